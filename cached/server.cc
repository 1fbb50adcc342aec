#include "server.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>

#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>
#include <zmq.hpp>

#include "catalog.h"
#include "lease_table.h"
#include "loader.h"
#include "posix.h"
#include "protocol.h"
#include "thread_pool.h"

namespace weightd {

namespace {

using proto::ModelState;
using Ms = std::chrono::milliseconds;

constexpr std::uint64_t kTagEvent = 1ull << 56;
constexpr std::uint64_t kTagSignal = 2ull << 56;
constexpr std::uint64_t kTagPid = 3ull << 56;
constexpr std::uint64_t kTagMask = 0xffull << 56;
constexpr unsigned kMaxMessagesPerWakeup = 256;  // keeps timers and completions responsive

std::uint64_t ToMs(Clock::TimePoint::duration d) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<Ms>(d).count());
}

// An exclusive, non-blocking flock on a file; released when the process exits.
Result<posix::Fd> LockFile(const std::string& path, const std::string& what) {
  ASSIGN_OR_RETURN(posix::Fd fd, posix::Open(path, O_RDWR | O_CREAT, 0600));
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK)
      return FailedPrecondition("another weightd instance holds " + what + " (" + path + ")", "daemon.instance_locked");
    return posix::ErrnoStatus("flock(" + path + ")");
  }
  return fd;
}

Result<posix::Fd> LockShmPrefix(const std::string& prefix) {
  const std::string name = "/" + prefix + ".lock";
  int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return posix::ErrnoStatus("shm_open(" + name + ")");
  posix::Fd owned(fd);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK)
      return FailedPrecondition("another weightd instance uses the segment prefix '" + prefix + "'",
                                "daemon.instance_locked");
    return posix::ErrnoStatus("flock(/dev/shm" + name + ")");
  }
  return owned;
}

struct Waiter {
  enum Kind { kAcquire, kLoad } kind;
  std::string routing_id;
  std::uint64_t request_id = 0;
  std::uint64_t session_id = 0;
  proto::Acquire acquire;
};

struct ModelEntry {
  ModelConfig config;
  ModelState state = ModelState::kAbsent;
  std::shared_ptr<const ResidentModel> resident;
  std::shared_ptr<std::atomic<bool>> cancel;  // of the load in flight
  std::uint64_t generation = 0;               // of the load in flight
  std::vector<Waiter> waiters;
  Status last_error;
  std::uint64_t loads = 0;
  std::uint64_t last_load_ms = 0;
  Clock::TimePoint last_used{};

  // Built once per resident copy.
  std::vector<proto::SegmentInfo> segments;
  std::vector<proto::TensorRecord> tensors;
  std::unordered_map<std::string, std::size_t> tensor_index;
};

struct Completion {
  std::string model;
  std::uint64_t generation = 0;
  Result<std::shared_ptr<ResidentModel>> result{Status(Code::kInternal, "unset")};
  std::uint64_t ms = 0;
};

}  // namespace

void BlockSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // A client that vanishes mid-write must not kill the daemon.
  ::signal(SIGPIPE, SIG_IGN);
}

struct Server::Impl {
  // Const after construction.
  DaemonConfig config;
  const Clock* clock;
  Clock::TimePoint started;

  // Loop-thread state.
  zmq::context_t ctx{1};
  zmq::socket_t router;
  posix::Fd epoll_fd, event_fd, signal_fd;
  posix::Fd socket_lock, prefix_lock;
  std::string socket_path;
  Catalog catalog;
  std::map<std::string, ModelEntry> models;
  LeaseTable leases;
  std::uint64_t next_generation = 1;
  std::uint64_t loads_ok = 0, loads_failed = 0, requests = 0, malformed = 0;
  std::uint64_t watchdog_usec = 0;
  Clock::TimePoint last_watchdog{}, last_expiry_check{};
  bool stopping = false;

  // Shared with loader threads.
  std::mutex completions_mu;
  std::deque<Completion> completions;  // guarded by completions_mu
  Loader loader;
  ThreadPool jobs;  // one model load per job; declared last so it is joined first

