// policy.h — the cache policy's decisions: which resident copies to evict, and when.
//
// Pure functions over a snapshot of one tier (the host, or one GPU): no I/O, no locks, and time
// comes in as an argument, so tests drive them with any clock. The server builds the snapshot,
// applies the decisions, and owns the accounting of what is resident and reserved.
//
// The order of eviction is the same for every reason: lower `priority` first, then the lowest
// access `frequency` (0 for every copy under plain LRU), then least recently used. A copy is a candidate only when `evictable` (resident, no lease on it, not
// loading, not pinned); pinned models are evicted by an administrator only.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "clock.h"

namespace weightd::policy {

enum class EvictReason : std::uint8_t { kLru, kTtl, kPressure, kAdmin, kChanged };
// "lru", "ttl", "pressure", "admin", "changed": the label of the evictions metric.
std::string_view ReasonName(EvictReason r);

// One copy of a model in the tier under decision.
struct Copy {
  std::string model;
  std::uint64_t bytes = 0;  // what evicting it gives back to the tier's budget
  bool evictable = false;
  std::int32_t priority = 0;
  Clock::TimePoint last_used{};
  std::chrono::milliseconds idle_ttl{0};  // 0: no TTL
  std::uint32_t frequency = 0;            // Frequency::Count of the model in this tier (LFU)
};

// The access counts of a frequency-aware eviction (TinyLFU's "frequency histogram", W. Einziger
// et al. 2017; exact counts rather than a sketch, since the names are the catalog's). Every
// `period` recorded accesses each count is halved and names whose count reaches 0 are
// forgotten, so that popularity that has passed fades. Counts outlive evictions: a model
// evicted and asked for again comes back with its history. At most `max_names` names are
// remembered: past that, the least counted one is forgotten.
class Frequency {
 public:
  explicit Frequency(std::uint64_t period = 1000, std::size_t max_names = 100'000)
      : period_(std::max<std::uint64_t>(period, 1)), max_names_(std::max<std::size_t>(max_names, 1)) {}
  void Record(const std::string& name);
  std::uint32_t Count(const std::string& name) const;
  // TinyLFU's sample size: ten times the entries the cache holds. Taken at the next Record.
  void set_period(std::uint64_t period) { period_ = std::max<std::uint64_t>(period, 1); }
  std::uint64_t period() const { return period_; }
  std::size_t names() const { return counts_.size(); }
  std::uint64_t halvings() const { return halvings_; }

 private:
  void Halve();

  std::uint64_t period_;
  std::size_t max_names_;
  std::uint64_t since_halving_ = 0;
  std::uint64_t halvings_ = 0;
  std::unordered_map<std::string, std::uint32_t> counts_;
};

// Indexes of the evictable copies whose idle TTL has run out at `now`.
std::vector<std::size_t> Expired(std::span<const Copy> copies, Clock::TimePoint now);

// What it takes to admit a new copy of `need` bytes into a tier that holds `used` bytes (resident
// and reserved) in `count` copies, under `budget` bytes and at most `max_count` copies (0: no
// cap). Only copies of priority <= `priority` (the newcomer's) may be evicted for it.
struct Admission {
  bool fits = false;                // with `victims` evicted, the newcomer fits
  std::vector<std::size_t> victims;  // in eviction order; empty unless `fits`
  std::uint64_t freed = 0;           // bytes the victims give back
};
Admission Admit(std::span<const Copy> copies, std::uint64_t used, std::size_t count, std::uint64_t need,
                std::int32_t priority, std::uint64_t budget, std::size_t max_count);

// Victims, in eviction order, that give back at least `excess` bytes, or every evictable copy
// when they cannot (memory pressure: evict what may be evicted, even if it is not enough).
std::vector<std::size_t> Relieve(std::span<const Copy> copies, std::uint64_t excess);

// The evictable copies in eviction order.
std::vector<std::size_t> EvictionOrder(std::span<const Copy> copies, std::int32_t max_priority);

}  // namespace weightd::policy
