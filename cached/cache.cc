#include "cache.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <set>

#include <spdlog/spdlog.h>

namespace weightd {

Result<MemoryProbe::Reading> SystemMemoryProbe::Host() {
  std::FILE* f = std::fopen("/proc/meminfo", "re");
  if (f == nullptr) return posix::ErrnoStatus("opening /proc/meminfo");
  Reading r;
  bool have_total = false, have_available = false;
  char key[64];
  unsigned long long kib = 0;
  while (std::fscanf(f, "%63s %llu kB\n", key, &kib) == 2) {
    if (std::strcmp(key, "MemTotal:") == 0) {
      r.total = kib * 1024;
      have_total = true;
    } else if (std::strcmp(key, "MemAvailable:") == 0) {
      r.available = kib * 1024;
      have_available = true;
    }
  }
  std::fclose(f);
  if (!have_total || !have_available) return Unavailable("/proc/meminfo has no MemTotal or MemAvailable", "memory.unreadable");
  return r;
}

Result<MemoryProbe::Reading> SystemMemoryProbe::Gpu(int ordinal) {
  if (gpu_ == nullptr || !gpu_->available()) return Unavailable("no GPU tier", "gpu.no_device");
  ASSIGN_OR_RETURN(gpu::MemInfo info, gpu_->Memory(ordinal));
  return Reading{info.total_bytes, info.free_bytes};
}

Cache::Cache(const CacheConfig& config, ModelTable& table, const LeaseTable& leases, gpu::GpuTier* gpu,
             MemoryProbe* memory)
    : config_(config), table_(table), leases_(leases), gpu_(gpu), memory_(memory) {
  if (memory_ == nullptr) {
    owned_memory_ = std::make_unique<SystemMemoryProbe>(gpu);
    memory_ = owned_memory_.get();
  }
}

void Cache::ResolveBudgets() {
  auto host_mem = memory_->Host();
  if (host_mem.ok()) {
    host_total_ = host_mem->total;
  } else {
    spdlog::warn("cannot read the host's memory ({}); using the physical page count", host_mem.status().ToString());
    host_total_ = static_cast<std::uint64_t>(::sysconf(_SC_PHYS_PAGES)) * posix::PageSize();
  }
  host_budget_ = config_.host_budget.Resolve(host_total_);
  spdlog::info("host budget {} ({} of {})", Gib(host_budget_), config_.host_budget.ToString(), Gib(host_total_));
  if (gpu_available())
    for (const auto& d : gpu_->Devices()) {
      gpu_budget_[d.ordinal] = config_.gpu_budget.Resolve(d.total_bytes);
      spdlog::info("{} budget {} ({} of {})", CudaName(d.ordinal), Gib(gpu_budget_[d.ordinal]),
                   config_.gpu_budget.ToString(), Gib(d.total_bytes));
    }
}

std::uint64_t Cache::GpuBudget(int ordinal) const {
  auto it = gpu_budget_.find(ordinal);
  return it == gpu_budget_.end() ? 0 : it->second;
}

bool Cache::HasRoomForHost(std::uint64_t bytes) const {
  const std::size_t cap = config_.max_host_models;
  return table_.HostUsed() + bytes <= host_budget_ && (cap == 0 || table_.HostCount() < cap);
}

std::vector<policy::Copy> Cache::HostCopies(const ModelEntry* except, std::vector<ModelEntry*>* owners) {
  std::vector<policy::Copy> out;
  for (auto& [name, m] : table_.models()) {
    if (&m == except || !m.resident) continue;
    policy::Copy c;
    c.model = name;
    c.bytes = m.host_bytes;
    c.evictable = !m.config.pin && m.state == ModelState::kResident && !m.GpuLoading() && leases_.LeasesOf(name, "cpu") == 0;
    c.priority = m.config.priority;
    c.last_used = m.last_used;
    c.idle_ttl = m.config.host_idle_ttl.value_or(config_.host_idle_ttl);
    c.frequency = Frequency(name, -1);
    out.push_back(std::move(c));
    owners->push_back(&m);
  }
  return out;
}

std::vector<policy::Copy> Cache::GpuCopies(int ordinal, const ModelEntry* except, std::vector<ModelEntry*>* owners) {
  std::vector<policy::Copy> out;
  for (auto& [name, m] : table_.models()) {
    if (&m == except) continue;
    auto g = m.gpus.find(ordinal);
    if (g == m.gpus.end() || !g->second.copy) continue;
    policy::Copy c;
    c.model = name;
    c.bytes = g->second.copy->allocated_bytes();
    c.evictable = !m.config.pin && g->second.state == ModelState::kResident && leases_.LeasesOf(name, CudaName(ordinal)) == 0;
    c.priority = m.config.priority;
    c.last_used = g->second.last_used;
    c.idle_ttl = m.config.gpu_idle_ttl.value_or(config_.gpu_idle_ttl);
    c.frequency = Frequency(name, ordinal);
    out.push_back(std::move(c));
    owners->push_back(&m);
  }
  return out;
}

std::string Cache::Holders(const std::vector<policy::Copy>& copies, int ordinal) const {
  std::string out;
  for (const policy::Copy& c : copies) {
    if (!out.empty()) out += ", ";
    out += c.model + " (" + Gib(c.bytes);
    const ModelEntry* m = table_.Find(c.model);
    const std::uint32_t n = leases_.LeasesOf(c.model, ordinal < 0 ? "cpu" : CudaName(ordinal));
    if (n > 0) out += ", " + std::to_string(n) + (n == 1 ? " lease" : " leases");
    if (m != nullptr && m->config.pin) out += ", pinned";
    if (m != nullptr && m->config.priority != 0) out += ", priority " + std::to_string(m->config.priority);
    out += ")";
  }
  return out.empty() ? "nothing evictable" : out;
}

void Cache::RecordAccess(const std::string& model, int ordinal) {
  if (!lfu()) return;
  // TinyLFU's sample: ten times the entries the cache holds; the catalog bounds what it can hold.
  const std::uint64_t period = std::max<std::uint64_t>(64, 10 * table_.models().size());
  for (int tier : {ordinal, -1}) {
    policy::Frequency& f = frequency_[tier];
    f.set_period(period);
    f.Record(model);
    if (tier == -1) break;
  }
}

std::uint32_t Cache::Frequency(const std::string& model, int ordinal) const {
  auto it = frequency_.find(ordinal);
  return it == frequency_.end() ? 0 : it->second.Count(model);
}

std::size_t Cache::LoadsInFlight(int ordinal) const {
  std::size_t n = 0;
  for (const auto& [name, m] : table_.models()) {
    if (ordinal < 0) {
      n += m.host_reserved > 0 ? 1 : 0;
    } else if (auto g = m.gpus.find(ordinal); g != m.gpus.end()) {
      n += g->second.reserved > 0 ? 1 : 0;
    }
  }
  return n;
}

bool Cache::HasLoadSlot(int ordinal, std::string* waiting_for) const {
  if (config_.max_loads == 0) return true;
  const std::size_t n = LoadsInFlight(ordinal);
  if (n < config_.max_loads) return true;
  *waiting_for = "waits for a load slot: " + std::to_string(n) + " loads " + (ordinal < 0 ? "of the host tier" : "to " + CudaName(ordinal)) +
                 " in flight, the most at once (max_loads " + std::to_string(config_.max_loads) + ")";
  return false;
}

Cache::Verdict Cache::Arrive(ModelEntry& m, int ordinal, Status* error) {
  std::size_t ahead = 0;
  for (const Ticket& t : admissions_) ahead += t.ordinal == ordinal && Find(t).model != nullptr ? 1 : 0;
  Verdict v = Verdict::kQueued;
  std::string& waiting_for = ordinal < 0 ? m.waiting_for : m.gpus.at(ordinal).waiting_for;
  if (ahead > 0) waiting_for = "queued behind " + std::to_string(ahead) + " earlier loads";
  else v = ordinal < 0 ? AdmitHost(m, error) : AdmitGpu(m, ordinal, error);
  if (v == Verdict::kWaiting || v == Verdict::kQueued) Queue(m.config.name, ordinal, v == Verdict::kWaiting);
  return v;
}

Cache::Verdict Cache::AdmitHost(ModelEntry& m, Status* error) {
  if (!HasLoadSlot(-1, &m.waiting_for)) return Verdict::kQueued;
  std::vector<ModelEntry*> owners;
  std::vector<policy::Copy> copies = HostCopies(&m, &owners);
  const std::size_t cap = config_.max_host_models;
  policy::Admission a =
      policy::Admit(copies, table_.HostUsed(), table_.HostCount(), m.host_bytes, m.config.priority, host_budget_, cap);
  if (!a.fits) {
    const std::string budget = "the host budget of " + Gib(host_budget_) + " (" + config_.host_budget.ToString() + ")";
    if (m.host_bytes > host_budget_) {
      *error = ResourceExhausted("model '" + m.config.name + "' needs " + Gib(m.host_bytes) + ", more than " + budget,
                                 "cache.too_large");
      return Verdict::kRefused;
    }
    m.waiting_for = "needs " + Gib(m.host_bytes) + " of " + budget + (cap ? " and a slot of " + std::to_string(cap) : "") +
                    "; " + Gib(table_.HostUsed()) + " held by " + Holders(copies, -1);
    return Verdict::kWaiting;
  }
  for (std::size_t i : a.victims) table_.EvictHost(*owners[i], policy::EvictReason::kLru);
  // Evicted copies still hold their memory until the reaper has freed them (milliseconds to
  // seconds); the budget holds for what is really in /dev/shm, so wait for it.
  if (const std::uint64_t freeing = table_.freeing_host(); table_.HostUsed() + freeing + m.host_bytes > host_budget_) {
    m.waiting_for = "waits for " + Gib(freeing) + " of evicted copies to be freed";
    return Verdict::kWaiting;
  }
  m.host_reserved = m.host_bytes;
  m.waiting_for.clear();
  return Verdict::kAdmitted;
}

Cache::Verdict Cache::AdmitGpu(ModelEntry& m, int ordinal, Status* error) {
  GpuEntry& g = m.gpus.at(ordinal);
  if (!HasLoadSlot(ordinal, &g.waiting_for)) return Verdict::kQueued;
  const std::uint64_t need = gpu_->AllocationBytes(ordinal, m.shard_sizes);
  const std::uint64_t budget = gpu_budget_.at(ordinal);
  std::vector<ModelEntry*> owners;
  std::vector<policy::Copy> copies = GpuCopies(ordinal, &m, &owners);
  const std::size_t cap = config_.max_gpu_models;
  policy::Admission a =
      policy::Admit(copies, table_.GpuUsed(ordinal), table_.GpuCount(ordinal), need, m.config.priority, budget, cap);
  if (!a.fits) {
    const std::string what = "the " + CudaName(ordinal) + " budget of " + Gib(budget) + " (" + config_.gpu_budget.ToString() + ")";
    if (need > budget) {
      *error = ResourceExhausted("model '" + m.config.name + "' needs " + Gib(need) + " on " + CudaName(ordinal) +
                                     ", more than " + what,
                                 "cache.too_large");
      return Verdict::kRefused;
    }
    g.waiting_for = "needs " + Gib(need) + " of " + what + (cap ? " and a slot of " + std::to_string(cap) : "") + "; " +
                    Gib(table_.GpuUsed(ordinal)) + " held by " + Holders(copies, ordinal);
    return Verdict::kWaiting;
  }
  for (std::size_t i : a.victims) table_.EvictGpu(*owners[i], ordinal, policy::EvictReason::kLru);
  if (const std::uint64_t freeing = table_.freeing_gpu(ordinal); table_.GpuUsed(ordinal) + freeing + need > budget) {
    g.waiting_for = "waits for " + Gib(freeing) + " of evicted copies to be freed";
    return Verdict::kWaiting;
  }
  g.reserved = need;
  g.waiting_for.clear();
  return Verdict::kAdmitted;
}

void Cache::Queue(const std::string& model, int ordinal, bool turn) {
  // One ticket per copy: a second one would wait behind the first and hold its tier forever.
  if (std::ranges::none_of(admissions_, [&](const Ticket& t) { return t.model == model && t.ordinal == ordinal; }))
    admissions_.push_back(Ticket{model, ordinal, turn});
}

Cache::Pending Cache::Find(const Ticket& t) {
  ModelEntry* m = table_.Find(t.model);
  if (m == nullptr) return {};
  if (t.ordinal < 0)
    return m->phase == Phase::kAdmitting ? Pending{m, &m->admission_deadline, &m->waiting_for} : Pending{};
  auto g = m->gpus.find(t.ordinal);
  if (g == m->gpus.end() || g->second.phase != Phase::kAdmitting) return {};
  return Pending{m, &g->second.admission_deadline, &g->second.waiting_for};
}

void Cache::Forget(const std::string& model) {
  std::erase_if(admissions_, [&](const Ticket& t) { return t.model == model; });
}

void Cache::Retry(Clock::TimePoint now, const Decided& decided) {
  // Tiers whose earlier copy still waits: the later ones keep their place behind it (FIFO), and
  // their admission timeout waits with them.
  std::set<int> blocked;
  // By index: acting on a decision may queue another copy (a GPU copy that waited for this host
  // copy's fill), which is then retried in this same pass.
  for (std::size_t i = 0; i < admissions_.size();) {
    const Ticket t = admissions_[i];
    bool waiting = false;
    if (const auto [m, deadline, waiting_for] = Find(t); m != nullptr) {
      Status error;
      Verdict v = Verdict::kQueued;
      if (blocked.count(t.ordinal) == 0) v = t.ordinal < 0 ? AdmitHost(*m, &error) : AdmitGpu(*m, t.ordinal, &error);
      else if (!waiting_for->starts_with("queued behind")) *waiting_for = "queued behind earlier loads";
      if (v == Verdict::kQueued || (v == Verdict::kWaiting && !t.turn)) {
        *deadline = now + config_.admission_timeout;
        admissions_[i].turn = v == Verdict::kWaiting;
      } else if (v == Verdict::kWaiting && now >= *deadline) {
        v = Verdict::kRefused;
        const std::string where = t.ordinal < 0 ? "" : " on " + CudaName(t.ordinal);
        error = ResourceExhausted("model '" + m->config.name + "' waited " +
                                      std::to_string(config_.admission_timeout.count()) + " ms for room" + where +
                                      ": it " + *waiting_for,
                                  "cache.budget_exhausted");
      }
      waiting = v == Verdict::kWaiting || v == Verdict::kQueued;
      if (waiting) {
        blocked.insert(t.ordinal);
      } else {
        // The ticket goes before `decided` acts, which may queue this very copy again.
        admissions_.erase(admissions_.begin() + static_cast<std::ptrdiff_t>(i));
        decided(*m, t.ordinal, v, error);
        continue;
      }
    }
    if (waiting) ++i;
    else admissions_.erase(admissions_.begin() + static_cast<std::ptrdiff_t>(i));
  }
}

Status Cache::Evict(ModelEntry& m, const std::string& device) {
  const std::string& model = m.config.name;
  // Which tiers: every one, the host only, or one GPU.
  const bool all = device.empty();
  const bool host = all || device == "cpu";
  std::vector<int> ordinals;
  if (all) {
    for (const auto& [ordinal, g] : m.gpus) ordinals.push_back(ordinal);
  } else if (!host) {
    if (gpu_ == nullptr) return Unavailable("this daemon has no GPU tier", "gpu.no_device");
    ASSIGN_OR_RETURN(int o, gpu_->ResolveDevice(device));
    ordinals.push_back(o);
  }
  const std::uint32_t held = all ? leases_.LeasesOf(model) : leases_.LeasesOf(model, host ? "cpu" : CudaName(ordinals.front()));
  if (held > 0)
    return FailedPrecondition("model '" + model + "' has " + std::to_string(held) + (held == 1 ? " live lease" : " live leases") +
                                  (all ? "" : " on " + device) + "; it cannot be evicted until they are released",
                              "evict.leased");
  // The host copy also stays while any GPU copy is being made from it.
  bool busy = host && m.Busy();
  if (!host) {
    auto g = m.gpus.find(ordinals.front());
    busy = g != m.gpus.end() && g->second.state == ModelState::kLoading;
  }
  if (busy)
    return FailedPrecondition("model '" + model + "' is loading; evict it once the load finishes", "evict.loading");
  for (int o : ordinals)
    if (m.gpus.count(o)) table_.EvictGpu(m, o, policy::EvictReason::kAdmin);
  if (host && m.resident) table_.EvictHost(m, policy::EvictReason::kAdmin);
  if (host && m.state == ModelState::kFailed) m.state = ModelState::kAbsent;
  RetrySoon();
  return Status::Ok();
}

void Cache::Enforce(Clock::TimePoint now) {
  {
    std::vector<ModelEntry*> owners;
    std::vector<policy::Copy> copies = HostCopies(nullptr, &owners);
    for (std::size_t i : policy::Expired(copies, now)) table_.EvictHost(*owners[i], policy::EvictReason::kTtl);
  }
  for (const auto& [ordinal, budget] : gpu_budget_) {
    std::vector<ModelEntry*> owners;
    std::vector<policy::Copy> copies = GpuCopies(ordinal, nullptr, &owners);
    for (std::size_t i : policy::Expired(copies, now)) table_.EvictGpu(*owners[i], ordinal, policy::EvictReason::kTtl);
  }
  if (now - last_pressure_check_ < config_.pressure_interval) return;
  last_pressure_check_ = now;
  // Used above the threshold: evict unleased copies, in eviction order, worth the excess.
  auto excess_of = [](const MemoryProbe::Reading& r, double threshold) -> std::uint64_t {
    if (threshold <= 0 || r.total == 0) return 0;
    const std::uint64_t used = r.total - std::min(r.available, r.total);
    const auto limit = static_cast<std::uint64_t>(static_cast<double>(r.total) * threshold);
    return used > limit ? used - limit : 0;
  };
  if (config_.host_pressure > 0) {
    auto reading = memory_->Host();
    if (!reading.ok()) {
      spdlog::debug("memory pressure: {}", reading.status().ToString());
    } else if (std::uint64_t excess = excess_of(*reading, config_.host_pressure); excess > 0) {
      std::vector<ModelEntry*> owners;
      std::vector<policy::Copy> copies = HostCopies(nullptr, &owners);
      std::vector<std::size_t> victims = policy::Relieve(copies, excess);
      if (!victims.empty())
        spdlog::warn("host memory pressure: {} used over the {:.0f}% threshold; evicting {} models", Gib(excess),
                     config_.host_pressure * 100, victims.size());
      for (std::size_t i : victims) table_.EvictHost(*owners[i], policy::EvictReason::kPressure);
    }
  }
  if (config_.gpu_pressure > 0) {
    for (const auto& [ordinal, budget] : gpu_budget_) {
      auto reading = memory_->Gpu(ordinal);
      if (!reading.ok()) continue;
      std::uint64_t excess = excess_of(*reading, config_.gpu_pressure);
      if (excess == 0) continue;
      std::vector<ModelEntry*> owners;
      std::vector<policy::Copy> copies = GpuCopies(ordinal, nullptr, &owners);
      std::vector<std::size_t> victims = policy::Relieve(copies, excess);
      if (!victims.empty())
        spdlog::warn("{} memory pressure: {} used over the {:.0f}% threshold; evicting {} models", CudaName(ordinal),
                     Gib(excess), config_.gpu_pressure * 100, victims.size());
      for (std::size_t i : victims) table_.EvictGpu(*owners[i], ordinal, policy::EvictReason::kPressure);
    }
  }
}

}  // namespace weightd