  Impl(DaemonConfig cfg, const Clock* c)
      : config(std::move(cfg)),
        clock(c),
        started(c->Now()),
        leases(config.max_sessions, config.max_leases_per_client),
        loader(LoaderOptions{config.shm_prefix, config.shm_mode, config.loader_threads, config.chunk_size}),
        jobs(2, "wd-load") {}

  ~Impl() {
    for (auto& [name, m] : models)
      if (m.cancel) m.cancel->store(true);
    jobs.Close();
    for (auto& [name, m] : models)
      if (m.resident) m.resident->RemoveSegments();
    std::lock_guard lock(completions_mu);
    for (auto& c : completions)
      if (c.result.ok()) c.result.value()->RemoveSegments();
  }

  Status Init();
  Status Loop();
  void HandleMessages();
  void HandleRequest(const std::string& routing_id, zmq::message_t& payload);
  void HandleEpoll();
  void HandleSignal();
  void HandleCompletions();
  void ExpireSessions();
  void ReloadCatalog();
  void ApplyCatalog(const std::vector<ModelConfig>& models);
  void EndSession(std::uint64_t session_id, const char* why);

  void Send(const std::string& routing_id, std::uint64_t request_id, proto::ReplyBody body);
  void SendError(const std::string& routing_id, std::uint64_t request_id, const Status& s) {
    Send(routing_id, request_id, proto::ToErrorReply(s));
  }

  // Request handlers: return a reply, or nullopt when the request was parked.
  std::optional<proto::ReplyBody> OnHello(const std::string& rid, const proto::Hello& m, zmq::message_t& payload);
  std::optional<proto::ReplyBody> OnAcquire(Session& s, std::uint64_t req, const proto::Acquire& m);
  std::optional<proto::ReplyBody> OnLoad(Session& s, std::uint64_t req, const proto::Load& m);
  proto::ReplyBody OnRelease(Session& s, const proto::Release& m);
  proto::ReplyBody OnEvict(const proto::Evict& m);

  void StartLoad(ModelEntry& m);
  proto::ReplyBody GrantLease(Session& s, ModelEntry& m, const proto::Acquire& req);
  proto::ModelStatus StatusOf(const ModelEntry& m) const;
  proto::DaemonStats StatsNow() const;
  void DropResident(ModelEntry& m);
  void Notify(const std::string& state) { sd_notify(0, state.c_str()); }
};

Status Server::Impl::Init() {
  socket_path = config.socket.substr(std::string("ipc://").size());
  // The socket directory: created private to the daemon's group if missing.
  std::filesystem::path dir = std::filesystem::path(socket_path).parent_path();
  if (!dir.empty()) {
    std::error_code ec;
    if (!std::filesystem::exists(dir, ec)) {
      std::filesystem::create_directories(dir, ec);
      if (ec) return posix::ErrnoStatus("creating socket directory " + dir.string(), ec.value());
      ::chmod(dir.c_str(), 0750);
    }
  }
  ASSIGN_OR_RETURN(socket_lock, LockFile(socket_path + ".lock", "the socket " + socket_path));
  ASSIGN_OR_RETURN(prefix_lock, LockShmPrefix(config.shm_prefix));

  // We hold the prefix, so whatever is left under it belongs to a dead instance of ours.
  // TODO(crash-safety): re-adopt verified segments instead of dropping them.
  std::size_t stale = 0;
  for (const auto& name : ListSegments(config.shm_prefix)) {
    if (name == config.shm_prefix + ".lock") continue;
    if (HostSegment::Remove(name).ok()) ++stale;
  }
  if (stale > 0) spdlog::warn("removed {} stale segments of an earlier instance under prefix '{}'", stale, config.shm_prefix);

  try {
    router = zmq::socket_t(ctx, zmq::socket_type::router);
    router.set(zmq::sockopt::linger, 0);
    router.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(config.max_message_size));
    router.set(zmq::sockopt::router_mandatory, 1);
    router.set(zmq::sockopt::sndhwm, 1000);
    router.set(zmq::sockopt::rcvhwm, 1000);
    ::unlink(socket_path.c_str());  // stale socket of a dead instance: we hold its lock
    router.bind(config.socket);
  } catch (const zmq::error_t& e) {
    return Unavailable("binding " + config.socket + ": " + e.what(), "daemon.bind_failed");
  }
  ::chmod(socket_path.c_str(), 0660);

  int efd = ::epoll_create1(EPOLL_CLOEXEC);
  if (efd < 0) return posix::ErrnoStatus("epoll_create1");
  epoll_fd.reset(efd);
  int evfd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (evfd < 0) return posix::ErrnoStatus("eventfd");
  event_fd.reset(evfd);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sfd = ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) return posix::ErrnoStatus("signalfd");
  signal_fd.reset(sfd);
  for (auto [fd, tag] : {std::pair{event_fd.get(), kTagEvent}, std::pair{signal_fd.get(), kTagSignal}}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = tag;
    if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, fd, &ev) != 0) return posix::ErrnoStatus("epoll_ctl(ADD)");
  }

  ApplyCatalog(config.models);
  if (sd_watchdog_enabled(0, &watchdog_usec) <= 0) watchdog_usec = 0;
  spdlog::info("weightd {} listening on {} (segment prefix '{}', {} models, {} loader threads, {} MiB chunks)",
               WEIGHTD_VERSION, config.socket, config.shm_prefix, catalog.models().size(), config.loader_threads,
               config.chunk_size >> 20);
  return Status::Ok();
}

