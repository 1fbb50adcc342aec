// model_table.h — the daemon's models and where each copy of them stands: one ModelEntry per
// catalog model, holding its host copy, its GPU copies (one per device) and the requests
// parked on them, with the primitives that install, index, evict and free copies. The load
// pipelines that move copies between the states live in loads.h, the cache policy that decides
// which copies to evict in cache.h.
//
// The residency state machine, per copy:
//   host: absent -> loading (phases planning -> admitting -> working) -> resident | failed
//   GPU:  absent -> loading (waiting for the host copy -> admitting -> working) -> resident | failed
// and back to absent when evicted.
//
// Threading: owned by the control loop and not thread-safe. The only thread it runs is the
// reaper, which frees what the loop let go of (Dispose) and then posts a wake-up to the loop.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "clock.h"
#include "config.h"
#include "gpu_tier.h"
#include "loader.h"
#include "metrics.h"
#include "policy.h"
#include "protocol.h"
#include "thread_pool.h"

namespace weightd {

using proto::ModelState;

// "cuda:N" in the daemon's numbering.
std::string CudaName(int ordinal);
// "16.0 KiB", "1.50 GiB": sizes in messages and logs.
std::string Gib(std::uint64_t bytes);
// Whole milliseconds of a duration.
std::uint64_t ToMs(Clock::TimePoint::duration d);

// A request parked until a copy's load completes.
struct Waiter {
  enum Kind { kAcquire, kLoad } kind;
  std::string routing_id;
  std::uint64_t request_id = 0;
  std::uint64_t session_id = 0;
  proto::Acquire acquire;
  int ordinal = -1;  // GPU acquires: the daemon's ordinal of the device
};

// Where a copy's load stands. Host: plan (read the headers) -> admit (make room under the
// budget, perhaps waiting for leases to end) -> fill (read the data). GPU: wait for the host
// copy (or for its fill to start, when the copy is pipelined behind the disk) -> admit -> copy.
enum class Phase : std::uint8_t { kIdle, kPlanning, kWaitHost, kAdmitting, kWorking };

// A finished GPU materialization on its way to the loop.
struct CopyResult {
  std::uint64_t generation = 0;
  Result<std::shared_ptr<gpu::GpuCopy>> copy{Status(Code::kInternal, "unset")};
  std::uint64_t ms = 0;
};

struct StoredCopy;  // adopt.h: a GPU copy's fds in systemd's fd store

// A model's copy on one GPU. Its waiters are GPU Acquires; the copy is made from the host tier,
// so while the host copy is loading the materialization waits (phase kWaitHost).
struct GpuEntry {
  ModelState state = ModelState::kAbsent;
  Phase phase = Phase::kIdle;
  std::shared_ptr<gpu::GpuCopy> copy;
  std::uint64_t generation = 0;  // of the materialization in flight
  std::uint64_t reserved = 0;    // budget bytes held for the copy in flight
  bool pipelined = false;        // the copy in flight reads the host copy while it fills
  bool preload = false;          // readiness waits for this copy
  std::vector<Waiter> waiters;
  Status last_error;
  std::uint64_t copy_ms = 0;
  Clock::TimePoint last_used{};
  Clock::TimePoint admission_deadline{};
  std::string waiting_for;
  std::optional<CopyResult> stashed;   // a pipelined copy that finished before its host fill did
  std::shared_ptr<StoredCopy> stored;  // its fds in systemd's fd store, while it is resident
};

struct ModelEntry {
  ModelConfig config;
  ModelState state = ModelState::kAbsent;
  Phase phase = Phase::kIdle;
  std::shared_ptr<const ResidentModel> resident;
  std::shared_ptr<std::atomic<bool>> cancel;  // of the load in flight
  std::uint64_t generation = 0;               // of the load in flight
  std::vector<Waiter> waiters;
  Status last_error;
  std::uint64_t loads = 0;
  std::uint64_t last_load_ms = 0;
  Clock::TimePoint last_used{};  // of the host copy

