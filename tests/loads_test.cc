// The residency state machine without sockets: the model table and its load pipelines
// (loads.h), driven directly with real model files, a fake clock and, for GPU copies, the fake
// CUDA API. The test plays the control loop (support/residency.h).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <condition_variable>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>

#include "adopt.h"

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
// Each model: one shard of exactly 4 pages of data (a single F32 tensor of 4096 elements).
constexpr std::uint64_t kDataBytes = 4 * kPage;
// What one copy takes from the host budget: its segment and a page for its adoption record.
constexpr std::uint64_t kModelBytes = kDataBytes + kPage;

class LoadsTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(posix::PageSize(), kPage); }

  ModelConfig WriteModel(const std::string& name, std::uint64_t seed = 1) {
    std::vector<st::TensorSpec> t{{"w", DType::kF32, {64, 64}}};
    EXPECT_TRUE(testing::WriteModel(dir_.file(name), t, seed).ok());
    return ModelConfig{name, dir_.file(name)};
  }
  static CacheConfig Budget(std::uint64_t host_models) {
    CacheConfig c;
    c.host_budget = weightd::Budget{host_models * kModelBytes, 0};
    c.host_pressure = 0;
    c.gpu_pressure = 0;
    c.admission_timeout = 5s;  // of fake time
    return c;
  }

  TempDir dir_;
};

TEST_F(LoadsTest, HostLoadGoesThroughPlanAdmitFillToResidentAndAnswersEveryWaiterOnce) {
  Residency r(Budget(4));
  r.Add(WriteModel("a"));
  r.Request("a");
  r.Request("a");  // a second request shares the load
  const ModelEntry& m = *r.table.Find("a");
  EXPECT_EQ(m.state, ModelState::kLoading);
  EXPECT_EQ(m.phase, Phase::kPlanning);
  const std::uint64_t generation = m.generation;
  ASSERT_TRUE(r.PumpUntilHost("a", ModelState::kResident));
  EXPECT_EQ(m.generation, generation) << "one load, not two";
  ASSERT_EQ(r.answers.size(), 1u);
  EXPECT_EQ(r.answers[0].waiters, 2u);
  EXPECT_EQ(r.answers[0].state, ModelState::kResident);
  EXPECT_EQ(m.host_bytes, kModelBytes);
  EXPECT_EQ(m.host_reserved, 0u);
  EXPECT_EQ(r.table.HostUsed(), kModelBytes);
  EXPECT_EQ(m.tensors.size(), 1u);
  EXPECT_EQ(r.counters.host.loads_ok, 1u);
  EXPECT_EQ(m.loads, 1u);
  // One segment and its adoption record.
  EXPECT_EQ(r.ShmNames().size(), 2u);
  EXPECT_FALSE(m.resident->record.empty());
}

// The budget counts everything a copy leaves in /dev/shm: its segments in whole pages and its
// adoption record. A budget of two copies' data alone holds only one copy.
TEST_F(LoadsTest, HostChargeIsWhatTheCopyTakesInDevShmRecordIncluded) {
  CacheConfig c = Budget(0);
  c.host_budget = weightd::Budget{2 * kDataBytes, 0};
  Residency r(c);
  r.Add(WriteModel("a"));
  r.Add(WriteModel("b", 2));
  ASSERT_TRUE(r.Load("a"));
  std::uint64_t shm = 0;
  for (const std::string& name : r.ShmNames()) {
    struct stat sb;
    ASSERT_EQ(::stat(("/dev/shm/" + name).c_str(), &sb), 0) << name;
    shm += posix::RoundUp(static_cast<std::uint64_t>(sb.st_size), kPage);
  }
  const ModelEntry& a = *r.table.Find("a");
  EXPECT_EQ(a.host_bytes, shm) << "the charge is what /dev/shm holds, in pages";
  EXPECT_EQ(a.host_bytes, SegmentStore::HostCharge(RecordOf(*a.resident, a.resident->record, a.generation)));
  EXPECT_GT(a.host_bytes, kDataBytes);
  ASSERT_TRUE(r.Load("b"));
  EXPECT_EQ(r.table.Find("a")->state, ModelState::kAbsent) << "a and b do not both fit";
  EXPECT_LE(r.table.HostUsed(), 2 * kDataBytes);
  EXPECT_EQ(r.counters.host.evictions["lru"], 1u);
}

