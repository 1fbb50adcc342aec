// gpu_tier.h — the daemon's GPU tier: which GPUs there are, and one device copy of a model's
// host-tier shards per GPU, exported to clients over CUDA VMM fds (primary) or legacy CUDA IPC
// handles (fallback).
//
// Contract:
//  - GpuTier borrows a CudaApi, which must outlive the tier and every GpuCopy it made. With no
//    CudaApi (or one that finds no device) the tier is host-only: every GPU request fails with
//    Unavailable "no CUDA device" (reason "gpu.no_device").
//  - All methods are thread-safe. Materialize blocks for the whole copy (hundreds of ms per GB
//    of registration plus the copy itself): call it on a loader worker, never on the control
//    loop. The device list is fixed at construction.
//  - Materialize returns only when every byte is on the device and every stream is
//    synchronized; a client may import the copy as soon as it has the GpuCopy.
//  - GpuCopy is owned through shared_ptr by the daemon's model table. Its destructor unmaps and
//    releases the daemon's references. VMM memory then lives on while any importer still maps
//    it (CUDA refcounts the allocation); legacy cudaMalloc memory is freed at once, so the owner
//    must drop a legacy copy only when no lease holds it. Deciding when to drop is policy, not
//    this module's business.
//  - The host shards passed to Materialize must stay mapped and unchanged until it returns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cuda_api.h"
#include "posix.h"
#include "status_macros.h"

namespace weightd::gpu {

enum class ExportMode : std::uint8_t { kVmm = 0, kLegacy = 1 };
std::string_view ExportModeName(ExportMode m);
// "vmm" | "legacy"; anything else is InvalidArgument "config.bad_gpu_export".
Result<ExportMode> ParseExportMode(std::string_view s);

// One host-tier shard: the data section of one safetensors file, in shared memory.
struct HostShard {
  const std::byte* data = nullptr;
  std::uint64_t size = 0;
};

// Blocks until bytes [0, end) of host shard `shard` hold their final data, or returns why they
// never will. Lets a copy start while its source is still being read from disk (disk -> host ->
// GPU, chunk by chunk).
using WaitReadyFn = std::function<Status(std::size_t shard, std::uint64_t end)>;

struct MaterializeOptions {
  std::uint64_t chunk_bytes = 64ull << 20;  // one async copy; large enough to run at PCIe speed
  int streams = 4;                          // chunks go round-robin over this many streams
  int pin_threads = 4;                      // threads page-locking a copy's chunks behind a fill
};

struct GpuShard {
  DevicePtr ptr = 0;
  std::uint64_t data_size = 0;   // bytes of tensor data
  std::uint64_t alloc_size = 0;  // VMM: data_size rounded up to the granularity (>= 1 granule)
  MemHandle handle = 0;          // VMM only
  std::string ipc_handle;        // legacy only: 64 bytes
};

struct GpuTierStats;
class GpuTier;

class GpuCopy {
 public:
  ~GpuCopy();
  GpuCopy(const GpuCopy&) = delete;
  GpuCopy& operator=(const GpuCopy&) = delete;

  int ordinal() const { return ordinal_; }
  const std::string& device_uuid() const { return uuid_; }
  ExportMode mode() const { return mode_; }
  const std::vector<GpuShard>& shards() const { return shards_; }
  std::uint64_t allocated_bytes() const;
  // Seconds of the copy that filled this copy (host-to-device, or from the peer).
  double copy_seconds() const { return copy_seconds_; }
  // The GPU whose copy this one was copied from (MaterializeFromPeer); -1: from host memory.
  int copied_from() const { return source_; }

  // VMM: one fresh close-on-exec fd per shard, in shard order, for one client. FailedPrecondition
  // "gpu.wrong_export_mode" for a legacy copy.
  Result<std::vector<posix::Fd>> ExportFds() const;
  // Legacy: the 64-byte cudaIpcMemHandle_t of each shard. FailedPrecondition for a VMM copy.
  Result<std::vector<std::string>> LegacyHandles() const;
  // Synchronous device-to-host read, for verification.
  Status CopyToHost(std::size_t shard, std::uint64_t offset, std::span<std::byte> out) const;

 private:
  friend class GpuTier;
  struct State;
  GpuCopy(std::shared_ptr<State> state, int ordinal, std::string uuid, ExportMode mode)
      : state_(std::move(state)), ordinal_(ordinal), uuid_(std::move(uuid)), mode_(mode) {}

  std::shared_ptr<State> state_;
  int ordinal_;
  std::string uuid_;
  ExportMode mode_;
  // Partially built while Materialize runs; const once returned.
  std::vector<GpuShard> shards_;
  std::vector<std::uint8_t> progress_;  // per shard: how far set-up got, for the destructor
  bool accounted_ = false;
  double copy_seconds_ = 0;
  int source_ = -1;
};

struct GpuDeviceStats {
  int ordinal = -1;
  std::string uuid;
  std::uint64_t resident_bytes = 0;  // sum of the allocation sizes of live copies
  std::uint32_t copies = 0;
};

struct GpuTierStats {
  std::vector<GpuDeviceStats> devices;
  std::uint64_t materializations = 0;         // completed
  std::uint64_t materialize_failures = 0;
  std::uint64_t staged_shards = 0;            // shards copied through pinned staging buffers
  std::uint64_t release_errors = 0;           // CUDA errors while freeing (memory may be leaked)
  std::uint64_t last_h2d_bytes = 0;
  double last_h2d_seconds = 0;
  double last_h2d_gbps = 0;                   // bytes / seconds / 1e9 of the last materialize
  std::uint64_t peer_copies = 0;              // completed copies made from another GPU's copy
  std::uint64_t last_peer_bytes = 0;
  double last_peer_seconds = 0;
  double last_peer_gbps = 0;
};

class GpuTier {
 public:
  // `api` may be null (host-only). Enumerates the devices once; an enumeration failure makes
  // the tier host-only and is remembered for error messages.
  explicit GpuTier(CudaApi* api, MaterializeOptions options = {});
  ~GpuTier();
  GpuTier(const GpuTier&) = delete;
  GpuTier& operator=(const GpuTier&) = delete;

