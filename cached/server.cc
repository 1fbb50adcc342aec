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
#include "fd_channel.h"
#include "gpu_tier.h"
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
constexpr std::uint64_t kTagFdListen = 4ull << 56;
constexpr std::uint64_t kTagFdConn = 5ull << 56;
constexpr std::uint64_t kTagMask = 0xffull << 56;
constexpr unsigned kMaxMessagesPerWakeup = 256;  // keeps timers and completions responsive
// The fd side channel: a token is good for this long after its Manifest was sent, a connection
// must present its token within the second limit, and at most this many may be pending.
constexpr Ms kFdTokenTtl{30'000};
constexpr Ms kFdConnTimeout{2'000};
constexpr std::size_t kMaxFdConnections = 256;
constexpr Ms kFdSendTimeout{200};
constexpr std::size_t kFdTokenBytes = 32;

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
  int ordinal = -1;  // GPU acquires: the daemon's ordinal of the device
};

std::string CudaName(int ordinal) { return "cuda:" + std::to_string(ordinal); }

// A model's copy on one GPU. Its waiters are GPU Acquires; the copy is made from the host tier,
// so while the host copy is loading the materialization waits (`started` false).
struct GpuEntry {
  ModelState state = ModelState::kAbsent;
  std::shared_ptr<gpu::GpuCopy> copy;
  std::uint64_t generation = 0;  // of the materialization in flight
  bool started = false;
  std::vector<Waiter> waiters;
  Status last_error;
  std::uint64_t copy_ms = 0;
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

  std::map<int, GpuEntry> gpus;  // by the daemon's device ordinal
  // The host copy's shards stay page-locked while resident, so that copies to a GPU run at
  // PCIe speed without registering them first.
  std::vector<std::shared_ptr<const void>> host_pins;

  bool Busy() const {
    if (state == ModelState::kLoading) return true;
    for (const auto& [ordinal, g] : gpus)
      if (g.state == ModelState::kLoading) return true;
    return false;
  }
};

// A finished host load (ordinal -1) or GPU materialization.
struct Completion {
  std::string model;
  std::uint64_t generation = 0;
  int ordinal = -1;
  Result<std::shared_ptr<ResidentModel>> result{Status(Code::kInternal, "unset")};
  Result<std::shared_ptr<gpu::GpuCopy>> gpu_result{Status(Code::kInternal, "unset")};
  std::vector<std::shared_ptr<const void>> pins;  // host loads: the shards' page-lock handles
  std::uint64_t ms = 0;
  std::uint64_t pin_ms = 0;
};

// A VMM lease whose fds wait to be fetched over the side channel.
struct PendingFds {
  std::uint64_t session_id = 0;
  std::uint64_t lease_id = 0;
  // The lease pins the copy; a token must not keep it alive past the lease.
  std::weak_ptr<const gpu::GpuCopy> copy;
  std::vector<std::uint32_t> shards;  // in manifest order
  Clock::TimePoint expires;
};

struct FdClient {
  fdchan::FdConnection conn;
  Clock::TimePoint expires;
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
  gpu::GpuTier* gpu;  // may be null: host-only
  gpu::ExportMode gpu_mode = gpu::ExportMode::kVmm;

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
  // The fd side channel (VMM export only).
  std::optional<fdchan::FdListener> fd_listener;
  std::map<int, FdClient> fd_clients;              // by socket fd
  std::map<std::string, PendingFds> pending_fds;   // by token

  // Shared with worker threads.
  std::mutex completions_mu;
  std::deque<Completion> completions;  // guarded by completions_mu
  std::atomic<bool> stop_requested{false};
  Loader loader;
  // Declared last so that they are joined first.
  ThreadPool jobs;      // one host load per job
  ThreadPool gpu_jobs;  // one GPU materialization per job

  Impl(DaemonConfig cfg, const Clock* c, gpu::GpuTier* g)
      : config(std::move(cfg)),
        clock(c),
        started(c->Now()),
        gpu(g),
        leases(config.max_sessions, config.max_leases_per_client),
        loader(LoaderOptions{config.shm_prefix, config.shm_mode, config.loader_threads, config.chunk_size}),
        jobs(2, "wd-load"),
        gpu_jobs(2, "wd-gpu") {}

  ~Impl() {
    for (auto& [name, m] : models)
      if (m.cancel) m.cancel->store(true);
    jobs.Close();
    gpu_jobs.Close();
    for (auto& [name, m] : models)
      if (m.resident) m.resident->RemoveSegments();
    std::lock_guard lock(completions_mu);
    for (auto& c : completions)
      if (c.result.ok()) c.result.value()->RemoveSegments();
    if (fd_listener) (void)fd_listener->Unlink();
  }

  bool gpu_available() const { return gpu != nullptr && gpu->available(); }

  Status Init();
  Status Loop();
  void HandleMessages();
  void HandleRequest(const std::string& routing_id, zmq::message_t& payload);
  void Dispatch(const std::string& routing_id, std::uint64_t id, proto::Request& req, zmq::message_t& payload);
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
  void StartGpuLoad(ModelEntry& m, int ordinal);
  void Complete(Completion& c);
  void CompleteGpu(Completion& c);
  void AnswerWaiters(ModelEntry& m, std::vector<Waiter>& waiters, ModelState state, const Status& error);
  void PostCompletion(Completion c);
  // Unregistering takes time too: done on a GPU worker, never on the loop. `host` keeps the
  // pinned mappings until they are unregistered.
  void ReleasePins(std::vector<std::shared_ptr<const void>> pins, std::shared_ptr<const ResidentModel> host) {
    if (pins.empty()) return;
    auto release = [p = std::move(pins), h = std::move(host)]() mutable {
      p.clear();
      h.reset();
    };
    if (!gpu_jobs.Submit(release)) release();
  }
  proto::ReplyBody GrantLease(Session& s, ModelEntry& m, const proto::Acquire& req, int ordinal);
  void AcceptFdClients();
  void ServeFdClient(int fd);
  void ExpireFdState(Clock::TimePoint now);
  void CloseFdClient(int fd);
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

  ASSIGN_OR_RETURN(gpu_mode, gpu::ParseExportMode(config.gpu_export));
  if (gpu_available() && gpu_mode == gpu::ExportMode::kVmm) {
    auto listener = fdchan::FdListener::Bind(config.fd_socket, 0660);
    if (!listener.ok()) return listener.status().WithContext("binding the GPU fd socket");
    fd_listener.emplace(std::move(listener).value());
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kTagFdListen;
    if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, fd_listener->fd(), &ev) != 0) return posix::ErrnoStatus("epoll_ctl(ADD)");
  }
  if (gpu_available()) {
    for (const auto& d : gpu->Devices())
      spdlog::info("GPU {}: {} ({}, {} MiB)", CudaName(d.ordinal), d.name, d.uuid, d.total_bytes >> 20);
    spdlog::info("GPU copies are exported as {}{}", gpu::ExportModeName(gpu_mode),
                 gpu_mode == gpu::ExportMode::kVmm ? " fds over " + config.fd_socket : std::string());
  } else {
    spdlog::info("host-only: {}", gpu != nullptr ? gpu->unavailable_status().message() : "the GPU tier is disabled");
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
  try {
    Dispatch(rid, id, *req, payload);
  } catch (const std::exception& e) {
    // A bug or an allocation failure while serving one request must not end the daemon.
    spdlog::error("internal error serving a request: {}", e.what());
    SendError(rid, id, Internal(std::string("internal error: ") + e.what(), "daemon.internal"));
  }
}