// max_loads: at most that many loads hold budget at once; the rest queue in arrival order,
// reserve nothing until they start, and their admission timeout does not run while they queue.
TEST_F(LoadsTest, LoadsInFlightAreBoundedAndTheRestQueueInArrivalOrder) {
  CacheConfig c = Budget(8);
  c.max_loads = 1;
  Residency r(c);
  const std::vector<std::string> names{"a", "b", "c", "d"};
  for (std::size_t i = 0; i < names.size(); ++i) r.Add(WriteModel(names[i], i + 1));
  // Each request is planned before the next is made, and the plans' results run in one batch,
  // in request order: a is admitted and b, c and d queue, whatever the speed of the machine.
  for (std::size_t i = 0; i < names.size(); ++i) {
    r.Request(names[i]);
    ASSERT_TRUE(r.WaitForTasks(i + 1)) << names[i];
  }
  r.Request("b");  // joins b's load
  std::size_t most = 0;
  bool saw_queue = false;
  ASSERT_TRUE(r.PumpUntil([&] {
    std::size_t reserving = 0;
    for (const auto& n : names) reserving += r.table.Find(n)->host_reserved > 0 ? 1 : 0;
    most = std::max(most, reserving);
    EXPECT_EQ(reserving, r.cache.LoadsInFlight(-1));
    for (const auto& n : names) {
      const ModelEntry& m = *r.table.Find(n);
      if (m.phase == Phase::kAdmitting) {
        saw_queue = true;
        EXPECT_EQ(m.host_reserved, 0u) << n << " reserves nothing while it queues";
        EXPECT_TRUE(m.waiting_for.find("load slot") != std::string::npos ||
                    m.waiting_for.find("queued behind") != std::string::npos)
            << m.waiting_for;
        r.clock.Advance(2s);  // queueing for a slot does not count against the 5 s timeout
      }
    }
    return r.answers.size() == names.size();
  }));
  EXPECT_EQ(most, 1u);
  EXPECT_TRUE(saw_queue);
  ASSERT_EQ(r.answers.size(), names.size());
  for (std::size_t i = 0; i < names.size(); ++i) {
    EXPECT_EQ(r.answers[i].model, names[i]) << "served in arrival order";
    EXPECT_EQ(r.answers[i].state, ModelState::kResident) << r.answers[i].error.ToString();
  }
  EXPECT_EQ(r.answers[1].waiters, 2u) << "the second request joined b's load";
  EXPECT_EQ(r.counters.host.loads_ok, names.size());
  EXPECT_EQ(r.cache.waiting(), 0u);
}

