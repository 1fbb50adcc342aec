#include "server.h"

#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>

#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>
#include <zmq.hpp>

#include "adopt.h"
#include "auth.h"
#include "cache.h"
#include "control_socket.h"
#include "fd_server.h"
#include "http.h"
#include "lifecycle.h"
#include "loads.h"
#include "model_table.h"
#include "posix.h"
#include "protocol.h"
#include "segment_store.h"
#include "sessions.h"
#include "stats.h"
#include "thread_annotations.h"

namespace weightd {

namespace {

using Ms = std::chrono::milliseconds;

// What woke the loop, in the high byte of an epoll event's data; the rest is a session id or fd.
constexpr std::uint64_t kTagEvent = 1ull << 56;
constexpr std::uint64_t kTagSignal = 2ull << 56;
constexpr std::uint64_t kTagPid = 3ull << 56;
constexpr std::uint64_t kTagFdListen = 4ull << 56;
constexpr std::uint64_t kTagFdConn = 5ull << 56;
constexpr std::uint64_t kTagMask = 0xffull << 56;
constexpr unsigned kMaxMessagesPerWakeup = 256;  // keeps timers and completions responsive
Status UnknownModel(const std::string& model) {
  return NotFound("model '" + model + "' is not in the catalog", "catalog.unknown_model");
}

LoaderOptions LoaderOptionsOf(const DaemonConfig& c, const SegmentStore* store) {
  LoaderOptions o;
  o.segments = store;
  o.threads = c.loader_threads;
  o.chunk_size = c.chunk_size;
  o.io = c.io == "direct" ? IoMode::kDirect : c.io == "buffered" ? IoMode::kBuffered : IoMode::kAuto;
  o.fill = c.fill == "map" ? FillMethod::kMap : FillMethod::kWrite;
  o.hash_source = c.fill_hash == "read-back" ? HashSource::kReadBack
                  : c.fill_hash == "mapping" ? HashSource::kMapping
                                             : HashSource::kAuto;
  o.prefault_threads = c.prefault_threads;
  o.verify_manifest = c.verify_checksums;
  return o;
}

// Host fills that run at once: as many as [cache] max_loads admits (each holds its budget, so it
// should be reading), at least 2, and no more than the loader has readers (0, no bound: one per
// reader). Plans run on a pool of their own and never wait behind a fill.
unsigned FillJobs(const DaemonConfig& c) {
  const unsigned readers = std::max(2u, c.loader_threads);
  const unsigned wanted = c.cache.max_loads == 0 ? readers : c.cache.max_loads;
  return std::clamp(wanted, 2u, readers);
}

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

// The loop, and what it hands each request and event to. The parts (model table, cache, loads,
// sessions, fd server, lifecycle, report) hold no reference to the loop; what they tell it comes
// through ModelEvents, implemented here, and through posted tasks.
struct Server::Impl final : ModelEvents {
  // Const after construction.
  const DaemonConfig config;
  const Clock* const clock;
  const Clock::TimePoint started;
  gpu::GpuTier* const gpu;  // may be null: host-only
  const gid_t shm_gid;

  // Loop-thread state.
  ControlSocket control;
  auth::Policy policy;
  posix::Fd epoll_fd, event_fd, signal_fd;
  std::uint64_t watchdog_usec = 0;
  Clock::TimePoint last_watchdog{}, last_expiry_check{};
  bool stopping = false;

  // The parts, in the order they are built: each borrows only parts above it.
  Counters counters;
  SegmentStore store;
  Loader loader;
  ModelTable table;
  Sessions sessions;
  Cache cache;
  GpuFdStore fd_store;
  Loads loads;
  FdServer fds;
  Lifecycle lifecycle;
  Report report;

  // The HTTP listener, whose requests are answered on the loop thread.
  std::unique_ptr<HttpServer> http;

  // Shared with worker threads: the next steps they post to the loop (and HTTP requests).
  Mutex tasks_mu;
  std::deque<std::function<void()>> tasks GUARDED_BY(tasks_mu);
  std::atomic<bool> stop_requested{false};