void Server::Impl::Dispatch(const std::string& rid, std::uint64_t id, proto::Request& req, zmq::message_t& payload) {
  if (auto* hello = std::get_if<proto::Hello>(&req.body)) {
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
        } else if constexpr (std::is_same_v<T, proto::Goodbye>) {
          EndSession(s->id, "client closed");
          return std::nullopt;
        }
      },
      req.body);
  if (reply) Send(rid, id, std::move(*reply));
}

std::optional<proto::ReplyBody> Server::Impl::OnHello(const std::string& rid, const proto::Hello& m,
                                                       zmq::message_t& payload) {
  PeerCred peer;
  // zmq_msg_gets, not cppzmq's gets(), which throws when the property is missing.
  if (const char* addr = zmq_msg_gets(payload.handle(), "Peer-Address")) {
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
  int ordinal = -1;
  if (m.device != "cpu") {
    if (gpu == nullptr)
      return proto::ToErrorReply(Unavailable("device '" + m.device + "' requested, but this daemon serves the host tier only (no CUDA device)",
                                             "gpu.no_device"));
    auto o = gpu->ResolveDevice(m.device);
    if (!o.ok()) return proto::ToErrorReply(o.status());
    ordinal = *o;
  }
  if (s.leases.size() >= config.max_leases_per_client)
    return proto::ToErrorReply(ResourceExhausted("this client already holds " + std::to_string(s.leases.size()) +
                                                     " leases, the maximum per client; release some first",
                                                 "limits.leases"));
  ModelEntry& e = it->second;
  const Status too_many = ResourceExhausted("this client already waits for " + std::to_string(s.pending) +
                                                " loads; wait for their answers first",
                                            "limits.pending");
  Waiter w{Waiter::kAcquire, s.routing_id, req, s.id, m, ordinal};
  if (ordinal < 0) {
    if (e.state == ModelState::kResident) return GrantLease(s, e, m, -1);
    if (s.pending >= config.max_leases_per_client) return proto::ToErrorReply(too_many);
    ++s.pending;
    e.waiters.push_back(std::move(w));
    if (e.state != ModelState::kLoading) StartLoad(e);
    return std::nullopt;
  }
  // A VMM copy reaches only the process that proved who it is: without the peer's credentials
  // its fds could never be fetched.
  if (gpu_mode == gpu::ExportMode::kVmm && !s.peer.known)
    return proto::ToErrorReply(PermissionDenied("GPU leases need the client's credentials, which this connection did not "
                                                "provide (connect over ipc://)",
                                                "gpu.no_credentials"));
  GpuEntry& g = e.gpus[ordinal];
  if (g.state == ModelState::kResident) return GrantLease(s, e, m, ordinal);
  if (s.pending >= config.max_leases_per_client) return proto::ToErrorReply(too_many);
  ++s.pending;
  g.waiters.push_back(std::move(w));
  if (g.state != ModelState::kLoading) {
    g.state = ModelState::kLoading;
    g.started = false;
    g.generation = next_generation++;
    // The copy is made from the host tier, which is loaded first if need be.
    if (e.state == ModelState::kResident) StartGpuLoad(e, ordinal);
    else if (e.state != ModelState::kLoading) StartLoad(e);
  }
  return std::nullopt;
}

std::optional<proto::ReplyBody> Server::Impl::OnLoad(Session& s, std::uint64_t req, const proto::Load& m) {
  auto it = models.find(m.model);
  if (it == models.end())
    return proto::ToErrorReply(NotFound("model '" + m.model + "' is not in the catalog", "catalog.unknown_model"));
  ModelEntry& e = it->second;
  if (e.state == ModelState::kResident) return StatusOf(e);
  if (s.pending >= config.max_leases_per_client)
    return proto::ToErrorReply(ResourceExhausted("this client already waits for " + std::to_string(s.pending) +
                                                     " loads; wait for their answers first",
                                                 "limits.pending"));
  ++s.pending;
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
  if (e.Busy())
    return proto::ToErrorReply(FailedPrecondition("model '" + m.model + "' is loading; evict it once the load finishes",
                                                  "evict.loading"));
  if (e.resident) spdlog::info("evicting model '{}' ({} bytes) on admin request", e.config.name, e.resident->bytes);
  for (const auto& [ordinal, g] : e.gpus)
    if (g.copy) spdlog::info("evicting model '{}' from {} ({} bytes)", e.config.name, CudaName(ordinal), g.copy->allocated_bytes());
  DropResident(e);
  e.state = ModelState::kAbsent;
  return proto::OkReply{};
}

// Drops every tier's copy. GPU copies that a lease still pins (after a catalog change) live on
// in the lease table until their leases end.
void Server::Impl::DropResident(ModelEntry& m) {
  ReleasePins(std::move(m.host_pins), m.resident);
  if (m.resident) m.resident->RemoveSegments();
  m.resident.reset();
  m.segments.clear();
  m.tensors.clear();
  m.tensor_index.clear();
  m.gpus.clear();
}

void Server::Impl::PostCompletion(Completion c) {
  {
    std::lock_guard lock(completions_mu);
    completions.push_back(std::move(c));
  }
  std::uint64_t one = 1;
  (void)!::write(event_fd.get(), &one, sizeof one);
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
    try {
      c.result = loader.LoadHost(mc, gen, *cancel);
    } catch (const std::exception& e) {  // bad_alloc of a huge header, and the like
      c.result = Internal(std::string("loading failed: ") + e.what(), "load.exception");
    }
    c.ms = ToMs(std::chrono::steady_clock::now() - t0);
    if (c.result.ok() && gpu_available() && config.gpu_pin_host) {
      const auto p0 = std::chrono::steady_clock::now();
      for (const ResidentShard& sh : c.result.value()->shards) {
        if (sh.segment.data_size() == 0) continue;
        auto pin = gpu->PinHost(sh.segment.data(), sh.segment.data_size());
        if (!pin.ok()) {
          // Not fatal: copies then register (or stage) each time.
          spdlog::warn("model '{}': {}", mc.name, pin.status().ToString());
          break;
        }
        c.pins.push_back(std::move(pin).value());
      }
      c.pin_ms = ToMs(std::chrono::steady_clock::now() - p0);
    }
    PostCompletion(std::move(c));
  });
  if (!ok) {
    Completion c;
    c.model = m.config.name;
    c.generation = gen;
    c.result = Unavailable("the daemon is shutting down", "daemon.stopping");
    Complete(c);
  }
}