Status Server::Impl::Loop() {
  Notify("READY=1\nSTATUS=serving " + std::to_string(catalog.models().size()) + " models");
  while (!stopping) {
    zmq::pollitem_t items[] = {{router.handle(), 0, ZMQ_POLLIN, 0}, {nullptr, epoll_fd.get(), ZMQ_POLLIN, 0}};
    try {
      zmq::poll(items, 2, Ms(250));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) return Internal(std::string("zmq_poll: ") + e.what());
    }
    if (items[0].revents & ZMQ_POLLIN) HandleMessages();
    if (items[1].revents & ZMQ_POLLIN) HandleEpoll();
    const auto now = clock->Now();
    if (now - last_expiry_check >= Ms(200)) {
      last_expiry_check = now;
      ExpireSessions();
    }
    if (watchdog_usec > 0 && now - last_watchdog >= std::chrono::microseconds(watchdog_usec / 2)) {
      last_watchdog = now;
      Notify("WATCHDOG=1");
    }
  }
  Notify("STOPPING=1");
  return Status::Ok();
}

void Server::Impl::HandleMessages() {
  for (unsigned n = 0; n < kMaxMessagesPerWakeup; ++n) {
    zmq::message_t id, payload;
    try {
      if (!router.recv(id, zmq::recv_flags::dontwait)) return;
      bool more = id.more();
      if (!more) continue;  // a bare routing id cannot happen; ignore
      (void)router.recv(payload, zmq::recv_flags::none);
      if (payload.more()) {
        // Extra frames: drain them and refuse the whole message.
        zmq::message_t extra;
        do (void)router.recv(extra, zmq::recv_flags::none);
        while (extra.more());
        ++malformed;
        SendError(id.to_string(), 0, InvalidArgument("a request is exactly one frame", "protocol.malformed"));
        continue;
      }
    } catch (const zmq::error_t& e) {
      spdlog::warn("receive failed: {}", e.what());
      return;
    }
    ++requests;
    HandleRequest(id.to_string(), payload);
  }
}

