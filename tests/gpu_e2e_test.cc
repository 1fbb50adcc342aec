// The GPU tier end to end, on a real GPU: the real weightd binary, clients in fresh processes
// (this binary re-executed as GpuE2EChild.Hold, driven over a pipe), and device memory read
// back against the files. Every test skips, with its reason, where no CUDA device is usable.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "cuda_api.h"
#include "posix.h"
#include "support/child_process.h"
#include "support/daemon_process.h"
#include "weightd/client.h"

namespace weightd {
namespace {

using namespace std::chrono_literals;
using testing::DaemonOptions;
using testing::DaemonProcess;
using testing::TempDir;

// Compares every tensor of a lease (read back with copy_to_host) with the model's files.
::testing::AssertionResult MatchesFiles(const Lease& lease) {
  for (const Tensor& t : lease.tensors()) {
    const ShardInfo& shard = lease.shards().at(t.shard);
    auto fd = posix::Open(lease.model_dir() + "/" + shard.file, O_RDONLY);
    if (!fd.ok()) return ::testing::AssertionFailure() << fd.status().ToString();
    std::vector<std::byte> want(t.nbytes), got(t.nbytes);
    Status s = posix::PreadFull(fd->get(), want, shard.file_data_offset + t.offset, shard.file);
    if (s.ok()) s = lease.copy_to_host(t, 0, t.nbytes, got.data());
    if (!s.ok()) return ::testing::AssertionFailure() << s.ToString();
    if (want != got) return ::testing::AssertionFailure() << "tensor " << t.name << " differs from the file";
  }
  return ::testing::AssertionSuccess();
}

// The importing process. WEIGHTD_E2E_MODE: "hold" acquires the model on cuda:0 and checks it;
// "context" only creates a CUDA context (to measure what one costs). It then reports "ready"
// on stdout and answers each "verify" line on stdin with "ok" or "bad <why>", until EOF.
TEST(GpuE2EChild, Hold) {
  const char* mode = std::getenv("WEIGHTD_E2E_MODE");
  if (mode == nullptr) GTEST_SKIP() << "runs only as the child of the GpuE2E tests";
  auto say = [](const std::string& line) {
    std::string l = line + "\n";
    (void)!::write(STDOUT_FILENO, l.data(), l.size());
  };
  std::unique_ptr<gpu::CudaApi> api;
  std::optional<Client> client;
  Lease lease;
  if (std::string(mode) == "context") {
    auto a = gpu::LoadCudaApi();
    if (!a.ok() || !(*a)->SetDevice(0).ok()) return say("bad no context");
    api = std::move(a).value();
  } else {
    ClientOptions o;
    o.endpoint = std::getenv("WEIGHTD_E2E_SOCKET");
    o.client_name = "gpu_e2e_child";
    auto c = Client::Connect(o);
    if (!c.ok()) return say("bad " + c.status().ToString());
    client.emplace(std::move(c).value());
    auto l = client->Acquire(std::getenv("WEIGHTD_E2E_MODEL"), AcquireOptions{"cuda:0", {}});
    if (!l.ok()) return say("bad " + l.status().ToString());
    lease = std::move(l).value();
    if (!MatchesFiles(lease)) return say("bad initial contents");
  }
  say("ready");
  std::string buf;
  char c;
  while (::read(STDIN_FILENO, &c, 1) == 1) {
    if (c != '\n') {
      buf += c;
      continue;
    }
    if (buf == "verify") {
      auto r = lease.valid() ? MatchesFiles(lease) : ::testing::AssertionSuccess();
      say(r ? "ok" : std::string("bad ") + r.message());
    }
    buf.clear();
  }
}

// A GpuE2EChild.Hold process, driven over its stdin and stdout.
class Child {
 public:
  Child(const std::string& mode, const std::string& socket, const std::string& model)
      : p_({"--gtest_filter=GpuE2EChild.Hold"},
           {"WEIGHTD_E2E_MODE=" + mode, "WEIGHTD_E2E_SOCKET=" + socket, "WEIGHTD_E2E_MODEL=" + model}) {
    EXPECT_TRUE(p_.started());
  }
  // The child's next answer ("ready", "ok", "bad ..."), skipping gtest's own output; "" on
  // timeout.
  std::string ReadLine(std::chrono::milliseconds timeout = 60s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      std::string line = p_.ReadLine(std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now()));
      if (line == "ready" || line == "ok" || line.rfind("bad", 0) == 0) return line;
    }
    return "";
  }
  void Say(const std::string& line) { p_.Say(line); }
  void Kill() { p_.Kill(); }

 private:
  testing::ChildProcess p_;
};