  Impl(DaemonConfig cfg, const Clock* c, gpu::GpuTier* g, MemoryProbe* mem, gid_t shm_group, gid_t gid,
       auth::Policy p, gpu::ExportMode gpu_mode)
      : config(std::move(cfg)),
        clock(c),
        started(c->Now()),
        gpu(g),
        shm_gid(gid),
        policy(std::move(p)),
        store({config.shm_prefix, config.shm_mode, shm_group, config.segment_parts}),
        loader(LoaderOptionsOf(config, &store)),
        table(clock, &counters, g != nullptr && g->available() ? g->Devices().size() : 0, Poster()),
        sessions({config.max_sessions, config.max_sessions_per_user, config.max_leases_per_client,
                  config.heartbeat_timeout},
                 clock, epoll_fd, kTagPid),
        cache(config.cache, table, sessions.leases(), g, mem),
        fd_store(config.gpu_fd_store, g, gpu_mode, clock),
        loads({config.cache.admission_timeout, config.gpu_pin_host, gpu_mode, config.gpu_peer_copy, FillJobs(config)}, clock,
              table, cache, loader, store, g, &fd_store, counters, *this, Poster()),
        fds(clock, sessions, store, epoll_fd, kTagFdConn),
        lifecycle(config, clock, started, shm_gid, table, cache, loads, sessions.leases(), loader, store, g, &fd_store,
                  counters, *this, Poster()),
        report({clock, started, &table, &cache, &sessions.leases(), &loader, &fds, &lifecycle, &counters, g, &control.zap_handler()}) {}

  ~Impl() override {
    if (http) http->Stop();
    loads.Close();
    lifecycle.Close();
    table.Close();
    // Completed host copies stay for the next start to adopt when configured so; a load cut
    // short never does (it has no record, and its posted result removes its segments).
    table.RemoveSegments(config.keep_segments_on_stop);
  }

  void Post(std::function<void()> task) {
    {
      MutexLock lock(tasks_mu);
      tasks.push_back(std::move(task));
    }
    Wake();
  }
  LoopPost Poster() {
    return [this](std::function<void()> task) { Post(std::move(task)); };
  }
  void Wake() {
    std::uint64_t one = 1;
    (void)!::write(event_fd.get(), &one, sizeof one);
  }
  bool gpu_available() const { return gpu != nullptr && gpu->available(); }
  LeaseTable& leases() { return sessions.leases(); }

  Status Init();
  Status Loop();
  void HandleRequest(const std::string& routing_id, zmq::message_t& payload);
  void Dispatch(const std::string& routing_id, std::uint64_t id, proto::Request& req, zmq::message_t& payload);
  void HandleEpoll();
  void HandleSignal();
  void HandleTasks();
  void EndSession(std::uint64_t session_id, const char* why);
  void ExpireSessions();

  void Send(const std::string& routing_id, std::uint64_t request_id, proto::ReplyBody body);
  void SendError(const std::string& routing_id, std::uint64_t request_id, const Status& s) {
    Send(routing_id, request_id, proto::ToErrorReply(s));
  }

  // Request handlers: return a reply, or nullopt when the request was parked.
  std::optional<proto::ReplyBody> OnHello(const std::string& rid, const proto::Hello& m, const auth::Identity& who);
  std::optional<proto::ReplyBody> OnAcquire(Session& s, std::uint64_t req, const proto::Acquire& m);
  std::optional<proto::ReplyBody> OnLoad(Session& s, std::uint64_t req, const proto::Load& m);
  proto::ReplyBody OnRelease(Session& s, const proto::Release& m);
  proto::ReplyBody OnEvict(const proto::Evict& m);
  proto::ReplyBody GrantLease(Session& s, ModelEntry& m, const proto::Acquire& req, int ordinal);

  // ModelEvents.
  void Answer(ModelEntry& m, std::vector<Waiter>& waiters, ModelState state, const Status& error) override;
  void Refuse(std::vector<Waiter>& waiters, const Status& error) override;
  void PreloadDone(const std::string& key, const Status& s) override { lifecycle.PreloadDone(key, s); }
  void Notify(const std::string& state) override { sd_notify(0, state.c_str()); }

