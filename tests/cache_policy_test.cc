// The cache policy end to end: the real Server on a thread with a fake clock (TTLs and LRU
// without sleeping), an injected memory reading (pressure), and the fake CUDA API (GPU
// eviction), driven over its real ZeroMQ socket. Models are a few pages each; the budgets are
// set in pages, so the arithmetic is exact.
#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <regex>
#include <thread>

#include <zmq.hpp>

#include "posix.h"
#include "protocol.h"
#include "server.h"
#include "support/daemon_process.h"
#include "support/fake_cuda.h"
#include "support/raw_client.h"

namespace weightd {
namespace {

using namespace std::chrono_literals;
using testing::FakeCudaApi;
using testing::TempDir;
using testing::RawClient;
using proto::ModelState;

std::atomic<int> g_instance{0};


Status ErrorOf(const proto::Reply& r) {
  if (auto* e = std::get_if<proto::ErrorReply>(&r.body)) return proto::FromErrorReply(*e);
  return Status::Ok();
}

std::uint64_t LeaseOf(const proto::Reply& r) {
  auto* m = std::get_if<proto::Manifest>(&r.body);
  EXPECT_NE(m, nullptr) << ErrorOf(r).ToString();
  return m ? m->lease_id : 0;
}

class FakeMemory final : public MemoryProbe {
 public:
  Result<Reading> Host() override { return Reading{host_total.load(), host_available.load()}; }
  Result<Reading> Gpu(int) override { return Reading{gpu_total.load(), gpu_available.load()}; }
  std::atomic<std::uint64_t> host_total{64ull << 30}, host_available{60ull << 30};
  std::atomic<std::uint64_t> gpu_total{64ull << 20}, gpu_available{60ull << 20};
};

constexpr std::uint64_t kPage = 4096;
// Each model: one shard of exactly 4 pages of data (a single F32 tensor of 4096 elements).
constexpr std::uint64_t kDataBytes = 4 * kPage;
// What one copy takes from the host budget: its segment and a page for its adoption record.
constexpr std::uint64_t kModelBytes = kDataBytes + kPage;

class CachePolicy : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(posix::PageSize(), kPage);
    for (const char* name : {"a", "b", "c", "d", "e"}) WriteModelFiles(name, 1);
    cfg_.socket = "ipc://" + dir_.file("wd.sock");
    cfg_.shm_prefix = "wdpol-" + std::to_string(::getpid()) + "-" + std::to_string(g_instance++);
    cfg_.heartbeat_interval = 100ms;
    cfg_.heartbeat_timeout = 24h;  // the fake clock jumps by minutes; sessions must not expire
    cfg_.cache.host_budget = Budget{2 * kModelBytes, 0};
    cfg_.cache.gpu_idle_ttl = 0ms;
    cfg_.cache.host_pressure = 0;
    cfg_.cache.gpu_pressure = 0;
    cfg_.cache.file_check_interval = 0ms;
    cfg_.cache.admission_timeout = 5s;  // of fake time
    cfg_.chunk_size = 4096;
    for (const char* name : {"a", "b", "c", "d", "e"}) UpsertModel(&cfg_, ModelConfig{name, dir_.file(name)});
  }
  void TearDown() override { StopServer(); }

  void WriteModelFiles(const std::string& name, std::uint64_t seed) {
    std::vector<st::TensorSpec> t{{"w", DType::kF32, {64, 64}}};
    ASSERT_TRUE(testing::WriteModel(dir_.file(name), t, seed).ok());
  }
  ModelConfig& Model(const std::string& name) {
    for (auto& m : cfg_.models)
      if (m.name == name) return m;
    ADD_FAILURE() << "no model " << name;
    return cfg_.models.front();
  }