class GpuE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    auto api = gpu::LoadCudaApi();
    if (!api.ok()) GTEST_SKIP() << "no CUDA device: " << api.status().ToString();
    api_ = std::move(api).value();
    ASSERT_TRUE(api_->SetDevice(0).ok());
  }

  // A model of `tensors` bf16 tensors of `rows` x 4096 in 3 shards.
  void WriteModel(int tensors, int rows) {
    std::vector<st::TensorSpec> specs;
    for (int i = 0; i < tensors; ++i) specs.push_back({"blocks." + std::to_string(i) + ".w", DType::kBF16, {rows, 4096}});
    specs.push_back({"norm.weight", DType::kF32, {4096}});
    ASSERT_TRUE(testing::WriteShardedModel(models_.file("m"), specs, 3, /*seed=*/21).ok());
  }

  void StartDaemon() {
    auto d = DaemonProcess::Start(DaemonOptions{.models = {{"m", models_.file("m")}}});
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    daemon_ = std::move(d).value();
  }

  Client Connect() {
    ClientOptions o;
    o.endpoint = daemon_->endpoint();
    auto c = Client::Connect(o);
    if (!c.ok()) throw Error(c.status());
    return std::move(c).value();
  }

  std::uint64_t UsedBytes() {
    auto m = api_->GetMemInfo(0);
    EXPECT_TRUE(m.ok());
    return m.ok() ? m->total_bytes - m->free_bytes : 0;
  }

  std::unique_ptr<gpu::CudaApi> api_;
  TempDir models_;
  std::unique_ptr<DaemonProcess> daemon_;
};

TEST_F(GpuE2E, AttachFromAFreshProcessIsBitwiseEqualToTheFile) {
  WriteModel(12, 256);
  StartDaemon();
  int rc = -1;
  std::string out = daemon_->Weightctl({"attach", "m", "--device", "cuda:0", "--verify"}, &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("against the files, OK"), std::string::npos) << out;
  EXPECT_NE(out.find("on cuda:0"), std::string::npos) << out;
  // The second attach finds the copy resident.
  out = daemon_->Weightctl({"--json", "attach", "m", "--device", "cuda:0"}, &rc);
  EXPECT_EQ(rc, 0) << out;
  Client c = Connect();
  auto st = c.Status("m");
  ASSERT_TRUE(st.ok());
  ASSERT_EQ(st->gpus.size(), 1u);
  EXPECT_EQ(st->gpus[0].state, "resident");
  EXPECT_EQ(st->loads, 1u);
}

TEST_F(GpuE2E, EightProcessesShareOneCopy) {
  WriteModel(24, 2048);  // 24 x 16 MiB: 384 MiB of bf16
  StartDaemon();
  Client c = Connect();
  {
    auto warm = c.Acquire("m", AcquireOptions{"cuda:0", {}});  // makes the copy resident
    ASSERT_TRUE(warm.ok()) << warm.status().ToString();
  }
  std::uint64_t model_bytes = 0;
  for (const auto& g : c.Status("m")->gpus) model_bytes += g.bytes;
  ASSERT_GT(model_bytes, 0u);

  // What one CUDA context costs, measured, not assumed.
  const std::uint64_t base = UsedBytes();
  std::uint64_t context = 0;
  {
    Child ctx("context", daemon_->endpoint(), "m");
    ASSERT_EQ(ctx.ReadLine(), "ready");
    context = UsedBytes() - base;
  }
  std::this_thread::sleep_for(500ms);
  const std::uint64_t before = UsedBytes();
  std::vector<std::unique_ptr<Child>> kids;
  for (int i = 0; i < 8; ++i) kids.push_back(std::make_unique<Child>("hold", daemon_->endpoint(), "m"));
  for (auto& k : kids) ASSERT_EQ(k->ReadLine(), "ready");
  const std::uint64_t used = UsedBytes() - before;
  EXPECT_EQ(c.Status("m")->gpus.at(0).leases, 8u);
  const double mib = 1024.0 * 1024.0;
  std::printf("[ measure  ] 8 importers: %.0f MiB over the daemon's copy; one context %.0f MiB; model copy %.0f MiB\n",
              static_cast<double>(used) / mib, static_cast<double>(context) / mib,
              static_cast<double>(model_bytes) / mib);
  // Eight private copies would add 8 x the model; shared imports add contexts and page tables.
  EXPECT_LT(static_cast<double>(used), 8.0 * static_cast<double>(context) + 0.5 * static_cast<double>(model_bytes));
}

