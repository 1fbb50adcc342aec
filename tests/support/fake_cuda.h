// fake_cuda.h — test support: a CudaApi whose "device memory" is real shared memory (memfd),
// so that bookkeeping, chunking, export and import can be tested without a GPU.
//
// Model:
//  - A device allocation (MemCreate or Malloc) is a memfd. A "device pointer" is a host address
//    where the fake mapped it, so tests can read device memory directly.
//  - VMM: AddressReserve reserves PROT_NONE address space; MemMap maps the memfd there with no
//    access; SetAccess applies PROT_READ or PROT_READ|PROT_WRITE (a write through a read-only
//    import faults, as on a GPU). ExportFd returns a fresh dup of the memfd; ImportFd dups the
//    fd it is given, so export/import across processes is real.
//  - Legacy IPC: the 64-byte handle names the exporter's pid and memfd; opening it reopens
//    /proc/<pid>/fd/<n> (same uid only), so it works across processes while the exporter lives.
//  - Access to VMM memory is per device, as SetAccess grants it; the host mapping carries the
//    union. A device-to-device copy runs on the stream's device, which must be able to read
//    the source (its own memory, or a peer's granted to it) and write the destination. Peer
//    access (CanAccessPeer) is on between every pair of distinct devices unless turned off.
//  - Copies on streams are queued and run at StreamSynchronize (or StreamDestroy), so a caller
//    that forgets to synchronize, or reuses a staging buffer too early, sees wrong bytes.
//  - Stricter than CUDA where that finds bugs: Malloc/StreamCreate/copies fail without a
//    current device on the thread; H2D copies from memory that is neither registered nor pinned
//    are counted (pageable_copies); unregistering or freeing host memory that a queued copy
//    still reads is counted (unsafe_host_releases).
// Thread-safe (one mutex). Every handle not released shows in Counters, so leaks are visible.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_api.h"

namespace weightd::testing {

class FakeCudaApi final : public gpu::CudaApi {
 public:
  struct Device {
    std::string name = "Fake GPU";
    std::string uuid;  // "GPU-..."; generated from the ordinal if empty
    std::uint64_t total_bytes = 64ull << 20;
    bool host_register_read_only = true;
    bool vmm_posix_fd = true;
  };

  struct Counters {
    std::int64_t live_allocations = 0;   // created or imported handles + legacy mallocs not released
    std::int64_t live_reservations = 0;
    std::int64_t live_mappings = 0;      // MemMap not unmapped
    std::int64_t live_ipc_opens = 0;
    std::int64_t live_streams = 0;
    std::int64_t live_host_registrations = 0;
    std::int64_t live_pinned = 0;
    std::int64_t allocations_total = 0;  // MemCreate + Malloc attempts
    std::int64_t host_registrations_total = 0;
    std::int64_t host_registrations_at_once = 0;  // most HostRegister calls seen in flight together
    std::int64_t pinned_total = 0;
    std::int64_t pageable_copies = 0;
    std::int64_t unsafe_host_releases = 0;
    std::int64_t bad_copies = 0;         // destination not mapped writable at execution time
    std::int64_t peer_copies = 0;        // device-to-device copies whose source is another device's
    std::int64_t peer_bytes = 0;
  };

  struct CopyRecord {
    gpu::Stream stream = nullptr;
    gpu::DevicePtr dst = 0;
    std::uint64_t size = 0;
  };

  explicit FakeCudaApi(std::vector<Device> devices, std::uint64_t granularity = 64 * 1024);
  ~FakeCudaApi() override;

  // The n-th allocation attempt from now on (1-based; MemCreate and Malloc both count) fails
  // with ResourceExhausted "gpu.out_of_memory". 0 disables.
  void FailAllocationAt(int n);
  void SetHostRegisterFails(bool fails);
  // Called at the start of every HostRegister, outside the fake's lock, on the caller's thread.
  void SetHostRegisterHook(std::function<void(const void* ptr, std::uint64_t size)> hook);
  // What CanAccessPeer answers for distinct devices (default true).
  void SetPeerAccess(bool on);
  // Device-to-device copies from another device's memory fail (Internal "gpu.cuda_error").
  void SetPeerCopiesFail(bool fail);

  Counters counters() const;
  std::vector<CopyRecord> h2d_log() const;
  void ClearLog();
  std::uint64_t allocated_bytes(int ordinal) const;

