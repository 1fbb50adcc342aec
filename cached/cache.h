// cache.h — the cache policy applied to the model table: the memory budgets, admission of new
// copies (evicting idle ones in policy.h's order, or queueing the copy until room is made), and
// eviction by idle TTL and by memory pressure. policy.h decides over snapshots; this module
// builds the snapshots from the model table and the lease table, and acts on the decisions.
//
// Loads in flight are bounded per tier ([cache] max_loads): a copy ready for admission while
// that many loads of its tier hold budget, or while earlier copies of its tier wait, queues
// behind them (FIFO) and reserves nothing until its turn; its admission timeout starts then.
// Under "lfu" eviction the cache keeps each tier's access counts (policy::Frequency), fed by
// RecordAccess.
//
// Threading: owned by the control loop and not thread-safe.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "clock.h"
#include "config.h"
#include "gpu_tier.h"
#include "lease_table.h"
#include "model_table.h"
#include "policy.h"

namespace weightd {

// Readings of memory for the pressure rule of the cache policy; tests inject their own.
// Called on the loop thread only.
class MemoryProbe {
 public:
  struct Reading {
    std::uint64_t total = 0;
    std::uint64_t available = 0;  // host: MemAvailable; GPU: free device memory
  };
  virtual ~MemoryProbe() = default;
  virtual Result<Reading> Host() = 0;
  virtual Result<Reading> Gpu(int ordinal) = 0;
};

// /proc/meminfo, and the GPU tier's cuMemGetInfo.
class SystemMemoryProbe final : public MemoryProbe {
 public:
  explicit SystemMemoryProbe(gpu::GpuTier* gpu) : gpu_(gpu) {}
  Result<Reading> Host() override;
  Result<Reading> Gpu(int ordinal) override;

 private:
  gpu::GpuTier* gpu_;
};

class Cache {
 public:
  // `gpu` may be null or unavailable (host-only); `memory` is borrowed (null: the system's).
  Cache(const CacheConfig& config, ModelTable& table, const LeaseTable& leases, gpu::GpuTier* gpu,
        MemoryProbe* memory);

  // Resolves the budgets against the memory there is (fractions of the host's MemTotal and of
  // each GPU's memory) and logs them. Once, at start.
  void ResolveBudgets();
  std::uint64_t host_budget() const { return host_budget_; }
  std::uint64_t host_total() const { return host_total_; }
  const std::map<int, std::uint64_t>& gpu_budgets() const { return gpu_budget_; }
  std::uint64_t GpuBudget(int ordinal) const;
  // Room for an adopted host copy of `bytes` under the budget and the warm-pool cap, evicting
  // nothing.
  bool HasRoomForHost(std::uint64_t bytes) const;

  enum class Verdict {
    kAdmitted,  // room was made (victims evicted) and reserved: start the copy
    kWaiting,   // not now: `waiting_for` says what it waits for (room; the timeout runs)
    kQueued,    // not yet: a load slot, or its turn behind earlier copies (the timeout waits)
    kRefused,   // never, or not in time: fail the copy with the error
  };
  // Admission of `m`'s host copy (m.host_bytes, planned): evicts what the policy allows and
  // reserves the bytes (m.host_reserved), or sets m.waiting_for, or refuses it
  // (ResourceExhausted "cache.too_large").
  Verdict AdmitHost(ModelEntry& m, Status* error);
  // The same for its copy on GPU `ordinal` (g.reserved, g.waiting_for).
  Verdict AdmitGpu(ModelEntry& m, int ordinal, Status* error);
  // A copy (`ordinal` -1: the host copy) is ready for admission: admitted as AdmitHost/AdmitGpu
  // would if no earlier copy of its tier waits, else queued behind them. A copy that waits or is
  // queued is in the queue (Queue) on return.
  Verdict Arrive(ModelEntry& m, int ordinal, Status* error);