TEST_F(GpuE2E, AKilledClientLosesItsLeaseAndTheCopyCanBeFreed) {
  WriteModel(8, 1024);
  StartDaemon();
  Client c = Connect();
  Child kid("hold", daemon_->endpoint(), "m");
  ASSERT_EQ(kid.ReadLine(), "ready");
  EXPECT_EQ(c.Status("m")->gpus.at(0).leases, 1u);
  const std::uint64_t held = UsedBytes();
  kid.Kill();
  const auto t0 = std::chrono::steady_clock::now();
  while (c.Status("m")->gpus.at(0).leases != 0 && std::chrono::steady_clock::now() - t0 < 5s)
    std::this_thread::sleep_for(20ms);
  EXPECT_EQ(c.Status("m")->gpus.at(0).leases, 0u);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  ASSERT_TRUE(c.Evict("m").ok());
  const std::uint64_t model_bytes = 8ull * 1024 * 4096 * 2;
  std::uint64_t freed = 0;
  for (int i = 0; i < 100 && freed < model_bytes; ++i) {
    std::this_thread::sleep_for(20ms);
    freed = held > UsedBytes() ? held - UsedBytes() : 0;
  }
  EXPECT_GE(freed, model_bytes) << "the dead client's context and the daemon's copy should both be gone";
}

TEST_F(GpuE2E, ClientsKeepReadingCorrectDataAfterTheDaemonDies) {
  WriteModel(8, 1024);
  StartDaemon();
  Child kid("hold", daemon_->endpoint(), "m");
  ASSERT_EQ(kid.ReadLine(), "ready");
  daemon_->Signal(SIGKILL);
  kid.Say("verify");
  EXPECT_EQ(kid.ReadLine(), "ok");
}

// The GPU variant of the restart scenario: the client's imports outlive the daemon, the new
// daemon adopts the host copy (no disk read) and re-makes the GPU copy when the client's library
// re-leases it, and the client's data stays correct throughout.
TEST_F(GpuE2E, AClientHoldingImportsSurvivesADaemonRestartAndGetsItsLeaseBack) {
  WriteModel(8, 1024);
  StartDaemon();
  Child kid("hold", daemon_->endpoint(), "m");
  ASSERT_EQ(kid.ReadLine(), "ready");
  // The copy's three shards went to the (test harness's) systemd fd store.
  EXPECT_TRUE(testing::WaitFor([&] { return daemon_->StoredFdNames().size() == 3; }, 5s))
      << daemon_->StoredFdNames().size();
  const std::uint64_t before = UsedBytes();
  daemon_->Signal(SIGKILL);
  kid.Say("verify");
  EXPECT_EQ(kid.ReadLine(), "ok");
  Status restarted = daemon_->Restart();
  ASSERT_TRUE(restarted.ok()) << restarted.ToString();
  Client c = Connect();
  std::uint32_t leases = 0;
  for (int i = 0; i < 500 && leases == 0; ++i) {
    auto st = c.Status("m");
    if (st.ok() && !st->gpus.empty()) leases = st->gpus[0].leases;
    if (leases == 0) std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(leases, 1u) << daemon_->Log();
  kid.Say("verify");
  EXPECT_EQ(kid.ReadLine(), "ok");
  auto stats = c.Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->bytes_read_from_disk, 0u);
  ASSERT_FALSE(stats->models.empty());
  EXPECT_EQ(stats->models[0].state, "resident");
  EXPECT_NE(daemon_->Log().find("adopted from the previous instance"), std::string::npos);
  // The GPU copy came back from the fd store: the same memory, not a second copy.
  EXPECT_NE(daemon_->Log().find("adopted from systemd's fd store"), std::string::npos) << daemon_->Log();
  const std::uint64_t model_bytes = 8ull * 1024 * 4096 * 2;
  const std::uint64_t after = UsedBytes();
  std::printf("[ measure  ] GPU memory before the kill %.0f MiB, after restart and reattach %.0f MiB (model %.0f MiB)\n",
              before / 1048576.0, after / 1048576.0, model_bytes / 1048576.0);
  EXPECT_LT(after, before + model_bytes / 2);
  EXPECT_EQ(daemon_->StoredFdNames().size(), 3u);
}

TEST_F(GpuE2E, LeasesOnCudaAreReadOnlyViewsOfOneCopy) {
  WriteModel(4, 256);
  StartDaemon();
  Client c = Connect();
  auto a = c.Acquire("m", AcquireOptions{"cuda:0", {}});
  auto b = c.Acquire("m", AcquireOptions{"cuda:0", {}});
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(a->device(), "cuda:0");
  EXPECT_EQ(a->cuda_device(), 0);
  EXPECT_FALSE(a->gpu_uuid().empty());
  EXPECT_TRUE(MatchesFiles(*a));
  EXPECT_TRUE(MatchesFiles(*b));
  auto st = c.Status("m");
  EXPECT_EQ(st->gpus.at(0).leases, 2u);
  EXPECT_EQ(st->gpus.size(), 1u);
}

}  // namespace
}  // namespace weightd