  void StartServer(bool with_gpu = false) {
    ASSERT_TRUE(Finalize(&cfg_).ok());
    if (with_gpu) tier_ = std::make_unique<gpu::GpuTier>(&fake_, gpu::MaterializeOptions{16 * 1024, 2});
    auto s = Server::Create(cfg_, &clock_, tier_.get(), &memory_);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    server_ = std::move(s).value();
    thread_ = std::thread([this] { EXPECT_TRUE(server_->Run().ok()); });
  }
  void StopServer() {
    if (!server_) return;
    server_->Stop();
    thread_.join();
    server_.reset();
  }
  std::string Endpoint() const { return cfg_.socket; }

  proto::ModelStatus StatusOf(RawClient& c, const std::string& model) {
    proto::Reply r = c.Call(proto::StatusRequest{model});
    auto* st = std::get_if<proto::ModelStatus>(&r.body);
    EXPECT_NE(st, nullptr) << ErrorOf(r).ToString();
    return st ? *st : proto::ModelStatus{};
  }
  proto::DaemonStats Stats(RawClient& c) {
    proto::Reply r = c.Call(proto::Stats{});
    auto* st = std::get_if<proto::DaemonStats>(&r.body);
    EXPECT_NE(st, nullptr);
    return st ? *st : proto::DaemonStats{};
  }
  ModelState HostState(RawClient& c, const std::string& model) {
    return proto::ParseModelState(StatusOf(c, model).state).value_or(ModelState::kAbsent);
  }
  // Waits (real time) until `model`'s host state is `want`; the loop applies the policy every
  // 200 ms of fake time, at most every 250 ms of real time.
  bool WaitHostState(RawClient& c, const std::string& model, ModelState want) {
    for (int i = 0; i < 200; ++i) {
      if (HostState(c, model) == want) return true;
      std::this_thread::sleep_for(20ms);
    }
    return false;
  }
  // Acquires on the host and releases at once; the model stays resident, unleased.
  void Touch(RawClient& c, const std::string& model) {
    const std::uint64_t lease = LeaseOf(c.Call(proto::Acquire{model, "cpu", {}}));
    ASSERT_NE(lease, 0u);
    ASSERT_TRUE(ErrorOf(c.Call(proto::Release{lease})).ok());
    clock_.Advance(1s);  // later touches are strictly more recent
  }
  // The value of one sample of the stats' metrics text, or -1.
  static double Metric(const proto::DaemonStats& st, const std::string& sample) {
    std::istringstream in(st.metrics);
    std::string line;
    while (std::getline(in, line))
      if (line.rfind(sample + " ", 0) == 0) return std::stod(line.substr(sample.size() + 1));
    return -1;
  }

  TempDir dir_;
  DaemonConfig cfg_;
  FakeClock clock_;
  FakeMemory memory_;
  FakeCudaApi fake_{{FakeCudaApi::Device{}}, 64 * 1024};
  std::unique_ptr<gpu::GpuTier> tier_;
  std::unique_ptr<Server> server_;
  std::thread thread_;
};

TEST_F(CachePolicy, EvictsTheLeastRecentlyUsedModelToMakeRoom) {
  StartServer();
  RawClient c(Endpoint());
  Touch(c, "a");
  Touch(c, "b");
  Touch(c, "a");  // b is now the least recently used
  Touch(c, "c");
  EXPECT_EQ(HostState(c, "a"), ModelState::kResident);
  EXPECT_EQ(HostState(c, "b"), ModelState::kAbsent);
  EXPECT_EQ(HostState(c, "c"), ModelState::kResident);
  const proto::DaemonStats st = Stats(c);
  EXPECT_LE(st.host_resident_bytes, 2 * kModelBytes);
  EXPECT_EQ(Metric(st, R"(weightd_evictions_total{tier="host",reason="lru"})"), 1);
  EXPECT_EQ(Metric(st, R"(weightd_cache_misses_total{tier="host"})"), 3);  // a, b, c
  EXPECT_EQ(Metric(st, R"(weightd_cache_hits_total{tier="host"})"), 1);    // a again
}