  HttpResponse AnswerHttp(const std::string& path);

};

Status Server::Impl::Init() {
  RETURN_IF_ERROR(control.Lock(config, policy.client_gid()));
  RETURN_IF_ERROR(store.Lock());
  RETURN_IF_ERROR(control.Bind(config, policy.client_gid()));

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
  // Host segments (and VMM exports) reach clients as fds over this socket.
  RETURN_IF_ERROR(fds.Bind(config.fd_socket, kTagFdListen));
  // It, the control socket and the socket's directory belong to the client group, whose members
  // alone may connect (with the 0750/0660 modes).
  RETURN_IF_ERROR(GiveToGroup(config.fd_socket, policy.client_gid()));
  if (gpu_available()) {
    for (const auto& d : gpu->Devices())
      spdlog::info("GPU {}: {} ({}, {} MiB)", CudaName(d.ordinal), d.name, d.uuid, d.total_bytes >> 20);
    spdlog::info("GPU copies are exported as {}{}", gpu::ExportModeName(loads.gpu_mode()),
                 loads.gpu_mode() == gpu::ExportMode::kVmm ? " fds over " + config.fd_socket : std::string());
  } else {
    spdlog::info("host-only: {}", gpu != nullptr ? gpu->unavailable_status().message() : "the GPU tier is disabled");
  }

  cache.ResolveBudgets();
  lifecycle.Start();

  if (!config.http_listen.empty()) {
    auto h = HttpServer::StartOnLoop(config.http_listen, Poster(),
                                     [this](const std::string& path) { return AnswerHttp(path); });
    if (!h.ok()) return h.status();
    http = std::move(h).value();
    spdlog::info("HTTP on {} (/healthz, /readyz, /metrics)", config.http_listen);
  }
  if (sd_watchdog_enabled(0, &watchdog_usec) <= 0) watchdog_usec = 0;
  const std::string huge = SegmentStore::HugePages();
  spdlog::info("weightd {} listening on {} (segment prefix '{}', {} models, {} loader threads, {} MiB chunks, {} fill, "
               "/dev/shm huge={})",
               WEIGHTD_VERSION, config.socket, config.shm_prefix, lifecycle.catalog().models().size(),
               config.loader_threads, config.chunk_size >> 20, config.fill, huge);
  if (config.fill == "write") {
    const char* source = loader.hash_source() == HashSource::kMapping ? "mapping" : "read-back";
    if (const auto& probe = loader.hash_probe(); !probe) {
      spdlog::info("write fill hashes late chunks through the {} (fill_hash)", source);
    } else if (!probe->error.empty()) {
      spdlog::warn("fill_hash = \"auto\": the probe failed ({}); hashing late chunks by read-back", probe->error);
    } else {
      spdlog::info("write fill hashes late chunks through the {} (fill_hash = \"auto\": a mapped page's first touch "
                   "costs {:.0f} ns here, reading it back {:.0f} ns)",
                   source, probe->touch_ns_per_page, probe->read_ns_per_page);
    }
  }
  if (huge == "always")
    spdlog::warn("/dev/shm is mounted with huge={}: each segment's last 2 MiB page is allocated whole, up to 2 MiB more "
                 "than the host budget counts; huge=within_size gives the same fill speed and keeps the count exact",
                 huge);
  return Status::Ok();
}

Status Server::Impl::Loop() {
  lifecycle.MaybeReady();
  while (!stopping) {
    zmq::pollitem_t items[] = {{control.handle(), 0, ZMQ_POLLIN, 0}, {nullptr, epoll_fd.get(), ZMQ_POLLIN, 0}};
    try {
      zmq::poll(items, 2, Ms(250));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) return Internal(std::string("zmq_poll: ") + e.what());
    }
    if (items[0].revents & ZMQ_POLLIN)
      control.Receive(
          kMaxMessagesPerWakeup,
          [this](const std::string& rid, zmq::message_t& payload) {
            ++counters.requests;
            HandleRequest(rid, payload);
          },
          [this](const std::string& rid) {
            ++counters.malformed;
            SendError(rid, 0, InvalidArgument("a request is exactly one frame", "protocol.malformed"));
          });
    if (items[1].revents & ZMQ_POLLIN) HandleEpoll();
    const auto now = clock->Now();
    if (now - last_expiry_check >= Ms(200)) {
      last_expiry_check = now;
      ExpireSessions();
      cache.Enforce(now);
      if (cache.waiting() > 0) cache.RetrySoon();  // deadlines
      lifecycle.CheckFiles(now);
    }
    if (cache.TakeRetry()) loads.RetryAdmissions(clock->Now());
    if (watchdog_usec > 0 && now - last_watchdog >= std::chrono::microseconds(watchdog_usec / 2)) {
      last_watchdog = now;
      Notify("WATCHDOG=1");
    }
  }
  Notify("STOPPING=1");
  return Status::Ok();
}

void Server::Impl::HandleRequest(const std::string& rid, zmq::message_t& payload) {
  auto req = proto::DecodeRequest(std::string_view(static_cast<const char*>(payload.data()), payload.size()));
  if (!req.ok()) {
    ++counters.malformed;
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
  // Who sent this: the credentials the ZAP handler stamped on the connection, never the request.
  const auth::Identity who = auth::IdentityOf(payload);
  if (!who.known) {
    SendError(rid, id, PermissionDenied("no peer credentials on this connection", "auth.no_credentials"));
    return;
  }
  Session* s = sessions.Find(rid);
  // A session whose process has exited ends now, even if its pidfd event is still queued: a
  // process that got the pid since must not inherit it.
  if (s != nullptr && Sessions::PeerGone(*s)) {
    EndSession(s->id, "process exited");
    s = nullptr;
  }
  // A routing id is chosen by the peer: a connection that reuses a session's routing id after its
  // owner went away must not inherit it.
  if (s != nullptr && (s->peer.uid != who.uid || s->peer.pid != who.pid)) {
    spdlog::warn("{} used the routing id of session {} (uid {}, pid {}); refused", who.ToString(), s->id, s->peer.uid,
                 s->peer.pid);
    SendError(rid, id, PermissionDenied("this connection's routing id belongs to another process's session",
                                        "auth.session_mismatch"));
    return;
  }
  if (auto* hello = std::get_if<proto::Hello>(&req.body)) {
    if (auto r = OnHello(rid, *hello, who)) Send(rid, id, std::move(*r));
    return;
  }
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
          if (table.Find(body.model) != nullptr)
            if (Status denied = policy.CheckModel(who, body.model); !denied.ok()) return proto::ToErrorReply(denied);
          return OnAcquire(*s, id, body);
        } else if constexpr (std::is_same_v<T, proto::Release>) {
          return OnRelease(*s, body);
        } else if constexpr (std::is_same_v<T, proto::Heartbeat>) {
          return proto::OkReply{};
        } else if constexpr (std::is_same_v<T, proto::List>) {
          proto::ModelList list;  // only the models this peer may use
          for (const auto& [name, m] : table.models())
            if (policy.MayAcquire(who, name)) list.models.push_back(report.StatusOf(m));
          return list;
        } else if constexpr (std::is_same_v<T, proto::StatusRequest>) {
          const ModelEntry* m = table.Find(body.model);
          if (m == nullptr) return proto::ToErrorReply(UnknownModel(body.model));
          if (Status denied = policy.CheckModel(who, body.model); !denied.ok()) return proto::ToErrorReply(denied);
          return report.StatusOf(*m);
        } else if constexpr (std::is_same_v<T, proto::Load>) {
          if (Status denied = policy.CheckAdmin(who, "load"); !denied.ok()) return proto::ToErrorReply(denied);
          return OnLoad(*s, id, body);
        } else if constexpr (std::is_same_v<T, proto::Evict>) {
          if (Status denied = policy.CheckAdmin(who, "evict"); !denied.ok()) return proto::ToErrorReply(denied);
          return OnEvict(body);
        } else if constexpr (std::is_same_v<T, proto::Stats>) {
          if (Status denied = policy.CheckAdmin(who, "stats"); !denied.ok()) return proto::ToErrorReply(denied);
          return report.Stats();
        } else if constexpr (std::is_same_v<T, proto::Goodbye>) {
          EndSession(s->id, "client closed");
          return std::nullopt;
        }
      },
      req.body);
  if (reply) Send(rid, id, std::move(*reply));
}

