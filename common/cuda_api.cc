#include "cuda_api.h"

#include <cstdio>
#include <cstring>

#if WEIGHTD_WITH_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>
#include <fcntl.h>
#endif

namespace weightd::gpu {

std::string FormatGpuUuid(const unsigned char (&b)[16]) {
  char buf[64];
  std::snprintf(buf, sizeof(buf),
                "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2],
                b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
  return buf;
}

#if !WEIGHTD_WITH_CUDA

Result<std::unique_ptr<CudaApi>> LoadCudaApi() {
  return Unavailable("no CUDA device: weightd was built without CUDA", "gpu.no_cuda");
}

#else

namespace {

std::string Bytes(std::uint64_t n) { return std::to_string(n) + " bytes"; }

// The one place a cudaError_t becomes a Status.
Status CudaStatus(cudaError_t e, std::string_view what) {
  std::string m(what);
  m += ": ";
  m += cudaGetErrorName(e);
  m += " (";
  m += cudaGetErrorString(e);
  m += ")";
  // Clear the non-sticky per-thread error so that it does not surface from a later call.
  (void)cudaGetLastError();
  switch (e) {
    case cudaErrorMemoryAllocation:
      return ResourceExhausted(std::move(m), "gpu.out_of_memory");
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorStubLibrary:
    case cudaErrorCallRequiresNewerDriver:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorInitializationError:
      return Unavailable("no CUDA device: " + m, "gpu.no_device");
    case cudaErrorInvalidDevice:
      return InvalidArgument(std::move(m), "gpu.invalid_device");
    case cudaErrorHostMemoryAlreadyRegistered:
      return FailedPrecondition(std::move(m), "gpu.host_already_registered");
    case cudaErrorNotSupported:
      return FailedPrecondition(std::move(m), "gpu.not_supported");
    default:
      return Internal(std::move(m), "gpu.cuda_error");
  }
}

#define WEIGHTD_CUDA(call, what)                              \
  do {                                                        \
    cudaError_t weightd_cuda_err_ = (call);                   \
    if (weightd_cuda_err_ != cudaSuccess)                     \
      return CudaStatus(weightd_cuda_err_, (what));           \
  } while (0)

struct DriverApi {
  PFN_cuGetErrorName_v6000 cuGetErrorName = nullptr;
  PFN_cuDeviceGet_v2000 cuDeviceGet = nullptr;
  PFN_cuDeviceGetAttribute_v2000 cuDeviceGetAttribute = nullptr;
  PFN_cuMemGetAllocationGranularity_v10020 cuMemGetAllocationGranularity = nullptr;
  PFN_cuMemCreate_v10020 cuMemCreate = nullptr;
  PFN_cuMemAddressReserve_v10020 cuMemAddressReserve = nullptr;
  PFN_cuMemMap_v10020 cuMemMap = nullptr;
  PFN_cuMemSetAccess_v10020 cuMemSetAccess = nullptr;
  PFN_cuMemExportToShareableHandle_v10020 cuMemExportToShareableHandle = nullptr;
  PFN_cuMemImportFromShareableHandle_v10020 cuMemImportFromShareableHandle = nullptr;
  PFN_cuMemUnmap_v10020 cuMemUnmap = nullptr;
  PFN_cuMemAddressFree_v10020 cuMemAddressFree = nullptr;
  PFN_cuMemRelease_v10020 cuMemRelease = nullptr;
};

// Every driver entry point is requested at the CUDA 12.0 ABI: the cuMem* signatures have not
// changed since 10.2, and a CUDA 13 runtime needs a newer driver anyway.
constexpr unsigned int kDriverAbi = 12000;

template <typename Fn>
Status LoadEntry(const char* name, Fn* out) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
  cudaError_t e = cudaGetDriverEntryPointByVersion(name, &p, kDriverAbi, cudaEnableDefault, &q);
  if (e != cudaSuccess) return CudaStatus(e, std::string("cudaGetDriverEntryPointByVersion(") + name + ")");
  if (q != cudaDriverEntryPointSuccess || p == nullptr)
    return Unavailable(std::string("no CUDA device: the CUDA driver lacks ") + name, "gpu.no_device");
  *out = reinterpret_cast<Fn>(p);
  return Status::Ok();
}

class RealCudaApi final : public CudaApi {
 public:
  Status Init() {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) return CudaStatus(e, "cudaGetDeviceCount");
    if (n <= 0) return Unavailable("no CUDA device: cudaGetDeviceCount found none", "gpu.no_device");
    device_count_ = n;
    RETURN_IF_ERROR(LoadEntry("cuGetErrorName", &d_.cuGetErrorName));
    RETURN_IF_ERROR(LoadEntry("cuDeviceGet", &d_.cuDeviceGet));
    RETURN_IF_ERROR(LoadEntry("cuDeviceGetAttribute", &d_.cuDeviceGetAttribute));
    RETURN_IF_ERROR(LoadEntry("cuMemGetAllocationGranularity", &d_.cuMemGetAllocationGranularity));
    RETURN_IF_ERROR(LoadEntry("cuMemCreate", &d_.cuMemCreate));
    RETURN_IF_ERROR(LoadEntry("cuMemAddressReserve", &d_.cuMemAddressReserve));
    RETURN_IF_ERROR(LoadEntry("cuMemMap", &d_.cuMemMap));
    RETURN_IF_ERROR(LoadEntry("cuMemSetAccess", &d_.cuMemSetAccess));
    RETURN_IF_ERROR(LoadEntry("cuMemExportToShareableHandle", &d_.cuMemExportToShareableHandle));
    RETURN_IF_ERROR(LoadEntry("cuMemImportFromShareableHandle", &d_.cuMemImportFromShareableHandle));
    RETURN_IF_ERROR(LoadEntry("cuMemUnmap", &d_.cuMemUnmap));
    RETURN_IF_ERROR(LoadEntry("cuMemAddressFree", &d_.cuMemAddressFree));
    RETURN_IF_ERROR(LoadEntry("cuMemRelease", &d_.cuMemRelease));
    return Status::Ok();
  }

  Result<int> DeviceCount() override { return device_count_; }

  Result<DeviceInfo> GetDeviceInfo(int ordinal) override {
    RETURN_IF_ERROR(CheckOrdinal(ordinal));
    cudaDeviceProp p{};
    WEIGHTD_CUDA(cudaGetDeviceProperties(&p, ordinal), "cudaGetDeviceProperties(cuda:" + std::to_string(ordinal) + ")");
    DeviceInfo info;
    info.ordinal = ordinal;
    info.name = p.name;
    unsigned char raw[16];
    std::memcpy(raw, p.uuid.bytes, sizeof(raw));
    info.uuid = FormatGpuUuid(raw);
    info.total_bytes = p.totalGlobalMem;
    info.host_register_read_only = p.hostRegisterReadOnlySupported != 0;
    ASSIGN_OR_RETURN(int cu_dev, CuDevice(ordinal));
    int vmm = 0, posix_fd = 0;
    RETURN_IF_ERROR(Cu(d_.cuDeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, cu_dev),
                       "cuDeviceGetAttribute(VMM, cuda:" + std::to_string(ordinal) + ")"));
    RETURN_IF_ERROR(Cu(d_.cuDeviceGetAttribute(&posix_fd, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
                                               cu_dev),
                       "cuDeviceGetAttribute(POSIX_FD, cuda:" + std::to_string(ordinal) + ")"));
    info.vmm_posix_fd = vmm != 0 && posix_fd != 0;
    return info;
  }

