// Integration tests: the real weightd binary on a private socket and segment prefix, driven
// through libweightd (and, for hostile input, a raw ZeroMQ socket).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>
#include <zmq.hpp>

#include "posix.h"
#include "protocol.h"
#include "support/daemon_process.h"
#include "weightd/client.h"

namespace weightd {
namespace {

using testing::DaemonOptions;
using testing::DaemonProcess;
using testing::TempDir;

std::unique_ptr<DaemonProcess> StartOrDie(const DaemonOptions& o) {
  auto d = DaemonProcess::Start(o);
  EXPECT_TRUE(d.ok()) << d.status().ToString();
  return d.ok() ? std::move(d).value() : nullptr;
}

Client ConnectOrDie(const DaemonProcess& d) {
  ClientOptions o;
  o.endpoint = d.endpoint();
  o.client_name = "daemon_test";
  auto c = Client::Connect(o);
  if (!c.ok()) throw Error(c.status());
  return std::move(c).value();
}

// Compares every tensor of a lease with the bytes in the model's files.
::testing::AssertionResult MatchesFiles(const Lease& lease) {
  if (Status s = testing::CompareWithFiles(lease); !s.ok()) return ::testing::AssertionFailure() << s.ToString();
  return ::testing::AssertionSuccess();
}

std::uint32_t LiveLeases(Client& c, const std::string& model) {
  auto st = c.Status(model);
  return st.ok() ? st->leases : 0xffffffffu;
}

class DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::WriteShardedModel(models_.file("small"), testing::SmallTensors(30), 3, /*seed=*/7).ok());
    ASSERT_TRUE(testing::WriteModel(models_.file("single"), testing::SmallTensors(5), /*seed=*/9).ok());
  }
  TempDir models_;
};

TEST_F(DaemonTest, AttachFromSecondProcessIsBitwiseEqualToFile) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  pid_t child = ::fork();
  if (child == 0) {
    // A fresh process: connect, acquire, compare with the file. Exit code is the verdict.
    try {
      Client c = ConnectOrDie(*d);
      auto lease = c.Acquire("small");
      if (!lease.ok()) std::_Exit(2);
      if (lease->tensors().size() != 30) std::_Exit(3);
      std::_Exit(MatchesFiles(*lease) ? 0 : 4);
    } catch (...) {
      std::_Exit(5);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << d->Log();
  // Three shards, three segments under the private prefix, and the model's adoption record.
  EXPECT_EQ(d->Segments().size(), 4u);
}

TEST_F(DaemonTest, TensorsAreZeroCopyViewsOfReadOnlySegments) {
  TempDir big;
  // 24 MiB in 6 tensors: big enough that a copy would show in RSS, small enough for CI.
  std::vector<st::TensorSpec> specs;
  for (int i = 0; i < 6; ++i) specs.push_back({"w" + std::to_string(i), DType::kF32, {1024, 1024}});
  ASSERT_TRUE(testing::WriteModel(big.file("m"), specs, 3).ok());
  auto d = StartOrDie({.models = {{"big", big.file("m")}}});
  ASSERT_NE(d, nullptr);
  Client c = ConnectOrDie(*d);
  ASSERT_TRUE(c.Load("big").ok());
  const std::uint64_t rss_before = posix::CurrentRssBytes();
  auto lease = c.Acquire("big");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  const std::uint64_t rss_after = posix::CurrentRssBytes();
  EXPECT_LT(rss_after - std::min(rss_after, rss_before), lease->total_bytes() / 10)
      << "attaching grew RSS by " << (rss_after - rss_before) << " bytes";

  // Every tensor pointer lies in a read-only shared mapping of one of the daemon's segments.
  std::ifstream maps("/proc/self/maps");
  std::string line;
  struct Range { std::uintptr_t lo, hi; std::string perms, path; };
  std::vector<Range> ranges;
  while (std::getline(maps, line)) {
    Range r;
    char perms[8] = {};
    char path[512] = {};
    unsigned long lo, hi;
    if (std::sscanf(line.c_str(), "%lx-%lx %7s %*s %*s %*s %511s", &lo, &hi, perms, path) >= 3) {
      r.lo = lo;
      r.hi = hi;
      r.perms = perms;
      r.path = path;
      ranges.push_back(r);
    }
  }
  for (const Tensor& t : lease->tensors()) {
    auto p = reinterpret_cast<std::uintptr_t>(t.data);
    auto it = std::find_if(ranges.begin(), ranges.end(), [&](const Range& r) { return p >= r.lo && p + t.nbytes <= r.hi; });
    ASSERT_NE(it, ranges.end()) << t.name;
    EXPECT_EQ(it->perms.substr(0, 2), "r-") << t.name << " is mapped " << it->perms;
    EXPECT_NE(it->path.find("/dev/shm/" + d->shm_prefix() + ".big."), std::string::npos) << it->path;
  }
  EXPECT_TRUE(MatchesFiles(*lease));
}

TEST_F(DaemonTest, ConcurrentAcquiresShareOneLoad) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  constexpr int kClients = 8;
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  std::vector<Lease> leases(kClients);
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      Client c = ConnectOrDie(*d);
      auto l = c.Acquire("small");
      if (l.ok()) {
        leases[i] = *l;
        ++ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kClients);
  Client c = ConnectOrDie(*d);
  auto st = c.Status("small");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->loads, 1u);
  EXPECT_EQ(st->leases, static_cast<std::uint32_t>(kClients));
  auto stats = c.Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->bytes_read_from_disk, st->bytes);
}