  // The load in flight: its plan until admitted, then its progress while the data is read.
  std::shared_ptr<LoadPlan> plan;
  std::shared_ptr<LoadProgress> progress;
  std::uint64_t plan_ms = 0;
  std::uint64_t host_reserved = 0;  // budget bytes held for the fill in flight
  std::uint64_t host_bytes = 0;     // SegmentStore::HostCharge of the copy: what it takes from the budget
  std::vector<std::uint64_t> shard_sizes;  // data bytes per shard (known once planned)
  Clock::TimePoint admission_deadline{};
  std::string waiting_for;
  bool preload_host = false;  // readiness waits for the host copy
  bool pinning = false;       // the host copy is being page-locked; GPU copies wait for it
  // Loads of the host copy answered once it is page-locked (Acquires are answered at once), so
  // that a GPU copy asked for after the answer runs at PCIe speed.
  std::vector<Waiter> pin_waiters;
  // The files the copies were made from (names, sizes, mtimes; no segments), kept while any
  // tier holds a copy, so that a changed file is noticed even when only a GPU copy is left.
  std::shared_ptr<const ResidentModel> files;

  // Built once per resident copy.
  std::vector<proto::SegmentInfo> segments;
  std::vector<proto::TensorRecord> tensors;
  std::unordered_map<std::string, std::size_t> tensor_index;

  std::map<int, GpuEntry> gpus;  // by the daemon's device ordinal
  // The host copy's shards stay page-locked while resident, so that copies to a GPU run at
  // PCIe speed without registering them first.
  std::vector<std::shared_ptr<const void>> host_pins;

  bool Busy() const { return state == ModelState::kLoading || GpuLoading(); }
  // A GPU copy is being made, or waits to be made, from the host copy: the host copy must stay.
  bool GpuLoading() const {
    for (const auto& [ordinal, g] : gpus)
      if (g.state == ModelState::kLoading) return true;
    return false;
  }
};

// What an Acquire of a resident copy gets before its lease exists: the manifest (no lease id or
// token yet), the copy it leases (null for the host copy) and, per manifest segment, the index
// of the model's shard it is.
struct Grant {
  proto::Manifest manifest;
  std::shared_ptr<const gpu::GpuCopy> copy;
  std::vector<std::uint32_t> shards;
};

// What the model machinery (loads.h, lifecycle.h) tells the rest of the daemon: the server
// implements it. Called on the loop thread.
class ModelEvents {
 public:
  virtual ~ModelEvents() = default;
  // A copy of `m` became resident (`state` kResident) or failed: answer the requests that waited.
  virtual void Answer(ModelEntry& m, std::vector<Waiter>& waiters, ModelState state, const Status& error) = 0;
  // The requests can never be served as asked (their model left the catalog, say): `error`.
  virtual void Refuse(std::vector<Waiter>& waiters, const Status& error) = 0;
  // A copy that readiness waits for ("<model>/host", "<model>/cuda:N") finished or failed.
  virtual void PreloadDone(const std::string& key, const Status& s) = 0;
  // A line for the service manager (sd_notify), e.g. "STATUS=loading model 'x'".
  virtual void Notify(const std::string& state) = 0;
};

class ModelTable {
 public:
  // `gpu_devices`: how many GPUs the daemon serves (their freed bytes are counted per device).
  // `post` wakes the loop once the reaper has freed memory, so that waiting admissions retry.
  ModelTable(const Clock* clock, Counters* counters, std::size_t gpu_devices, LoopPost post);
  ~ModelTable() { Close(); }
  ModelTable(const ModelTable&) = delete;
  ModelTable& operator=(const ModelTable&) = delete;

  ModelEntry* Find(const std::string& name);
  const ModelEntry* Find(const std::string& name) const;
  // The entry of `name`, made (absent, no config) if there is none.
  ModelEntry& Get(const std::string& name) { return models_[name]; }
  void Erase(const std::string& name) { models_.erase(name); }
  std::map<std::string, ModelEntry>& models() { return models_; }
  const std::map<std::string, ModelEntry>& models() const { return models_; }

