#include "auth.h"

#include <grp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>

#include "posix.h"
#include "protocol.h"

namespace weightd::auth {
namespace {

constexpr const char* kZapEndpoint = "inproc://zeromq.zap.01";
constexpr const char* kGroupsProperty = "X-Groups";
constexpr std::size_t kMaxGroups = 65536;  // NGROUPS_MAX

template <typename T>
bool ParseNumber(std::string_view s, T* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return !s.empty() && ec == std::errc() && p == s.data() + s.size();
}

std::vector<std::string_view> Split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  for (std::size_t at; (at = s.find(sep)) != std::string_view::npos; s.remove_prefix(at + 1)) out.push_back(s.substr(0, at));
  out.push_back(s);
  return out;
}

// What follows the n-th last `sep` of `s` (":a:b:c", 3 -> "a:b:c"); empty if `s` has fewer.
std::string_view AfterLastSeparators(std::string_view s, int n, char sep) {
  std::size_t at = s.size();
  for (int i = 0; i < n; ++i) {
    if (at == 0 || (at = s.rfind(sep, at - 1)) == std::string_view::npos) return {};
  }
  return s.substr(at + 1);
}

void SortUnique(std::vector<gid_t>* v) {
  std::sort(v->begin(), v->end());
  v->erase(std::unique(v->begin(), v->end()), v->end());
}

// /proc/<pid>/status: "Uid:\treal\teffective\t..." and "Groups:\t10 1001 ". nullopt unless
// the file is readable and its real uid is `uid`.
std::optional<std::vector<gid_t>> ProcGroups(uid_t uid, gid_t gid, pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  if (!in) return std::nullopt;
  std::optional<uid_t> real_uid;
  std::optional<std::vector<gid_t>> groups;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("Uid:", 0) == 0) {
      std::istringstream f(line.substr(4));
      uid_t u;
      if (f >> u) real_uid = u;
    } else if (line.rfind("Groups:", 0) == 0) {
      std::istringstream f(line.substr(7));
      std::vector<gid_t> g{gid};
      for (gid_t x; f >> x && g.size() < kMaxGroups;) g.push_back(x);
      groups = std::move(g);
    }
  }
  if (!real_uid || *real_uid != uid || !groups) return std::nullopt;
  return groups;
}

std::vector<gid_t> DatabaseGroups(uid_t uid, gid_t gid) {
  std::vector<gid_t> out{gid};
  std::vector<char> buf(16384);
  struct passwd pw {};
  struct passwd* found = nullptr;
  if (::getpwuid_r(uid, &pw, buf.data(), buf.size(), &found) != 0 || found == nullptr) return out;
  int n = 64;
  std::vector<gid_t> g(static_cast<std::size_t>(n));
  if (::getgrouplist(found->pw_name, gid, g.data(), &n) < 0) {
    if (n <= 0 || static_cast<std::size_t>(n) > kMaxGroups) return out;
    g.resize(static_cast<std::size_t>(n));
    if (::getgrouplist(found->pw_name, gid, g.data(), &n) < 0) return out;
  }
  g.resize(static_cast<std::size_t>(n));
  out.insert(out.end(), g.begin(), g.end());
  return out;
}

// ZMTP metadata: a name (1-byte length) and a value (4-byte big-endian length).
std::string Property(std::string_view name, std::string_view value) {
  std::string out;
  out.push_back(static_cast<char>(name.size()));
  out.append(name);
  const auto n = static_cast<std::uint32_t>(value.size());
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>((n >> shift) & 0xff));
  out.append(value);
  return out;
}

}  // namespace

bool Identity::InGroup(gid_t g) const { return known && std::binary_search(groups.begin(), groups.end(), g); }

std::string Identity::ToString() const {
  if (!known) return "an unidentified peer";
  return "uid " + std::to_string(uid) + " (pid " + std::to_string(pid) + ")";
}