void Server::Impl::StartGpuLoad(ModelEntry& m, int ordinal) {
  GpuEntry& g = m.gpus.at(ordinal);
  g.started = true;
  Notify("STATUS=copying model '" + m.config.name + "' to " + CudaName(ordinal));
  spdlog::info("copying model '{}' ({} bytes) to {}", m.config.name, m.resident->bytes, CudaName(ordinal));
  // The job holds the host copy, so its mappings stay valid even if the model is evicted or
  // changed meanwhile; the generation tells the loop whether the result is still wanted.
  std::shared_ptr<const ResidentModel> host = m.resident;
  const std::uint64_t gen = g.generation;
  const std::string name = m.config.name;
  bool ok = gpu_jobs.Submit([this, host, gen, name, ordinal] {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<gpu::HostShard> shards;
    shards.reserve(host->shards.size());
    for (const ResidentShard& sh : host->shards) shards.push_back(gpu::HostShard{sh.segment.data(), sh.segment.data_size()});
    Completion c;
    c.model = name;
    c.generation = gen;
    c.ordinal = ordinal;
    try {
      c.gpu_result = gpu->Materialize(ordinal, shards, gpu_mode);
    } catch (const std::exception& e) {
      c.gpu_result = Internal(std::string("GPU copy failed: ") + e.what(), "gpu.exception");
    }
    c.ms = ToMs(std::chrono::steady_clock::now() - t0);
    PostCompletion(std::move(c));
  });
  if (!ok) {
    Completion c;
    c.model = name;
    c.generation = gen;
    c.ordinal = ordinal;
    c.gpu_result = Unavailable("the daemon is shutting down", "daemon.stopping");
    CompleteGpu(c);
  }
}