TEST_F(CachePolicy, LowerPriorityGoesFirstAndPinnedModelsStay) {
  Model("a").pin = true;
  Model("b").priority = 5;
  cfg_.cache.host_budget = Budget{3 * kModelBytes, 0};
  StartServer();
  RawClient c(Endpoint());
  Touch(c, "a");  // oldest, but pinned
  Touch(c, "b");  // older than c, but of a higher priority
  Touch(c, "c");
  Touch(c, "d");
  EXPECT_EQ(HostState(c, "a"), ModelState::kResident);
  EXPECT_EQ(HostState(c, "b"), ModelState::kResident);
  EXPECT_EQ(HostState(c, "c"), ModelState::kAbsent);
  EXPECT_EQ(HostState(c, "d"), ModelState::kResident);
  EXPECT_EQ(StatusOf(c, "a").pinned, 1);
}

TEST_F(CachePolicy, IdleTtlPerTierAndPerModel) {
  cfg_.cache.host_budget = Budget{0, 0.5};
  cfg_.cache.host_idle_ttl = 10s;
  Model("b").host_idle_ttl = 60s;
  StartServer();
  RawClient c(Endpoint());
  Touch(c, "a");
  Touch(c, "b");
  const std::uint64_t held = LeaseOf(c.Call(proto::Acquire{"c", "cpu", {}}));  // leased: never idle
  clock_.Advance(11s);
  EXPECT_TRUE(WaitHostState(c, "a", ModelState::kAbsent));
  EXPECT_EQ(HostState(c, "b"), ModelState::kResident);
  clock_.Advance(50s);
  EXPECT_TRUE(WaitHostState(c, "b", ModelState::kAbsent));
  EXPECT_EQ(HostState(c, "c"), ModelState::kResident);
  EXPECT_EQ(Metric(Stats(c), R"(weightd_evictions_total{tier="host",reason="ttl"})"), 2);
  // Released, c ages from now on.
  ASSERT_TRUE(ErrorOf(c.Call(proto::Release{held})).ok());
  clock_.Advance(9s);
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(HostState(c, "c"), ModelState::kResident);
  clock_.Advance(2s);
  EXPECT_TRUE(WaitHostState(c, "c", ModelState::kAbsent));
}

TEST_F(CachePolicy, WarmPoolCapBoundsTheResidentModels) {
  cfg_.cache.host_budget = Budget{0, 0.5};
  cfg_.cache.max_host_models = 2;
  StartServer();
  RawClient c(Endpoint());
  for (const char* m : {"a", "b", "c", "d"}) Touch(c, m);
  int resident = 0;
  for (const char* m : {"a", "b", "c", "d"}) resident += HostState(c, m) == ModelState::kResident;
  EXPECT_EQ(resident, 2);
  EXPECT_EQ(HostState(c, "c"), ModelState::kResident);
  EXPECT_EQ(HostState(c, "d"), ModelState::kResident);
}

TEST_F(CachePolicy, PreloadsBeforeReady) {
  Model("a").preload = {"host"};
  Model("b").preload = {"host"};
  StartServer();
  RawClient c(Endpoint());
  EXPECT_TRUE(WaitHostState(c, "a", ModelState::kResident));
  EXPECT_TRUE(WaitHostState(c, "b", ModelState::kResident));
  proto::DaemonStats st = Stats(c);
  for (int i = 0; i < 100 && !st.ready; ++i) {
    std::this_thread::sleep_for(20ms);
    st = Stats(c);
  }
  EXPECT_EQ(st.ready, 1);
  EXPECT_EQ(Metric(st, "weightd_ready"), 1);
  EXPECT_EQ(Metric(st, R"(weightd_loads_total{tier="host",result="ok"})"), 2);
  EXPECT_EQ(Metric(st, "weightd_preload_failures"), 0);
}