void Server::Impl::HandleRequest(const std::string& rid, zmq::message_t& payload) {
  auto req = proto::DecodeRequest(std::string_view(static_cast<const char*>(payload.data()), payload.size()));
  if (!req.ok()) {
    ++malformed;
    spdlog::debug("malformed request: {}", req.status().ToString());
    SendError(rid, 0, req.status());
    return;
  }
  const std::uint64_t id = req->id;
  if (auto* hello = std::get_if<proto::Hello>(&req->body)) {
    if (auto r = OnHello(rid, *hello, payload)) Send(rid, id, std::move(*r));
    return;
  }
  Session* s = leases.Find(rid);
  if (s == nullptr) {
    SendError(rid, id, FailedPrecondition("no session: send Hello first", "protocol.no_session"));
    return;
  }
  s->last_seen = clock->Now();
  std::optional<proto::ReplyBody> reply = std::visit(
      [&](auto& body) -> std::optional<proto::ReplyBody> {
        using T = std::decay_t<decltype(body)>;
        if constexpr (std::is_same_v<T, proto::Hello>) {
          return std::nullopt;  // handled above
        } else if constexpr (std::is_same_v<T, proto::Acquire>) {
          return OnAcquire(*s, id, body);
        } else if constexpr (std::is_same_v<T, proto::Release>) {
          return OnRelease(*s, body);
        } else if constexpr (std::is_same_v<T, proto::Heartbeat>) {
          return proto::OkReply{};
        } else if constexpr (std::is_same_v<T, proto::List>) {
          proto::ModelList list;
          for (const auto& [name, m] : models) list.models.push_back(StatusOf(m));
          return list;
        } else if constexpr (std::is_same_v<T, proto::StatusRequest>) {
          auto it = models.find(body.model);
          if (it == models.end())
            return proto::ToErrorReply(NotFound("model '" + body.model + "' is not in the catalog", "catalog.unknown_model"));
          return StatusOf(it->second);
        } else if constexpr (std::is_same_v<T, proto::Load>) {
          return OnLoad(*s, id, body);
        } else if constexpr (std::is_same_v<T, proto::Evict>) {
          return OnEvict(body);
        } else if constexpr (std::is_same_v<T, proto::Stats>) {
          return StatsNow();
        }
      },
      req->body);
  if (reply) Send(rid, id, std::move(*reply));
}

std::optional<proto::ReplyBody> Server::Impl::OnHello(const std::string& rid, const proto::Hello& m,
                                                       zmq::message_t& payload) {
  PeerCred peer;
  if (const char* addr = payload.gets("Peer-Address")) {
    if (auto p = ParsePeerAddress(addr)) peer = *p;
  }
  const bool fresh = leases.Find(rid) == nullptr;
  auto s = leases.Open(rid, m.client_name, peer, clock->Now());
  if (!s.ok()) return proto::ToErrorReply(s.status());
  Session& session = **s;
  if (fresh && peer.known && peer.pid > 0) {
    // A pidfd turns readable when the process exits: death is noticed at once, not after the
    // heartbeat timeout.
    int pfd = static_cast<int>(::syscall(SYS_pidfd_open, peer.pid, 0));
    if (pfd >= 0) {
      ::fcntl(pfd, F_SETFD, FD_CLOEXEC);
      session.pidfd.reset(pfd);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = kTagPid | session.id;
      if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, pfd, &ev) != 0) session.pidfd.reset();
    } else {
      spdlog::debug("pidfd_open({}) failed: {}; relying on heartbeats", peer.pid, std::strerror(errno));
    }
  }
  if (fresh)
    spdlog::info("session {} opened by '{}' (uid {}, pid {})", session.id, session.client_name, peer.uid, peer.pid);
  proto::HelloReply r;
  r.daemon_version = WEIGHTD_VERSION;
  r.session_id = session.id;
  r.heartbeat_interval_ms = static_cast<std::uint32_t>(config.heartbeat_interval.count());
  r.heartbeat_timeout_ms = static_cast<std::uint32_t>(config.heartbeat_timeout.count());
  r.max_leases = config.max_leases_per_client;
  r.peer_uid = peer.uid;
  r.peer_pid = static_cast<std::uint32_t>(peer.pid);
  return r;
}