TEST_F(DaemonTest, EvictIsRefusedWhileLeasedAndRemovesSegmentsAfter) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  Client c = ConnectOrDie(*d);
  auto lease = c.Acquire("small");
  ASSERT_TRUE(lease.ok());
  Status s = c.Evict("small");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_EQ(s.reason(), "evict.leased");
  EXPECT_NE(s.message().find("1 live lease"), std::string::npos) << s.message();
  lease->release();
  lease = Lease();
  // Release is sent by the last handle's destructor; the daemon sees it before our next request.
  EXPECT_EQ(LiveLeases(c, "small"), 0u);
  EXPECT_TRUE(c.Evict("small").ok());
  // The daemon's reaper thread unlinks them right after the reply.
  for (int i = 0; i < 200 && !d->Segments().empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(d->Segments().empty());
  auto st = c.Status("small");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->state, "absent");
}

TEST_F(DaemonTest, SigkilledClientLosesItsLeaseWithinTwoSeconds) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  pid_t child = ::fork();
  if (child == 0) {
    try {
      Client c = ConnectOrDie(*d);
      auto lease = c.Acquire("small");
      char ok = lease.ok() ? 'y' : 'n';
      (void)!::write(pipefd[1], &ok, 1);
      ::pause();
    } catch (...) {
    }
    std::_Exit(1);
  }
  char got = 0;
  ASSERT_EQ(::read(pipefd[0], &got, 1), 1);
  ASSERT_EQ(got, 'y');
  Client c = ConnectOrDie(*d);
  EXPECT_EQ(LiveLeases(c, "small"), 1u);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  const auto t0 = std::chrono::steady_clock::now();
  while (LiveLeases(c, "small") != 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(LiveLeases(c, "small"), 0u) << "the lease outlived its process by more than 2 s";
  ::close(pipefd[0]);
  ::close(pipefd[1]);
}

