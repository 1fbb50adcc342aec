#include "support/fake_cuda.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace weightd::testing {

namespace {

constexpr char kIpcMagic[8] = {'W', 'T', 'D', 'F', 'A', 'K', 'E', '1'};

struct IpcPayload {
  char magic[8];
  std::int32_t pid;
  std::int32_t fd;
  std::uint64_t size;
};
static_assert(sizeof(IpcPayload) <= gpu::kIpcHandleSize);

Status Oom(std::string what) { return ResourceExhausted("fake " + what + ": out of memory", "gpu.out_of_memory"); }

}  // namespace

std::string FakeUuid(int ordinal) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "GPU-fa4e0000-0000-4000-8000-%012x", ordinal + 1);
  return buf;
}

FakeCudaApi::FakeCudaApi(std::vector<Device> devices, std::uint64_t granularity)
    : devices_(std::move(devices)), granularity_(granularity), allocated_(devices_.size(), 0) {
  for (std::size_t i = 0; i < devices_.size(); ++i)
    if (devices_[i].uuid.empty()) devices_[i].uuid = FakeUuid(static_cast<int>(i));
}

FakeCudaApi::~FakeCudaApi() {
  // Release whatever a test leaked so that one failing test does not poison the next; the
  // counters already told the test about it.
  for (auto& [base, r] : regions_) {
    ::munmap(reinterpret_cast<void*>(base), r.size);
    if (r.kind == Region::kMalloc) ::close(r.fd);
  }
  for (auto& [base, size] : reservations_) ::munmap(reinterpret_cast<void*>(base), size);
  for (auto& [id, h] : handles_) ::close(h.fd);
  for (auto& [p, size] : pinned_) ::munmap(const_cast<void*>(p), size);
}

void FakeCudaApi::FailAllocationAt(int n) {
  std::lock_guard lock(mu_);
  fail_alloc_in_ = n;
}

void FakeCudaApi::SetHostRegisterFails(bool fails) {
  std::lock_guard lock(mu_);
  host_register_fails_ = fails;
}

void FakeCudaApi::SetHostRegisterHook(std::function<void(const void*, std::uint64_t)> hook) {
  std::lock_guard lock(mu_);
  host_register_hook_ = std::move(hook);
}

void FakeCudaApi::SetPeerAccess(bool on) {
  std::lock_guard lock(mu_);
  peer_access_ = on;
}

void FakeCudaApi::SetPeerCopiesFail(bool fail) {
  std::lock_guard lock(mu_);
  peer_copies_fail_ = fail;
}

FakeCudaApi::Counters FakeCudaApi::counters() const {
  std::lock_guard lock(mu_);
  return c_;
}

std::vector<FakeCudaApi::CopyRecord> FakeCudaApi::h2d_log() const {
  std::lock_guard lock(mu_);
  return log_;
}

void FakeCudaApi::ClearLog() {
  std::lock_guard lock(mu_);
  log_.clear();
}

std::uint64_t FakeCudaApi::allocated_bytes(int ordinal) const {
  std::lock_guard lock(mu_);
  return allocated_.at(static_cast<std::size_t>(ordinal));
}

Status FakeCudaApi::CheckOrdinalLocked(int ordinal) const {
  if (ordinal < 0 || static_cast<std::size_t>(ordinal) >= devices_.size())
    return InvalidArgument("fake: device ordinal " + std::to_string(ordinal) + " out of range", "gpu.invalid_device");
  return Status::Ok();
}

Result<int> FakeCudaApi::CurrentDeviceLocked() const {
  auto it = current_device_.find(std::this_thread::get_id());
  if (it == current_device_.end())
    return FailedPrecondition("fake: no current device on this thread (call SetDevice first)", "fake.no_current_device");
  return it->second;
}

Status FakeCudaApi::TakeAllocationLocked(int ordinal, std::uint64_t size) {
  ++c_.allocations_total;
  if (fail_alloc_in_ > 0 && --fail_alloc_in_ == 0) return Oom("allocation of " + std::to_string(size) + " bytes");
  auto& used = allocated_[static_cast<std::size_t>(ordinal)];
  if (used + size > devices_[static_cast<std::size_t>(ordinal)].total_bytes)
    return Oom("allocation of " + std::to_string(size) + " bytes on device " + std::to_string(ordinal));
  used += size;
  return Status::Ok();
}