  // CudaApi
  Result<int> DeviceCount() override;
  Result<gpu::DeviceInfo> GetDeviceInfo(int ordinal) override;
  Result<gpu::MemInfo> GetMemInfo(int ordinal) override;
  Status SetDevice(int ordinal) override;
  Result<bool> CanAccessPeer(int ordinal, int peer) override;
  Result<std::uint64_t> AllocationGranularity(int ordinal) override;
  Result<gpu::MemHandle> MemCreate(int ordinal, std::uint64_t size) override;
  Result<gpu::DevicePtr> AddressReserve(std::uint64_t size, std::uint64_t alignment) override;
  Status MemMap(gpu::DevicePtr va, std::uint64_t size, gpu::MemHandle handle) override;
  Status SetAccess(gpu::DevicePtr va, std::uint64_t size, int ordinal, gpu::Access access) override;
  Result<posix::Fd> ExportFd(gpu::MemHandle handle) override;
  Result<gpu::MemHandle> ImportFd(int fd) override;
  Status MemUnmap(gpu::DevicePtr va, std::uint64_t size) override;
  Status AddressFree(gpu::DevicePtr va, std::uint64_t size) override;
  Status MemRelease(gpu::MemHandle handle) override;
  Result<gpu::DevicePtr> Malloc(std::uint64_t size) override;
  Status Free(gpu::DevicePtr ptr) override;
  Result<std::string> IpcGetMemHandle(gpu::DevicePtr ptr) override;
  Result<gpu::DevicePtr> IpcOpenMemHandle(std::string_view handle) override;
  Status IpcCloseMemHandle(gpu::DevicePtr ptr) override;
  Status HostRegister(const void* ptr, std::uint64_t size, bool read_only) override;
  Status HostUnregister(const void* ptr) override;
  Result<void*> HostAllocPinned(std::uint64_t size) override;
  Status HostFreePinned(void* ptr) override;
  Result<gpu::Stream> StreamCreate() override;
  Status StreamDestroy(gpu::Stream stream) override;
  Status CopyHostToDeviceAsync(gpu::DevicePtr dst, const void* src, std::uint64_t size, gpu::Stream stream) override;
  Status CopyDeviceToDeviceAsync(gpu::DevicePtr dst, gpu::DevicePtr src, std::uint64_t size,
                                 gpu::Stream stream) override;
  Status StreamSynchronize(gpu::Stream stream) override;
  Status CopyDeviceToHost(void* dst, gpu::DevicePtr src, std::uint64_t size) override;

 private:
  struct Handle {
    int fd = -1;
    std::uint64_t size = 0;
    int ordinal = -1;
    bool imported = false;
  };
  struct Region {  // a device address range the fake has mapped
    std::uint64_t size = 0;
    bool writable = false;
    bool readable = false;
    enum Kind { kVmm, kMalloc, kIpc } kind = kVmm;
    int fd = -1;        // kMalloc: the memfd (exported by IPC handles)
    int ordinal = -1;   // kMalloc, kVmm: owning device
    std::map<int, gpu::Access> access;  // kVmm: per device, as SetAccess granted it
  };
  struct Op {
    gpu::DevicePtr dst = 0;
    const void* src = nullptr;
    std::uint64_t size = 0;
  };

  Status CheckOrdinalLocked(int ordinal) const;
  Result<int> CurrentDeviceLocked() const;
  Status TakeAllocationLocked(int ordinal, std::uint64_t size);
  bool HostPinnedLocked(const void* p, std::uint64_t size) const;
  bool PendingReadsLocked(const void* base, std::uint64_t size) const;
  Status RunLocked(gpu::Stream stream);
  const Region* FindRegionLocked(std::uint64_t addr, std::uint64_t size) const;

  // Const after construction.
  std::vector<Device> devices_;
  std::uint64_t granularity_;

  // Guarded by mu_.
  mutable std::mutex mu_;
  std::map<std::thread::id, int> current_device_;
  std::map<gpu::MemHandle, Handle> handles_;
  gpu::MemHandle next_handle_ = 1;
  std::map<std::uint64_t, std::uint64_t> reservations_;  // base -> size
  std::map<std::uint64_t, Region> regions_;              // base -> region
  std::map<const void*, std::uint64_t> registered_;      // host registrations
  std::map<const void*, std::uint64_t> pinned_;          // HostAllocPinned
  std::map<gpu::Stream, std::vector<Op>> streams_;
  std::map<gpu::Stream, int> stream_device_;
  std::uintptr_t next_stream_ = 1;
  std::vector<std::uint64_t> allocated_;  // bytes per device
  std::vector<CopyRecord> log_;
  Counters c_;
  int fail_alloc_in_ = 0;
  bool host_register_fails_ = false;
  std::function<void(const void*, std::uint64_t)> host_register_hook_;
  std::int64_t host_registers_in_flight_ = 0;
  bool peer_access_ = true;
  bool peer_copies_fail_ = false;
};

// A unique fake UUID for device `ordinal`.
std::string FakeUuid(int ordinal);

}  // namespace weightd::testing