// A queued copy's admission timeout starts at its turn: the head of the queue, waiting for
// room that a lease holds, is refused at its deadline; the copy behind it, queued as long, is
// not refused with it, and gets a whole timeout of its own.
TEST_F(LoadsTest, AQueuedCopysAdmissionTimeoutStartsAtItsTurn) {
  CacheConfig c = Budget(1);
  c.max_loads = 1;
  Residency r(c);
  const std::vector<std::string> names{"a", "b", "c"};
  for (std::size_t i = 0; i < names.size(); ++i) r.Add(WriteModel(names[i], i + 1));
  ASSERT_TRUE(r.Load("a"));
  const std::uint64_t lease = r.Lease("a");  // the budget holds a alone, and a is leased
  for (const char* n : {"b", "c"}) {
    r.Request(n);
    ASSERT_TRUE(r.PumpUntil([&] { return r.table.Find(n)->phase == Phase::kAdmitting; })) << n;
  }
  EXPECT_NE(r.table.Find("b")->waiting_for.find("held by a"), std::string::npos) << r.table.Find("b")->waiting_for;
  EXPECT_NE(r.table.Find("c")->waiting_for.find("queued behind"), std::string::npos) << r.table.Find("c")->waiting_for;

  r.clock.Advance(6s);  // past the 5 s timeout, for b and for c alike
  r.loads.RetryAdmissions(r.clock.Now());
  ASSERT_EQ(r.answers.size(), 1u);
  EXPECT_EQ(r.answers[0].model, "b");
  EXPECT_EQ(r.answers[0].error.reason(), "cache.budget_exhausted") << r.answers[0].error.ToString();
  r.loads.RetryAdmissions(r.clock.Now());
  EXPECT_EQ(r.answers.size(), 1u) << "c's timeout started when b left the head of the queue";
  EXPECT_EQ(r.table.Find("c")->phase, Phase::kAdmitting);

  r.clock.Advance(6s);
  r.loads.RetryAdmissions(r.clock.Now());
  ASSERT_EQ(r.answers.size(), 2u);
  EXPECT_EQ(r.answers[1].model, "c");
  EXPECT_EQ(r.answers[1].error.reason(), "cache.budget_exhausted") << r.answers[1].error.ToString();
  EXPECT_EQ(r.cache.waiting(), 0u);
  EXPECT_TRUE(r.Release(lease).ok());
}

// max_loads = 0: no bound, no miss queues for a slot (the behaviour before the bound).
TEST_F(LoadsTest, UnboundedLoadsNeverQueueForASlot) {
  CacheConfig c = Budget(8);
  c.max_loads = 0;
  Residency r(c);
  for (const char* n : {"a", "b", "c"}) {
    r.Add(WriteModel(n));
    r.Request(n);
  }
  ASSERT_TRUE(r.PumpUntil([&] {
    EXPECT_EQ(r.cache.waiting(), 0u);
    return r.answers.size() == 3;
  }));
  for (const auto& a : r.answers) EXPECT_EQ(a.state, ModelState::kResident);
}

// Counts the segments being written at once (a fill writes one model's); each write waits (up
// to 2 s) until `want` segments are being written together, so that the most seen is how many
// fills can write at once.
class ConcurrentWrites : public FileIo {
 public:
  explicit ConcurrentWrites(std::size_t want) : want_(want) {}
  Status Pwrite(int fd, std::span<const std::byte> in, std::uint64_t offset, std::string_view what) override {
    {
      std::unique_lock lock(mu_);
      ++inside_[fd];
      most_ = std::max(most_, inside_.size());
      cv_.notify_all();
      cv_.wait_for(lock, 2s, [&] { return inside_.size() >= want_ || released_; });
      released_ = true;  // the first group met (or timed out); later writes do not wait
      cv_.notify_all();
    }
    Status s = FileIo::Pwrite(fd, in, offset, what);
    std::lock_guard lock(mu_);
    if (--inside_[fd] == 0) inside_.erase(fd);
    return s;
  }
  std::size_t most() {
    std::lock_guard lock(mu_);
    return most_;
  }

 private:
  const std::size_t want_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int, unsigned> inside_;  // segment fd -> writes in progress
  std::size_t most_ = 0;
  bool released_ = false;
};

// Every load that max_loads admits also reads: Loads runs as many fills at once as it is given
// (the daemon gives it max_loads), and plans never wait behind them.
TEST_F(LoadsTest, AsManyFillsRunAtOnceAsFillJobsAllow) {
  for (unsigned jobs : {2u, 3u}) {
    SCOPED_TRACE("fill_jobs " + std::to_string(jobs));
    CacheConfig c = Budget(8);
    c.max_loads = 3;
    ConcurrentWrites io(3);
    {
      Residency r(c, nullptr, true, jobs, &io);
      for (const char* n : {"a", "b", "c"}) {
        r.Add(WriteModel(std::string(n) + std::to_string(jobs)));
        r.Request(std::string(n) + std::to_string(jobs));
      }
      ASSERT_TRUE(r.PumpUntil([&] { return r.answers.size() == 3; }));
      for (const auto& a : r.answers) EXPECT_EQ(a.state, ModelState::kResident) << a.model;
    }
    EXPECT_EQ(io.most(), std::size_t{jobs});
  }
}