Result<int> FakeCudaApi::DeviceCount() { return static_cast<int>(devices_.size()); }

Result<gpu::DeviceInfo> FakeCudaApi::GetDeviceInfo(int ordinal) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(CheckOrdinalLocked(ordinal));
  const Device& d = devices_[static_cast<std::size_t>(ordinal)];
  gpu::DeviceInfo info;
  info.ordinal = ordinal;
  info.name = d.name;
  info.uuid = d.uuid;
  info.total_bytes = d.total_bytes;
  info.host_register_read_only = d.host_register_read_only;
  info.vmm_posix_fd = d.vmm_posix_fd;
  return info;
}

Result<gpu::MemInfo> FakeCudaApi::GetMemInfo(int ordinal) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(CheckOrdinalLocked(ordinal));
  std::uint64_t total = devices_[static_cast<std::size_t>(ordinal)].total_bytes;
  return gpu::MemInfo{total - allocated_[static_cast<std::size_t>(ordinal)], total};
}

Status FakeCudaApi::SetDevice(int ordinal) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(CheckOrdinalLocked(ordinal));
  current_device_[std::this_thread::get_id()] = ordinal;
  return Status::Ok();
}

Result<bool> FakeCudaApi::CanAccessPeer(int ordinal, int peer) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(CheckOrdinalLocked(ordinal));
  RETURN_IF_ERROR(CheckOrdinalLocked(peer));
  return ordinal != peer && peer_access_;
}

Result<std::uint64_t> FakeCudaApi::AllocationGranularity(int ordinal) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(CheckOrdinalLocked(ordinal));
  return granularity_;
}

Result<gpu::MemHandle> FakeCudaApi::MemCreate(int ordinal, std::uint64_t size) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(CheckOrdinalLocked(ordinal));
  if (!devices_[static_cast<std::size_t>(ordinal)].vmm_posix_fd)
    return FailedPrecondition("fake: device has no VMM", "gpu.not_supported");
  if (size == 0 || size % granularity_ != 0)
    return InvalidArgument("fake cuMemCreate: size " + std::to_string(size) + " is not a positive multiple of " +
                               std::to_string(granularity_),
                           "gpu.invalid_value");
  RETURN_IF_ERROR(TakeAllocationLocked(ordinal, size));
  int fd = ::memfd_create("weightd-fake-vmm", MFD_CLOEXEC);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    Status s = posix::ErrnoStatus("fake memfd");
    if (fd >= 0) ::close(fd);
    allocated_[static_cast<std::size_t>(ordinal)] -= size;
    return s;
  }
  gpu::MemHandle id = next_handle_++;
  handles_[id] = Handle{fd, size, ordinal, false};
  ++c_.live_allocations;
  return id;
}