std::optional<proto::ReplyBody> Server::Impl::OnAcquire(Session& s, std::uint64_t req, const proto::Acquire& m) {
  auto it = models.find(m.model);
  if (it == models.end())
    return proto::ToErrorReply(NotFound("model '" + m.model + "' is not in the catalog", "catalog.unknown_model"));
  if (m.device != "cpu") {
    if (m.device.rfind("cuda:", 0) == 0 || m.device.rfind("GPU-", 0) == 0)
      return proto::ToErrorReply(Unavailable("device '" + m.device + "' requested, but this daemon serves the host tier only (no CUDA device)",
                                             "gpu.no_device"));
    return proto::ToErrorReply(InvalidArgument("unknown device '" + m.device + "' (use cpu, cuda:N or GPU-<uuid>)",
                                               "acquire.bad_device"));
  }
  if (s.leases.size() >= config.max_leases_per_client)
    return proto::ToErrorReply(ResourceExhausted("this client already holds " + std::to_string(s.leases.size()) +
                                                     " leases, the maximum per client; release some first",
                                                 "limits.leases"));
  ModelEntry& e = it->second;
  if (e.state == ModelState::kResident) return GrantLease(s, e, m);
  e.waiters.push_back(Waiter{Waiter::kAcquire, s.routing_id, req, s.id, m});
  if (e.state != ModelState::kLoading) StartLoad(e);
  return std::nullopt;
}

std::optional<proto::ReplyBody> Server::Impl::OnLoad(Session& s, std::uint64_t req, const proto::Load& m) {
  auto it = models.find(m.model);
  if (it == models.end())
    return proto::ToErrorReply(NotFound("model '" + m.model + "' is not in the catalog", "catalog.unknown_model"));
  ModelEntry& e = it->second;
  if (e.state == ModelState::kResident) return StatusOf(e);
  e.waiters.push_back(Waiter{Waiter::kLoad, s.routing_id, req, s.id, {}});
  if (e.state != ModelState::kLoading) StartLoad(e);
  return std::nullopt;
}

proto::ReplyBody Server::Impl::OnRelease(Session& s, const proto::Release& m) {
  auto r = leases.Release(s, m.lease_id);
  if (!r.ok()) return proto::ToErrorReply(r.status());
  auto it = models.find(r->model);
  if (it != models.end()) it->second.last_used = clock->Now();
  return proto::OkReply{};
}

proto::ReplyBody Server::Impl::OnEvict(const proto::Evict& m) {
  auto it = models.find(m.model);
  if (it == models.end())
    return proto::ToErrorReply(NotFound("model '" + m.model + "' is not in the catalog", "catalog.unknown_model"));
  ModelEntry& e = it->second;
  if (std::uint32_t n = leases.LeasesOf(m.model); n > 0)
    return proto::ToErrorReply(FailedPrecondition("model '" + m.model + "' has " + std::to_string(n) +
                                                      (n == 1 ? " live lease" : " live leases") + "; it cannot be evicted until they are released",
                                                  "evict.leased"));
  if (e.state == ModelState::kLoading)
    return proto::ToErrorReply(FailedPrecondition("model '" + m.model + "' is loading; evict it once the load finishes",
                                                  "evict.loading"));
  if (e.resident) spdlog::info("evicting model '{}' ({} bytes) on admin request", e.config.name, e.resident->bytes);
  DropResident(e);
  e.state = ModelState::kAbsent;
  return proto::OkReply{};
}

void Server::Impl::DropResident(ModelEntry& m) {
  if (m.resident) m.resident->RemoveSegments();
  m.resident.reset();
  m.segments.clear();
  m.tensors.clear();
  m.tensor_index.clear();
}

void Server::Impl::StartLoad(ModelEntry& m) {
  m.state = ModelState::kLoading;
  m.generation = next_generation++;
  m.cancel = std::make_shared<std::atomic<bool>>(false);
  Notify("STATUS=loading model '" + m.config.name + "'");
  spdlog::info("loading model '{}' from {}", m.config.name, m.config.dir);
  ModelConfig mc = m.config;
  // Each load gets its own segment names (the generation is in them), so a cancelled load can
  // never unlink a newer one's.
  const std::uint64_t gen = m.generation;
  auto cancel = m.cancel;
  bool ok = jobs.Submit([this, mc, gen, cancel] {
    const auto t0 = std::chrono::steady_clock::now();
    Completion c;
    c.model = mc.name;
    c.generation = gen;
    c.result = loader.LoadHost(mc, gen, *cancel);
    c.ms = ToMs(std::chrono::steady_clock::now() - t0);
    {
      std::lock_guard lock(completions_mu);
      completions.push_back(std::move(c));
    }
    std::uint64_t one = 1;
    (void)!::write(event_fd.get(), &one, sizeof one);
  });
  if (!ok) {
    m.state = ModelState::kFailed;
    m.last_error = Unavailable("the daemon is shutting down", "daemon.stopping");
  }
}