  Result<bool> CanAccessPeer(int ordinal, int peer) override {
    RETURN_IF_ERROR(CheckOrdinal(ordinal));
    RETURN_IF_ERROR(CheckOrdinal(peer));
    if (ordinal == peer) return false;
    int can = 0;
    WEIGHTD_CUDA(cudaDeviceCanAccessPeer(&can, ordinal, peer),
                 "cudaDeviceCanAccessPeer(cuda:" + std::to_string(ordinal) + ", cuda:" + std::to_string(peer) + ")");
    return can != 0;
  }

  Result<MemInfo> GetMemInfo(int ordinal) override {
    RETURN_IF_ERROR(CheckOrdinal(ordinal));
    int previous = 0;
    WEIGHTD_CUDA(cudaGetDevice(&previous), "cudaGetDevice");
    RETURN_IF_ERROR(SetDevice(ordinal));
    std::size_t free_b = 0, total_b = 0;
    cudaError_t e = cudaMemGetInfo(&free_b, &total_b);
    if (previous != ordinal) (void)cudaSetDevice(previous);
    if (e != cudaSuccess) return CudaStatus(e, "cudaMemGetInfo(cuda:" + std::to_string(ordinal) + ")");
    return MemInfo{free_b, total_b};
  }

  Status SetDevice(int ordinal) override {
    RETURN_IF_ERROR(CheckOrdinal(ordinal));
    // Since CUDA 12 cudaSetDevice creates the primary context, so the driver calls that follow
    // on this thread have a current context.
    WEIGHTD_CUDA(cudaSetDevice(ordinal), "cudaSetDevice(cuda:" + std::to_string(ordinal) + ")");
    return Status::Ok();
  }