  // An Acquire of `model` on tier `ordinal` (-1: the host), hit or miss: the access counts of
  // "lfu" eviction. A GPU acquire counts for the host copy too, its source.
  void RecordAccess(const std::string& model, int ordinal);
  // The model's access count in the tier (0 under "lru").
  std::uint32_t Frequency(const std::string& model, int ordinal) const;
  // Loads of the tier that hold budget now (admitted, not finished).
  std::size_t LoadsInFlight(int ordinal) const;

  // Something may have made room (a lease ended, a copy failed or was freed): the loop retries
  // the waiting copies before it sleeps again.
  void RetrySoon() { retry_ = true; }
  bool TakeRetry() { return std::exchange(retry_, false); }

  // Copies that wait for room, oldest first; `ordinal` -1 is the host copy. `turn`: the copy
  // waits at the head of its tier (its admission timeout runs), not behind earlier copies.
  void Queue(const std::string& model, int ordinal, bool turn = false);
  void Forget(const std::string& model);
  std::size_t waiting() const { return admissions_.size(); }
  // Admits the queued copies again, oldest first, each as AdmitHost/AdmitGpu would; a copy that
  // waited past the admission timeout is refused (ResourceExhausted "cache.budget_exhausted").
  // `decided` acts on each copy that no longer waits, at once, so that the next one sees what
  // it did.
  using Decided = std::function<void(ModelEntry& m, int ordinal, Verdict v, const Status& error)>;
  void Retry(Clock::TimePoint now, const Decided& decided);

  // An administrator's eviction of `m` from every tier (`device` ""), the host tier ("cpu") or
  // one GPU ("cuda:N"). FailedPrecondition "evict.leased" while leases hold what would go,
  // "evict.loading" while it is being loaded (or copied from); the errors of ResolveDevice.
  Status Evict(ModelEntry& m, const std::string& device);

  // TTLs and memory pressure (every pressure_interval); budgets and warm-pool caps are enforced
  // when copies are admitted.
  void Enforce(Clock::TimePoint now);

 private:
  std::vector<policy::Copy> HostCopies(const ModelEntry* except, std::vector<ModelEntry*>* owners);
  std::vector<policy::Copy> GpuCopies(int ordinal, const ModelEntry* except, std::vector<ModelEntry*>* owners);
  // "a (3.0 GiB, 2 leases), b (4.5 GiB, pinned)": what holds a tier that cannot make room.
  std::string Holders(const std::vector<policy::Copy>& copies, int ordinal) const;
  bool gpu_available() const { return gpu_ != nullptr && gpu_->available(); }
  bool lfu() const { return config_.eviction != "lru"; }
  // A free slot for one more load of the tier; else sets `waiting_for` and says no.
  bool HasLoadSlot(int ordinal, std::string* waiting_for) const;

  const CacheConfig config_;
  ModelTable& table_;
  const LeaseTable& leases_;
  gpu::GpuTier* const gpu_;
  MemoryProbe* memory_;  // borrowed, or owned_memory_
  std::unique_ptr<MemoryProbe> owned_memory_;

  std::uint64_t host_total_ = 0, host_budget_ = 0;
  std::map<int, std::uint64_t> gpu_budget_;  // by ordinal
  struct Ticket {
    std::string model;
    int ordinal;  // -1: the host copy
    // It has waited for room at the head of its tier since its deadline was last set; a copy
    // that reaches the head gets a whole admission timeout from then.
    bool turn = false;
  };
  // The admission state of a ticket's copy; all null when the copy no longer waits for
  // admission (its load failed, was cancelled or dropped): such a ticket is stale.
  struct Pending {
    ModelEntry* model = nullptr;
    Clock::TimePoint* deadline = nullptr;
    std::string* waiting_for = nullptr;
  };
  Pending Find(const Ticket& t);
  std::deque<Ticket> admissions_;  // copies waiting for room, oldest first
  std::map<int, policy::Frequency> frequency_;  // by tier: -1 the host, else the GPU's ordinal
  bool retry_ = false;
  Clock::TimePoint last_pressure_check_{};
};

}  // namespace weightd