std::optional<Identity> ParseIdentity(std::string_view user_id, std::string_view groups) {
  auto f = Split(user_id, ':');
  Identity id;
  if (f.size() != 3 || !ParseNumber(f[0], &id.uid) || !ParseNumber(f[1], &id.gid) || !ParseNumber(f[2], &id.pid) ||
      id.pid < 0)
    return std::nullopt;
  id.groups.push_back(id.gid);
  if (!groups.empty()) {
    for (std::string_view g : Split(groups, ',')) {
      gid_t x;
      if (!ParseNumber(g, &x) || id.groups.size() >= kMaxGroups) return std::nullopt;
      id.groups.push_back(x);
    }
  }
  SortUnique(&id.groups);
  id.known = true;
  return id;
}

std::string FormatGroups(const std::vector<gid_t>& groups) {
  std::string out;
  for (gid_t g : groups) {
    if (!out.empty()) out.push_back(',');
    out += std::to_string(g);
  }
  return out;
}

std::uint64_t ProcessStartTime(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (pid <= 0 || !std::getline(in, line)) return 0;
  // "pid (comm) state ppid ...": comm may hold spaces and ')', so count from the last ')'.
  const auto close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(line.substr(close + 1));
  std::string field;
  for (int i = 3; i <= 22 && rest >> field; ++i)
    if (i == 22) return std::strtoull(field.c_str(), nullptr, 10);
  return 0;
}

std::vector<gid_t> PeerGroups(uid_t uid, gid_t gid, pid_t pid) {
  std::optional<std::vector<gid_t>> g;
  if (pid > 0) g = ProcGroups(uid, gid, pid);
  std::vector<gid_t> out = g ? std::move(*g) : DatabaseGroups(uid, gid);
  SortUnique(&out);
  return out;
}

Result<uid_t> ResolveUser(const std::string& user) {
  uid_t uid = 0;
  if (ParseNumber(std::string_view(user), &uid)) return uid;
  std::vector<char> buf(16384);
  struct passwd pw {};
  struct passwd* found = nullptr;
  const int err = ::getpwnam_r(user.c_str(), &pw, buf.data(), buf.size(), &found);
  if (err != 0) return Internal("looking up user '" + user + "': " + std::strerror(err), "config.unknown_user");
  if (found == nullptr) return NotFound("no user named '" + user + "'", "config.unknown_user");
  return found->pw_uid;
}

Result<gid_t> ResolveGroup(const std::string& group) {
  gid_t gid = 0;
  if (ParseNumber(std::string_view(group), &gid)) return gid;
  std::vector<char> buf(16384);
  struct group gr {};
  struct group* found = nullptr;
  const int err = ::getgrnam_r(group.c_str(), &gr, buf.data(), buf.size(), &found);
  if (err != 0) return Internal("looking up group '" + group + "': " + std::strerror(err), "config.unknown_group");
  if (found == nullptr) return NotFound("no group named '" + group + "'", "config.unknown_group");
  return found->gr_gid;
}

bool Acl::Allows(const Identity& who) const {
  if (!who.known) return false;
  if (std::find(users.begin(), users.end(), who.uid) != users.end()) return true;
  return std::any_of(groups.begin(), groups.end(), [&](gid_t g) { return who.InGroup(g); });
}

Result<Policy> Policy::Create(const DaemonConfig& c, uid_t self_uid, gid_t self_gid) {
  Policy p;
  p.self_uid_ = self_uid;
  p.client_gid_ = self_gid;
  if (!c.client_group.empty()) {
    auto g = ResolveGroup(c.client_group);
    if (!g.ok()) return g.status().WithContext("daemon.client_group");
    p.client_gid_ = *g;
  }
  if (!c.admin_group.empty()) {
    auto g = ResolveGroup(c.admin_group);
    if (!g.ok()) return g.status().WithContext("daemon.admin_group");
    p.admin_gid_ = *g;
  }
  for (const ModelConfig& m : c.models) {
    Acl acl;
    for (const std::string& u : m.allow_users) {
      auto uid = ResolveUser(u);
      if (!uid.ok()) return uid.status().WithContext("models." + m.name + ".allow_users");
      acl.users.push_back(*uid);
    }
    for (const std::string& g : m.allow_groups) {
      auto gid = ResolveGroup(g);
      if (!gid.ok()) return gid.status().WithContext("models." + m.name + ".allow_groups");
      acl.groups.push_back(*gid);
    }
    if (m.allow_users.empty() && m.allow_groups.empty()) acl.groups.push_back(p.client_gid_);
    p.models_[m.name] = std::move(acl);
  }
  return p;
}