Result<gpu::DevicePtr> FakeCudaApi::AddressReserve(std::uint64_t size, std::uint64_t alignment) {
  std::lock_guard lock(mu_);
  if (size == 0 || size % posix::PageSize() != 0)
    return InvalidArgument("fake cuMemAddressReserve: bad size", "gpu.invalid_value");
  std::uint64_t align = std::max<std::uint64_t>(alignment, posix::PageSize());
  void* p = ::mmap(nullptr, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return posix::ErrnoStatus("fake reserve mmap");
  auto raw = reinterpret_cast<std::uint64_t>(p);
  std::uint64_t base = posix::RoundUp(raw, align);
  if (base > raw) ::munmap(p, base - raw);
  std::uint64_t tail = raw + size + align - (base + size);
  if (tail > 0) ::munmap(reinterpret_cast<void*>(base + size), tail);
  reservations_[base] = size;
  ++c_.live_reservations;
  return base;
}

Status FakeCudaApi::MemMap(gpu::DevicePtr va, std::uint64_t size, gpu::MemHandle handle) {
  std::lock_guard lock(mu_);
  auto h = handles_.find(handle);
  if (h == handles_.end()) return InvalidArgument("fake cuMemMap: unknown handle", "gpu.invalid_handle");
  if (size != h->second.size) return InvalidArgument("fake cuMemMap: size differs from the allocation", "gpu.invalid_value");
  auto r = reservations_.upper_bound(va);
  if (r == reservations_.begin()) return InvalidArgument("fake cuMemMap: address not reserved", "gpu.invalid_value");
  --r;
  if (va + size > r->first + r->second) return InvalidArgument("fake cuMemMap: range past the reservation", "gpu.invalid_value");
  if (FindRegionLocked(va, 1) != nullptr) return InvalidArgument("fake cuMemMap: already mapped", "gpu.invalid_value");
  void* p = ::mmap(reinterpret_cast<void*>(va), size, PROT_NONE, MAP_SHARED | MAP_FIXED, h->second.fd, 0);
  if (p == MAP_FAILED) return posix::ErrnoStatus("fake cuMemMap mmap");
  regions_[va] = Region{size, false, false, Region::kVmm, -1, h->second.ordinal};
  ++c_.live_mappings;
  return Status::Ok();
}

Status FakeCudaApi::SetAccess(gpu::DevicePtr va, std::uint64_t size, int ordinal, gpu::Access access) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(CheckOrdinalLocked(ordinal));
  auto it = regions_.find(va);
  if (it == regions_.end() || it->second.kind != Region::kVmm || it->second.size != size)
    return InvalidArgument("fake cuMemSetAccess: not a mapped range", "gpu.invalid_value");
  Region& r = it->second;
  if (r.ordinal >= 0 && r.ordinal != ordinal && !peer_access_)
    return FailedPrecondition("fake cuMemSetAccess: no peer access", "gpu.not_supported");
  r.access[ordinal] = access;
  bool rw = false;
  for (auto& [device, a] : r.access) rw = rw || a == gpu::Access::kReadWrite;
  if (::mprotect(reinterpret_cast<void*>(va), size, rw ? PROT_READ | PROT_WRITE : PROT_READ) != 0)
    return posix::ErrnoStatus("fake cuMemSetAccess mprotect");
  r.readable = true;
  r.writable = rw;
  return Status::Ok();
}

Result<posix::Fd> FakeCudaApi::ExportFd(gpu::MemHandle handle) {
  std::lock_guard lock(mu_);
  auto h = handles_.find(handle);
  if (h == handles_.end()) return InvalidArgument("fake export: unknown handle", "gpu.invalid_handle");
  int fd = ::fcntl(h->second.fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return posix::ErrnoStatus("fake export dup");
  return posix::Fd(fd);
}

Result<gpu::MemHandle> FakeCudaApi::ImportFd(int fd) {
  std::lock_guard lock(mu_);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return InvalidArgument("fake import: bad fd " + std::to_string(fd), "gpu.invalid_handle");
  int mine = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (mine < 0) return posix::ErrnoStatus("fake import dup");
  gpu::MemHandle id = next_handle_++;
  handles_[id] = Handle{mine, static_cast<std::uint64_t>(st.st_size), -1, true};  // its device is unknown here
  ++c_.live_allocations;
  return id;
}

Status FakeCudaApi::MemUnmap(gpu::DevicePtr va, std::uint64_t size) {
  std::lock_guard lock(mu_);
  auto it = regions_.find(va);
  if (it == regions_.end() || it->second.kind != Region::kVmm || it->second.size != size)
    return InvalidArgument("fake cuMemUnmap: not a mapped range", "gpu.invalid_value");
  // Back to reserved, inaccessible address space.
  void* p = ::mmap(reinterpret_cast<void*>(va), size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                   -1, 0);
  if (p == MAP_FAILED) return posix::ErrnoStatus("fake cuMemUnmap mmap");
  regions_.erase(it);
  --c_.live_mappings;
  return Status::Ok();
}

Status FakeCudaApi::AddressFree(gpu::DevicePtr va, std::uint64_t size) {
  std::lock_guard lock(mu_);
  auto it = reservations_.find(va);
  if (it == reservations_.end() || it->second != size)
    return InvalidArgument("fake cuMemAddressFree: not a reservation", "gpu.invalid_value");
  if (FindRegionLocked(va, size) != nullptr) return FailedPrecondition("fake cuMemAddressFree: still mapped", "gpu.invalid_value");
  ::munmap(reinterpret_cast<void*>(va), size);
  reservations_.erase(it);
  --c_.live_reservations;
  return Status::Ok();
}

Status FakeCudaApi::MemRelease(gpu::MemHandle handle) {
  std::lock_guard lock(mu_);
  auto h = handles_.find(handle);
  if (h == handles_.end()) return InvalidArgument("fake cuMemRelease: unknown handle", "gpu.invalid_handle");
  ::close(h->second.fd);
  if (!h->second.imported) allocated_[static_cast<std::size_t>(h->second.ordinal)] -= h->second.size;
  handles_.erase(h);
  --c_.live_allocations;
  return Status::Ok();
}

Result<gpu::DevicePtr> FakeCudaApi::Malloc(std::uint64_t size) {
  std::lock_guard lock(mu_);
  ASSIGN_OR_RETURN(int ordinal, CurrentDeviceLocked());
  std::uint64_t mapped = posix::RoundUp(std::max<std::uint64_t>(size, 1), posix::PageSize());
  RETURN_IF_ERROR(TakeAllocationLocked(ordinal, mapped));
  int fd = ::memfd_create("weightd-fake-malloc", MFD_CLOEXEC);
  void* p = MAP_FAILED;
  if (fd >= 0 && ::ftruncate(fd, static_cast<off_t>(mapped)) == 0)
    p = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    Status s = posix::ErrnoStatus("fake cudaMalloc");
    if (fd >= 0) ::close(fd);
    allocated_[static_cast<std::size_t>(ordinal)] -= mapped;
    return s;
  }
  auto base = reinterpret_cast<std::uint64_t>(p);
  regions_[base] = Region{mapped, true, true, Region::kMalloc, fd, ordinal};
  ++c_.live_allocations;
  return base;
}

