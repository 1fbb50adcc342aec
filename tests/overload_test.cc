// Overload from one user against the real daemon: a flood of connection attempts, half-open
// connections, and more connections and sessions than the per-user limits allow. The daemon must
// stay responsive to an established client, hold no more descriptors than the limits allow, give
// the excess clean errors, and return to its baseline afterwards.
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>
#include <zmq.hpp>

#include "posix.h"
#include "support/daemon_process.h"
#include "weightd/client.h"

namespace weightd {
namespace {

using namespace std::chrono_literals;
using testing::DaemonProcess;
using testing::TempDir;

constexpr int kMaxConnections = 32;
constexpr int kMaxSessions = 8;
constexpr const char* kConfig = R"(
[daemon]
max_connections_per_user = 32
max_sessions_per_user = 8
)";

// A connection to the socket that never sends the ZMTP greeting.
posix::Fd HalfOpen(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return posix::Fd();
  }
  return posix::Fd(fd);
}

class OverloadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::WriteModel(models_.file("m"), testing::SmallTensors(4), /*seed=*/3).ok());
    auto d = DaemonProcess::Start({.models = {{"m", models_.file("m")}}, .config_toml = kConfig});
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    daemon_ = std::move(d).value();
    auto c = Client::Connect(Options());
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    observer_.emplace(std::move(c).value());
    ASSERT_TRUE(observer_->Load("m").ok());
  }

  ClientOptions Options() const {
    ClientOptions o;
    o.endpoint = daemon_->endpoint();
    o.client_name = "overload_test";
    return o;
  }
  std::string SocketPath() const { return daemon_->endpoint().substr(6); }
  double Connections() {
    auto s = observer_->Stats();
    return s.ok() ? testing::MetricValue(s->metrics, "weightd_connections") : -1;
  }

  TempDir models_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::optional<Client> observer_;
};

// 10,000 connection attempts and 200 half-open connections from this user, while an established
// client keeps working.
TEST_F(OverloadTest, AConnectionFloodLeavesTheDaemonResponsive) {
  const std::size_t base_fds = testing::OpenFdCount(daemon_->pid());
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0}, calls{0};
  std::atomic<long> worst_us{0};
  std::atomic<std::size_t> most_fds{0};
  std::thread victim([&] {
    while (!stop) {
      const auto t0 = std::chrono::steady_clock::now();
      auto st = observer_->Status("m");
      const long us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
      if (!st.ok() || st->state != "resident") ++errors;
      ++calls;
      worst_us = std::max(worst_us.load(), us);
      most_fds = std::max(most_fds.load(), testing::OpenFdCount(daemon_->pid()));
      std::this_thread::sleep_for(5ms);
    }
  });
  // Should the flood throw (a zmq::error_t), the victim is stopped and joined first, so the test
  // fails naming the error instead of ending in std::terminate (seen once under a load of 12).
  struct JoinOnExit {
    std::atomic<bool>& stop;
    std::thread& thread;
    ~JoinOnExit() {
      stop = true;
      if (thread.joinable()) thread.join();
    }
  } join_on_exit{stop, victim};
  // ZeroMQ closes the rounds' sockets on its reaper thread, later: room for them, as the daemon
  // makes for itself (cached/main.cc).
  rlimit fds{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &fds), 0);
  fds.rlim_cur = fds.rlim_max;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &fds), 0);

  std::vector<posix::Fd> half_open;
  for (int i = 0; i < 200; ++i) half_open.push_back(HalfOpen(SocketPath()));
  // Once the burst is handled, the daemon holds at most the limit of them (the observer's own
  // connection is one).
  EXPECT_TRUE(testing::WaitFor([&] { return testing::OpenFdCount(daemon_->pid()) <= base_fds + kMaxConnections; }, 5s))
      << testing::OpenFdCount(daemon_->pid()) << " fds, baseline " << base_fds;
  constexpr int kRounds = 100, kPerRound = 100;
  zmq::context_t ctx;
  // Each round's sockets are closed by ZeroMQ's reaper, asynchronously: on a loaded machine
  // several rounds may still be open when the next one starts; room for them all.
  ctx.set(zmq::ctxopt::max_sockets, kRounds * kPerRound + 64);
  for (int r = 0; r < kRounds; ++r) {
    std::vector<zmq::socket_t> socks;
    for (int i = 0; i < kPerRound; ++i) {
      socks.emplace_back(ctx, zmq::socket_type::dealer);
      socks.back().set(zmq::sockopt::linger, 0);
      socks.back().connect(daemon_->endpoint());
    }
    std::this_thread::sleep_for(10ms);
  }
  half_open.clear();
  stop = true;
  victim.join();

  std::printf("[ measure  ] %d attempts + 200 half-open: %d status calls, worst %.1f ms; daemon fds %zu -> most %zu\n",
              kRounds * kPerRound, calls.load(), worst_us.load() / 1000.0, base_fds, most_fds.load());
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GT(calls.load(), 10);
  // During the flood: a burst may be accepted before the handler closes it (200 half-open ones
  // at first), never more.
  EXPECT_LE(most_fds.load(), base_fds + kMaxConnections + 200);
  EXPECT_TRUE(testing::WaitFor([&] { return testing::OpenFdCount(daemon_->pid()) <= base_fds && Connections() == 1; }, 10s))
      << "fds " << testing::OpenFdCount(daemon_->pid()) << " (baseline " << base_fds << "), connections " << Connections();
  auto stats = observer_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_GT(testing::MetricValue(stats->metrics, "weightd_connections_shed_total"), 0);
  EXPECT_EQ(stats->sessions, 1u);
  EXPECT_TRUE(daemon_->running());
}