TEST_F(CachePolicy, NoRoomFailsWithResourceExhaustedNamingTheBudgetAndItsHolders) {
  cfg_.cache.host_budget = Budget{kModelBytes, 0};
  StartServer();
  RawClient c(Endpoint());
  const std::uint64_t held = LeaseOf(c.Call(proto::Acquire{"a", "cpu", {}}));
  ASSERT_NE(held, 0u);
  const std::uint64_t id = c.Send(proto::Acquire{"b", "cpu", {}});
  // It waits for room: no answer yet, and its status says why.
  EXPECT_FALSE(c.Receive(300ms).has_value());
  RawClient other(Endpoint());
  const proto::ModelStatus waiting = StatusOf(other, "b");
  EXPECT_NE(waiting.waiting_for.find("host budget"), std::string::npos) << waiting.waiting_for;
  clock_.Advance(6s);  // past admission_timeout
  auto r = c.Receive();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->id, id);
  const Status s = ErrorOf(*r);
  EXPECT_EQ(s.code(), Code::kResourceExhausted) << s.ToString();
  EXPECT_EQ(s.reason(), "cache.budget_exhausted");
  EXPECT_NE(s.message().find("host budget"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("a (20.0 KiB, 1 lease)"), std::string::npos) << s.message();
  EXPECT_EQ(HostState(other, "a"), ModelState::kResident);
}

TEST_F(CachePolicy, AWaitingLoadStartsWhenALeaseEnds) {
  cfg_.cache.host_budget = Budget{kModelBytes, 0};
  StartServer();
  RawClient c(Endpoint());
  RawClient holder(Endpoint());
  const std::uint64_t held = LeaseOf(holder.Call(proto::Acquire{"a", "cpu", {}}));
  const std::uint64_t id = c.Send(proto::Acquire{"b", "cpu", {}});
  EXPECT_FALSE(c.Receive(300ms).has_value());
  ASSERT_TRUE(ErrorOf(holder.Call(proto::Release{held})).ok());
  auto r = c.Receive();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->id, id);
  EXPECT_NE(LeaseOf(*r), 0u);
  EXPECT_EQ(HostState(holder, "a"), ModelState::kAbsent);
}

TEST_F(CachePolicy, TooLargeForTheBudgetFailsAtOnce) {
  cfg_.cache.host_budget = Budget{kModelBytes - 1, 0};
  StartServer();
  RawClient c(Endpoint());
  const Status s = ErrorOf(c.Call(proto::Acquire{"a", "cpu", {}}));
  EXPECT_EQ(s.code(), Code::kResourceExhausted) << s.ToString();
  EXPECT_EQ(s.reason(), "cache.too_large");
}

TEST_F(CachePolicy, TheBudgetHoldsUnderConcurrentAcquires) {
  StartServer();
  std::vector<std::unique_ptr<RawClient>> clients;
  for (int i = 0; i < 5; ++i) clients.push_back(std::make_unique<RawClient>(Endpoint()));
  RawClient watcher(Endpoint());
  const char* names[] = {"a", "b", "c", "d", "e"};
  // Every client wants every model, all at once; each releases what it gets at once.
  for (auto& c : clients)
    for (const char* n : names) c->Send(proto::Acquire{n, "cpu", {}});
  int granted = 0;
  for (int round = 0; round < 400 && granted < 25; ++round) {
    for (auto& c : clients) {
      while (auto r = c->Receive(1ms)) {
        if (std::holds_alternative<proto::OkReply>(r->body)) continue;  // a Release
        const std::uint64_t lease = LeaseOf(*r);
        if (lease == 0) continue;
        ++granted;
        c->Send(proto::Release{lease});
      }
    }
    const proto::DaemonStats st = Stats(watcher);
    ASSERT_LE(Metric(st, R"(weightd_resident_bytes{tier="host",device="cpu"})"), 2.0 * kModelBytes);
  }
  EXPECT_EQ(granted, 25);
}