Status FakeCudaApi::Free(gpu::DevicePtr ptr) {
  std::lock_guard lock(mu_);
  auto it = regions_.find(ptr);
  if (it == regions_.end() || it->second.kind != Region::kMalloc)
    return InvalidArgument("fake cudaFree: not an allocation", "gpu.invalid_value");
  ::munmap(reinterpret_cast<void*>(ptr), it->second.size);
  ::close(it->second.fd);
  allocated_[static_cast<std::size_t>(it->second.ordinal)] -= it->second.size;
  regions_.erase(it);
  --c_.live_allocations;
  return Status::Ok();
}

Result<std::string> FakeCudaApi::IpcGetMemHandle(gpu::DevicePtr ptr) {
  std::lock_guard lock(mu_);
  auto it = regions_.find(ptr);
  if (it == regions_.end() || it->second.kind != Region::kMalloc)
    return InvalidArgument("fake cudaIpcGetMemHandle: not an allocation", "gpu.invalid_value");
  IpcPayload pl{};
  std::memcpy(pl.magic, kIpcMagic, sizeof(kIpcMagic));
  pl.pid = static_cast<std::int32_t>(::getpid());
  pl.fd = it->second.fd;
  pl.size = it->second.size;
  std::string h(gpu::kIpcHandleSize, '\0');
  std::memcpy(h.data(), &pl, sizeof(pl));
  return h;
}

Result<gpu::DevicePtr> FakeCudaApi::IpcOpenMemHandle(std::string_view handle) {
  if (handle.size() != gpu::kIpcHandleSize)
    return InvalidArgument("fake cudaIpcOpenMemHandle: handle is " + std::to_string(handle.size()) + " bytes",
                           "gpu.bad_ipc_handle");
  IpcPayload pl{};
  std::memcpy(&pl, handle.data(), sizeof(pl));
  if (std::memcmp(pl.magic, kIpcMagic, sizeof(kIpcMagic)) != 0)
    return InvalidArgument("fake cudaIpcOpenMemHandle: not a handle", "gpu.invalid_handle");
  std::string path = "/proc/" + std::to_string(pl.pid) + "/fd/" + std::to_string(pl.fd);
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return InvalidArgument("fake cudaIpcOpenMemHandle: exporter gone (" + path + ")", "gpu.invalid_handle");
  void* p = ::mmap(nullptr, pl.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) return posix::ErrnoStatus("fake cudaIpcOpenMemHandle mmap");
  std::lock_guard lock(mu_);
  auto base = reinterpret_cast<std::uint64_t>(p);
  regions_[base] = Region{pl.size, true, true, Region::kIpc, -1, -1};
  ++c_.live_ipc_opens;
  return base;
}

