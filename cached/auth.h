// auth.h — who a peer is, and what it may do (docs/security.md, "Identity and authorization").
//
// Identity comes from the kernel, never from the request: libzmq reads SO_PEERCRED when an ipc
// peer connects and hands "uid:gid:pid" to the ZAP handler, which adds the process's groups and
// stamps every message of that connection with them (User-Id and the X-Groups property). The
// ROUTER enforces ZAP (ZMQ_ZAP_ENFORCE_DOMAIN), so a connection no handler approved carries no
// message at all: a missing handler fails closed.
//
// Policy: root, the daemon's own uid and members of `admin_group` are admins; they may do
// anything. Everyone else may acquire a model only if its ACL (`allow_users`, `allow_groups`;
// default: the client group) lets them, and may connect only if some ACL or the client group
// does. Load, evict and stats are admin operations.
//
// Thread safety: Policy is an immutable value; ZapHandler runs its own thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <zmq.hpp>

#include "config.h"
#include "status_macros.h"

namespace weightd::auth {

struct Identity {
  bool known = false;  // false: no credentials reached the server (refused everywhere)
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;  // 0 when the peer's pid is not visible in our pid namespace
  std::vector<gid_t> groups;  // the primary and supplementary groups, sorted and unique

  bool InGroup(gid_t g) const;
  std::string ToString() const;  // "uid 1001 (pid 4242)"
};

// The User-Id the ZAP handler sets ("uid:gid:pid") and the X-Groups property ("10,1001").
std::optional<Identity> ParseIdentity(std::string_view user_id, std::string_view groups);
std::string FormatGroups(const std::vector<gid_t>& groups);

// The groups of a peer: from /proc/<pid>/status (the kernel's list, what the process really
// holds) when the pid is visible and its real uid is `uid`; otherwise, from the user database
// (getgrouplist). Always contains `gid`; sorted and unique.
std::vector<gid_t> PeerGroups(uid_t uid, gid_t gid, pid_t pid);

// When process `pid` started, in clock ticks after boot (/proc/<pid>/stat, field 22); 0 if there
// is no such process. Two processes that had the same pid never have the same start time.
std::uint64_t ProcessStartTime(pid_t pid);

// "alice" or "1001" -> uid; "weightd" or "1000" -> gid. NotFound config.unknown_user/_group.
Result<uid_t> ResolveUser(const std::string& user);
Result<gid_t> ResolveGroup(const std::string& group);

struct Acl {
  std::vector<uid_t> users;
  std::vector<gid_t> groups;
  bool Allows(const Identity& who) const;
  bool operator==(const Acl&) const = default;
};

class Policy {
 public:
  // Resolves every name in `c` (client_group, admin_group, each model's ACL). `self_uid` and
  // `self_gid` are the daemon's own (the defaults of the client group).
  static Result<Policy> Create(const DaemonConfig& c, uid_t self_uid, gid_t self_gid);

  bool IsAdmin(const Identity& who) const;
  bool MayConnect(const Identity& who) const;
  // False for a model the policy does not know.
  bool MayAcquire(const Identity& who, const std::string& model) const;
  // The same as PermissionDenied errors that say why: "auth.not_a_client", "auth.admin_only"
  // (`what`: the operation, "load"), "auth.model_denied".
  Status CheckConnect(const Identity& who) const;
  Status CheckAdmin(const Identity& who, std::string_view what) const;
  Status CheckModel(const Identity& who, const std::string& model) const;

  gid_t client_gid() const { return client_gid_; }
  // True when some model's ACL differs from another's: then whoever may open segments by name
  // (their group) could read models its ACL denies, so the segments' group must be none of
  // the ACLs' groups.
  bool Restrictive() const;
  // True if `g` is the client group or appears in an ACL.
  bool GrantsGroup(gid_t g) const;

 private:
  uid_t self_uid_ = 0;
  gid_t client_gid_ = 0;
  std::optional<gid_t> admin_gid_;
  std::map<std::string, Acl> models_;
};

// Per-model ACLs are only airtight when no tenant can open segments by name: then the segments'
// group (`shm_gid`) must be none that an ACL or the client group grants, or have no group read
// bit in `shm_mode`. InvalidArgument "config.shm_group_leaks" otherwise.
Status CheckSegmentGroup(const Policy& policy, gid_t shm_gid, mode_t shm_mode);

// The socket's directory and the names the daemon creates in it must be ours (or root's): a user
// who owns the directory, or may write to it without the sticky bit, could swap our socket for
// theirs and receive every client's requests. An existing name of another user is a squat.
// FailedPrecondition "daemon.socket_dir_unsafe" or "daemon.socket_squatted".
Status CheckSocketPaths(const std::string& dir, const std::vector<std::string>& names);

// Answers libzmq's ZAP requests (RFC 27) on inproc://zeromq.zap.01 of `ctx`, for every domain:
// an ipc peer whose credentials libzmq read is accepted and stamped; anything else (no
// credentials: not an ipc peer) is refused with 400. Start it before binding the socket it
// guards; stop it (destroy) after closing that socket.
//
// It also watches the guarded socket's connections (a ZeroMQ monitor: the fd of each accepted
// and each disconnected connection) and counts them per peer uid (SO_PEERCRED of the fd). A
// connection that would give its uid more than `max_connections_per_user` is shut down at once,
// before its handshake, so that a flood of connections from one user, complete or half-open,
// cannot use up the daemon's file descriptors; the peer sees its connection closed.
class ZapHandler {
 public:
  // `guarded`: the socket to watch, not yet bound to the ipc path `socket_path`.
  // `max_connections_per_user` 0: no limit.
  static Result<std::unique_ptr<ZapHandler>> Start(zmq::context_t& ctx, zmq::socket_t& guarded,
                                                   const std::string& socket_path,
                                                   std::uint32_t max_connections_per_user);
  ~ZapHandler();
  ZapHandler(const ZapHandler&) = delete;
  ZapHandler& operator=(const ZapHandler&) = delete;

  std::uint64_t accepted() const { return accepted_.load(); }
  std::uint64_t refused() const { return refused_.load(); }
  // Connections shut down for the per-user limit, and the connections open now.
  std::uint64_t shed() const { return shed_.load(); }
  std::uint64_t connections() const { return connections_.load(); }

 private:
  ZapHandler(zmq::socket_t sock, zmq::socket_t monitor, std::string socket_path, std::uint32_t max_per_user);
  void Run();
  void Answer(std::vector<zmq::message_t>& frames);
  bool OnMonitorEvent();

  zmq::socket_t sock_;
  zmq::socket_t monitor_;  // PAIR, connected to the guarded socket's monitor
  const std::string socket_path_;
  const std::uint32_t max_per_user_;
  // Handler thread only: the uid of each open connection's fd, and the count per uid.
  std::map<int, uid_t> conn_uid_;
  std::map<uid_t, std::uint32_t> per_uid_;
  std::map<uid_t, std::chrono::steady_clock::time_point> last_warned_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> accepted_{0}, refused_{0}, shed_{0}, connections_{0};
  std::thread thread_;
};

// The identity the ZAP handler stamped on a received message; unknown if none.
Identity IdentityOf(zmq::message_t& msg);

}  // namespace weightd::auth