TEST_F(DaemonTest, CorruptModelFailsAloneWhileAnotherKeepsServing) {
  // A header that claims more bytes than the file holds.
  std::filesystem::create_directories(models_.file("bad"));
  {
    std::ofstream f(models_.file("bad/model.safetensors"), std::ios::binary);
    std::uint64_t n = 1ull << 40;
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << "{}";
  }
  auto d = StartOrDie({.models = {{"bad", models_.file("bad")}, {"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  Client c = ConnectOrDie(*d);
  auto good = c.Acquire("small");
  ASSERT_TRUE(good.ok());
  auto bad = c.Acquire("bad");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Code::kDataLoss) << bad.status().ToString();
  EXPECT_EQ(bad.status().reason().rfind("safetensors.", 0), 0u) << bad.status().reason();
  EXPECT_NE(bad.status().message().find("model.safetensors"), std::string::npos) << bad.status().message();
  auto st = c.Status("bad");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->state, "failed");
  EXPECT_EQ(st->last_error.code(), Code::kDataLoss);
  // The other model is untouched and still attachable.
  EXPECT_TRUE(MatchesFiles(*good));
  auto again = c.Acquire("small");
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(d->running());
}

TEST_F(DaemonTest, UnknownModelAndTensorAreNotFound) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  Client c = ConnectOrDie(*d);
  auto none = c.Acquire("nope");
  EXPECT_EQ(none.status().code(), Code::kNotFound);
  EXPECT_EQ(none.status().reason(), "catalog.unknown_model");
  AcquireOptions o;
  o.tensor_filter = {"layer.1.bias", "no.such.tensor"};
  auto partial = c.Acquire("small", o);
  EXPECT_EQ(partial.status().code(), Code::kNotFound);
  EXPECT_NE(partial.status().message().find("no.such.tensor"), std::string::npos);
  o.tensor_filter = {"layer.1.bias", "layer.29.index"};
  auto two = c.Acquire("small", o);
  ASSERT_TRUE(two.ok()) << two.status().ToString();
  EXPECT_EQ(two->tensors().size(), 2u);
  EXPECT_NE(two->find("layer.29.index"), nullptr);
  EXPECT_TRUE(MatchesFiles(*two));
  auto gpu = c.Acquire("small", AcquireOptions{.device = "tpu:0"});
  EXPECT_EQ(gpu.status().code(), Code::kInvalidArgument);
}

TEST_F(DaemonTest, LeaseCapPerClientIsEnforced) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}},
                       .config_toml = "[daemon]\nmax_leases_per_client = 2\n"});
  ASSERT_NE(d, nullptr);
  Client c = ConnectOrDie(*d);
  auto a = c.Acquire("small");
  auto b = c.Acquire("small");
  ASSERT_TRUE(a.ok() && b.ok());
  auto third = c.Acquire("small");
  EXPECT_EQ(third.status().code(), Code::kResourceExhausted);
  EXPECT_EQ(third.status().reason(), "limits.leases");
}

// A raw DEALER, to speak to the daemon the way a hostile or outdated peer would.
class RawPeer {
 public:
  explicit RawPeer(const std::string& endpoint) : sock_(ctx_, zmq::socket_type::dealer) {
    sock_.set(zmq::sockopt::linger, 0);
    sock_.set(zmq::sockopt::rcvtimeo, 5000);
    sock_.connect(endpoint);
  }
  Result<proto::Reply> Call(const std::string& frame) {
    sock_.send(zmq::buffer(frame));
    zmq::message_t m;
    if (!sock_.recv(m)) return DeadlineExceeded("no reply");
    return proto::DecodeReply(m.to_string_view());
  }
  Result<proto::Reply> Call(const proto::Request& r, proto::FrameVersion v = {proto::kVersionMajor, proto::kVersionMinor}) {
    return Call(proto::EncodeRequest(r, v));
  }

 private:
  zmq::context_t ctx_;
  zmq::socket_t sock_;
};

Status ErrorOf(const Result<proto::Reply>& r) {
  if (!r.ok()) return r.status();
  if (auto* e = std::get_if<proto::ErrorReply>(&r->body)) return proto::FromErrorReply(*e);
  return Status::Ok();
}

TEST_F(DaemonTest, WrongProtocolVersionIsRefusedWithAClearError) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  RawPeer peer(d->endpoint());
  auto r = peer.Call(proto::Request{1, proto::Hello{"future-client"}}, {proto::kVersionMajor + 1, 0});
  Status s = ErrorOf(r);
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
  EXPECT_EQ(s.reason(), "protocol.version_mismatch");
  EXPECT_NE(s.message().find(std::to_string(proto::kVersionMajor + 1) + ".0"), std::string::npos) << s.message();
  // A minor difference is fine.
  auto ok = peer.Call(proto::Request{2, proto::Hello{"newer-minor"}}, {proto::kVersionMajor, 99});
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(std::holds_alternative<proto::HelloReply>(ok->body));
}