void Server::Impl::HandleCompletions() {
  std::deque<Completion> batch;
  {
    std::lock_guard lock(completions_mu);
    batch.swap(completions);
  }
  for (Completion& c : batch) {
    if (c.ordinal < 0) Complete(c);
    else CompleteGpu(c);
  }
  Notify("STATUS=serving " + std::to_string(catalog.models().size()) + " models, " +
         std::to_string(leases.lease_count()) + " leases");
}

void Server::Impl::Complete(Completion& c) {
  auto it = models.find(c.model);
  if (it == models.end() || it->second.generation != c.generation || it->second.state != ModelState::kLoading) {
    // The model was removed, changed or evicted while loading: the result is nobody's.
    if (c.result.ok()) {
      c.result.value()->RemoveSegments();
      ReleasePins(std::move(c.pins), c.result.value());
    }
    return;
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
                                              sh.file, sh.header.data_offset, 0, {}});
      for (const auto& t : sh.header.tensors) {
        m.tensor_index[t.name] = m.tensors.size();
        m.tensors.push_back(proto::TensorRecord{t.name, static_cast<std::uint8_t>(t.dtype), t.shape,
                                                static_cast<std::uint32_t>(i), t.begin, t.nbytes()});
      }
    }
    m.resident = std::move(r);
    m.host_pins = std::move(c.pins);
    if (!m.host_pins.empty()) spdlog::info("model '{}' page-locked for GPU copies in {} ms", m.config.name, c.pin_ms);
    const double secs = std::max<double>(static_cast<double>(c.ms), 1) / 1000.0;
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
  AnswerWaiters(m, waiters, m.state, m.last_error);
  // GPU copies that waited for the host tier.
  for (auto& [ordinal, g] : m.gpus) {
    if (g.state != ModelState::kLoading || g.started) continue;
    if (m.state == ModelState::kResident) {
      StartGpuLoad(m, ordinal);
    } else {
      g.state = ModelState::kFailed;
      g.last_error = m.last_error;
      std::vector<Waiter> gw;
      gw.swap(g.waiters);
      AnswerWaiters(m, gw, ModelState::kFailed, m.last_error);
    }
  }
}

