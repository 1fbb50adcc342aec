// cuda_api.h — the small slice of CUDA that the GPU tier (daemon) and the GPU importer (client
// library) use, behind an interface so that bookkeeping is testable without a GPU.
//
// Contract:
//  - No CUDA type appears here: device pointers and VMM allocation handles are opaque 64-bit
//    values, streams are opaque pointers. The header compiles without the CUDA toolkit.
//  - Every method returns a Status/Result. The real implementation converts each cudaError_t /
//    CUresult exactly once, naming the call, the device and the byte count. Out of memory is
//    ResourceExhausted ("gpu.out_of_memory"); a missing driver or device is Unavailable
//    ("gpu.no_device"); anything else is Internal ("gpu.cuda_error" / "gpu.cu_error").
//  - "Current device" follows the CUDA runtime: it is per thread. SetDevice(ordinal) binds the
//    calling thread to the device's primary context (creating it the first time, 130-150 ms on
//    an H100). Malloc, StreamCreate, the copies and the VMM calls act on the current device;
//    call SetDevice on each thread before using them. Ordinals are this process's ordinals
//    (CUDA_VISIBLE_DEVICES renumbers); UUIDs are stable across processes.
//  - Implementations are thread-safe. Ownership of what they hand out (handles, mappings,
//    streams, pinned buffers) stays with the caller, who must release it with the matching
//    call; RAII wrappers live in gpu_tier.h and gpu_import.h.
//  - The CudaApi object must outlive everything allocated through it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "posix.h"
#include "status_macros.h"

namespace weightd::gpu {

using DevicePtr = std::uint64_t;   // CUdeviceptr; 0 is "none"
using MemHandle = std::uint64_t;   // CUmemGenericAllocationHandle; 0 is "none"
using Stream = void*;              // cudaStream_t

inline constexpr std::size_t kIpcHandleSize = 64;  // sizeof(cudaIpcMemHandle_t)

struct DeviceInfo {
  int ordinal = -1;
  std::string name;           // "NVIDIA H100 80GB HBM3"
  std::string uuid;           // "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi prints it
  std::uint64_t total_bytes = 0;
  bool host_register_read_only = false;  // cudaDevAttrHostRegisterReadOnlySupported
  bool vmm_posix_fd = false;             // VMM with POSIX-fd shareable handles is supported
};

struct MemInfo {
  std::uint64_t free_bytes = 0;
  std::uint64_t total_bytes = 0;
};

enum class Access : std::uint8_t { kRead, kReadWrite };

// Formats 16 raw UUID bytes the way nvidia-smi does ("GPU-" + 8-4-4-4-12 lowercase hex).
std::string FormatGpuUuid(const unsigned char (&bytes)[16]);

class CudaApi {
 public:
  virtual ~CudaApi() = default;

  // ---- devices ------------------------------------------------------------------------------
  virtual Result<int> DeviceCount() = 0;
  virtual Result<DeviceInfo> GetDeviceInfo(int ordinal) = 0;
  // Needs (and creates) the device's primary context on the calling thread.
  virtual Result<MemInfo> GetMemInfo(int ordinal) = 0;
  virtual Status SetDevice(int ordinal) = 0;
  // Whether `ordinal` can read `peer`'s memory directly (NVLink or PCIe peer-to-peer), as
  // cudaDeviceCanAccessPeer says; false for a device and itself.
  virtual Result<bool> CanAccessPeer(int ordinal, int peer) = 0;

  // ---- VMM (driver API) ---------------------------------------------------------------------
  // Recommended granularity of a pinned device allocation that can be exported as a POSIX fd.
  virtual Result<std::uint64_t> AllocationGranularity(int ordinal) = 0;
  // cuMemCreate of `size` bytes (a multiple of the granularity) on `ordinal`, exportable as a
  // POSIX file descriptor.
  virtual Result<MemHandle> MemCreate(int ordinal, std::uint64_t size) = 0;
  virtual Result<DevicePtr> AddressReserve(std::uint64_t size, std::uint64_t alignment) = 0;
  virtual Status MemMap(DevicePtr va, std::uint64_t size, MemHandle handle) = 0;
  // Grants `ordinal` `access` to [va, va+size). Importers use kRead (CU_MEM_ACCESS_FLAGS_PROT_READ).
  virtual Status SetAccess(DevicePtr va, std::uint64_t size, int ordinal, Access access) = 0;
  // A new close-on-exec fd referring to the allocation; each call returns a fresh fd.
  virtual Result<posix::Fd> ExportFd(MemHandle handle) = 0;
  // The fd is not consumed; the caller may close it once this returns.
  virtual Result<MemHandle> ImportFd(int fd) = 0;
  virtual Status MemUnmap(DevicePtr va, std::uint64_t size) = 0;
  virtual Status AddressFree(DevicePtr va, std::uint64_t size) = 0;
  // Drops this process's reference; the memory lives on while any mapping or importer holds it.
  virtual Status MemRelease(MemHandle handle) = 0;

  // ---- legacy allocations and IPC (runtime API) ---------------------------------------------
  virtual Result<DevicePtr> Malloc(std::uint64_t size) = 0;
  virtual Status Free(DevicePtr ptr) = 0;
  // The 64 opaque bytes of a cudaIpcMemHandle_t.
  virtual Result<std::string> IpcGetMemHandle(DevicePtr ptr) = 0;
  // Opens a handle exported by another process (size checked: exactly kIpcHandleSize bytes).
  virtual Result<DevicePtr> IpcOpenMemHandle(std::string_view handle) = 0;
  virtual Status IpcCloseMemHandle(DevicePtr ptr) = 0;

  // ---- host memory --------------------------------------------------------------------------
  // Page-locks [ptr, ptr+size) for DMA. With `read_only` the GPU only reads it, which allows
  // registering a PROT_READ mapping. Registering an already registered range fails with
  // FailedPrecondition "gpu.host_already_registered".
  virtual Status HostRegister(const void* ptr, std::uint64_t size, bool read_only) = 0;
  virtual Status HostUnregister(const void* ptr) = 0;
  virtual Result<void*> HostAllocPinned(std::uint64_t size) = 0;
  virtual Status HostFreePinned(void* ptr) = 0;

  // ---- streams and copies (current device) --------------------------------------------------
  // A non-blocking stream (does not synchronize with the legacy default stream).
  virtual Result<Stream> StreamCreate() = 0;
  virtual Status StreamDestroy(Stream stream) = 0;
  virtual Status CopyHostToDeviceAsync(DevicePtr dst, const void* src, std::uint64_t size, Stream stream) = 0;
  // Between two devices too (unified addressing): the current device must have access to both
  // ranges, its own and, for VMM memory of a peer, one granted with SetAccess.
  virtual Status CopyDeviceToDeviceAsync(DevicePtr dst, DevicePtr src, std::uint64_t size, Stream stream) = 0;
  virtual Status StreamSynchronize(Stream stream) = 0;
  // Synchronous; for verification and tests.
  virtual Status CopyDeviceToHost(void* dst, DevicePtr src, std::uint64_t size) = 0;
};

// The real CUDA. The runtime is linked statically; the driver API is reached at run time via
// cudaGetDriverEntryPointByVersion, so the binary starts on machines without libcuda.so.1.
// Fails with Unavailable "gpu.no_device" when there is no driver or no device, and with
// Unavailable "gpu.no_cuda" when weightd was built without CUDA.
Result<std::unique_ptr<CudaApi>> LoadCudaApi();

}  // namespace weightd::gpu