Status FakeCudaApi::IpcCloseMemHandle(gpu::DevicePtr ptr) {
  std::lock_guard lock(mu_);
  auto it = regions_.find(ptr);
  if (it == regions_.end() || it->second.kind != Region::kIpc)
    return InvalidArgument("fake cudaIpcCloseMemHandle: not an opened handle", "gpu.invalid_value");
  ::munmap(reinterpret_cast<void*>(ptr), it->second.size);
  regions_.erase(it);
  --c_.live_ipc_opens;
  return Status::Ok();
}

Status FakeCudaApi::HostRegister(const void* ptr, std::uint64_t size, bool read_only) {
  std::function<void(const void*, std::uint64_t)> hook;
  {
    std::lock_guard lock(mu_);
    hook = host_register_hook_;
    c_.host_registrations_at_once = std::max(c_.host_registrations_at_once, ++host_registers_in_flight_);
  }
  if (hook) hook(ptr, size);
  std::lock_guard lock(mu_);
  --host_registers_in_flight_;
  ++c_.host_registrations_total;
  if (host_register_fails_) return Internal("fake cudaHostRegister: injected failure", "gpu.cuda_error");
  if (size == 0) return InvalidArgument("fake cudaHostRegister: empty range", "gpu.invalid_value");
  auto p = static_cast<const std::byte*>(ptr);
  for (auto& [q, n] : registered_) {
    auto b = static_cast<const std::byte*>(q);
    if (p < b + n && b < p + size)
      return FailedPrecondition("fake cudaHostRegister: already registered", "gpu.host_already_registered");
  }
  (void)read_only;
  registered_[ptr] = size;
  ++c_.live_host_registrations;
  return Status::Ok();
}

Status FakeCudaApi::HostUnregister(const void* ptr) {
  std::lock_guard lock(mu_);
  auto it = registered_.find(ptr);
  if (it == registered_.end()) return InvalidArgument("fake cudaHostUnregister: not registered", "gpu.invalid_value");
  if (PendingReadsLocked(ptr, it->second)) ++c_.unsafe_host_releases;
  registered_.erase(it);
  --c_.live_host_registrations;
  return Status::Ok();
}

Result<void*> FakeCudaApi::HostAllocPinned(std::uint64_t size) {
  std::lock_guard lock(mu_);
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return posix::ErrnoStatus("fake cudaHostAlloc");
  pinned_[p] = size;
  ++c_.live_pinned;
  ++c_.pinned_total;
  return p;
}

Status FakeCudaApi::HostFreePinned(void* ptr) {
  std::lock_guard lock(mu_);
  auto it = pinned_.find(ptr);
  if (it == pinned_.end()) return InvalidArgument("fake cudaFreeHost: not pinned", "gpu.invalid_value");
  if (PendingReadsLocked(ptr, it->second)) ++c_.unsafe_host_releases;
  ::munmap(ptr, it->second);
  pinned_.erase(it);
  --c_.live_pinned;
  return Status::Ok();
}

Result<gpu::Stream> FakeCudaApi::StreamCreate() {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(CurrentDeviceLocked().status());
  auto s = reinterpret_cast<gpu::Stream>(next_stream_++);
  streams_[s];
  stream_device_[s] = *CurrentDeviceLocked();
  ++c_.live_streams;
  return s;
}

Status FakeCudaApi::StreamDestroy(gpu::Stream stream) {
  std::lock_guard lock(mu_);
  if (!streams_.contains(stream)) return InvalidArgument("fake cudaStreamDestroy: unknown stream", "gpu.invalid_handle");
  // CUDA finishes queued work of a destroyed stream.
  Status s = RunLocked(stream);
  streams_.erase(stream);
  stream_device_.erase(stream);
  --c_.live_streams;
  return s;
}

bool FakeCudaApi::HostPinnedLocked(const void* ptr, std::uint64_t size) const {
  auto p = static_cast<const std::byte*>(ptr);
  auto within = [&](const std::map<const void*, std::uint64_t>& m) {
    for (auto& [q, n] : m) {
      auto b = static_cast<const std::byte*>(q);
      if (p >= b && p + size <= b + n) return true;
    }
    return false;
  };
  return within(registered_) || within(pinned_);
}

bool FakeCudaApi::PendingReadsLocked(const void* base, std::uint64_t size) const {
  auto b = static_cast<const std::byte*>(base);
  for (auto& [s, ops] : streams_)
    for (const Op& op : ops) {
      auto p = static_cast<const std::byte*>(op.src);
      if (p < b + size && b < p + op.size) return true;
    }
  return false;
}

