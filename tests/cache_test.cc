// The eviction policy applied to the model table (cache.h), without sockets: which copies an
// admission evicts, what is never evicted, idle TTLs, memory pressure and an administrator's
// evict, on real resident copies (support/residency.h) and a fake clock.
#include <gtest/gtest.h>

#include "support/daemon_process.h"
#include "support/fake_cuda.h"
#include "support/residency.h"

namespace weightd {
namespace {

using namespace std::chrono_literals;
using testing::FakeCudaApi;
using testing::Residency;
using testing::TempDir;

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kDataBytes = 4 * kPage;  // one F32 tensor of 64x64
// What one copy takes from the host budget: its segment and a page for its adoption record.
constexpr std::uint64_t kModelBytes = kDataBytes + kPage;

class CacheTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(posix::PageSize(), kPage); }

  ModelConfig WriteModel(const std::string& name) {
    std::vector<st::TensorSpec> t{{"w", DType::kF32, {64, 64}}};
    EXPECT_TRUE(testing::WriteModel(dir_.file(name), t, name.size()).ok());
    return ModelConfig{name, dir_.file(name)};
  }
  static CacheConfig Config(std::uint64_t host_models) {
    CacheConfig c;
    c.host_budget = Budget{host_models * kModelBytes, 0};
    c.host_pressure = 0;
    c.gpu_pressure = 0;
    return c;
  }
  // Loads each model in turn, one second of fake time apart (so the first is least recent).
  static void LoadAll(Residency& r, const std::vector<std::string>& names) {
    for (const auto& n : names) {
      ASSERT_TRUE(r.Load(n)) << n;
      r.clock.Advance(1s);
    }
  }
  static ModelState HostState(Residency& r, const std::string& name) { return r.table.Find(name)->state; }

  TempDir dir_;
};

TEST_F(CacheTest, AdmissionEvictsTheLeastRecentlyUsedCopy) {
  Residency r(Config(2));
  for (const char* n : {"a", "b", "c"}) r.Add(WriteModel(n));
  LoadAll(r, {"a", "b"});
  r.table.Touch("a", "cpu", r.clock.Now());  // a lease of a ended: a is now the most recent
  ASSERT_TRUE(r.Load("c"));
  EXPECT_EQ(HostState(r, "a"), ModelState::kResident);
  EXPECT_EQ(HostState(r, "b"), ModelState::kAbsent);
  EXPECT_EQ(r.counters.host.evictions["lru"], 1u);
  EXPECT_LE(r.table.HostUsed(), 2 * kModelBytes);
}

// Frequency-aware eviction: a model asked for often stays, even when it is the least recently
// used; under "lru" the same sequence evicts it.
TEST_F(CacheTest, LfuEvictsTheLeastFrequentlyUsedCopyAndLruTheLeastRecent) {
  for (const char* eviction : {"lfu", "lru"}) {
    SCOPED_TRACE(eviction);
    CacheConfig c = Config(2);
    c.eviction = eviction;
    Residency r(c);
    for (const char* n : {"a", "b", "c"}) r.Add(WriteModel(n));
    for (int i = 0; i < 5; ++i) r.cache.RecordAccess("a", -1);  // five acquires of a
    LoadAll(r, {"a", "b"});  // b is the most recent
    r.cache.RecordAccess("b", -1);
    r.cache.RecordAccess("c", -1);
    ASSERT_TRUE(r.Load("c"));
    if (std::string(eviction) == "lfu") {
      EXPECT_EQ(r.cache.Frequency("a", -1), 5u);
      EXPECT_EQ(HostState(r, "a"), ModelState::kResident);
      EXPECT_EQ(HostState(r, "b"), ModelState::kAbsent);
    } else {
      EXPECT_EQ(r.cache.Frequency("a", -1), 0u) << "no counts are kept under lru";
      EXPECT_EQ(HostState(r, "a"), ModelState::kAbsent);
      EXPECT_EQ(HostState(r, "b"), ModelState::kResident);
    }
    EXPECT_EQ(r.counters.host.evictions["lru"], 1u);
  }
}