  Result<std::uint64_t> AllocationGranularity(int ordinal) override {
    ASSIGN_OR_RETURN(CUmemAllocationProp prop, Prop(ordinal));
    std::size_t g = 0;
    RETURN_IF_ERROR(Cu(d_.cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
                       "cuMemGetAllocationGranularity(cuda:" + std::to_string(ordinal) + ")"));
    if (g == 0) return Internal("cuMemGetAllocationGranularity returned 0", "gpu.cu_error");
    return static_cast<std::uint64_t>(g);
  }

  Result<MemHandle> MemCreate(int ordinal, std::uint64_t size) override {
    ASSIGN_OR_RETURN(CUmemAllocationProp prop, Prop(ordinal));
    CUmemGenericAllocationHandle h = 0;
    RETURN_IF_ERROR(Cu(d_.cuMemCreate(&h, size, &prop, 0),
                       "cuMemCreate(cuda:" + std::to_string(ordinal) + ", " + Bytes(size) + ")"));
    return static_cast<MemHandle>(h);
  }

  Result<DevicePtr> AddressReserve(std::uint64_t size, std::uint64_t alignment) override {
    CUdeviceptr p = 0;
    RETURN_IF_ERROR(Cu(d_.cuMemAddressReserve(&p, size, alignment, 0, 0), "cuMemAddressReserve(" + Bytes(size) + ")"));
    return static_cast<DevicePtr>(p);
  }

  Status MemMap(DevicePtr va, std::uint64_t size, MemHandle handle) override {
    return Cu(d_.cuMemMap(va, size, 0, handle, 0), "cuMemMap(" + Bytes(size) + ")");
  }

  Status SetAccess(DevicePtr va, std::uint64_t size, int ordinal, Access access) override {
    ASSIGN_OR_RETURN(int cu_dev, CuDevice(ordinal));
    CUmemAccessDesc desc{};
    desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    desc.location.id = cu_dev;
    desc.flags = access == Access::kRead ? CU_MEM_ACCESS_FLAGS_PROT_READ : CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    return Cu(d_.cuMemSetAccess(va, size, &desc, 1),
              "cuMemSetAccess(cuda:" + std::to_string(ordinal) + ", " + Bytes(size) +
                  (access == Access::kRead ? ", read)" : ", read-write)"));
  }

  Result<posix::Fd> ExportFd(MemHandle handle) override {
    int fd = -1;
    RETURN_IF_ERROR(Cu(d_.cuMemExportToShareableHandle(&fd, handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
                       "cuMemExportToShareableHandle(POSIX_FD)"));
    posix::Fd out(fd);
    // The driver creates it close-on-exec today; make sure, since the daemon may spawn helpers.
    int flags = ::fcntl(fd, F_GETFD);
    if (flags < 0 || ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC) != 0)
      return posix::ErrnoStatus("fcntl(exported CUDA fd, FD_CLOEXEC)");
    return out;
  }