TEST_F(DaemonTest, MalformedMessagesGetErrorRepliesAndTheDaemonLives) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  RawPeer peer(d->endpoint());
  EXPECT_EQ(ErrorOf(peer.Call(std::string("garbage"))).reason(), "protocol.bad_frame");
  std::string frame = proto::EncodeRequest(proto::Request{3, proto::Acquire{"small", "cpu", {}}});
  // Claim a 2^40-byte model name.
  std::uint64_t huge = 1ull << 40;
  std::memcpy(frame.data() + proto::kFrameHeaderSize + 8 + 4, &huge, 8);
  EXPECT_EQ(ErrorOf(peer.Call(frame)).reason(), "protocol.malformed");
  frame.resize(frame.size() - 3);  // truncated
  EXPECT_EQ(ErrorOf(peer.Call(frame)).reason(), "protocol.malformed");
  // Requests before Hello.
  EXPECT_EQ(ErrorOf(peer.Call(proto::Request{4, proto::Acquire{"small", "cpu", {}}})).reason(), "protocol.no_session");
  EXPECT_TRUE(d->running());
  Client c = ConnectOrDie(*d);
  EXPECT_TRUE(c.Acquire("small").ok());
}

TEST_F(DaemonTest, SilentSessionLosesItsLeasesAfterTheHeartbeatTimeout) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}},
                       .config_toml = "[daemon]\nheartbeat_interval = \"100ms\"\nheartbeat_timeout = \"400ms\"\n"});
  ASSERT_NE(d, nullptr);
  RawPeer peer(d->endpoint());  // lives in this (alive) process: only the timeout can end it
  auto hello = peer.Call(proto::Request{1, proto::Hello{"silent"}});
  ASSERT_TRUE(hello.ok());
  auto man = peer.Call(proto::Request{2, proto::Acquire{"small", "cpu", {}}});
  ASSERT_TRUE(man.ok());
  ASSERT_TRUE(std::holds_alternative<proto::Manifest>(man->body));
  Client c = ConnectOrDie(*d);
  EXPECT_EQ(LiveLeases(c, "small"), 1u);
  const auto t0 = std::chrono::steady_clock::now();
  while (LiveLeases(c, "small") != 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(LiveLeases(c, "small"), 0u);
  // And the silent peer must say Hello again.
  EXPECT_EQ(ErrorOf(peer.Call(proto::Request{3, proto::Heartbeat{}})).reason(), "protocol.no_session");
}

TEST_F(DaemonTest, SighupReloadsTheCatalog) {
  TempDir cfgdir;
  const std::string path = cfgdir.file("weightd.toml");
  std::ofstream(path) << "[models.first]\npath = \"" << models_.file("small") << "\"\n";
  auto d = StartOrDie({.extra_args = {"--config", path}});
  ASSERT_NE(d, nullptr);
  Client c = ConnectOrDie(*d);
  auto before = c.List();
  ASSERT_TRUE(before.ok());
  ASSERT_EQ(before->size(), 1u);
  EXPECT_EQ((*before)[0].name, "first");
  std::ofstream(path) << "[models.second]\npath = \"" << models_.file("single") << "\"\n";
  d->Signal(SIGHUP);
  std::vector<ModelInfo> after;
  const auto t0 = std::chrono::steady_clock::now();
  do {
    auto l = c.List();
    ASSERT_TRUE(l.ok());
    after = *l;
  } while ((after.size() != 1 || after[0].name != "second") && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  ASSERT_EQ(after.size(), 1u);
  EXPECT_EQ(after[0].name, "second");
  EXPECT_TRUE(c.Acquire("second").ok());
  EXPECT_EQ(c.Acquire("first").status().code(), Code::kNotFound);
  // A broken file keeps the current catalog.
  std::ofstream(path) << "[models.third\n";
  d->Signal(SIGHUP);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_TRUE(d->running());
  EXPECT_TRUE(c.Acquire("second").ok());
}

TEST_F(DaemonTest, SecondInstanceOnTheSameSocketIsRefused) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  std::string sock = d->endpoint().substr(6);
  std::string cmd = std::string(WEIGHTD_DAEMON_PATH) + " --config /dev/null --socket " + d->endpoint() +
                    " --shm-prefix other-" + std::to_string(::getpid()) + " > /dev/null 2>&1";
  int st = std::system(cmd.c_str());
  EXPECT_NE(WEXITSTATUS(st), 0);
  Client c = ConnectOrDie(*d);
  EXPECT_TRUE(c.Acquire("small").ok());
}

