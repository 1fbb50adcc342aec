// Authorization end to end (issue 5, "Security"): the real weightd binary with per-model ACLs,
// probed by forked children that drop to other uids and groups and use the real client library
// and raw protocol messages. Each child reports what it saw as "key=value" lines over a pipe.
// Needs root (to change uids); skips otherwise.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <map>
#include <sstream>

#include "fd_channel.h"
#include "protocol.h"
#include "support/daemon_process.h"
#include "support/raw_client.h"
#include "weightd/client.h"

namespace weightd {
namespace {

using testing::DaemonOptions;
using testing::DaemonProcess;
using testing::RawClient;
using testing::TempDir;
using Report = std::map<std::string, std::string>;

constexpr gid_t kClientGroup = 64000;  // daemon.client_group: may connect; the default ACL
constexpr gid_t kTeamGroup = 64001;    // allowed model "team"
constexpr uid_t kTenant = 65534;       // in the client group only
constexpr uid_t kSoloUser = 65533;     // in no group; named by model "solo"'s allow_users
constexpr uid_t kStranger = 65532;     // in nothing

// FNV-1a over every tensor's bytes, in manifest order: the same value from two processes means
// they read the same data.
std::string Digest(const Lease& lease) {
  std::uint64_t h = 1469598103934665603ull;
  for (const Tensor& t : lease.tensors()) {
    const auto* p = reinterpret_cast<const unsigned char*>(t.data);
    for (std::size_t i = 0; i < t.nbytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  }
  return std::to_string(h);
}

std::string ReasonOf(const proto::Reply& r) {
  if (auto* e = std::get_if<proto::ErrorReply>(&r.body)) return e->reason;
  return "ok";
}

std::string Errno(int rc) { return rc >= 0 ? std::string("ok") : std::string(std::strerror(errno)); }

// Runs `body` in a child with the given credentials (no other supplementary groups).
Report RunAs(uid_t uid, gid_t gid, std::vector<gid_t> groups, const std::function<void(Report&)>& body) {
  int p[2];
  if (::pipe(p) != 0) return {{"setup", "pipe failed"}};
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(p[0]);
    Report out;
    if (::setgroups(groups.size(), groups.data()) != 0 || ::setgid(gid) != 0 || ::setuid(uid) != 0) {
      out["setup"] = std::string("dropping privileges: ") + std::strerror(errno);
    } else {
      out["setup"] = "ok";
      body(out);
    }
    std::string text;
    for (const auto& [k, v] : out) text += k + "=" + v + "\n";
    (void)!::write(p[1], text.data(), text.size());
    ::_exit(0);
  }
  ::close(p[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(p[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(n));
  ::close(p[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  Report out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    const auto eq = line.find('=');
    if (eq != std::string::npos) out[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return out;
}

ClientOptions OptionsFor(const std::string& endpoint) {
  ClientOptions o;
  o.endpoint = endpoint;
  o.client_name = "authz_test";
  o.connect_timeout = std::chrono::seconds(5);
  return o;
}

// Acquire through the library; "ok:<digest>" or the error's reason.
void TryAcquire(Client& c, const std::string& model, Report& out) {
  auto l = c.Acquire(model);
  out["acquire." + model] = l.ok() ? "ok:" + Digest(*l) : l.status().reason();
}

// A raw host acquire, its fds fetched over the fd socket, and every route to writing probed.
void ProbeWriteRoutes(const std::string& endpoint, Report& out) {
  RawClient raw(endpoint);
  proto::Reply r = raw.Call(proto::Acquire{"open", "cpu", {}});
  auto* m = std::get_if<proto::Manifest>(&r.body);
  if (m == nullptr) {
    out["raw.acquire"] = ReasonOf(r);
    return;
  }
  auto fds = fdchan::FetchFds(m->fd_socket, m->fd_token, std::chrono::seconds(5), 1);
  if (!fds.ok() || fds->fds.empty()) {
    out["raw.fds"] = fds.ok() ? "none" : fds.status().reason();
    return;
  }
  const int fd = fds->fds[0].get();
  out["fd.access_mode"] = (::fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDONLY ? "rdonly" : "writable";
  const std::size_t size = m->segments[0].size;
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  out["mmap.read"] = p == MAP_FAILED ? std::strerror(errno) : "ok";
  if (p != MAP_FAILED) out["mprotect.write"] = Errno(::mprotect(p, size, PROT_READ | PROT_WRITE));
  out["mmap.write"] = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) == MAP_FAILED ? std::strerror(errno) : "ok";
  out["reopen.write"] = Errno(::open(("/proc/self/fd/" + std::to_string(fd)).c_str(), O_RDWR | O_CLOEXEC));
  out["shm_open.write"] = Errno(::shm_open(m->segments[0].shm_name.c_str(), O_RDWR, 0));
}

class Authz : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root to act as other uids";
    for (const char* name : {"open", "team", "solo"})
      ASSERT_TRUE(testing::WriteModel(models_.file(name), testing::SmallTensors(3), name[0]).ok());
    DaemonOptions o;
    o.config_toml = "[daemon]\nclient_group = \"" + std::to_string(kClientGroup) + "\"\n" +
                    "[models.open]\npath = \"" + models_.file("open") + "\"\n" +
                    "[models.team]\npath = \"" + models_.file("team") + "\"\nallow_groups = [" +
                    std::to_string(kTeamGroup) + "]\n" + "[models.solo]\npath = \"" + models_.file("solo") +
                    "\"\nallow_users = [" + std::to_string(kSoloUser) + "]\n";
    auto d = DaemonProcess::Start(o);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    daemon_ = std::move(d).value();
    // Let other uids traverse to the socket; the socket's own mode and group decide the rest.
    ASSERT_EQ(::chmod(daemon_->runtime_dir().c_str(), 0711), 0);
    // The reference digests and the segment names, as root (an admin).
    auto c = Client::Connect(OptionsFor(daemon_->endpoint()));
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    for (const char* name : {"open", "team", "solo"}) {
      auto l = c->Acquire(name);
      ASSERT_TRUE(l.ok()) << l.status().ToString();
      digest_[name] = "ok:" + Digest(*l);
    }
    RawClient raw(daemon_->endpoint());
    proto::Reply r = raw.Call(proto::Acquire{"team", "cpu", {}});
    auto* m = std::get_if<proto::Manifest>(&r.body);
    ASSERT_NE(m, nullptr) << ReasonOf(r);
    team_segment_ = m->segments.at(0).shm_name;
  }

  TempDir models_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::map<std::string, std::string> digest_;
  std::string team_segment_;
};

TEST_F(Authz, SocketAndSegmentsHaveTheDocumentedOwners) {
  const std::string sock = daemon_->endpoint().substr(6);
  struct stat st {};
  ASSERT_EQ(::stat(sock.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  EXPECT_EQ(st.st_gid, kClientGroup);
  ASSERT_EQ(::stat((sock + ".fds").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  EXPECT_EQ(st.st_gid, kClientGroup);
  ASSERT_EQ(::stat(("/dev/shm" + team_segment_).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);
  EXPECT_NE(st.st_gid, kClientGroup) << "tenants could open every model's segment by name";
  EXPECT_NE(st.st_gid, kTeamGroup);
}

TEST_F(Authz, ATenantGetsItsModelsReadOnlyAndNothingElse) {
  const std::string endpoint = daemon_->endpoint(), team = team_segment_;
  Report r = RunAs(kTenant, kTenant, {kClientGroup}, [&](Report& out) {
    auto c = Client::Connect(OptionsFor(endpoint));
    out["connect"] = c.ok() ? "ok" : c.status().reason();
    if (!c.ok()) return;
    auto list = c->List();
    std::string names;
    if (list.ok())
      for (const auto& m : *list) names += m.name + ",";
    out["list"] = list.ok() ? names : list.status().reason();
    for (const char* name : {"open", "team", "solo"}) TryAcquire(*c, name, out);
    auto load = c->Load("open");
    out["load"] = load.ok() ? "ok" : load.status().reason();
    auto stats = c->Stats();
    out["stats"] = stats.ok() ? "ok" : stats.status().reason();
    RawClient raw(endpoint);
    out["evict"] = ReasonOf(raw.Call(proto::Evict{"open", ""}));
    out["status.team"] = ReasonOf(raw.Call(proto::StatusRequest{"team"}));
    out["shm_open.team"] = Errno(::shm_open(team.c_str(), O_RDONLY, 0));
    ProbeWriteRoutes(endpoint, out);
  });
  EXPECT_EQ(r["setup"], "ok");
  EXPECT_EQ(r["connect"], "ok");
  EXPECT_EQ(r["list"], "open,") << "the list shows only the models this tenant may use";
  EXPECT_EQ(r["acquire.open"], digest_["open"]) << "the allowed model, bit for bit";
  EXPECT_EQ(r["acquire.team"], "auth.model_denied");
  EXPECT_EQ(r["acquire.solo"], "auth.model_denied");
  EXPECT_EQ(r["load"], "auth.admin_only");
  EXPECT_EQ(r["stats"], "auth.admin_only");
  EXPECT_EQ(r["evict"], "auth.admin_only");
  EXPECT_EQ(r["status.team"], "auth.model_denied");
  EXPECT_EQ(r["shm_open.team"], std::strerror(EACCES)) << "a denied model's segment opened by name";
  // Writes to its own model's segment, by every route.
  EXPECT_EQ(r["fd.access_mode"], "rdonly");
  EXPECT_EQ(r["mmap.read"], "ok");
  EXPECT_EQ(r["mprotect.write"], std::strerror(EACCES));
  EXPECT_EQ(r["mmap.write"], std::strerror(EACCES));
  EXPECT_EQ(r["reopen.write"], std::strerror(EACCES));
  EXPECT_EQ(r["shm_open.write"], std::strerror(EACCES));
}

TEST_F(Authz, AGroupAndAUserNamedByAnAclGetExactlyThatModel) {
  const std::string endpoint = daemon_->endpoint();
  auto probe = [&](Report& out) {
    auto c = Client::Connect(OptionsFor(endpoint));
    out["connect"] = c.ok() ? "ok" : c.status().reason();
    if (!c.ok()) return;
    for (const char* name : {"open", "team", "solo"}) TryAcquire(*c, name, out);
  };
  // In the team group and, to reach the socket, the client group.
  Report team = RunAs(kTenant, kTenant, {kClientGroup, kTeamGroup}, probe);
  EXPECT_EQ(team["connect"], "ok");
  EXPECT_EQ(team["acquire.team"], digest_["team"]);
  EXPECT_EQ(team["acquire.open"], digest_["open"]);
  EXPECT_EQ(team["acquire.solo"], "auth.model_denied");
  // The socket is the client group's: a user named by an ACL but outside it cannot reach the
  // daemon, and is told why at once.
  Report solo = RunAs(kSoloUser, kSoloUser, {}, probe);
  EXPECT_EQ(solo["setup"], "ok");
  EXPECT_EQ(solo["connect"], "client.socket_denied");
  Report solo_in_group = RunAs(kSoloUser, kSoloUser, {kClientGroup}, probe);
  EXPECT_EQ(solo_in_group["acquire.solo"], digest_["solo"]);
  EXPECT_EQ(solo_in_group["acquire.team"], "auth.model_denied");
}

TEST_F(Authz, AStrangerIsRefusedAtTheSocket) {
  const std::string endpoint = daemon_->endpoint();
  Report r = RunAs(kStranger, kStranger, {}, [&](Report& out) {
    auto c = Client::Connect(OptionsFor(endpoint));
    out["connect"] = c.ok() ? "ok" : c.status().reason();
  });
  EXPECT_EQ(r["setup"], "ok");
  EXPECT_EQ(r["connect"], "client.socket_denied");
  // Behind a socket opened to everyone by mistake, the daemon itself still refuses the session.
  ASSERT_EQ(::chmod(endpoint.substr(6).c_str(), 0666), 0);
  Report open = RunAs(kStranger, kStranger, {}, [&](Report& out) {
    auto c = Client::Connect(OptionsFor(endpoint));
    out["connect"] = c.ok() ? "ok" : c.status().reason();
  });
  EXPECT_EQ(open["connect"], "auth.not_a_client");
  EXPECT_TRUE(daemon_->running());
}

}  // namespace
}  // namespace weightd