  Result<MemHandle> ImportFd(int fd) override {
    CUmemGenericAllocationHandle h = 0;
    RETURN_IF_ERROR(Cu(d_.cuMemImportFromShareableHandle(&h, reinterpret_cast<void*>(static_cast<std::intptr_t>(fd)),
                                                         CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                       "cuMemImportFromShareableHandle(fd " + std::to_string(fd) + ")"));
    return static_cast<MemHandle>(h);
  }

  Status MemUnmap(DevicePtr va, std::uint64_t size) override {
    return Cu(d_.cuMemUnmap(va, size), "cuMemUnmap(" + Bytes(size) + ")");
  }
  Status AddressFree(DevicePtr va, std::uint64_t size) override {
    return Cu(d_.cuMemAddressFree(va, size), "cuMemAddressFree(" + Bytes(size) + ")");
  }
  Status MemRelease(MemHandle handle) override { return Cu(d_.cuMemRelease(handle), "cuMemRelease"); }

  Result<DevicePtr> Malloc(std::uint64_t size) override {
    void* p = nullptr;
    WEIGHTD_CUDA(cudaMalloc(&p, size), "cudaMalloc(" + Bytes(size) + ")");
    return reinterpret_cast<DevicePtr>(p);
  }
  Status Free(DevicePtr ptr) override {
    WEIGHTD_CUDA(cudaFree(reinterpret_cast<void*>(ptr)), "cudaFree");
    return Status::Ok();
  }

  Result<std::string> IpcGetMemHandle(DevicePtr ptr) override {
    cudaIpcMemHandle_t h{};
    static_assert(sizeof(h) == kIpcHandleSize);
    WEIGHTD_CUDA(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(ptr)), "cudaIpcGetMemHandle");
    return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
  }
  Result<DevicePtr> IpcOpenMemHandle(std::string_view handle) override {
    if (handle.size() != kIpcHandleSize)
      return InvalidArgument("CUDA IPC handle is " + std::to_string(handle.size()) + " bytes, expected " +
                                 std::to_string(kIpcHandleSize),
                             "gpu.bad_ipc_handle");
    cudaIpcMemHandle_t h{};
    std::memcpy(&h, handle.data(), sizeof(h));
    void* p = nullptr;
    WEIGHTD_CUDA(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
    return reinterpret_cast<DevicePtr>(p);
  }
  Status IpcCloseMemHandle(DevicePtr ptr) override {
    WEIGHTD_CUDA(cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr)), "cudaIpcCloseMemHandle");
    return Status::Ok();
  }

  Status HostRegister(const void* ptr, std::uint64_t size, bool read_only) override {
    unsigned flags = cudaHostRegisterPortable | (read_only ? cudaHostRegisterReadOnly : 0u);
    WEIGHTD_CUDA(cudaHostRegister(const_cast<void*>(ptr), size, flags),
                 std::string("cudaHostRegister(") + Bytes(size) + (read_only ? ", read-only)" : ")"));
    return Status::Ok();
  }
  Status HostUnregister(const void* ptr) override {
    WEIGHTD_CUDA(cudaHostUnregister(const_cast<void*>(ptr)), "cudaHostUnregister");
    return Status::Ok();
  }
  Result<void*> HostAllocPinned(std::uint64_t size) override {
    void* p = nullptr;
    WEIGHTD_CUDA(cudaHostAlloc(&p, size, cudaHostAllocPortable), "cudaHostAlloc(" + Bytes(size) + ")");
    return p;
  }
  Status HostFreePinned(void* ptr) override {
    WEIGHTD_CUDA(cudaFreeHost(ptr), "cudaFreeHost");
    return Status::Ok();
  }

  Result<Stream> StreamCreate() override {
    cudaStream_t s = nullptr;
    WEIGHTD_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    return static_cast<Stream>(s);
  }
  Status StreamDestroy(Stream stream) override {
    WEIGHTD_CUDA(cudaStreamDestroy(static_cast<cudaStream_t>(stream)), "cudaStreamDestroy");
    return Status::Ok();
  }
  Status CopyHostToDeviceAsync(DevicePtr dst, const void* src, std::uint64_t size, Stream stream) override {
    WEIGHTD_CUDA(cudaMemcpyAsync(reinterpret_cast<void*>(dst), src, size, cudaMemcpyHostToDevice,
                                 static_cast<cudaStream_t>(stream)),
                 "cudaMemcpyAsync(host to device, " + Bytes(size) + ")");
    return Status::Ok();
  }
  Status CopyDeviceToDeviceAsync(DevicePtr dst, DevicePtr src, std::uint64_t size, Stream stream) override {
    WEIGHTD_CUDA(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), size,
                                 cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)),
                 "cudaMemcpyAsync(device to device, " + Bytes(size) + ")");
    return Status::Ok();
  }
  Status StreamSynchronize(Stream stream) override {
    WEIGHTD_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
    return Status::Ok();
  }
  Status CopyDeviceToHost(void* dst, DevicePtr src, std::uint64_t size) override {
    WEIGHTD_CUDA(cudaMemcpy(dst, reinterpret_cast<const void*>(src), size, cudaMemcpyDeviceToHost),
                 "cudaMemcpy(device to host, " + Bytes(size) + ")");
    return Status::Ok();
  }

 private:
  Status CheckOrdinal(int ordinal) const {
    if (ordinal < 0 || ordinal >= device_count_)
      return InvalidArgument("CUDA device ordinal " + std::to_string(ordinal) + " out of range (" +
                                 std::to_string(device_count_) + " devices)",
                             "gpu.invalid_device");
    return Status::Ok();
  }

  Result<int> CuDevice(int ordinal) {
    RETURN_IF_ERROR(CheckOrdinal(ordinal));
    CUdevice dev = 0;
    RETURN_IF_ERROR(Cu(d_.cuDeviceGet(&dev, ordinal), "cuDeviceGet(" + std::to_string(ordinal) + ")"));
    return static_cast<int>(dev);
  }

  Result<CUmemAllocationProp> Prop(int ordinal) {
    ASSIGN_OR_RETURN(int cu_dev, CuDevice(ordinal));
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = cu_dev;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    return prop;
  }

  // The one place a CUresult becomes a Status.
  Status Cu(CUresult r, std::string_view what) const {
    if (r == CUDA_SUCCESS) return Status::Ok();
    const char* name = nullptr;
    if (d_.cuGetErrorName == nullptr || d_.cuGetErrorName(r, &name) != CUDA_SUCCESS || name == nullptr)
      name = "CUDA_ERROR_UNKNOWN";
    std::string m(what);
    m += ": ";
    m += name;
    m += " (" + std::to_string(static_cast<int>(r)) + ")";
    switch (r) {
      case CUDA_ERROR_OUT_OF_MEMORY:
        return ResourceExhausted(std::move(m), "gpu.out_of_memory");
      case CUDA_ERROR_NO_DEVICE:
      case CUDA_ERROR_NOT_INITIALIZED:
      case CUDA_ERROR_DEINITIALIZED:
      case CUDA_ERROR_STUB_LIBRARY:
      case CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
        return Unavailable("no CUDA device: " + m, "gpu.no_device");
      case CUDA_ERROR_INVALID_DEVICE:
        return InvalidArgument(std::move(m), "gpu.invalid_device");
      case CUDA_ERROR_NOT_SUPPORTED:
        return FailedPrecondition(std::move(m), "gpu.not_supported");
      case CUDA_ERROR_INVALID_HANDLE:
        return InvalidArgument(std::move(m), "gpu.invalid_handle");
      default:
        return Internal(std::move(m), "gpu.cu_error");
    }
  }

  // Const after Init().
  int device_count_ = 0;
  DriverApi d_;
};

}  // namespace

Result<std::unique_ptr<CudaApi>> LoadCudaApi() {
  auto api = std::make_unique<RealCudaApi>();
  RETURN_IF_ERROR(api->Init());
  return std::unique_ptr<CudaApi>(std::move(api));
}

#endif  // WEIGHTD_WITH_CUDA

}  // namespace weightd::gpu
