// Churn soak against the real daemon: 64 client processes acquire, verify and release two models
// in a loop, and open a new session every 25 rounds, for WEIGHTD_SOAK_SECONDS (default 60). The
// daemon's descriptors, memory and lease counts must stay flat, no client may see an error, and
// everything must return to the baseline at the end. Runs alone (RUN_SERIAL in CMake): it keeps
// every core busy.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "support/daemon_process.h"
#include "weightd/client.h"

namespace weightd {
namespace {

using namespace std::chrono_literals;
using testing::DaemonProcess;
using testing::TempDir;

constexpr int kClients = 64;
constexpr int kRoundsPerSession = 25;
constexpr const char* kConfig = R"(
[daemon]
heartbeat_interval = "500ms"
heartbeat_timeout = "3s"
)";

std::uint64_t RssKiB(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  while (in >> key) {
    if (key == "VmRSS:") {
      std::uint64_t kib = 0;
      in >> kib;
      return kib;
    }
    in.ignore(1 << 16, '\n');
  }
  return 0;
}

struct Sample {
  double t = 0;
  std::size_t fds = 0;
  std::uint64_t rss_kib = 0;
  std::uint32_t leases = 0, sessions = 0;
};

// One client process: returns its exit code (0 ok, 1 an error, reported on stderr).
int RunClient(const std::string& endpoint, std::chrono::steady_clock::time_point deadline, int index, int report_fd) {
  ClientOptions o;
  o.endpoint = endpoint;
  o.client_name = "soak-" + std::to_string(index);
  std::optional<Client> c;
  long rounds = 0;
  auto fail = [&](const std::string& what) {
    std::fprintf(stderr, "soak client %d, round %ld: %s\n", index, rounds, what.c_str());
    return 1;
  };
  while (std::chrono::steady_clock::now() < deadline) {
    if (!c || rounds % kRoundsPerSession == 0) {
      c.reset();  // Goodbye, and a new session
      auto next = Client::Connect(o);
      if (!next.ok()) return fail(next.status().ToString());
      c.emplace(std::move(next).value());
    }
    const char* model = (rounds + index) % 2 == 0 ? "a" : "b";
    auto lease = c->Acquire(model);
    if (!lease.ok()) return fail(lease.status().ToString());
    if (Status s = testing::CompareWithFiles(*lease); !s.ok()) return fail(s.ToString());
    ++rounds;
  }
  const std::string line = std::to_string(rounds) + "\n";
  (void)!::write(report_fd, line.data(), line.size());
  return 0;
}

TEST(Soak, ChurningClientsLeaveTheDaemonFlat) {
  const char* env = std::getenv("WEIGHTD_SOAK_SECONDS");
  const int seconds = env != nullptr ? std::max(5, std::atoi(env)) : 60;
  TempDir models;
  ASSERT_TRUE(testing::WriteShardedModel(models.file("a"), testing::SmallTensors(16), 2, /*seed=*/31).ok());
  ASSERT_TRUE(testing::WriteModel(models.file("b"), testing::SmallTensors(8), /*seed=*/32).ok());
  auto started = DaemonProcess::Start({.models = {{"a", models.file("a")}, {"b", models.file("b")}}, .config_toml = kConfig});
  ASSERT_TRUE(started.ok()) << started.status().ToString();
  DaemonProcess& d = **started;
  ClientOptions o;
  o.endpoint = d.endpoint();
  auto observer = Client::Connect(o);
  ASSERT_TRUE(observer.ok());
  ASSERT_TRUE(observer->Load("a").ok());
  ASSERT_TRUE(observer->Load("b").ok());
  const std::size_t base_fds = testing::OpenFdCount(d.pid());

  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  const auto t0 = std::chrono::steady_clock::now();
  const auto deadline = t0 + std::chrono::seconds(seconds);
  std::vector<pid_t> kids;
  for (int i = 0; i < kClients; ++i) {
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(pipe_fds[0]);
      std::_Exit(RunClient(d.endpoint(), deadline, i, pipe_fds[1]));
    }
    kids.push_back(pid);
  }
  ::close(pipe_fds[1]);