// Past max_connections_per_user, a new client gets a clean error, promptly; once the user closes
// some connections, it connects.
TEST_F(OverloadTest, TheConnectionLimitIsACleanError) {
  zmq::context_t ctx;
  std::vector<zmq::socket_t> held;
  for (int i = 0; i < kMaxConnections - 1; ++i) {  // the observer holds one
    held.emplace_back(ctx, zmq::socket_type::dealer);
    held.back().set(zmq::sockopt::linger, 0);
    held.back().connect(daemon_->endpoint());
  }
  ASSERT_TRUE(testing::WaitFor([&] { return Connections() == kMaxConnections; }, 5s)) << Connections();
  const auto t0 = std::chrono::steady_clock::now();
  auto refused = Client::Connect(Options());
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Code::kResourceExhausted) << refused.status().ToString();
  EXPECT_EQ(refused.status().reason(), "client.connection_refused") << refused.status().ToString();
  EXPECT_LT(took, 4s);  // before the 5 s connect timeout: the closures are recognized
  held.clear();
  ASSERT_TRUE(testing::WaitFor([&] { return Connections() == 1; }, 5s));
  auto ok = Client::Connect(Options());
  EXPECT_TRUE(ok.ok()) << ok.status().ToString();
}

TEST_F(OverloadTest, TheSessionLimitIsACleanError) {
  std::vector<Client> clients;
  for (int i = 0; i < kMaxSessions - 1; ++i) {  // the observer holds one
    auto c = Client::Connect(Options());
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    clients.push_back(std::move(c).value());
  }
  auto refused = Client::Connect(Options());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Code::kResourceExhausted);
  EXPECT_EQ(refused.status().reason(), "limits.sessions_per_user") << refused.status().ToString();
  clients.pop_back();
  EXPECT_TRUE(testing::WaitFor([&] { return Client::Connect(Options()).ok(); }, 5s));
}

// Connections that never finish the handshake are dropped by the daemon after its 5 s
// handshake timeout, whatever the peer does.
TEST_F(OverloadTest, HalfOpenConnectionsAreDropped) {
  const std::size_t base_fds = testing::OpenFdCount(daemon_->pid());
  std::vector<posix::Fd> half_open;
  for (int i = 0; i < 10; ++i) half_open.push_back(HalfOpen(SocketPath()));
  ASSERT_TRUE(testing::WaitFor([&] { return Connections() == 11; }, 5s)) << Connections();
  EXPECT_TRUE(testing::WaitFor([&] { return Connections() == 1 && testing::OpenFdCount(daemon_->pid()) <= base_fds; }, 10s))
      << Connections();
  // The peers see their connections closed (after the daemon's half of the greeting).
  for (const auto& fd : half_open) {
    char buf[256];
    ssize_t n;
    while ((n = ::recv(fd.get(), buf, sizeof buf, MSG_DONTWAIT)) > 0) {
    }
    EXPECT_EQ(n, 0);
  }
}

}  // namespace
}  // namespace weightd