TEST_F(LoadsTest, FailedLoadAnswersItsWaitersAndCountsTheReason) {
  Residency r(Budget(4));
  ModelConfig mc = WriteModel("bad");
  {
    std::ofstream f(mc.dir + "/model.safetensors", std::ios::binary | std::ios::trunc);
    f << "not a safetensors file";
  }
  r.Add(mc);
  r.Request("bad");
  ASSERT_TRUE(r.PumpUntilHost("bad", ModelState::kFailed));
  ASSERT_EQ(r.answers.size(), 1u);
  EXPECT_EQ(r.answers[0].state, ModelState::kFailed);
  EXPECT_FALSE(r.answers[0].error.ok());
  EXPECT_EQ(r.counters.host.loads_failed, 1u);
  EXPECT_EQ(r.counters.host.errors.count(r.answers[0].error.reason()), 1u) << r.answers[0].error.ToString();
  EXPECT_FALSE(r.table.Find("bad")->resident);
  EXPECT_TRUE(r.ShmNames().empty());
}

TEST_F(LoadsTest, ModelLargerThanTheBudgetIsRefusedBeforeAnySegmentExists) {
  Residency r(Budget(1));
  std::vector<st::TensorSpec> t{{"w", DType::kF32, {128, 64}}};  // 8 pages
  ASSERT_TRUE(testing::WriteModel(dir_.file("big"), t, 1).ok());
  r.Add(ModelConfig{"big", dir_.file("big")});
  r.Request("big");
  ASSERT_TRUE(r.PumpUntilHost("big", ModelState::kFailed));
  ASSERT_EQ(r.answers.size(), 1u);
  EXPECT_EQ(r.answers[0].error.reason(), "cache.too_large") << r.answers[0].error.ToString();
  EXPECT_TRUE(r.ShmNames().empty());
}

TEST_F(LoadsTest, WaitsForRoomWhileALeaseHoldsItAndLoadsOnceTheLeaseEnds) {
  Residency r(Budget(1));
  r.Add(WriteModel("a"));
  r.Add(WriteModel("b", 2));
  ASSERT_TRUE(r.Load("a"));
  const std::uint64_t lease = r.Lease("a");
  r.Request("b");
  ASSERT_TRUE(r.PumpUntil([&] { return r.table.Find("b")->phase == Phase::kAdmitting; }));
  EXPECT_EQ(r.cache.waiting(), 1u);
  EXPECT_NE(r.table.Find("b")->waiting_for.find("host budget"), std::string::npos) << r.table.Find("b")->waiting_for;
  EXPECT_NE(r.table.Find("b")->waiting_for.find("1 lease"), std::string::npos) << r.table.Find("b")->waiting_for;
  // The lease ends: the loop retries, evicts a (least recently used, unleased now) and loads b.
  ASSERT_TRUE(r.Release(lease).ok());
  r.cache.RetrySoon();
  ASSERT_TRUE(r.PumpUntilHost("b", ModelState::kResident));
  EXPECT_EQ(r.table.Find("a")->state, ModelState::kAbsent);
  EXPECT_EQ(r.counters.host.evictions["lru"], 1u);
  EXPECT_EQ(r.cache.waiting(), 0u);
}

TEST_F(LoadsTest, AdmissionThatWaitsPastItsTimeoutFailsWithBudgetExhausted) {
  Residency r(Budget(1));
  r.Add(WriteModel("a"));
  r.Add(WriteModel("b", 2));
  ASSERT_TRUE(r.Load("a"));
  r.Lease("a");
  r.Request("b");
  ASSERT_TRUE(r.PumpUntil([&] { return r.cache.waiting() == 1; }));
  r.clock.Advance(6s);
  r.cache.RetrySoon();
  ASSERT_TRUE(r.PumpUntilHost("b", ModelState::kFailed));
  EXPECT_EQ(r.answers.back().error.reason(), "cache.budget_exhausted") << r.answers.back().error.ToString();
  EXPECT_EQ(r.table.Find("a")->state, ModelState::kResident) << "a leased copy is never a victim";
  EXPECT_EQ(r.cache.waiting(), 0u);
}