// The counts outlive an eviction: a popular model that was evicted (it was leased-out of the way,
// say) comes back with its history, and a one-off is the next victim.
TEST_F(CacheTest, LfuRemembersEvictedModelsAndNeverEvictsALeasedCopy) {
  Residency r(Config(2));
  for (const char* n : {"a", "b", "c", "d"}) r.Add(WriteModel(n));
  for (int i = 0; i < 4; ++i) r.cache.RecordAccess("a", -1);
  LoadAll(r, {"a", "b"});
  ASSERT_TRUE(r.cache.Evict(*r.table.Find("a"), "cpu").ok());
  EXPECT_EQ(r.cache.Frequency("a", -1), 4u);
  ASSERT_TRUE(r.Load("c"));                   // room without evicting b
  r.cache.RecordAccess("c", -1);
  r.cache.RecordAccess("c", -1);              // c: 2, b: 0
  const std::uint64_t lease = r.Lease("b");  // the least frequent, but leased
  ASSERT_TRUE(r.Load("a"));
  EXPECT_EQ(HostState(r, "b"), ModelState::kResident) << "a leased copy is never a victim";
  EXPECT_EQ(HostState(r, "c"), ModelState::kAbsent);
  ASSERT_TRUE(r.Release(lease).ok());
  r.clock.Advance(1s);
  r.table.Touch("b", "cpu", r.clock.Now());  // b is the most recent: LRU would evict a
  ASSERT_TRUE(r.Load("d"));
  EXPECT_EQ(HostState(r, "a"), ModelState::kResident) << "a's count came back with it";
  EXPECT_EQ(HostState(r, "b"), ModelState::kAbsent);
}

// A ticket whose copy no longer waits (its load failed or was dropped after it queued) stays
// in the queue until the next retry: it must not make a new arrival queue behind it, and a copy
// queued twice has one ticket (a second would wait behind the first and hold the tier).
TEST_F(CacheTest, StaleOrRepeatedTicketsNeitherQueueArrivalsNorHoldTheTier) {
  CacheConfig c = Config(2);
  c.max_loads = 1;
  Residency r(c);
  for (const char* n : {"a", "b"}) r.Add(WriteModel(n));
  r.cache.Queue("a", -1);  // a is idle: the ticket is stale
  r.cache.Queue("a", -1);
  EXPECT_EQ(r.cache.waiting(), 1u) << "one ticket per copy";
  ModelEntry& b = *r.table.Find("b");
  b.phase = Phase::kAdmitting;
  b.host_bytes = kModelBytes;
  Status error;
  EXPECT_EQ(r.cache.Arrive(b, -1, &error), Cache::Verdict::kAdmitted) << b.waiting_for;
  EXPECT_EQ(b.host_reserved, kModelBytes);
  EXPECT_EQ(r.cache.waiting(), 1u) << "an admitted copy takes no ticket";
  b.host_reserved = 0;  // b never loads
  b.phase = Phase::kIdle;
  r.cache.Retry(r.clock.Now(), [](ModelEntry& m, int, Cache::Verdict, const Status&) {
    ADD_FAILURE() << m.config.name << " decided: nothing waits";
  });
  EXPECT_EQ(r.cache.waiting(), 0u) << "the retry drops the stale ticket";
}

TEST_F(CacheTest, LowerPriorityIsEvictedFirstAndPinnedOrLeasedCopiesNever) {
  Residency r(Config(3));
  for (const char* n : {"pinned", "leased", "low", "high", "new"}) r.Add(WriteModel(n));
  r.table.Find("pinned")->config.pin = true;
  r.table.Find("low")->config.priority = -1;
  LoadAll(r, {"pinned", "leased", "low"});
  r.Lease("leased");
  // Full: "high" evicts "low" (priority -1), though "pinned" is older.
  ASSERT_TRUE(r.Load("high"));
  EXPECT_EQ(HostState(r, "low"), ModelState::kAbsent);
  EXPECT_EQ(HostState(r, "pinned"), ModelState::kResident);
  EXPECT_EQ(HostState(r, "leased"), ModelState::kResident);
  // Full again, and a newcomer of priority 0 may evict only "high" (priority 0, unleased).
  ASSERT_TRUE(r.Load("new"));
  EXPECT_EQ(HostState(r, "high"), ModelState::kAbsent);
  EXPECT_EQ(HostState(r, "pinned"), ModelState::kResident);
  EXPECT_EQ(HostState(r, "leased"), ModelState::kResident);
}