const FakeCudaApi::Region* FakeCudaApi::FindRegionLocked(std::uint64_t addr, std::uint64_t size) const {
  auto it = regions_.upper_bound(addr);
  if (it == regions_.begin()) return nullptr;
  --it;
  if (addr + size > it->first + it->second.size) return nullptr;
  return &it->second;
}

Status FakeCudaApi::CopyHostToDeviceAsync(gpu::DevicePtr dst, const void* src, std::uint64_t size, gpu::Stream stream) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(CurrentDeviceLocked().status());
  auto it = streams_.find(stream);
  if (it == streams_.end()) return InvalidArgument("fake cudaMemcpyAsync: unknown stream", "gpu.invalid_handle");
  const Region* r = FindRegionLocked(dst, size);
  if (r == nullptr || !r->writable)
    return InvalidArgument("fake cudaMemcpyAsync: destination is not writable device memory", "gpu.invalid_value");
  if (!HostPinnedLocked(src, size)) ++c_.pageable_copies;
  it->second.push_back(Op{dst, src, size});
  log_.push_back(CopyRecord{stream, dst, size});
  return Status::Ok();
}

Status FakeCudaApi::CopyDeviceToDeviceAsync(gpu::DevicePtr dst, gpu::DevicePtr src, std::uint64_t size,
                                            gpu::Stream stream) {
  std::lock_guard lock(mu_);
  RETURN_IF_ERROR(CurrentDeviceLocked().status());
  auto it = streams_.find(stream);
  if (it == streams_.end()) return InvalidArgument("fake cudaMemcpyAsync: unknown stream", "gpu.invalid_handle");
  const Region* d = FindRegionLocked(dst, size);
  const Region* s = FindRegionLocked(src, size);
  if (d == nullptr || !d->writable || s == nullptr || !s->readable)
    return InvalidArgument("fake cudaMemcpyAsync D2D: bad device range", "gpu.invalid_value");
  // What the stream's device may do with each range.
  const int device = stream_device_.at(stream);
  auto may = [&](const Region& r, bool write) {
    if (r.kind != Region::kVmm) return r.ordinal < 0 || r.ordinal == device;
    auto a = r.access.find(device);
    return a != r.access.end() && (!write || a->second == gpu::Access::kReadWrite);
  };
  if (!may(*d, true) || !may(*s, false))
    return InvalidArgument("fake cudaMemcpyAsync D2D: cuda:" + std::to_string(device) + " has no access to a range",
                           "gpu.invalid_value");
  if (s->ordinal >= 0 && s->ordinal != device) {
    if (peer_copies_fail_) return Internal("fake cudaMemcpyAsync D2D: peer copy failed", "gpu.cuda_error");
    ++c_.peer_copies;
    c_.peer_bytes += static_cast<std::int64_t>(size);
  }
  it->second.push_back(Op{dst, reinterpret_cast<const void*>(src), size});
  return Status::Ok();
}

Status FakeCudaApi::RunLocked(gpu::Stream stream) {
  auto& ops = streams_[stream];
  Status first;
  for (const Op& op : ops) {
    const Region* r = FindRegionLocked(op.dst, op.size);
    if (r == nullptr || !r->writable) {
      ++c_.bad_copies;
      if (first.ok()) first = Internal("fake: queued copy into unmapped device memory", "gpu.cuda_error");
      continue;
    }
    std::memcpy(reinterpret_cast<void*>(op.dst), op.src, op.size);
  }
  ops.clear();
  return first;
}

Status FakeCudaApi::StreamSynchronize(gpu::Stream stream) {
  std::lock_guard lock(mu_);
  if (!streams_.contains(stream)) return InvalidArgument("fake cudaStreamSynchronize: unknown stream", "gpu.invalid_handle");
  return RunLocked(stream);
}

Status FakeCudaApi::CopyDeviceToHost(void* dst, gpu::DevicePtr src, std::uint64_t size) {
  std::lock_guard lock(mu_);
  const Region* r = FindRegionLocked(src, size);
  if (r == nullptr || !r->readable)
    return InvalidArgument("fake cudaMemcpy D2H: source is not readable device memory", "gpu.invalid_value");
  std::memcpy(dst, reinterpret_cast<const void*>(src), size);
  return Status::Ok();
}

}  // namespace weightd::testing