std::optional<proto::ReplyBody> Server::Impl::OnHello(const std::string& rid, const proto::Hello& m,
                                                       const auth::Identity& who) {
  if (Status denied = policy.CheckConnect(who); !denied.ok()) {
    spdlog::warn("refused a session for {}: not in the client group, an admin or in any model's ACL", who.ToString());
    return proto::ToErrorReply(denied);
  }
  std::uint64_t gone = 0;
  auto s = sessions.Open(rid, m.client_name, who, &gone);
  if (gone != 0) EndSession(gone, "the process exited during its handshake");
  if (!s.ok()) return proto::ToErrorReply(s.status());
  const Session& session = **s;
  proto::HelloReply r;
  r.daemon_version = WEIGHTD_VERSION;
  r.session_id = session.id;
  r.heartbeat_interval_ms = static_cast<std::uint32_t>(config.heartbeat_interval.count());
  r.heartbeat_timeout_ms = static_cast<std::uint32_t>(config.heartbeat_timeout.count());
  r.max_leases = config.max_leases_per_client;
  r.peer_uid = session.peer.uid;
  r.peer_pid = static_cast<std::uint32_t>(session.peer.pid);
  return r;
}

std::optional<proto::ReplyBody> Server::Impl::OnAcquire(Session& s, std::uint64_t req, const proto::Acquire& m) {
  ModelEntry* e = table.Find(m.model);
  if (e == nullptr) return proto::ToErrorReply(UnknownModel(m.model));
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
  const Status too_many = ResourceExhausted("this client already waits for " + std::to_string(s.pending) +
                                                " loads; wait for their answers first",
                                            "limits.pending");
  Waiter w{Waiter::kAcquire, s.routing_id, req, s.id, m, ordinal};
  // Only an Acquire that is served or queued counts as an access for the eviction policy; one
  // refused with limits.pending asked for nothing.
  if (ordinal < 0) {
    if (e->state == ModelState::kResident) {
      cache.RecordAccess(m.model, ordinal);
      ++counters.host.hits;
      return GrantLease(s, *e, m, -1);
    }
    if (s.pending >= config.max_leases_per_client) return proto::ToErrorReply(too_many);
    cache.RecordAccess(m.model, ordinal);
    ++counters.host.misses;
    ++s.pending;
    e->waiters.push_back(std::move(w));
    if (e->state != ModelState::kLoading) loads.StartLoad(*e);
    return std::nullopt;
  }
  GpuEntry& g = e->gpus[ordinal];
  if (g.state == ModelState::kResident) {
    cache.RecordAccess(m.model, ordinal);
    ++counters.gpu.hits;
    return GrantLease(s, *e, m, ordinal);
  }
  if (s.pending >= config.max_leases_per_client) return proto::ToErrorReply(too_many);
  cache.RecordAccess(m.model, ordinal);
  ++counters.gpu.misses;
  ++s.pending;
  g.waiters.push_back(std::move(w));
  loads.RequestGpu(*e, ordinal);
  return std::nullopt;
}