TEST_F(CacheTest, WarmPoolCapCountsCopiesNotBytes) {
  CacheConfig c = Config(10);
  c.max_host_models = 2;
  Residency r(c);
  for (const char* n : {"a", "b", "c"}) r.Add(WriteModel(n));
  LoadAll(r, {"a", "b", "c"});
  EXPECT_EQ(HostState(r, "a"), ModelState::kAbsent);
  EXPECT_EQ(r.table.HostCount(), 2u);
}

TEST_F(CacheTest, IdleTtlEvictsUnleasedCopiesOnceTheirIdleTimeRunsOut) {
  CacheConfig c = Config(4);
  c.host_idle_ttl = 30s;
  Residency r(c);
  for (const char* n : {"idle", "leased"}) r.Add(WriteModel(n));
  LoadAll(r, {"idle", "leased"});
  r.Lease("leased");
  r.cache.Enforce(r.clock.Now() + 20s);
  EXPECT_EQ(HostState(r, "idle"), ModelState::kResident) << "20 s idle of 30";
  r.cache.Enforce(r.clock.Now() + 40s);
  EXPECT_EQ(HostState(r, "idle"), ModelState::kAbsent);
  EXPECT_EQ(HostState(r, "leased"), ModelState::kResident);
  EXPECT_EQ(r.counters.host.evictions["ttl"], 1u);
}

TEST_F(CacheTest, MemoryPressureEvictsInEvictionOrderWorthTheExcess) {
  CacheConfig c = Config(4);
  c.host_pressure = 0.5;
  c.pressure_interval = 1s;
  Residency r(c);
  for (const char* n : {"a", "b", "c"}) r.Add(WriteModel(n));
  LoadAll(r, {"a", "b", "c"});
  // Used is 50% of the total plus one model's worth: evicting the oldest copy is enough.
  r.memory.host_total = 1000 * kModelBytes;
  r.memory.host_available = 500 * kModelBytes - kModelBytes;
  r.cache.Enforce(r.clock.Now());
  EXPECT_EQ(HostState(r, "a"), ModelState::kAbsent);
  EXPECT_EQ(HostState(r, "b"), ModelState::kResident);
  EXPECT_EQ(HostState(r, "c"), ModelState::kResident);
  EXPECT_EQ(r.counters.host.evictions["pressure"], 1u);
  // Sampled once per pressure_interval only.
  r.cache.Enforce(r.clock.Now() + 500ms);
  EXPECT_EQ(HostState(r, "b"), ModelState::kResident);
}

TEST_F(CacheTest, AdminEvictIsRefusedWhileLeasedOrLoadingAndDropsEveryTierOtherwise) {
  FakeCudaApi cuda({FakeCudaApi::Device{}}, 64 * 1024);
  Residency r(Config(4), &cuda);
  r.Add(WriteModel("a"));
  r.Request("a", 0);
  ModelEntry& m = *r.table.Find("a");
  EXPECT_EQ(r.cache.Evict(m, "").reason(), "evict.loading");
  ASSERT_TRUE(r.PumpUntilGpu("a", 0, ModelState::kResident));
  const std::uint64_t lease = r.Lease("a", "cuda:0");
  EXPECT_EQ(r.cache.Evict(m, "cuda:0").reason(), "evict.leased");
  // The host copy alone may go: the GPU lease holds only the GPU copy.
  ASSERT_TRUE(r.cache.Evict(m, "cpu").ok());
  EXPECT_FALSE(m.resident);
  EXPECT_EQ(m.gpus.count(0), 1u);
  EXPECT_FALSE(m.tensors.empty()) << "the GPU copy's leases still need the tensor index";
  ASSERT_TRUE(r.Release(lease).ok());
  ASSERT_TRUE(r.cache.Evict(m, "").ok());
  EXPECT_TRUE(m.gpus.empty());
  EXPECT_TRUE(m.tensors.empty());
  EXPECT_EQ(r.counters.host.evictions["admin"], 1u);
  EXPECT_EQ(r.counters.gpu.evictions["admin"], 1u);
  EXPECT_EQ(r.cache.Evict(m, "cuda:7").reason(), "gpu.unknown_device");
}

}  // namespace
}  // namespace weightd