TEST_F(CachePolicy, PressureEvictsUnleasedModels) {
  cfg_.cache.host_budget = Budget{0, 0.5};
  cfg_.cache.host_pressure = 0.8;
  StartServer();
  RawClient c(Endpoint());
  Touch(c, "a");
  Touch(c, "b");
  const std::uint64_t held = LeaseOf(c.Call(proto::Acquire{"c", "cpu", {}}));
  ASSERT_NE(held, 0u);
  // 90% used: 10% of the total over the threshold, more than every model together.
  memory_.host_available = memory_.host_total / 10;
  clock_.Advance(2s);
  EXPECT_TRUE(WaitHostState(c, "a", ModelState::kAbsent));
  EXPECT_TRUE(WaitHostState(c, "b", ModelState::kAbsent));
  EXPECT_EQ(HostState(c, "c"), ModelState::kResident);  // leased
  EXPECT_EQ(Metric(Stats(c), R"(weightd_evictions_total{tier="host",reason="pressure"})"), 2);
}

TEST_F(CachePolicy, GpuEvictionKeepsTheHostCopy) {
  cfg_.cache.gpu_idle_ttl = 30s;
  StartServer(/*with_gpu=*/true);
  RawClient c(Endpoint());
  const std::uint64_t lease = LeaseOf(c.Call(proto::Acquire{"a", "cuda:0", {}}));
  ASSERT_NE(lease, 0u);
  ASSERT_TRUE(ErrorOf(c.Call(proto::Release{lease})).ok());
  const std::uint64_t read_before = Stats(c).bytes_read_from_disk;
  clock_.Advance(31s);
  bool gone = false;
  for (int i = 0; i < 200 && !gone; ++i) {
    gone = StatusOf(c, "a").gpus.empty();
    if (!gone) std::this_thread::sleep_for(20ms);
  }
  EXPECT_TRUE(gone);
  EXPECT_EQ(HostState(c, "a"), ModelState::kResident);
  // The next GPU acquire copies from the host tier: no disk read.
  EXPECT_NE(LeaseOf(c.Call(proto::Acquire{"a", "cuda:0", {}})), 0u);
  const proto::DaemonStats st = Stats(c);
  EXPECT_EQ(st.bytes_read_from_disk, read_before);
  EXPECT_EQ(Metric(st, R"(weightd_evictions_total{tier="gpu",reason="ttl"})"), 1);
  EXPECT_EQ(Metric(st, R"(weightd_cache_misses_total{tier="gpu"})"), 2);
}

TEST_F(CachePolicy, AdminEvictsOneTier) {
  StartServer(/*with_gpu=*/true);
  RawClient c(Endpoint());
  const std::uint64_t lease = LeaseOf(c.Call(proto::Acquire{"a", "cuda:0", {}}));
  ASSERT_TRUE(ErrorOf(c.Call(proto::Release{lease})).ok());
  ASSERT_TRUE(ErrorOf(c.Call(proto::Evict{"a", "cuda:0"})).ok());
  EXPECT_TRUE(StatusOf(c, "a").gpus.empty());
  EXPECT_EQ(HostState(c, "a"), ModelState::kResident);
  ASSERT_TRUE(ErrorOf(c.Call(proto::Evict{"a", "cpu"})).ok());
  EXPECT_EQ(HostState(c, "a"), ModelState::kAbsent);
}

TEST_F(CachePolicy, AChangedFileIsReloadedNotServedStale) {
  cfg_.cache.file_check_interval = 1s;
  StartServer();
  RawClient c(Endpoint());
  Touch(c, "a");
  const std::uint64_t loads = StatusOf(c, "a").loads;
  WriteModelFiles("a", 2);  // other bytes, a new inode and mtime
  clock_.Advance(2s);
  EXPECT_TRUE(WaitHostState(c, "a", ModelState::kAbsent));
  Touch(c, "a");
  EXPECT_EQ(StatusOf(c, "a").loads, loads + 1);
  EXPECT_EQ(Metric(Stats(c), R"(weightd_evictions_total{tier="host",reason="changed"})"), 1);
}