std::optional<proto::ReplyBody> Server::Impl::OnLoad(Session& s, std::uint64_t req, const proto::Load& m) {
  ModelEntry* e = table.Find(m.model);
  if (e == nullptr) return proto::ToErrorReply(UnknownModel(m.model));
  if (e->state == ModelState::kResident && !e->pinning) return report.StatusOf(*e);
  if (s.pending >= config.max_leases_per_client)
    return proto::ToErrorReply(ResourceExhausted("this client already waits for " + std::to_string(s.pending) +
                                                     " loads; wait for their answers first",
                                                 "limits.pending"));
  ++s.pending;
  Waiter w{Waiter::kLoad, s.routing_id, req, s.id, {}};
  if (e->state == ModelState::kResident) {  // resident, being page-locked: answered once it is
    e->pin_waiters.push_back(std::move(w));
    return std::nullopt;
  }
  e->waiters.push_back(std::move(w));
  if (e->state != ModelState::kLoading) loads.StartLoad(*e);
  return std::nullopt;
}

proto::ReplyBody Server::Impl::OnRelease(Session& s, const proto::Release& m) {
  auto r = leases().Release(s, m.lease_id);
  if (!r.ok()) return proto::ToErrorReply(r.status());
  // Its unused token goes too: the pending tokens stay bounded by the live leases.
  fds.ForgetLease(s.id, m.lease_id);
  table.Touch(r->model, r->device, clock->Now());
  cache.RetrySoon();
  return proto::OkReply{};
}

