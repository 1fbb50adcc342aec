#include "gpu_import.h"

#include <algorithm>
#include <cctype>
#include <memory>
#include <utility>

namespace weightd::gpu {

namespace {

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace

GpuImport::GpuImport(GpuImport&& o) noexcept
    : api_(std::exchange(o.api_, nullptr)),
      kind_(std::exchange(o.kind_, Kind::kNone)),
      ordinal_(std::exchange(o.ordinal_, -1)),
      ptr_(std::exchange(o.ptr_, 0)),
      size_(std::exchange(o.size_, 0)),
      handle_(std::exchange(o.handle_, 0)) {}

GpuImport& GpuImport::operator=(GpuImport&& o) noexcept {
  if (this != &o) {
    Reset();
    api_ = std::exchange(o.api_, nullptr);
    kind_ = std::exchange(o.kind_, Kind::kNone);
    ordinal_ = std::exchange(o.ordinal_, -1);
    ptr_ = std::exchange(o.ptr_, 0);
    size_ = std::exchange(o.size_, 0);
    handle_ = std::exchange(o.handle_, 0);
  }
  return *this;
}

GpuImport::~GpuImport() { Reset(); }

void GpuImport::Reset() {
  // Errors here cannot be reported to anyone: the process is dropping its view, and CUDA
  // reclaims an import at process exit in any case.
  if (kind_ == Kind::kVmm) {
    (void)api_->SetDevice(ordinal_);
    if (ptr_ != 0) {
      (void)api_->MemUnmap(ptr_, size_);
      (void)api_->AddressFree(ptr_, size_);
    }
    if (handle_ != 0) (void)api_->MemRelease(handle_);
  } else if (kind_ == Kind::kLegacy && ptr_ != 0) {
    (void)api_->SetDevice(ordinal_);
    (void)api_->IpcCloseMemHandle(ptr_);
  }
  kind_ = Kind::kNone;
  ptr_ = 0;
  handle_ = 0;
  size_ = 0;
}

Result<GpuImport> GpuImport::ImportVmm(CudaApi* api, int ordinal, int fd, std::uint64_t alloc_size) {
  const std::string what = "importing a VMM allocation of " + std::to_string(alloc_size) + " bytes on cuda:" +
                           std::to_string(ordinal);
  if (fd < 0) return InvalidArgument(what + ": no fd", "gpu.bad_import");
  RETURN_IF_ERROR(api->SetDevice(ordinal).WithContext(what));
  ASSIGN_OR_RETURN(std::uint64_t granularity, api->AllocationGranularity(ordinal));
  if (alloc_size == 0 || alloc_size % granularity != 0)
    return InvalidArgument(what + ": size is not a positive multiple of the granularity (" +
                               std::to_string(granularity) + ")",
                           "gpu.bad_import");
  GpuImport im;
  im.api_ = api;
  im.kind_ = Kind::kVmm;
  im.ordinal_ = ordinal;
  auto h = api->ImportFd(fd);
  if (!h.ok()) return h.status().WithContext(what);
  im.handle_ = *h;
  auto va = api->AddressReserve(alloc_size, granularity);
  if (!va.ok()) return va.status().WithContext(what);
  // From here on Reset() unmaps [ptr_, ptr_+size_): map before recording the pointer would leave
  // a reservation unfreed on failure, so free it explicitly.
  Status s = api->MemMap(*va, alloc_size, im.handle_);
  if (!s.ok()) {
    (void)api->AddressFree(*va, alloc_size);
    return s.WithContext(what);
  }
  im.ptr_ = *va;
  im.size_ = alloc_size;
  RETURN_IF_ERROR(api->SetAccess(im.ptr_, alloc_size, ordinal, Access::kRead).WithContext(what));
  return im;
}

Result<GpuImport> GpuImport::ImportLegacy(CudaApi* api, int ordinal, std::string_view handle, std::uint64_t size) {
  const std::string what = "opening a CUDA IPC handle on cuda:" + std::to_string(ordinal);
  if (handle.size() != kIpcHandleSize)
    return InvalidArgument(what + ": handle is " + std::to_string(handle.size()) + " bytes, expected " +
                               std::to_string(kIpcHandleSize),
                           "gpu.bad_ipc_handle");
  RETURN_IF_ERROR(api->SetDevice(ordinal).WithContext(what));
  ASSIGN_OR_RETURN(DevicePtr p, api->IpcOpenMemHandle(handle));
  GpuImport im;
  im.api_ = api;
  im.kind_ = Kind::kLegacy;
  im.ordinal_ = ordinal;
  im.ptr_ = p;
  im.size_ = size;
  return im;
}

Result<int> FindLocalOrdinal(CudaApi* api, std::string_view uuid) {
  ASSIGN_OR_RETURN(int n, api->DeviceCount());
  const std::string want = Lower(uuid);
  std::string seen;
  for (int i = 0; i < n; ++i) {
    ASSIGN_OR_RETURN(DeviceInfo d, api->GetDeviceInfo(i));
    if (Lower(d.uuid) == want) return i;
    seen += (seen.empty() ? "" : ", ") + d.uuid;
  }
  return NotFound("the daemon's GPU " + std::string(uuid) + " is not visible to this process (visible: " +
                      (seen.empty() ? "none" : seen) + "); check CUDA_VISIBLE_DEVICES",
                  "gpu.device_not_visible");
}

ContextWarmup ContextWarmup::Start(CudaApi* api, int ordinal) {
  ContextWarmup w;
  auto info = std::make_shared<std::promise<Result<DeviceInfo>>>();
  w.info_ = info->get_future();
  w.ready_ = std::async(std::launch::async, [api, ordinal, info]() -> Result<DeviceInfo> {
    Result<DeviceInfo> d = api->GetDeviceInfo(ordinal);
    info->set_value(d);
    if (!d.ok()) return d;
    RETURN_IF_ERROR(api->SetDevice(ordinal));
    return d;
  });
  return w;
}

ContextWarmup::~ContextWarmup() {
  if (ready_.valid()) ready_.wait();
}

const Result<DeviceInfo>& ContextWarmup::Device() {
  if (!info_done_.has_value()) {
    if (info_.valid()) info_done_.emplace(info_.get());
    else info_done_.emplace(FailedPrecondition("context warm-up was never started", "gpu.no_warmup"));
  }
  return *info_done_;
}

const Result<DeviceInfo>& ContextWarmup::Wait() {
  if (!done_.has_value()) {
    if (ready_.valid()) done_.emplace(ready_.get());
    else done_.emplace(FailedPrecondition("context warm-up was never started", "gpu.no_warmup"));
  }
  return *done_;
}

}  // namespace weightd::gpu