  std::vector<Sample> samples;
  while (std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(500ms);
    Sample s;
    s.t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    s.fds = testing::OpenFdCount(d.pid());
    s.rss_kib = RssKiB(d.pid());
    if (auto st = observer->Stats(); st.ok()) {
      s.leases = st->leases;
      s.sessions = st->sessions;
    }
    samples.push_back(s);
  }
  int failed = 0;
  for (pid_t pid : kids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ++failed;
  }
  long rounds = 0;
  {
    FILE* f = ::fdopen(pipe_fds[0], "r");
    long n;
    while (std::fscanf(f, "%ld", &n) == 1) rounds += n;
    std::fclose(f);
  }
  EXPECT_EQ(failed, 0) << d.Log().substr(0, 4000);
  ASSERT_GE(samples.size(), 8u);

  // Flat: nothing grows with the number of rounds. The fds of the moment swing with the churn
  // (a session being replaced holds two connections for a while), so the trend is judged by the
  // median of the last quarter against the second quarter's, and every sample against a bound:
  // per client at most its connection, a closing one, its pidfd, an fd-socket connection and a
  // spare.
  const std::size_t q = samples.size() / 4;
  auto median_of = [&](std::size_t from, std::size_t to, auto field) {
    std::vector<decltype(field(samples[0]))> v;
    for (std::size_t i = from; i < to; ++i) v.push_back(field(samples[i]));
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
    return v[v.size() / 2];
  };
  auto fds = [](const Sample& s) { return s.fds; };
  auto rss = [](const Sample& s) { return s.rss_kib; };
  const std::size_t fds_q2 = median_of(q, 2 * q, fds), fds_q4 = median_of(3 * q, samples.size(), fds);
  const std::uint64_t rss_q2 = median_of(q, 2 * q, rss), rss_q4 = median_of(3 * q, samples.size(), rss);
  std::size_t fds_max = 0, leases_max = 0;
  for (const Sample& s : samples) {
    fds_max = std::max(fds_max, s.fds);
    leases_max = std::max<std::size_t>(leases_max, s.leases);
  }
  std::printf("[ measure  ] %d clients, %d s: %ld rounds (%.0f/s); daemon fds %zu base, median %zu (2nd quarter) / "
              "%zu (4th), max %zu; RSS median %.1f / %.1f MiB; leases max %zu\n",
              kClients, seconds, rounds, static_cast<double>(rounds) / seconds, base_fds, fds_q2, fds_q4, fds_max,
              static_cast<double>(rss_q2) / 1024, static_cast<double>(rss_q4) / 1024, leases_max);
  EXPECT_GT(rounds, kClients);
  EXPECT_LE(fds_q4, fds_q2 + 16);
  EXPECT_LE(fds_max, base_fds + 5 * kClients);
#ifndef __SANITIZE_ADDRESS__
  // (Under ASan, freed memory sits in its quarantine, up to 256 MiB, so RSS grows by design.)
  EXPECT_LE(rss_q4, rss_q2 + 16 * 1024);
#endif
  EXPECT_LE(leases_max, static_cast<std::size_t>(kClients));

  // Everything back to the baseline: one session (the observer's), no lease, no extra fd.
  auto back = [&] {
    auto st = observer->Stats();
    return st.ok() && st->leases == 0 && st->sessions == 1 && testing::OpenFdCount(d.pid()) <= base_fds;
  };
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (!back() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(100ms);
  EXPECT_TRUE(back()) << "fds " << testing::OpenFdCount(d.pid()) << " (baseline " << base_fds << ")";
  EXPECT_TRUE(d.running());
}

}  // namespace
}  // namespace weightd