TEST_F(LoadsTest, ResultOfALoadThatWasReplacedIsFreedNotInstalled) {
  Residency r(Budget(4));
  r.Add(WriteModel("a"));
  r.Request("a");
  ModelEntry& m = *r.table.Find("a");
  const std::uint64_t first = m.generation;
  // Admitted and filling (or filled, its result not yet handed to the loop).
  ASSERT_TRUE(r.PumpUntil([&] { return m.phase == Phase::kWorking; }));
  // What a reload does to a model that changed directory while it loaded.
  m.cancel->store(true);
  r.table.DropResident(m);
  m.state = ModelState::kAbsent;
  m.waiters.clear();
  r.Request("a");
  ASSERT_NE(m.generation, first);
  ASSERT_TRUE(r.PumpUntilHost("a", ModelState::kResident));
  ASSERT_TRUE(r.PumpUntil([&] { return r.ShmNames().size() == 2; }));
  for (const std::string& name : r.ShmNames())
    EXPECT_NE(name.find(r.store.LoadTag(m.generation)), std::string::npos) << name << " is not the second load's";
}

TEST_F(LoadsTest, GpuCopyOfAnAbsentModelLoadsTheHostCopyFirst) {
  FakeCudaApi cuda({FakeCudaApi::Device{}}, 64 * 1024);
  Residency r(Budget(4), &cuda);
  r.Add(WriteModel("a"));
  r.Request("a", 0);
  const ModelEntry& m = *r.table.Find("a");
  EXPECT_EQ(m.state, ModelState::kLoading) << "the host copy is the GPU copy's source";
  ASSERT_TRUE(r.PumpUntilGpu("a", 0, ModelState::kResident));
  EXPECT_EQ(m.state, ModelState::kResident);
  ASSERT_EQ(r.answers.size(), 1u);
  EXPECT_EQ(r.answers[0].ordinal, 0);
  EXPECT_EQ(r.answers[0].state, ModelState::kResident);
  EXPECT_EQ(r.counters.gpu.loads_ok, 1u);
  EXPECT_EQ(r.table.GpuUsed(0), cuda.allocated_bytes(0));
  EXPECT_EQ(r.table.GpuCount(0), 1u);
}

// Two GPUs with peer access: the second GPU's copy is made from the first GPU's, device to
// device, not from host memory; without peer access, with peer_copy off, or when the peer copy
// fails, it is made from the host copy. Every way, the bytes are the file's.
TEST_F(LoadsTest, ASecondGpusCopyComesFromTheFirstGpuWherePeerAccessAllows) {
  struct Case {
    const char* what;
    bool peer_access, peer_copy, peer_fails;
    bool from_peer;
  };
  for (const Case& k : {Case{"peer access", true, true, false, true}, Case{"no peer access", false, true, false, false},
                        Case{"peer_copy off", true, false, false, false},
                        Case{"the peer copy fails", true, true, true, false}}) {
    SCOPED_TRACE(k.what);
    FakeCudaApi cuda({FakeCudaApi::Device{}, FakeCudaApi::Device{}}, 64 * 1024);
    cuda.SetPeerAccess(k.peer_access);
    Residency r(Budget(4), &cuda, k.peer_copy);
    r.Add(WriteModel("a"));
    r.Request("a", 0);
    ASSERT_TRUE(r.PumpUntilGpu("a", 0, ModelState::kResident));
    cuda.ClearLog();
    cuda.SetPeerCopiesFail(k.peer_fails);
    r.Request("a", 1);
    ASSERT_TRUE(r.PumpUntilGpu("a", 1, ModelState::kResident));
    const ModelEntry& m = *r.table.Find("a");
    const gpu::GpuCopy& second = *m.gpus.at(1).copy;
    EXPECT_EQ(second.copied_from(), k.from_peer ? 0 : -1);
    EXPECT_EQ(cuda.counters().peer_copies > 0, k.from_peer);
    EXPECT_EQ(cuda.h2d_log().empty(), k.from_peer) << "host-to-device copies";
    EXPECT_EQ(r.gpu->Stats().peer_copies, k.from_peer ? 1u : 0u);
    const ResidentShard& host = m.resident->shards.at(0);
    std::vector<std::byte> got(host.segment.data_size());
    ASSERT_TRUE(second.CopyToHost(0, 0, got).ok());
    EXPECT_EQ(std::memcmp(got.data(), host.segment.data(), got.size()), 0) << "the copy on cuda:1 is the file's bytes";
    ASSERT_EQ(r.answers.size(), 2u);
    EXPECT_EQ(r.answers[1].ordinal, 1);
    EXPECT_EQ(r.answers[1].state, ModelState::kResident);
    EXPECT_EQ(r.table.GpuUsed(1), cuda.allocated_bytes(1));
    EXPECT_EQ(cuda.counters().bad_copies, 0);
  }
}