void Server::Impl::HandleCompletions() {
  std::deque<Completion> batch;
  {
    std::lock_guard lock(completions_mu);
    batch.swap(completions);
  }
  for (Completion& c : batch) {
    auto it = models.find(c.model);
    if (it == models.end() || it->second.generation != c.generation || it->second.state != ModelState::kLoading) {
      // The model was removed, changed or evicted while loading: the result is nobody's.
      if (c.result.ok()) c.result.value()->RemoveSegments();
      continue;
    }
    ModelEntry& m = it->second;
    m.cancel.reset();
    if (c.result.ok()) {
      std::shared_ptr<ResidentModel> r = std::move(c.result).value();
      ++loads_ok;
      ++m.loads;
      m.last_load_ms = c.ms;
      m.last_error = Status::Ok();
      m.state = ModelState::kResident;
      m.last_used = clock->Now();
      m.segments.clear();
      m.tensors.clear();
      m.tensor_index.clear();
      for (std::size_t i = 0; i < r->shards.size(); ++i) {
        const ResidentShard& sh = r->shards[i];
        m.segments.push_back(proto::SegmentInfo{sh.segment.shm_path(), sh.segment.mapped_size(), sh.segment.data_size(),
                                                sh.file, sh.header.data_offset});
        for (const auto& t : sh.header.tensors) {
          m.tensor_index[t.name] = m.tensors.size();
          m.tensors.push_back(proto::TensorRecord{t.name, static_cast<std::uint8_t>(t.dtype), t.shape,
                                                  static_cast<std::uint32_t>(i), t.begin, t.nbytes()});
        }
      }
      m.resident = std::move(r);
      const double secs = std::max<double>(c.ms, 1) / 1000.0;
      spdlog::info("model '{}' resident: {} shards, {} tensors, {} bytes in {} ms ({:.2f} GB/s)", m.config.name,
                   m.resident->shards.size(), m.resident->tensor_count, m.resident->bytes, c.ms,
                   static_cast<double>(m.resident->bytes) / secs / 1e9);
    } else {
      ++loads_failed;
      m.state = ModelState::kFailed;
      m.last_error = c.result.status();
      spdlog::error("model '{}' failed to load: {}", m.config.name, m.last_error.ToString());
    }
    std::vector<Waiter> waiters;
    waiters.swap(m.waiters);
    for (Waiter& w : waiters) {
      Session* s = leases.FindById(w.session_id);
      if (s == nullptr) continue;  // the client went away while it waited
      if (m.state != ModelState::kResident) {
        SendError(w.routing_id, w.request_id, m.last_error.WithContext("loading model '" + m.config.name + "'"));
      } else if (w.kind == Waiter::kLoad) {
        Send(w.routing_id, w.request_id, StatusOf(m));
      } else if (s->leases.size() >= config.max_leases_per_client) {
        SendError(w.routing_id, w.request_id,
                  ResourceExhausted("this client already holds the maximum number of leases", "limits.leases"));
      } else {
        Send(w.routing_id, w.request_id, GrantLease(*s, m, w.acquire));
      }
    }
  }
  Notify("STATUS=serving " + std::to_string(catalog.models().size()) + " models, " +
         std::to_string(leases.lease_count()) + " leases");
}