bool Policy::IsAdmin(const Identity& who) const {
  if (!who.known) return false;
  return who.uid == 0 || who.uid == self_uid_ || (admin_gid_ && who.InGroup(*admin_gid_));
}

bool Policy::MayConnect(const Identity& who) const {
  if (IsAdmin(who) || who.InGroup(client_gid_)) return true;
  return std::any_of(models_.begin(), models_.end(), [&](const auto& kv) { return kv.second.Allows(who); });
}

bool Policy::MayAcquire(const Identity& who, const std::string& model) const {
  if (IsAdmin(who)) return true;
  auto it = models_.find(model);
  return it != models_.end() && it->second.Allows(who);
}

bool Policy::Restrictive() const {
  if (models_.empty()) return false;
  const Acl& first = models_.begin()->second;
  return std::any_of(models_.begin(), models_.end(), [&](const auto& kv) { return !(kv.second == first); });
}

bool Policy::GrantsGroup(gid_t g) const {
  if (g == client_gid_) return true;
  return std::any_of(models_.begin(), models_.end(), [&](const auto& kv) {
    return std::find(kv.second.groups.begin(), kv.second.groups.end(), g) != kv.second.groups.end();
  });
}

Identity IdentityOf(zmq::message_t& msg) {
  const char* user = zmq_msg_gets(msg.handle(), "User-Id");
  const char* groups = zmq_msg_gets(msg.handle(), kGroupsProperty);
  if (user == nullptr) return {};
  auto id = ParseIdentity(user, groups ? std::string_view(groups) : std::string_view());
  return id ? *id : Identity{};
}

Result<std::unique_ptr<ZapHandler>> ZapHandler::Start(zmq::context_t& ctx, zmq::socket_t& guarded,
                                                      const std::string& socket_path,
                                                      std::uint32_t max_connections_per_user) {
  static std::atomic<int> instances{0};
  const std::string monitor_endpoint = "inproc://weightd-connections-" + std::to_string(instances++);
  try {
    zmq::socket_t sock(ctx, zmq::socket_type::rep);
    sock.set(zmq::sockopt::linger, 0);
    sock.bind(kZapEndpoint);
    if (zmq_socket_monitor(guarded.handle(), monitor_endpoint.c_str(), ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED) != 0)
      throw zmq::error_t();
    zmq::socket_t monitor(ctx, zmq::socket_type::pair);
    monitor.set(zmq::sockopt::linger, 0);
    monitor.set(zmq::sockopt::rcvhwm, 0);  // never make libzmq's I/O thread wait for us
    monitor.connect(monitor_endpoint);
    return std::unique_ptr<ZapHandler>(
        new ZapHandler(std::move(sock), std::move(monitor), socket_path, max_connections_per_user));
  } catch (const zmq::error_t& e) {
    return Internal(std::string("starting the ZAP handler on ") + kZapEndpoint + ": " + e.what(), "daemon.zap");
  }
}

ZapHandler::ZapHandler(zmq::socket_t sock, zmq::socket_t monitor, std::string socket_path, std::uint32_t max_per_user)
    : sock_(std::move(sock)), monitor_(std::move(monitor)), socket_path_(std::move(socket_path)), max_per_user_(max_per_user) {
  thread_ = std::thread([this] { Run(); });
}

ZapHandler::~ZapHandler() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