  bool available() const { return !devices_.empty(); }
  // Why the tier is host-only (OK when available).
  const Status& unavailable_status() const { return unavailable_; }
  const std::vector<DeviceInfo>& Devices() const { return devices_; }
  // Free and total memory now (creates the device's primary context on this thread).
  Result<MemInfo> Memory(int ordinal) const;

  // "cuda" (= cuda:0), "cuda:N" or "GPU-<uuid>" (case-insensitive) -> ordinal.
  // InvalidArgument "gpu.bad_device" for another form, NotFound "gpu.unknown_device" for a
  // device that is not there, Unavailable "gpu.no_device" when host-only.
  Result<int> ResolveDevice(std::string_view device) const;

  // One device allocation per shard, filled from `shards` and synchronized. ResourceExhausted
  // "gpu.out_of_memory" when the device is full; nothing stays allocated after a failure.
  // With `wait_ready`, each chunk is copied once it reports its bytes ready (the host shards
  // must already be mapped at their final addresses); its error fails the copy.
  Result<std::shared_ptr<GpuCopy>> Materialize(int ordinal, std::span<const HostShard> shards, ExportMode mode,
                                               const WaitReadyFn& wait_ready = {});

  // Whether a copy on `to` can be made from one on `from` GPU-to-GPU: `to` can access
  // `from`'s memory (cudaDeviceCanAccessPeer, asked once at construction).
  bool CanCopyPeer(int from, int to) const;
  // A VMM copy on `ordinal` of `source` (a VMM copy on another GPU), copied device to device:
  // `ordinal` is granted read access to the source's shards and pulls them over NVLink or PCIe.
  // FailedPrecondition "gpu.no_peer_copy" when the pair cannot (no peer access, a legacy
  // copy), and the errors of Materialize otherwise; nothing stays allocated after a failure.
  // The caller keeps `source` alive until it returns; the copy does not depend on it after.
  Result<std::shared_ptr<GpuCopy>> MaterializeFromPeer(int ordinal, const GpuCopy& source);

  // Takes back a VMM copy that an earlier instance of the daemon exported (its fds, kept by
  // systemd's file-descriptor store): imports each shard's fd (`fds[i]`, of `data_sizes[i]` bytes
  // of data, allocated as Materialize would have), maps it read-write into this process, and
  // accounts it like a materialized copy. The contents are the caller's to verify. Errors are
  // those of the CUDA calls (an fd of another size fails to map), or FailedPrecondition
  // "gpu.vmm_unsupported".
  Result<std::shared_ptr<GpuCopy>> Adopt(int ordinal, std::span<const int> fds, std::span<const std::uint64_t> data_sizes);

  // Device bytes a copy of shards of these sizes takes: each rounded up to the device's VMM
  // granularity once a copy has queried it, to 2 MiB before.
  std::uint64_t AllocationBytes(int ordinal, std::span<const std::uint64_t> shard_sizes) const;

  // Keeps host memory [ptr, ptr+size) page-locked (registered with CUDA, for all devices)
  // until the returned handle is destroyed, so that Materialize copies from it at full PCIe
  // speed instead of registering it first (~50 ms per GB). Blocking; run it on a worker. The
  // handle may be destroyed on any thread (that unregisters: also a blocking call).
  // FailedPrecondition "gpu.register_failed" when CUDA refuses (RLIMIT_MEMLOCK, say).
  Result<std::shared_ptr<const void>> PinHost(const void* ptr, std::uint64_t size);

  GpuTierStats Stats() const;

 private:
  Status CheckOrdinal(int ordinal) const;
  Result<std::uint64_t> Granularity(int ordinal);
  // Reserves an address range for `s` (its handle made), maps the handle there and grants this
  // device read-write access, advancing `progress` (kCreated -> kMapped) as it goes.
  Status MapVmmShard(GpuShard& s, std::uint8_t& progress, int ordinal, std::uint64_t granularity);
  Status Allocate(GpuCopy& copy, std::span<const std::uint64_t> sizes);
  struct CopySession;
  Status CopyIn(GpuCopy& copy, std::span<const HostShard> shards, std::uint64_t* staged, const WaitReadyFn& wait_ready);
  Status CopyFromPeer(GpuCopy& copy, const GpuCopy& source);
  // Accounts a finished copy, or frees a failed one and returns `s` with `what` as context.
  Result<std::shared_ptr<GpuCopy>> Settle(std::shared_ptr<GpuCopy> copy, const Status& s, const std::string& what);

  // Const after construction.
  CudaApi* api_;
  MaterializeOptions options_;
  std::vector<DeviceInfo> devices_;
  std::vector<bool> peer_;                  // [to * devices + from]: to can read from's memory
  Status unavailable_;
  // Bookkeeping shared with the copies (which may outlive a Materialize call).
  std::shared_ptr<GpuCopy::State> state_;
};

}  // namespace weightd::gpu