void Server::Impl::CompleteGpu(Completion& c) {
  auto it = models.find(c.model);
  if (it == models.end()) return;  // the copy (if any) is freed with `c`
  auto g_it = it->second.gpus.find(c.ordinal);
  if (g_it == it->second.gpus.end() || g_it->second.generation != c.generation ||
      g_it->second.state != ModelState::kLoading)
    return;
  ModelEntry& m = it->second;
  GpuEntry& g = g_it->second;
  g.copy_ms = c.ms;
  if (c.gpu_result.ok()) {
    g.copy = std::move(c.gpu_result).value();
    g.state = ModelState::kResident;
    g.last_error = Status::Ok();
    m.last_used = clock->Now();
    const double secs = std::max(g.copy->copy_seconds(), 1e-6);
    spdlog::info("model '{}' resident on {}: {} bytes in {} ms (host-to-device {:.2f} GB/s)", m.config.name,
                 CudaName(c.ordinal), g.copy->allocated_bytes(), c.ms, static_cast<double>(m.resident->bytes) / secs / 1e9);
  } else {
    g.state = ModelState::kFailed;
    g.last_error = c.gpu_result.status();
    spdlog::error("model '{}' failed to copy to {}: {}", m.config.name, CudaName(c.ordinal), g.last_error.ToString());
  }
  std::vector<Waiter> waiters;
  waiters.swap(g.waiters);
  AnswerWaiters(m, waiters, g.state, g.last_error);
}

void Server::Impl::AnswerWaiters(ModelEntry& m, std::vector<Waiter>& waiters, ModelState state, const Status& error) {
  for (Waiter& w : waiters) {
    Session* s = leases.FindById(w.session_id);
    if (s == nullptr) continue;  // the client went away while it waited
    --s->pending;
    if (state != ModelState::kResident) {
      SendError(w.routing_id, w.request_id,
                error.WithContext((w.ordinal < 0 ? "loading model '" : "copying model '") + m.config.name + "'" +
                                  (w.ordinal < 0 ? std::string() : " to " + CudaName(w.ordinal))));
    } else if (w.kind == Waiter::kLoad) {
      Send(w.routing_id, w.request_id, StatusOf(m));
    } else if (s->leases.size() >= config.max_leases_per_client) {
      SendError(w.routing_id, w.request_id,
                ResourceExhausted("this client already holds the maximum number of leases", "limits.leases"));
    } else {
      Send(w.routing_id, w.request_id, GrantLease(*s, m, w.acquire, w.ordinal));
    }
  }
}