void ZapHandler::Run() {
  while (!stop_.load()) {
    zmq::pollitem_t items[] = {{monitor_.handle(), 0, ZMQ_POLLIN, 0}, {sock_.handle(), 0, ZMQ_POLLIN, 0}};
    try {
      if (zmq::poll(items, 2, std::chrono::milliseconds(100)) <= 0) continue;
      // Connections first: a ZAP request comes after its connection's accept event.
      if (items[0].revents & ZMQ_POLLIN)
        while (OnMonitorEvent()) {
        }
      if ((items[1].revents & ZMQ_POLLIN) == 0) continue;
      std::vector<zmq::message_t> frames;
      do {
        zmq::message_t f;
        if (!sock_.recv(f, zmq::recv_flags::dontwait)) break;
        frames.push_back(std::move(f));
      } while (frames.back().more() && frames.size() < 16);
      if (frames.empty()) continue;
      while (!frames.empty() && frames.back().more()) {  // drain an oversized request
        zmq::message_t f;
        (void)sock_.recv(f, zmq::recv_flags::none);
        if (!f.more()) break;
      }
      Answer(frames);
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) return;
      spdlog::warn("ZAP handler: {}", e.what());
    }
  }
}

// A monitor event: two frames, (u16 event, u32 value = the connection's fd) and the endpoint.
// False when none was queued.
bool ZapHandler::OnMonitorEvent() {
  zmq::message_t head, addr;
  if (!monitor_.recv(head, zmq::recv_flags::dontwait)) return false;
  if (head.more()) (void)monitor_.recv(addr, zmq::recv_flags::none);
  const auto ev = proto::DecodeMonitorEvent(head.to_string_view());
  if (!ev) return true;
  const int fd = static_cast<int>(ev->value);
  if (ev->event == ZMQ_EVENT_DISCONNECTED) {
    auto it = conn_uid_.find(fd);
    if (it == conn_uid_.end()) return true;
    if (auto n = per_uid_.find(it->second); n != per_uid_.end() && --n->second == 0) per_uid_.erase(n);
    conn_uid_.erase(it);
    connections_.fetch_sub(1);
    return true;
  }
  if (ev->event != ZMQ_EVENT_ACCEPTED) return true;
  // The fd is libzmq's; it may have closed (and the number been reused) since the event was
  // queued. Whatever connection to the control socket holds the number now is what is counted,
  // and its disconnect uncounts it, so the counts stay balanced; an fd that is no longer such a
  // connection (another socket of the daemon's) is left alone.
  sockaddr_un local{};
  socklen_t local_len = sizeof local;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0 || local.sun_family != AF_UNIX ||
      std::strncmp(local.sun_path, socket_path_.c_str(), sizeof local.sun_path) != 0)
    return true;
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return true;
  if (auto old = conn_uid_.find(fd); old != conn_uid_.end()) {  // its disconnect is still queued
    if (auto n = per_uid_.find(old->second); n != per_uid_.end() && --n->second == 0) per_uid_.erase(n);
    connections_.fetch_sub(1);
  }
  conn_uid_[fd] = cred.uid;
  connections_.fetch_add(1);
  const std::uint32_t n = ++per_uid_[cred.uid];
  if (max_per_user_ == 0 || n <= max_per_user_) return true;
  // Over the limit: closed before it costs more than this fd (libzmq sees end of file).
  ::shutdown(fd, SHUT_RDWR);
  shed_.fetch_add(1);
  const auto now = std::chrono::steady_clock::now();
  auto& last = last_warned_[cred.uid];
  if (now - last >= std::chrono::seconds(10)) {
    last = now;
    spdlog::warn("uid {} (pid {}) holds {} connections, more than daemon.max_connections_per_user = {}; closing the "
                 "new ones ({} so far)",
                 cred.uid, cred.pid, n - 1, max_per_user_, shed_.load());
  }
  return true;
}