// Where GPUs are served, a Load of the host copy answers once the copy is page-locked (so that
// a GPU copy asked for next runs at PCIe speed); an Acquire of the host copy does not wait for
// that. Host-only, nothing is page-locked and the Load answers with the copy.
TEST_F(LoadsTest, ALoadServingGpusAnswersOnceTheCopyIsPageLockedAndAnAcquireDoesNotWait) {
  FakeCudaApi cuda({FakeCudaApi::Device{}}, 64 * 1024);
  {
    Residency r(Budget(4), &cuda);
    r.Add(WriteModel("a"));
    r.RequestLoad("a");
    r.Request("a");
    ASSERT_TRUE(r.PumpUntil([&] { return r.answers.size() == 2; }));
    EXPECT_EQ(r.answers[0].kind, Waiter::kAcquire) << "the Acquire is answered first, alone";
    EXPECT_EQ(r.answers[0].waiters, 1u);
    EXPECT_EQ(r.answers[0].state, ModelState::kResident);
    EXPECT_EQ(r.answers[1].kind, Waiter::kLoad);
    EXPECT_EQ(r.answers[1].state, ModelState::kResident);
    EXPECT_TRUE(r.answers[1].pinned) << "a Load that serves GPUs answers once page-locked";
    EXPECT_FALSE(r.table.Find("a")->pinning);
    EXPECT_TRUE(r.table.Find("a")->pin_waiters.empty());
  }
  {  // Host-only: both answered together, with the copy.
    Residency r(Budget(4));
    r.Add(WriteModel("a"));
    r.RequestLoad("a");
    r.Request("a");
    ASSERT_TRUE(r.PumpUntilHost("a", ModelState::kResident));
    ASSERT_EQ(r.answers.size(), 1u);
    EXPECT_EQ(r.answers[0].waiters, 2u);
    EXPECT_FALSE(r.answers[0].pinned);
  }
}

TEST_F(LoadsTest, GpuCopiesWaitingForAHostCopyFailWithIt) {
  FakeCudaApi cuda({FakeCudaApi::Device{}}, 64 * 1024);
  Residency r(Budget(4), &cuda);
  ModelConfig mc = WriteModel("bad");
  {
    std::ofstream f(mc.dir + "/model.safetensors", std::ios::binary | std::ios::trunc);
    f << "garbage";
  }
  r.Add(mc);
  r.Request("bad", 0);
  ASSERT_TRUE(r.PumpUntilGpu("bad", 0, ModelState::kFailed));
  EXPECT_EQ(r.table.Find("bad")->state, ModelState::kFailed);
  ASSERT_EQ(r.answers.size(), 1u);
  EXPECT_EQ(r.answers[0].ordinal, 0);
  EXPECT_EQ(r.counters.gpu.loads_failed, 1u);
  EXPECT_EQ(cuda.allocated_bytes(0), 0u);
}

}  // namespace
}  // namespace weightd