proto::ReplyBody Server::Impl::GrantLease(Session& s, ModelEntry& m, const proto::Acquire& req, int ordinal) {
  proto::Manifest man;
  man.model = m.config.name;
  man.device = "cpu";
  man.model_dir = m.config.dir;
  // The shards in manifest order, as indices into m.segments.
  std::vector<std::uint32_t> shards;
  if (req.tensor_filter.empty()) {
    man.tensors = m.tensors;
    for (std::uint32_t i = 0; i < m.segments.size(); ++i) shards.push_back(i);
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
      neu = static_cast<std::uint32_t>(shards.size());
      shards.push_back(old);
    }
    for (std::size_t i : picked) {
      man.tensors.push_back(m.tensors[i]);
      man.tensors.back().segment = remap[m.tensors[i].segment];
    }
  }
  std::shared_ptr<const gpu::GpuCopy> copy;
  if (ordinal >= 0) copy = m.gpus.at(ordinal).copy;
  for (std::uint32_t i : shards) {
    proto::SegmentInfo seg = m.segments[i];
    if (copy) {
      // GPU leases import the device copy and never map the host segment.
      seg.shm_name.clear();
      seg.size = 0;
      seg.gpu_alloc_size = copy->shards()[i].alloc_size;
      if (copy->mode() == gpu::ExportMode::kLegacy) seg.ipc_handle = copy->shards()[i].ipc_handle;
    }
    man.segments.push_back(std::move(seg));
  }
  const std::string device = copy ? CudaName(ordinal) : "cpu";
  auto id = leases.AddLease(s, m.config.name, device, copy);
  if (!id.ok()) return proto::ToErrorReply(id.status());
  man.lease_id = *id;
  if (copy) {
    man.device = copy->device_uuid();
    man.gpu_export = static_cast<std::uint8_t>(copy->mode() == gpu::ExportMode::kVmm ? proto::GpuExport::kVmm
                                                                                     : proto::GpuExport::kLegacy);
    if (copy->mode() == gpu::ExportMode::kVmm) {
      std::string token(kFdTokenBytes, '\0');
      Status r = posix::RandomBytes(std::as_writable_bytes(std::span(token.data(), token.size())));
      if (!r.ok()) {
        (void)leases.Release(s, *id);
        return proto::ToErrorReply(r);
      }
      man.fd_socket = config.fd_socket;
      man.fd_token = token;
      pending_fds[token] = PendingFds{s.id, *id, copy, std::move(shards), clock->Now() + kFdTokenTtl};
    }
  }
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
  for (const auto& [ordinal, g] : m.gpus) {
    proto::GpuCopyStatus gs;
    gs.device = CudaName(ordinal);
    gs.uuid = gpu->Devices().at(static_cast<std::size_t>(ordinal)).uuid;
    gs.state = static_cast<std::uint8_t>(g.state);
    gs.bytes = g.copy ? g.copy->allocated_bytes() : 0;
    gs.leases = leases.LeasesOf(m.config.name, gs.device);
    gs.copy_ms = g.copy_ms;
    gs.h2d_us = g.copy ? static_cast<std::uint64_t>(g.copy->copy_seconds() * 1e6) : 0;
    if (!g.last_error.ok()) gs.last_error = proto::ToErrorReply(g.last_error);
    st.gpus.push_back(std::move(gs));
  }
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
  if (gpu_available()) {
    const gpu::GpuTierStats gs = gpu->Stats();
    for (const gpu::DeviceInfo& d : gpu->Devices()) {
      proto::GpuDeviceStatus ds;
      ds.device = CudaName(d.ordinal);
      ds.uuid = d.uuid;
      ds.name = d.name;
      ds.total_bytes = d.total_bytes;
      for (const gpu::GpuDeviceStats& x : gs.devices)
        if (x.ordinal == d.ordinal) {
          ds.resident_bytes = x.resident_bytes;
          ds.copies = x.copies;
        }
      ds.leases = leases.LeasesOn(ds.device);
      st.gpus.push_back(std::move(ds));
    }
  } else {
    st.gpu_unavailable = gpu != nullptr ? gpu->unavailable_status().message() : "the GPU tier is disabled";
  }
  return st;
}