proto::ReplyBody Server::Impl::GrantLease(Session& s, ModelEntry& m, const proto::Acquire& req) {
  proto::Manifest man;
  man.model = m.config.name;
  man.device = "cpu";
  man.model_dir = m.config.dir;
  if (req.tensor_filter.empty()) {
    man.segments = m.segments;
    man.tensors = m.tensors;
  } else {
    std::vector<std::string> unknown;
    std::set<std::size_t> picked;
    for (const auto& n : req.tensor_filter) {
      auto t = m.tensor_index.find(n);
      if (t == m.tensor_index.end()) unknown.push_back(n);
      else picked.insert(t->second);
    }
    if (!unknown.empty()) {
      std::string list;
      for (std::size_t i = 0; i < unknown.size() && i < 10; ++i) list += (i ? ", " : "") + unknown[i];
      if (unknown.size() > 10) list += ", ...";
      return proto::ToErrorReply(NotFound("model '" + m.config.name + "' has no tensor named " + list,
                                          "acquire.unknown_tensor"));
    }
    // Only the segments the chosen tensors live in, renumbered.
    std::map<std::uint32_t, std::uint32_t> remap;
    for (std::size_t i : picked) remap.emplace(m.tensors[i].segment, 0);
    for (auto& [old, neu] : remap) {
      neu = static_cast<std::uint32_t>(man.segments.size());
      man.segments.push_back(m.segments[old]);
    }
    for (std::size_t i : picked) {
      man.tensors.push_back(m.tensors[i]);
      man.tensors.back().segment = remap[m.tensors[i].segment];
    }
  }
  auto id = leases.AddLease(s, m.config.name, man.device);
  if (!id.ok()) return proto::ToErrorReply(id.status());
  man.lease_id = *id;
  m.last_used = clock->Now();
  return man;
}

proto::ModelStatus Server::Impl::StatusOf(const ModelEntry& m) const {
  proto::ModelStatus st;
  st.name = m.config.name;
  st.dir = m.config.dir;
  st.state = static_cast<std::uint8_t>(m.state);
  if (m.resident) {
    st.shards = static_cast<std::uint32_t>(m.resident->shards.size());
    st.tensors = m.resident->tensor_count;
    st.bytes = m.resident->bytes;
    st.resident_bytes = m.resident->bytes;
  }
  st.leases = leases.LeasesOf(m.config.name);
  st.loads = m.loads;
  st.last_load_ms = m.last_load_ms;
  st.last_used_ms_ago = m.last_used == Clock::TimePoint{} ? 0 : ToMs(clock->Now() - m.last_used);
  if (!m.last_error.ok()) st.last_error = proto::ToErrorReply(m.last_error);
  return st;
}

proto::DaemonStats Server::Impl::StatsNow() const {
  proto::DaemonStats st;
  st.daemon_version = WEIGHTD_VERSION;
  st.uptime_ms = ToMs(clock->Now() - started);
  st.sessions = static_cast<std::uint32_t>(leases.session_count());
  st.leases = static_cast<std::uint32_t>(leases.lease_count());
  st.bytes_read_from_disk = loader.bytes_read();
  st.loads_ok = loads_ok;
  st.loads_failed = loads_failed;
  st.requests = requests;
  st.malformed_requests = malformed;
  for (const auto& [name, m] : models) {
    st.models.push_back(StatusOf(m));
    st.host_resident_bytes += st.models.back().resident_bytes;
  }
  return st;
}

void Server::Impl::Send(const std::string& rid, std::uint64_t request_id, proto::ReplyBody body) {
  proto::Reply r{request_id, std::move(body)};
  std::string frame = proto::EncodeReply(r);
  try {
    if (!router.send(zmq::buffer(rid), zmq::send_flags::sndmore | zmq::send_flags::dontwait)) return;
    (void)router.send(zmq::buffer(frame), zmq::send_flags::dontwait);
  } catch (const zmq::error_t& e) {
    // EHOSTUNREACH: the peer disconnected. Its session ends by pidfd or heartbeat.
    spdlog::debug("reply to a departed peer dropped: {}", e.what());
  }
}

void Server::Impl::HandleEpoll() {
  epoll_event evs[64];
  int n = ::epoll_wait(epoll_fd.get(), evs, 64, 0);
  for (int i = 0; i < n; ++i) {
    const std::uint64_t tag = evs[i].data.u64 & kTagMask;
    if (tag == kTagEvent) {
      std::uint64_t v;
      (void)!::read(event_fd.get(), &v, sizeof v);
      HandleCompletions();
    } else if (tag == kTagSignal) {
      HandleSignal();
    } else if (tag == kTagPid) {
      EndSession(evs[i].data.u64 & ~kTagMask, "client process exited");
    }
  }
}