TEST_F(CachePolicy, AChangedFileDropsAGpuCopyWhoseHostCopyIsGone) {
  cfg_.cache.file_check_interval = 1s;
  StartServer(/*with_gpu=*/true);
  RawClient c(Endpoint());
  const std::uint64_t lease = LeaseOf(c.Call(proto::Acquire{"a", "cuda:0", {}}));
  ASSERT_TRUE(ErrorOf(c.Call(proto::Release{lease})).ok());
  ASSERT_TRUE(ErrorOf(c.Call(proto::Evict{"a", "cpu"})).ok());  // only the GPU copy is left
  ASSERT_EQ(StatusOf(c, "a").gpus.size(), 1u);
  WriteModelFiles("a", 2);
  clock_.Advance(2s);
  bool gone = false;
  for (int i = 0; i < 200 && !gone; ++i) {
    gone = StatusOf(c, "a").gpus.empty();
    if (!gone) std::this_thread::sleep_for(20ms);
  }
  EXPECT_TRUE(gone);
  EXPECT_EQ(Metric(Stats(c), R"(weightd_evictions_total{tier="gpu",reason="changed"})"), 1);
  EXPECT_NE(LeaseOf(c.Call(proto::Acquire{"a", "cuda:0", {}})), 0u);
  EXPECT_EQ(StatusOf(c, "a").loads, 2u);  // the new files were read
}

// A raw HTTP/1.0 GET against the loopback listener.
std::pair<int, std::string> HttpGet(int port, const std::string& path) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return {-1, ""};
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  (void)!::write(fd, req.data(), req.size());
  std::string resp;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0) resp.append(buf, static_cast<std::size_t>(n));
  ::close(fd);
  int code = -1;
  std::sscanf(resp.c_str(), "HTTP/1.%*d %d", &code);
  const auto body = resp.find("\r\n\r\n");
  return {code, body == std::string::npos ? "" : resp.substr(body + 4)};
}

int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

TEST_F(CachePolicy, MetricsEndpointReportsAKnownSequence) {
#if !WEIGHTD_TEST_HTTP
  GTEST_SKIP() << "built without cpp-httplib (WEIGHTD_WITH_HTTP=OFF)";
#endif
  const int port = FreePort();
  cfg_.http_listen = "127.0.0.1:" + std::to_string(port);
  StartServer();
  RawClient c(Endpoint());
  Touch(c, "a");                                                  // a miss and a host load
  const std::uint64_t lease = LeaseOf(c.Call(proto::Acquire{"a", "cpu", {}}));  // a hit
  ASSERT_TRUE(ErrorOf(c.Call(proto::Evict{"a", ""})).code() == Code::kFailedPrecondition);  // leased
  ASSERT_TRUE(ErrorOf(c.Call(proto::Release{lease})).ok());
  ASSERT_TRUE(ErrorOf(c.Call(proto::Evict{"a", ""})).ok());      // an admin eviction
  EXPECT_NE(ErrorOf(c.Call(proto::Acquire{"nope", "cpu", {}})).code(), Code::kOk);

  EXPECT_EQ(HttpGet(port, "/healthz").first, 200);
  EXPECT_EQ(HttpGet(port, "/readyz").first, 200);
  EXPECT_EQ(HttpGet(port, "/nope").first, 404);
  auto [code, text] = HttpGet(port, "/metrics");
  ASSERT_EQ(code, 200);
  auto value = [&](const std::string& sample) {
    std::smatch m;
    std::regex re("(^|\n)" + std::regex_replace(sample, std::regex(R"([{}\[\]().*+?^$|\\])"), R"(\$&)") + " ([^\n]+)");
    return std::regex_search(text, m, re) ? std::stod(m[2]) : -1.0;
  };
  EXPECT_EQ(value(R"(weightd_loads_total{tier="host",result="ok"})"), 1);
  EXPECT_EQ(value(R"(weightd_load_bytes_total{tier="host"})"), kDataBytes);
  EXPECT_EQ(value(R"(weightd_load_duration_seconds_count{tier="host"})"), 1);
  EXPECT_EQ(value(R"(weightd_cache_hits_total{tier="host"})"), 1);
  EXPECT_EQ(value(R"(weightd_cache_misses_total{tier="host"})"), 1);
  EXPECT_EQ(value(R"(weightd_evictions_total{tier="host",reason="admin"})"), 1);
  EXPECT_EQ(value(R"(weightd_resident_bytes{tier="host",device="cpu"})"), 0);
  EXPECT_EQ(value(R"(weightd_budget_bytes{tier="host",device="cpu"})"), 2 * kModelBytes);
  EXPECT_EQ(value(R"(weightd_model_leases{model="a",device="cpu"})"), 0);
  EXPECT_EQ(value("weightd_ready"), 1);
  EXPECT_GE(value("weightd_start_to_ready_seconds"), 0);
  EXPECT_EQ(value(R"(weightd_requests_total{result="malformed"})"), 0);
  // Every family is announced once, before its samples.
  EXPECT_NE(text.find("# TYPE weightd_load_duration_seconds histogram"), std::string::npos);
  // /metrics and Stats tell the same figures.
  EXPECT_EQ(Metric(Stats(c), R"(weightd_cache_hits_total{tier="host"})"), 1);
}

}  // namespace
}  // namespace weightd