  // Load generations: unique per load and per GPU materialization, growing.
  std::uint64_t NextGeneration() { return next_generation_++; }
  // An adopted copy keeps its generation; later ones must come after it.
  void SawGeneration(std::uint64_t g) { next_generation_ = std::max(next_generation_, g + 1); }

  // Makes `r` the model's host copy (its index is built already) and keeps its files' identity.
  void InstallHost(ModelEntry& m, std::shared_ptr<ResidentModel> r);
  // The tensor index and segment list a manifest is built from; every segment is split into parts
  // of `part_size` bytes (HostSegment; 0: one file each).
  void BuildIndex(ModelEntry& m, const std::vector<std::string>& files, const std::vector<st::Header>& headers,
                  const std::vector<std::string>& shm_paths, std::uint64_t part_size);
  // The manifest of an Acquire of `m`'s host copy (ordinal -1) or of its resident copy on a GPU,
  // with only the tensors of `filter` (empty: all). NotFound "acquire.unknown_tensor".
  Result<Grant> GrantOf(const ModelEntry& m, const std::vector<std::string>& filter, int ordinal) const;

  // Drops a copy; its memory is freed on the reaper once no lease maps it.
  void EvictHost(ModelEntry& m, policy::EvictReason why);
  void EvictGpu(ModelEntry& m, int ordinal, policy::EvictReason why);
  // Drops every tier's copy and any load's state. GPU copies that a lease still pins live on in
  // the lease table until their leases end.
  void DropResident(ModelEntry& m);
  // GPU leases still need the tensor records after the host copy went: they, the files'
  // fingerprint and the shard sizes go with the last copy.
  void ForgetIndexUnlessHeld(ModelEntry& m);
  // A lease on `device` ("cpu" or "cuda:N") of `model` ended: its copy's idle time starts now.
  void Touch(const std::string& model, const std::string& device, Clock::TimePoint now);

  // What the copies hold (and loads in flight reserve), per tier.
  std::uint64_t HostUsed() const;
  std::size_t HostCount() const;
  std::uint64_t GpuUsed(int ordinal) const;
  std::size_t GpuCount(int ordinal) const;
  // Bytes of evicted copies that the reaper has not freed yet; they still count against the
  // budgets.
  std::uint64_t freeing_host() const { return reaping_host_.load(); }
  std::uint64_t freeing_gpu(int ordinal) const { return reaping_gpu_[static_cast<std::size_t>(ordinal)].load(); }

  // Frees what the loop let go of: unpins host pages, unlinks (`unlink`) and unmaps segments,
  // releases GPU copies. For a model of many GB these take from tens of milliseconds to seconds,
  // which the loop must not spend; the reaper thread does them in order. Page-lock handles go
  // first, while the pages are still mapped.
  void Dispose(std::shared_ptr<const ResidentModel> host, std::vector<std::shared_ptr<const void>> pins, bool unlink,
               std::vector<std::shared_ptr<gpu::GpuCopy>> gpu_copies = {});
  // Unregistering takes time too: `host` keeps the pinned mappings until they are unregistered.
  void ReleasePins(std::vector<std::shared_ptr<const void>> pins, std::shared_ptr<const ResidentModel> host) {
    Dispose(std::move(host), std::move(pins), /*unlink=*/false);
  }
  // Lets the reaper finish what it was given and joins it (the daemon stops).
  void Close() { reaper_.Close(); }
  // At stop: removes the host copies' segments, except completed ones that have a record when
  // `keep_adoptable` (the next start adopts them).
  void RemoveSegments(bool keep_adoptable);

 private:
  const Clock* const clock_;
  Counters* const counters_;
  const LoopPost post_;
  std::map<std::string, ModelEntry> models_;
  std::uint64_t next_generation_ = 1;
  // Shared with the reaper.
  std::atomic<std::uint64_t> reaping_host_{0};
  std::unique_ptr<std::atomic<std::uint64_t>[]> reaping_gpu_;  // by ordinal
  ThreadPool reaper_{1, "wd-reap"};  // last: joined first
};

}  // namespace weightd