void Server::Impl::Send(const std::string& rid, std::uint64_t request_id, proto::ReplyBody body) {
  const auto* manifest = std::get_if<proto::Manifest>(&body);
  const std::uint64_t granted = manifest != nullptr ? manifest->lease_id : 0;
  std::string frame = proto::EncodeReply(proto::Reply{request_id, std::move(body)});
  const bool too_large = frame.size() > proto::kMaxReplyBytes;
  if (too_large) {
    Status error = ResourceExhausted("the reply would be " + std::to_string(frame.size()) + " bytes, more than the " +
                                         std::to_string(proto::kMaxReplyBytes) +
                                         " a client accepts (for an Acquire: select fewer tensors)",
                                     "protocol.reply_too_large");
    frame = proto::EncodeReply(proto::Reply{request_id, proto::ToErrorReply(error)});
  }
  bool sent = false;
  try {
    if (router.send(zmq::buffer(rid), zmq::send_flags::sndmore | zmq::send_flags::dontwait))
      sent = router.send(zmq::buffer(frame), zmq::send_flags::dontwait).has_value();
  } catch (const zmq::error_t& e) {
    // EHOSTUNREACH: the peer disconnected. Its session ends by pidfd or heartbeat.
    spdlog::debug("reply to a departed peer dropped: {}", e.what());
  }
  // A lease whose Manifest never left (or was replaced by an error) is nobody's: end it now
  // rather than when the session ends.
  if (granted != 0 && (!sent || too_large)) {
    if (Session* s = leases.Find(rid)) (void)leases.Release(*s, granted);
    std::erase_if(pending_fds, [granted](const auto& kv) { return kv.second.lease_id == granted; });
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
      if (stop_requested.load()) stopping = true;
    } else if (tag == kTagSignal) {
      HandleSignal();
    } else if (tag == kTagPid) {
      EndSession(evs[i].data.u64 & ~kTagMask, "client process exited");
    } else if (tag == kTagFdListen) {
      AcceptFdClients();
    } else if (tag == kTagFdConn) {
      ServeFdClient(static_cast<int>(evs[i].data.u64 & ~kTagMask));
    }
  }
}

void Server::Impl::AcceptFdClients() {
  for (;;) {
    auto conn = fd_listener->Accept();
    if (!conn.ok()) {
      spdlog::warn("fd socket: {}", conn.status().ToString());
      return;
    }
    if (!conn->has_value()) return;
    fdchan::FdConnection c = std::move(**conn);
    if (fd_clients.size() >= kMaxFdConnections) {
      // Never wait on this peer: a fresh socket takes the short reply at once, or it goes unsent.
      (void)c.SendReply(ResourceExhausted("too many pending fd requests; try again", "fdchan.busy"), {}, {}, Ms(0));
      continue;
    }
    const int fd = c.fd();
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kTagFdConn | static_cast<std::uint64_t>(fd);
    if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
      spdlog::warn("fd socket: epoll_ctl: {}", std::strerror(errno));
      continue;
    }
    fd_clients.emplace(fd, FdClient{std::move(c), clock->Now() + kFdConnTimeout});
  }
}

void Server::Impl::CloseFdClient(int fd) {
  ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, fd, nullptr);
  fd_clients.erase(fd);
}