void Server::Impl::HandleSignal() {
  signalfd_siginfo si;
  while (::read(signal_fd.get(), &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
    if (si.ssi_signo == SIGHUP) {
      ReloadCatalog();
    } else {
      spdlog::info("signal {} received: shutting down", si.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
      stopping = true;
    }
  }
}

void Server::Impl::EndSession(std::uint64_t session_id, const char* why) {
  Session* s = leases.FindById(session_id);
  if (s == nullptr) return;
  if (s->pidfd.valid()) ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, s->pidfd.get(), nullptr);
  const std::string name = s->client_name;
  const pid_t pid = s->peer.pid;
  std::vector<LeaseRecord> ended = leases.Close(session_id);
  const auto now = clock->Now();
  for (const auto& l : ended) {
    auto it = models.find(l.model);
    if (it != models.end()) it->second.last_used = now;
  }
  spdlog::info("session {} of '{}' (pid {}) ended: {}; {} leases freed", session_id, name, pid, why, ended.size());
}

void Server::Impl::ExpireSessions() {
  for (std::uint64_t id : leases.Expired(clock->Now(), config.heartbeat_timeout))
    EndSession(id, "heartbeat timeout");
}

void Server::Impl::ReloadCatalog() {
  if (!config.config_path) {
    spdlog::info("SIGHUP: no config file in use; the catalog is unchanged");
    return;
  }
  DaemonConfig next;
  Status s = ApplyTomlFile(*config.config_path, &next);
  if (!s.ok()) {
    spdlog::error("SIGHUP: keeping the current catalog: {}", s.ToString());
    return;
  }
  // Models given on the command line stay, and win over the file.
  std::vector<ModelConfig> merged = next.models;
  for (const auto& m : config.cli_models) {
    auto it = std::find_if(merged.begin(), merged.end(), [&](const ModelConfig& x) { return x.name == m.name; });
    if (it != merged.end()) *it = m;
    else merged.push_back(m);
  }
  ApplyCatalog(merged);
  Notify("STATUS=catalog reloaded: " + std::to_string(catalog.models().size()) + " models");
}

void Server::Impl::ApplyCatalog(const std::vector<ModelConfig>& list) {
  CatalogDiff diff = catalog.Update(list);
  auto drop = [&](const std::string& name, const char* why) {
    auto it = models.find(name);
    if (it == models.end()) return;
    ModelEntry& m = it->second;
    if (m.cancel) m.cancel->store(true);
    // Clients that still map the old segments keep them; new requests get the new catalog.
    DropResident(m);
    for (Waiter& w : m.waiters)
      if (leases.FindById(w.session_id))
        SendError(w.routing_id, w.request_id, Unavailable("model '" + name + "' " + why + " while loading", "catalog.changed"));
    m.waiters.clear();
  };
  for (const auto& name : diff.removed) {
    drop(name, "was removed from the catalog");
    models.erase(name);
    spdlog::info("model '{}' removed from the catalog", name);
  }
  for (const auto& name : diff.changed) {
    drop(name, "changed directory");
    ModelEntry& m = models[name];
    m.config = *catalog.Find(name);
    m.state = ModelState::kAbsent;
    m.generation = 0;
    m.last_error = Status::Ok();
    spdlog::info("model '{}' now served from {}", name, m.config.dir);
  }
  for (const auto& name : diff.added) {
    ModelEntry& m = models[name];
    m.config = *catalog.Find(name);
    spdlog::info("model '{}' added to the catalog ({})", name, m.config.dir);
  }
}

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Server::~Server() = default;

Result<std::unique_ptr<Server>> Server::Create(DaemonConfig config, const Clock* clock) {
  auto impl = std::make_unique<Impl>(std::move(config), clock);
  RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Status Server::Run() {
  Status s = impl_->Loop();
  spdlog::info("stopping: {} sessions, {} leases", impl_->leases.session_count(), impl_->leases.lease_count());
  return s;
}

}  // namespace weightd