void ZapHandler::Answer(std::vector<zmq::message_t>& frames) {
  // version, request id, domain, address, routing id, mechanism, credentials...
  std::string code = "400", text = "no peer credentials (weightd serves ipc:// peers only)", user;
  std::string meta;
  if (frames.size() >= 6 && frames[0].to_string_view() == "1.0") {
    // The address of an ipc peer ends with ":uid:gid:pid" (SO_PEERCRED, read by libzmq).
    const std::string_view creds = AfterLastSeparators(frames[3].to_string_view(), 3, ':');
    if (auto id = ParseIdentity(creds, "")) {
      code = "200";
      text = "OK";
      user = creds;
      meta = Property(kGroupsProperty, FormatGroups(PeerGroups(id->uid, id->gid, id->pid)));
    }
  } else {
    code = "500";
    text = "malformed ZAP request";
  }
  (code == "200" ? accepted_ : refused_).fetch_add(1);
  if (code != "200")
    spdlog::warn("refused a connection ({}): {}", frames.size() >= 4 ? frames[3].to_string() : std::string("?"), text);
  const std::string version = "1.0";
  const std::string request_id = frames.size() >= 2 ? frames[1].to_string() : std::string();
  sock_.send(zmq::buffer(version), zmq::send_flags::sndmore);
  sock_.send(zmq::buffer(request_id), zmq::send_flags::sndmore);
  sock_.send(zmq::buffer(code), zmq::send_flags::sndmore);
  sock_.send(zmq::buffer(text), zmq::send_flags::sndmore);
  sock_.send(zmq::buffer(user), zmq::send_flags::sndmore);
  sock_.send(zmq::buffer(meta), zmq::send_flags::none);
}

Status Policy::CheckConnect(const Identity& who) const {
  if (MayConnect(who)) return Status::Ok();
  return PermissionDenied(who.ToString() + " may not use this daemon: it is not in daemon.client_group (gid " +
                              std::to_string(client_gid_) + "), an admin, or allowed any model",
                          "auth.not_a_client");
}

Status Policy::CheckAdmin(const Identity& who, std::string_view what) const {
  if (IsAdmin(who)) return Status::Ok();
  return PermissionDenied(std::string(what) + " is an admin operation: " + who.ToString() +
                              " is neither root, the daemon's user nor in daemon.admin_group",
                          "auth.admin_only");
}

Status Policy::CheckModel(const Identity& who, const std::string& model) const {
  if (MayAcquire(who, model)) return Status::Ok();
  return PermissionDenied(who.ToString() + " may not use model '" + model +
                              "' (its allow_users and allow_groups do not include it)",
                          "auth.model_denied");
}

Status CheckSegmentGroup(const Policy& policy, gid_t shm_gid, mode_t shm_mode) {
  if (!policy.Restrictive() || (shm_mode & 0040) == 0 || !policy.GrantsGroup(shm_gid)) return Status::Ok();
  return InvalidArgument("models have different ACLs (allow_users, allow_groups), but the segments' group (gid " +
                             std::to_string(shm_gid) + ", daemon.shm_group or the daemon's own group) is one the "
                             "client group or an ACL grants, so its members could open every model's segments by "
                             "name; set daemon.shm_mode = \"0600\" (clients get their segments as fds anyway) or a "
                             "shm_group no ACL names",
                         "config.shm_group_leaks");
}

Status CheckSocketPaths(const std::string& dir, const std::vector<std::string>& names) {
  const uid_t me = ::geteuid();
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) return posix::ErrnoStatus("lstat(" + dir + ")");
  if (!S_ISDIR(st.st_mode))
    return FailedPrecondition("the socket directory " + dir + " is not a directory (a symbolic link is refused)",
                              "daemon.socket_dir_unsafe");
  if (st.st_uid != me && st.st_uid != 0)
    return FailedPrecondition("the socket directory " + dir + " belongs to uid " + std::to_string(st.st_uid) +
                                  ", not to this daemon (uid " + std::to_string(me) + ") or root",
                              "daemon.socket_dir_unsafe");
  if ((st.st_mode & 0022) != 0 && (st.st_mode & S_ISVTX) == 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return FailedPrecondition("the socket directory " + dir + " (mode " + mode +
                                  ") is writable by other users and not sticky: another user could replace the socket",
                              "daemon.socket_dir_unsafe");
  }
  for (const std::string& name : names) {
    if (::lstat(name.c_str(), &st) != 0) continue;  // absent: fine
    if (S_ISLNK(st.st_mode))
      return FailedPrecondition(name + " is a symbolic link; refusing to use it", "daemon.socket_squatted");
    if (st.st_uid != me && st.st_uid != 0)
      return FailedPrecondition(name + " exists and belongs to uid " + std::to_string(st.st_uid) +
                                    "; refusing a path another user prepared (remove it if it is stale)",
                                "daemon.socket_squatted");
  }
  return Status::Ok();
}

}  // namespace weightd::auth