TEST_F(DaemonTest, CleanShutdownRemovesSegmentsButClientsKeepTheirMappings) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  Client c = ConnectOrDie(*d);
  auto lease = c.Acquire("small");
  ASSERT_TRUE(lease.ok());
  int status = d->Signal(SIGTERM);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_TRUE(d->Segments().empty());
  EXPECT_TRUE(MatchesFiles(*lease));  // the mapping outlives the name
}

}  // namespace
}  // namespace weightd

namespace weightd {
namespace {

TEST_F(DaemonTest, ParkedRequestsPerClientAreCapped) {
  // A model big enough that its load is still running when the burst below arrives.
  std::vector<st::TensorSpec> big;
  for (int i = 0; i < 8; ++i) big.push_back({"w." + std::to_string(i), DType::kF32, {1024, 2048}});
  ASSERT_TRUE(testing::WriteModel(models_.file("big"), big, 5).ok());
  auto d = StartOrDie({.models = {{"big", models_.file("big")}, {"small", models_.file("small")}},
                       .config_toml = "[daemon]\nmax_leases_per_client = 2\n"});
  ASSERT_NE(d, nullptr);
  zmq::context_t ctx;
  zmq::socket_t sock(ctx, zmq::socket_type::dealer);
  sock.set(zmq::sockopt::linger, 0);
  sock.set(zmq::sockopt::rcvtimeo, 20000);
  sock.connect(d->endpoint());
  auto send = [&](std::uint64_t id, proto::RequestBody b) { sock.send(zmq::buffer(proto::EncodeRequest({id, std::move(b)}))); };
  {
    Client c = ConnectOrDie(*d);
    ASSERT_TRUE(c.Load("small").ok());
  }
  send(1, proto::Hello{"burst"});
  for (std::uint64_t id = 2; id <= 4; ++id) send(id, proto::Load{"big"});
  send(5, proto::Acquire{"small", "cpu", {}});  // resident: served at once, whatever is parked
  std::map<std::uint64_t, proto::Reply> replies;
  while (replies.size() < 5) {
    zmq::message_t m;
    ASSERT_TRUE(sock.recv(m)) << "no reply";
    auto r = proto::DecodeReply(m.to_string_view());
    ASSERT_TRUE(r.ok());
    replies[r->id] = *r;
  }
  // Two wait for the load; the third is refused at once.
  EXPECT_TRUE(std::holds_alternative<proto::ModelStatus>(replies[2].body));
  EXPECT_TRUE(std::holds_alternative<proto::ModelStatus>(replies[3].body));
  auto* e = std::get_if<proto::ErrorReply>(&replies[4].body);
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->reason, "limits.pending");
  EXPECT_TRUE(std::holds_alternative<proto::Manifest>(replies[5].body));
}

TEST_F(DaemonTest, AClosedClientsSessionEndsAtOnce) {
  auto d = StartOrDie({.models = {{"small", models_.file("small")}}});
  ASSERT_NE(d, nullptr);
  Client watcher = ConnectOrDie(*d);
  { Client gone = ConnectOrDie(*d); }
  // Goodbye, not the 10 s heartbeat timeout, ends it.
  const auto t0 = std::chrono::steady_clock::now();
  std::uint32_t sessions = 2;
  while (sessions > 1 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2)) {
    auto st = watcher.Stats();
    ASSERT_TRUE(st.ok());
    sessions = st->sessions;
    if (sessions > 1) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(sessions, 1u);
}

}  // namespace
}  // namespace weightd
