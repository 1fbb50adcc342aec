// Client death at every step of its life, against the real daemon: a forked child goes as far
// as the case says and dies there (_exit, as a crash or SIGKILL would: no Goodbye, no Release).
// The daemon's sessions, leases, pending fd tokens, fd-socket connections, open file
// descriptors and segments must return to their baseline within the heartbeat timeout, and the
// daemon must keep serving.
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <zmq.hpp>

#include "protocol.h"
#include "support/daemon_process.h"
#include "support/raw_client.h"
#include "weightd/client.h"

namespace weightd {
namespace {

using namespace std::chrono_literals;
using testing::DaemonProcess;
using testing::RawClient;
using testing::TempDir;

constexpr auto kHeartbeatTimeout = 1500ms;
constexpr const char* kConfig = R"(
[daemon]
heartbeat_interval = "200ms"
heartbeat_timeout = "1500ms"
)";

// What a dead client could leave behind in the daemon.
struct Footprint {
  std::uint32_t sessions = 0, leases = 0;
  double fd_tokens = 0, fd_connections = 0;
  std::size_t open_fds = 0, segments = 0;

  bool operator==(const Footprint&) const = default;
  std::string ToString() const {
    std::ostringstream o;
    o << "sessions " << sessions << ", leases " << leases << ", fd tokens " << fd_tokens << ", fd connections "
      << fd_connections << ", open fds " << open_fds << ", segments " << segments;
    return o.str();
  }
};

class ClientDeathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::WriteShardedModel(models_.file("m"), testing::SmallTensors(12), 2, /*seed=*/5).ok());
    auto d = DaemonProcess::Start({.models = {{"m", models_.file("m")}}, .config_toml = kConfig});
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    daemon_ = std::move(d).value();
    ClientOptions o;
    o.endpoint = daemon_->endpoint();
    auto c = Client::Connect(o);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    observer_.emplace(std::move(c).value());
    ASSERT_TRUE(observer_->Load("m").ok());
  }

  Footprint Now() {
    Footprint f;
    auto s = observer_->Stats();
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (!s.ok()) return f;
    f.sessions = s->sessions;
    f.leases = s->leases;
    f.fd_tokens = testing::MetricValue(s->metrics, "weightd_fd_tokens_pending");
    f.fd_connections = testing::MetricValue(s->metrics, "weightd_fd_connections");
    f.open_fds = testing::OpenFdCount(daemon_->pid());
    f.segments = daemon_->Segments().size();
    return f;
  }

  // Runs `body` in a child that then _exits, and checks that the footprint returns to `base`.
  void DieAndCheck(const std::function<void()>& body, const char* what) {
    // The baseline once it holds still: the load in SetUp answers before its worker has let go
    // of everything it held (a file of the plan, for a moment), and that is not the client's.
    Footprint base = Now();
    for (int i = 0; i < 40; ++i) {
      std::this_thread::sleep_for(50ms);
      const Footprint again = Now();
      if (again == base) break;
      base = again;
    }
    pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      body();
      std::_Exit(0);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    const auto deadline = std::chrono::steady_clock::now() + kHeartbeatTimeout + 1500ms;
    Footprint now = Now();
    while (!(now == base) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(50ms);
      now = Now();
    }
    EXPECT_EQ(now, base) << what << ": still " << now.ToString() << "; baseline " << base.ToString() << "\n"
                         << daemon_->Log();
    // And the daemon still serves.
    auto lease = observer_->Acquire("m");
    EXPECT_TRUE(lease.ok()) << what << ": " << lease.status().ToString();
  }

  TempDir models_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::optional<Client> observer_;
};

TEST_F(ClientDeathTest, ConnectedButNeverSaidHello) {
  DieAndCheck(
      [&] {
        zmq::context_t ctx;
        zmq::socket_t s(ctx, zmq::socket_type::dealer);
        s.connect(daemon_->endpoint());
        std::this_thread::sleep_for(200ms);  // the connection and its ZAP handshake are up
      },
      "before Hello");
}

TEST_F(ClientDeathTest, DiedRightAfterSendingHello) {
  DieAndCheck(
      [&] {
        zmq::context_t ctx;
        zmq::socket_t s(ctx, zmq::socket_type::dealer);
        s.connect(daemon_->endpoint());
        s.send(zmq::buffer(proto::EncodeRequest(proto::Request{1, proto::Hello{"dies"}})));
        std::this_thread::sleep_for(50ms);  // sent, reply not read
      },
      "during the handshake");
}

TEST_F(ClientDeathTest, DiedWithALeaseWhoseFdsItNeverFetched) {
  DieAndCheck(
      [&] {
        RawClient c(daemon_->endpoint());
        if (!c.hello_ok()) std::_Exit(2);
        auto r = c.Call(proto::Acquire{"m", "cpu", {}});
        if (!std::holds_alternative<proto::Manifest>(r.body)) std::_Exit(3);
      },
      "after the Acquire reply, before the fd fetch");
}

TEST_F(ClientDeathTest, DiedConnectedToTheFdSocketWithoutAToken) {
  DieAndCheck(
      [&] {
        RawClient c(daemon_->endpoint());
        auto r = c.Call(proto::Acquire{"m", "cpu", {}});
        auto* m = std::get_if<proto::Manifest>(&r.body);
        if (m == nullptr) std::_Exit(3);
        int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::strncpy(addr.sun_path, m->fd_socket.c_str(), sizeof addr.sun_path - 1);
        if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) std::_Exit(4);
        std::this_thread::sleep_for(100ms);  // accepted, no token sent
      },
      "connected to the fd socket");
}

TEST_F(ClientDeathTest, DiedHoldingMappedLeases) {
  DieAndCheck(
      [&] {
        ClientOptions o;
        o.endpoint = daemon_->endpoint();
        auto c = Client::Connect(o);
        if (!c.ok()) std::_Exit(2);
        auto a = c->Acquire("m");
        auto b = c->Acquire("m");
        if (!a.ok() || !b.ok() || testing::CompareWithFiles(*a).ok() == false) std::_Exit(3);
        std::_Exit(0);  // no Release, no Goodbye
      },
      "holding two mapped leases");
}

TEST_F(ClientDeathTest, KilledWhileItsRequestsWereInFlight) {
  DieAndCheck(
      [&] {
        RawClient c(daemon_->endpoint());
        for (int i = 0; i < 50; ++i) c.Send(proto::Acquire{"m", "cpu", {}});
        ::kill(::getpid(), SIGKILL);
      },
      "with 50 Acquires in flight");
}

}  // namespace
}  // namespace weightd