// One request per connection: a token, answered with the lease's fds or an error, then closed.
void Server::Impl::ServeFdClient(int fd) {
  auto it = fd_clients.find(fd);
  if (it == fd_clients.end()) return;
  fdchan::FdConnection& conn = it->second.conn;
  auto token = conn.TryReadToken();
  if (token.ok() && !token->has_value()) return;  // not all there yet
  if (!token.ok()) {
    if (token.status().reason() != "fdchan.peer_closed")
      (void)conn.SendReply(token.status(), {}, {}, kFdSendTimeout);
    CloseFdClient(fd);
    return;
  }
  auto deny = [&](const std::string& why) {
    spdlog::warn("fd socket: refused pid {} (uid {}): {}", conn.peer().pid, conn.peer().uid, why);
    (void)conn.SendReply(PermissionDenied("fd request refused: " + why, "fdchan.denied"), {}, {}, kFdSendTimeout);
    CloseFdClient(fd);
  };
  auto p = pending_fds.find(**token);
  if (p == pending_fds.end()) return deny("unknown, expired or already used token");
  PendingFds pending = std::move(p->second);
  pending_fds.erase(p);  // one use, whatever happens next
  Session* s = leases.FindById(pending.session_id);
  if (s == nullptr || s->leases.count(pending.lease_id) == 0) return deny("the lease has ended");
  // The token travelled over the session's ZeroMQ connection; the process presenting it must be
  // the one that opened that session.
  if (!s->peer.known || conn.peer().uid != s->peer.uid || conn.peer().pid != s->peer.pid)
    return deny("credentials do not match the session (pid " + std::to_string(s->peer.pid) + ")");
  std::shared_ptr<const gpu::GpuCopy> copy = pending.copy.lock();
  if (copy == nullptr) return deny("the lease has ended");
  auto fds = copy->ExportFds();
  if (!fds.ok()) {
    spdlog::error("exporting fds of lease {}: {}", pending.lease_id, fds.status().ToString());
    (void)conn.SendReply(fds.status(), {}, {}, kFdSendTimeout);
    CloseFdClient(fd);
    return;
  }
  std::vector<int> raw;
  raw.reserve(pending.shards.size());
  for (std::uint32_t i : pending.shards) raw.push_back((*fds)[i].get());
  Status sent = conn.SendReply(Status::Ok(), std::to_string(pending.lease_id), raw, kFdSendTimeout);
  if (!sent.ok()) spdlog::warn("fd socket: sending fds of lease {}: {}", pending.lease_id, sent.ToString());
  CloseFdClient(fd);  // our copies of the fds close with `fds`
}

void Server::Impl::ExpireFdState(Clock::TimePoint now) {
  std::erase_if(pending_fds, [&](const auto& kv) { return kv.second.expires <= now; });
  std::vector<int> stale;
  for (const auto& [fd, c] : fd_clients)
    if (c.expires <= now) stale.push_back(fd);
  for (int fd : stale) CloseFdClient(fd);
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
  const auto now = clock->Now();
  for (std::uint64_t id : leases.Expired(now, config.heartbeat_timeout)) EndSession(id, "heartbeat timeout");
  ExpireFdState(now);
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
    const Status changed = Unavailable("model '" + name + "' " + why + " while loading", "catalog.changed");
    auto answer = [&](std::vector<Waiter>& waiters) {
      for (Waiter& w : waiters) {
        if (Session* s = leases.FindById(w.session_id)) {
          --s->pending;
          SendError(w.routing_id, w.request_id, changed);
        }
      }
      waiters.clear();
    };
    answer(m.waiters);
    for (auto& [ordinal, g] : m.gpus) answer(g.waiters);
    // Clients that still map the old segments keep them; leased GPU copies stay pinned by their
    // leases; new requests get the new catalog.
    DropResident(m);
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

void Server::Stop() {
  impl_->stop_requested.store(true);
  std::uint64_t one = 1;
  (void)!::write(impl_->event_fd.get(), &one, sizeof one);
}
Server::~Server() = default;

Result<std::unique_ptr<Server>> Server::Create(DaemonConfig config, const Clock* clock, gpu::GpuTier* gpu) {
  auto impl = std::make_unique<Impl>(std::move(config), clock, gpu);
  RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Status Server::Run() {
  Status s = impl_->Loop();
  spdlog::info("stopping: {} sessions, {} leases", impl_->leases.session_count(), impl_->leases.lease_count());
  return s;
}

}  // namespace weightd