proto::ReplyBody Server::Impl::OnEvict(const proto::Evict& m) {
  ModelEntry* e = table.Find(m.model);
  if (e == nullptr) return proto::ToErrorReply(UnknownModel(m.model));
  if (Status s = cache.Evict(*e, m.device); !s.ok()) return proto::ToErrorReply(s);
  return proto::OkReply{};
}

proto::ReplyBody Server::Impl::GrantLease(Session& s, ModelEntry& m, const proto::Acquire& req, int ordinal) {
  auto grant = table.GrantOf(m, req.tensor_filter, ordinal);
  if (!grant.ok()) return proto::ToErrorReply(grant.status());
  proto::Manifest& man = grant->manifest;
  const std::shared_ptr<const gpu::GpuCopy>& copy = grant->copy;
  auto id = leases().AddLease(s, m.config.name, copy ? CudaName(ordinal) : "cpu", copy);
  if (!id.ok()) return proto::ToErrorReply(id.status());
  man.lease_id = *id;
  // VMM exports and host segments travel as fds over the fd socket, to the process that holds
  // this token (and the session's credentials); a legacy handle is in the manifest itself.
  if (!copy || copy->mode() == gpu::ExportMode::kVmm) {
    std::vector<std::string> shm_names;
    if (!copy)
      for (const auto& seg : man.segments)
        if (seg.size > 0)
          for (std::string& part : HostSegment::PartNames(seg.shm_name, seg.data_size, seg.part_size))
            shm_names.push_back(std::move(part));
    auto token = fds.Offer(s.id, *id, copy, std::move(grant->shards), std::move(shm_names));
    if (!token.ok()) {
      (void)leases().Release(s, *id);
      return proto::ToErrorReply(token.status());
    }
    man.fd_socket = config.fd_socket;
    man.fd_token = *token;
  }
  m.last_used = clock->Now();
  return std::move(man);
}

void Server::Impl::Answer(ModelEntry& m, std::vector<Waiter>& waiters, ModelState state, const Status& error) {
  for (Waiter& w : waiters) {
    Session* s = sessions.FindById(w.session_id);
    if (s == nullptr) continue;  // the client went away while it waited
    --s->pending;
    if (state != ModelState::kResident) {
      SendError(w.routing_id, w.request_id,
                error.WithContext((w.ordinal < 0 ? "loading model '" : "copying model '") + m.config.name + "'" +
                                  (w.ordinal < 0 ? std::string() : " to " + CudaName(w.ordinal))));
    } else if (w.kind == Waiter::kLoad) {
      Send(w.routing_id, w.request_id, report.StatusOf(m));
    } else if (s->leases.size() >= config.max_leases_per_client) {
      SendError(w.routing_id, w.request_id,
                ResourceExhausted("this client already holds the maximum number of leases", "limits.leases"));
    } else {
      Send(w.routing_id, w.request_id, GrantLease(*s, m, w.acquire, w.ordinal));
    }
  }
}

void Server::Impl::Refuse(std::vector<Waiter>& waiters, const Status& error) {
  for (Waiter& w : waiters) {
    if (Session* s = sessions.FindById(w.session_id)) {
      --s->pending;
      SendError(w.routing_id, w.request_id, error);
    }
  }
  waiters.clear();
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
  const bool sent = control.Send(rid, frame);
  // A lease whose Manifest never left (or was replaced by an error) is nobody's: end it now
  // rather than when the session ends.
  if (granted != 0 && (!sent || too_large)) {
    if (Session* s = sessions.Find(rid)) (void)leases().Release(*s, granted);
    fds.ForgetLease(granted);
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
      HandleTasks();
      if (stop_requested.load()) stopping = true;
    } else if (tag == kTagSignal) {
      HandleSignal();
    } else if (tag == kTagPid) {
      EndSession(evs[i].data.u64 & ~kTagMask, "client process exited");
    } else if (tag == kTagFdListen) {
      fds.Accept();
    } else if (tag == kTagFdConn) {
      fds.Serve(static_cast<int>(evs[i].data.u64 & ~kTagMask));
    }
  }
}