namespace weightd {
namespace {

// Start-up refuses a socket directory or socket names another user could control.
class SocketSafety : public ::testing::Test {
 protected:
  Status Create(const std::string& dir) {
    DaemonConfig cfg;
    cfg.socket = "ipc://" + dir + "/wd.sock";
    cfg.shm_prefix = "wdsafe-" + std::to_string(::getpid());
    RETURN_IF_ERROR(Finalize(&cfg));
    FakeClock clock;
    auto s = Server::Create(cfg, &clock, nullptr);
    return s.ok() ? Status::Ok() : s.status();
  }
  TempDir dir_;
};

TEST_F(SocketSafety, AWorldWritableDirectoryIsRefusedUnlessSticky) {
  const std::string d = dir_.file("open");
  ASSERT_TRUE(posix::MakeDirs(d).ok());
  ASSERT_EQ(::chmod(d.c_str(), 0777), 0);
  Status s = Create(d);
  EXPECT_EQ(s.reason(), "daemon.socket_dir_unsafe") << s.ToString();
  EXPECT_NE(s.message().find("0777"), std::string::npos) << s.message();
  ASSERT_EQ(::chmod(d.c_str(), 01777), 0);  // like /tmp
  EXPECT_TRUE(Create(d).ok());
}

TEST_F(SocketSafety, ASocketPathOfAnotherUserIsASquat) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to give a file to another uid";
  const std::string d = dir_.file("squat");
  ASSERT_TRUE(posix::MakeDirs(d).ok());
  const std::string sock = d + "/wd.sock";
  posix::Fd f(::open(sock.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
  ASSERT_TRUE(f.valid());
  ASSERT_EQ(::fchown(f.get(), 65534, 65534), 0);
  Status s = Create(d);
  EXPECT_EQ(s.reason(), "daemon.socket_squatted") << s.ToString();
  EXPECT_NE(s.message().find("uid 65534"), std::string::npos) << s.message();
  // A link planted where the lock file goes is refused too.
  ::unlink(sock.c_str());
  ASSERT_EQ(::symlink("/etc/passwd", (sock + ".lock").c_str()), 0);
  EXPECT_EQ(Create(d).reason(), "daemon.socket_squatted");
}

TEST_F(SocketSafety, ADirectoryOfAnotherUserIsRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to give a directory to another uid";
  const std::string d = dir_.file("theirs");
  ASSERT_TRUE(posix::MakeDirs(d).ok());
  ASSERT_EQ(::chown(d.c_str(), 65534, 65534), 0);
  EXPECT_EQ(Create(d).reason(), "daemon.socket_dir_unsafe");
}

}  // namespace
}  // namespace weightd
