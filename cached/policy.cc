#include "policy.h"

#include <algorithm>
#include <limits>

namespace weightd::policy {

std::string_view ReasonName(EvictReason r) {
  switch (r) {
    case EvictReason::kLru: return "lru";
    case EvictReason::kTtl: return "ttl";
    case EvictReason::kPressure: return "pressure";
    case EvictReason::kAdmin: return "admin";
    case EvictReason::kChanged: return "changed";
  }
  return "unknown";
}

void Frequency::Record(const std::string& name) {
  std::uint32_t& n = counts_[name];
  if (n < std::numeric_limits<std::uint32_t>::max()) ++n;
  if (++since_halving_ >= period_) Halve();
  if (counts_.size() > max_names_) {
    // Forget the least counted other name (a linear scan, only past the bound).
    auto victim = counts_.end();
    for (auto it = counts_.begin(); it != counts_.end(); ++it)
      if (it->first != name && (victim == counts_.end() || it->second < victim->second)) victim = it;
    if (victim != counts_.end()) counts_.erase(victim);
  }
}

std::uint32_t Frequency::Count(const std::string& name) const {
  auto it = counts_.find(name);
  return it == counts_.end() ? 0 : it->second;
}

void Frequency::Halve() {
  since_halving_ = 0;
  ++halvings_;
  for (auto& [name, n] : counts_) n /= 2;
  std::erase_if(counts_, [](const auto& kv) { return kv.second == 0; });
}

std::vector<std::size_t> Expired(std::span<const Copy> copies, Clock::TimePoint now) {
  std::vector<std::size_t> out;
  for (std::size_t i = 0; i < copies.size(); ++i) {
    const Copy& c = copies[i];
    if (c.evictable && c.idle_ttl.count() > 0 && now - c.last_used >= c.idle_ttl) out.push_back(i);
  }
  return out;
}

std::vector<std::size_t> EvictionOrder(std::span<const Copy> copies, std::int32_t max_priority) {
  std::vector<std::size_t> order;
  for (std::size_t i = 0; i < copies.size(); ++i)
    if (copies[i].evictable && copies[i].priority <= max_priority) order.push_back(i);
  // Stable, and ties broken by name, so that equal snapshots always give the same victims.
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const Copy& x = copies[a];
    const Copy& y = copies[b];
    if (x.priority != y.priority) return x.priority < y.priority;
    if (x.frequency != y.frequency) return x.frequency < y.frequency;
    if (x.last_used != y.last_used) return x.last_used < y.last_used;
    return x.model < y.model;
  });
  return order;
}

Admission Admit(std::span<const Copy> copies, std::uint64_t used, std::size_t count, std::uint64_t need,
                std::int32_t priority, std::uint64_t budget, std::size_t max_count) {
  Admission a;
  if (need > budget) return a;  // it could never fit, whatever goes
  auto fits = [&](std::uint64_t freed, std::size_t gone) {
    const std::uint64_t now_used = used >= freed ? used - freed : 0;
    const bool bytes_ok = now_used + need <= budget;
    const bool count_ok = max_count == 0 || count - std::min(count, gone) + 1 <= max_count;
    return bytes_ok && count_ok;
  };
  if (fits(0, 0)) {
    a.fits = true;
    return a;
  }
  std::uint64_t freed = 0;
  std::vector<std::size_t> victims;
  for (std::size_t i : EvictionOrder(copies, priority)) {
    victims.push_back(i);
    freed += copies[i].bytes;
    if (fits(freed, victims.size())) {
      a.fits = true;
      a.victims = std::move(victims);
      a.freed = freed;
      return a;
    }
  }
  return a;  // evicting everything allowed is not enough: evict nothing
}

std::vector<std::size_t> Relieve(std::span<const Copy> copies, std::uint64_t excess) {
  std::vector<std::size_t> victims;
  std::uint64_t freed = 0;
  for (std::size_t i : EvictionOrder(copies, std::numeric_limits<std::int32_t>::max())) {
    if (freed >= excess) break;
    victims.push_back(i);
    freed += copies[i].bytes;
  }
  return victims;
}

}  // namespace weightd::policy