// The next steps that workers posted (a load's plan, fill or GPU copy, a page-locking, a file
// check, memory the reaper freed) and the HTTP listener's requests.
void Server::Impl::HandleTasks() {
  std::deque<std::function<void()>> batch;
  {
    MutexLock lock(tasks_mu);
    batch.swap(tasks);
  }
  if (batch.empty()) return;  // woken for something else (Stop)
  for (auto& task : batch) task();
  cache.RetrySoon();
  if (lifecycle.ready()) Notify("STATUS=" + lifecycle.ServingStatus());
}

void Server::Impl::HandleSignal() {
  signalfd_siginfo si;
  while (::read(signal_fd.get(), &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
    if (si.ssi_signo == SIGHUP) {
      lifecycle.Reload(&policy);
    } else {
      spdlog::info("signal {} received: shutting down", si.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
      stopping = true;
    }
  }
}

void Server::Impl::EndSession(std::uint64_t session_id, const char* why) {
  Session* s = sessions.FindById(session_id);
  if (s == nullptr) return;
  const std::string name = s->client_name;
  const pid_t pid = s->peer.pid;
  std::vector<LeaseRecord> ended = sessions.Close(session_id);
  fds.ForgetSession(session_id);
  const auto now = clock->Now();
  for (const auto& l : ended) table.Touch(l.model, l.device, now);
  spdlog::info("session {} of '{}' (pid {}) ended: {}; {} leases freed", session_id, name, pid, why, ended.size());
  cache.RetrySoon();
}

void Server::Impl::ExpireSessions() {
  const auto now = clock->Now();
  for (std::uint64_t id : sessions.Expired(now)) EndSession(id, "heartbeat timeout");
  fds.Expire(now);
}

HttpResponse Server::Impl::AnswerHttp(const std::string& path) {
  if (path == "/healthz") return HttpResponse{200, "text/plain", "ok\n"};
  if (path == "/readyz") {
    if (lifecycle.ready()) return HttpResponse{200, "text/plain", "ready\n"};
    return HttpResponse{503, "text/plain",
                        "not ready: " + std::to_string(lifecycle.preloads_left()) + " preloads in progress\n"};
  }
  if (path == "/metrics") return HttpResponse{200, "text/plain; version=0.0.4; charset=utf-8", report.Metrics()};
  return HttpResponse{404, "text/plain", "not found: try /healthz, /readyz or /metrics\n"};
}

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

void Server::Stop() {
  impl_->stop_requested.store(true);
  impl_->Wake();
}
Server::~Server() = default;

Result<std::unique_ptr<Server>> Server::Create(DaemonConfig config, const Clock* clock, gpu::GpuTier* gpu,
                                               MemoryProbe* memory) {
  gid_t shm_group = static_cast<gid_t>(-1);  // the segments' group is left as created
  gid_t shm_gid = ::getegid();
  if (!config.shm_group.empty()) {
    auto g = auth::ResolveGroup(config.shm_group);
    if (!g.ok()) return g.status().WithContext("daemon.shm_group");
    shm_group = shm_gid = *g;
  }
  ASSIGN_OR_RETURN(auth::Policy policy, auth::Policy::Create(config, ::geteuid(), ::getegid()));
  RETURN_IF_ERROR(auth::CheckSegmentGroup(policy, shm_gid, config.shm_mode));
  ASSIGN_OR_RETURN(gpu::ExportMode gpu_mode, gpu::ParseExportMode(config.gpu_export));
  auto impl = std::make_unique<Impl>(std::move(config), clock, gpu, memory, shm_group, shm_gid, std::move(policy), gpu_mode);
  RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Status Server::Run() {
  Status s = impl_->Loop();
  spdlog::info("stopping: {} sessions, {} leases", impl_->leases().session_count(), impl_->leases().lease_count());
  return s;
}

}  // namespace weightd
