#include "server.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
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
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <future>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <unordered_map>

#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>
#include <zmq.hpp>

#include "adopt.h"
#include "auth.h"
#include "catalog.h"
#include "fd_channel.h"
#include "gpu_tier.h"
#include "http.h"
#include "metrics.h"
#include "policy.h"
#include "lease_table.h"
#include "loader.h"
#include "posix.h"
#include "protocol.h"
#include "segment_store.h"
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
// A control connection must finish its ZMTP handshake within this (ZMQ_HANDSHAKE_IVL).
constexpr Ms kHandshakeTimeout{5'000};
constexpr std::size_t kFdTokenBytes = 32;
#ifdef ZMQ_ZAP_ENFORCE_DOMAIN
constexpr int kZmqZapEnforceDomain = ZMQ_ZAP_ENFORCE_DOMAIN;
#else
constexpr int kZmqZapEnforceDomain = 93;  // zmq.h's value, hidden behind ZMQ_BUILD_DRAFT_API
#endif

std::uint64_t ToMs(Clock::TimePoint::duration d) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<Ms>(d).count());
}

// An exclusive, non-blocking flock on a file; released when the process exits.
Result<posix::Fd> LockFile(const std::string& path, const std::string& what) {
  ASSIGN_OR_RETURN(posix::Fd fd, posix::Open(path, O_RDWR | O_CREAT | O_NOFOLLOW, 0600));
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK)
      return FailedPrecondition("another weightd instance holds " + what + " (" + path + ")", "daemon.instance_locked");
    return posix::ErrnoStatus("flock(" + path + ")");
  }
  return fd;
}

// The socket's directory and the names the daemon creates in it must be ours (or root's): a user
// who owns the directory, or may write to it without the sticky bit, could swap our socket for
// theirs and receive every client's requests. An existing name of another user is a squat.
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

// Per-model ACLs are only airtight when no tenant can open segments by name: then the segments'
// group must be none that an ACL or the client group grants, or have no group read bit.
Status CheckSegmentGroup(const auth::Policy& policy, gid_t shm_gid, mode_t shm_mode) {
  if (!policy.Restrictive() || (shm_mode & 0040) == 0 || !policy.GrantsGroup(shm_gid)) return Status::Ok();
  return InvalidArgument("models have different ACLs (allow_users, allow_groups), but the segments' group (gid " +
                             std::to_string(shm_gid) + ", daemon.shm_group or the daemon's own group) is one the "
                             "client group or an ACL grants, so its members could open every model's segments by "
                             "name; set daemon.shm_mode = \"0600\" (clients get their segments as fds anyway) or a "
                             "shm_group no ACL names",
                         "config.shm_group_leaks");
}

LoaderOptions LoaderOptionsOf(const DaemonConfig& c, const SegmentStore* store) {
  LoaderOptions o;
  o.segments = store;
  o.threads = c.loader_threads;
  o.chunk_size = c.chunk_size;
  o.io = c.io == "direct" ? IoMode::kDirect : c.io == "buffered" ? IoMode::kBuffered : IoMode::kAuto;
  o.prefault_threads = c.prefault_threads;
  o.verify_manifest = c.verify_checksums;
  return o;
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

// The label of weightd_load_errors_total: the error's reason, or its code when it has none.
std::string ErrorLabel(const Status& s) { return s.reason().empty() ? std::string(CodeName(s.code())) : s.reason(); }

// "16.0 KiB", "1.50 GiB": sizes in messages and logs.
std::string Gib(std::uint64_t b) {
  char buf[32];
  if (b < (1ull << 20)) std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / 1024);
  else if (b < (1ull << 30)) std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / (1ull << 20));
  else std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(b) / (1ull << 30));
  return buf;
}

// A finished job: a host plan or fill, a GPU materialization, a page-locking, or a check of
// resident files.
struct Completion {
  enum Kind { kPlan, kFill, kGpu, kPin, kCheck, kReaped } kind = kFill;
  std::string model;
  std::uint64_t generation = 0;
  int ordinal = -1;
  Result<std::shared_ptr<ResidentModel>> result{Status(Code::kInternal, "unset")};
  Result<std::shared_ptr<gpu::GpuCopy>> gpu_result{Status(Code::kInternal, "unset")};
  std::shared_ptr<LoadPlan> plan;                 // kPlan, when it succeeded
  Status status;                                  // kPlan's error; kCheck: the check's error
  std::vector<std::shared_ptr<const void>> pins;  // kPin: the shards' page-lock handles
  std::vector<std::string> changed;               // kCheck: models whose files changed on disk
  std::uint64_t ms = 0;
};

// Where a copy's load stands. Host: plan (read the headers) -> admit (make room under the
// budget, perhaps waiting for leases to end) -> fill (read the data). GPU: wait for the host
// copy (or for its fill to start, when the copy is pipelined behind the disk) -> admit -> copy.
enum class Phase : std::uint8_t { kIdle, kPlanning, kWaitHost, kAdmitting, kWorking };

// A GPU copy's shard fds in systemd's file-descriptor store (sd_notify FDSTORE=1), under one
// name per shard: "gpu.<device uuid>.<host generation>.<shard>.<model>". systemd keeps them
// while the daemon crashes and restarts; the next instance adopts them (AdoptStoredGpuCopies).
// Dropping the entry removes them from the store, or the memory would outlive the copy.
struct StoredCopy {
  std::vector<std::string> names;
  StoredCopy() = default;
  StoredCopy(const StoredCopy&) = delete;
  StoredCopy& operator=(const StoredCopy&) = delete;
  ~StoredCopy() {
    for (const std::string& n : names) sd_notify(0, ("FDSTOREREMOVE=1\nFDNAME=" + n).c_str());
  }
};

bool ParseU64(std::string_view s, std::uint64_t* out) {
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return !s.empty() && ec == std::errc() && end == s.data() + s.size();
}

std::string FdStoreName(const std::string& uuid, std::uint64_t host_generation, std::size_t shard,
                        const std::string& model) {
  return "gpu." + uuid + "." + std::to_string(host_generation) + "." + std::to_string(shard) + "." + model;
}

// A model's copy on one GPU. Its waiters are GPU Acquires; the copy is made from the host tier,
// so while the host copy is loading the materialization waits (phase kWaitHost).
struct GpuEntry {
  ModelState state = ModelState::kAbsent;
  Phase phase = Phase::kIdle;
  std::shared_ptr<gpu::GpuCopy> copy;
  std::uint64_t generation = 0;  // of the materialization in flight
  std::uint64_t reserved = 0;    // budget bytes held for the copy in flight
  bool pipelined = false;        // the copy in flight reads the host copy while it fills
  bool preload = false;          // readiness waits for this copy
  std::vector<Waiter> waiters;
  Status last_error;
  std::uint64_t copy_ms = 0;
  Clock::TimePoint last_used{};
  Clock::TimePoint admission_deadline{};
  std::string waiting_for;
  std::optional<Completion> stashed;  // a pipelined copy that finished before its host fill did
  std::shared_ptr<StoredCopy> stored; // its fds in systemd's fd store, while it is resident
};

struct ModelEntry {
  ModelConfig config;
  ModelState state = ModelState::kAbsent;
  Phase phase = Phase::kIdle;
  std::shared_ptr<const ResidentModel> resident;
  std::shared_ptr<std::atomic<bool>> cancel;  // of the load in flight
  std::uint64_t generation = 0;               // of the load in flight
  std::vector<Waiter> waiters;
  Status last_error;
  std::uint64_t loads = 0;
  std::uint64_t last_load_ms = 0;
  Clock::TimePoint last_used{};  // of the host copy

  // The load in flight: its plan until admitted, then its progress while the data is read.
  std::shared_ptr<LoadPlan> plan;
  std::shared_ptr<LoadProgress> progress;
  std::uint64_t plan_ms = 0;
  std::uint64_t host_reserved = 0;  // budget bytes held for the fill in flight
  std::uint64_t host_bytes = 0;     // of the copy, page-rounded: what it takes from the budget
  std::vector<std::uint64_t> shard_sizes;  // data bytes per shard (known once planned)
  Clock::TimePoint admission_deadline{};
  std::string waiting_for;
  bool preload_host = false;  // readiness waits for the host copy
  bool pinning = false;       // the host copy is being page-locked; GPU copies wait for it
  // The files the copies were made from (names, sizes, mtimes; no segments), kept while any
  // tier holds a copy, so that a changed file is noticed even when only a GPU copy is left.
  std::shared_ptr<const ResidentModel> files;

  // Built once per resident copy.
  std::vector<proto::SegmentInfo> segments;
  std::vector<proto::TensorRecord> tensors;
  std::unordered_map<std::string, std::size_t> tensor_index;

  std::map<int, GpuEntry> gpus;  // by the daemon's device ordinal
  // The host copy's shards stay page-locked while resident, so that copies to a GPU run at
  // PCIe speed without registering them first.
  std::vector<std::shared_ptr<const void>> host_pins;

  bool Busy() const { return state == ModelState::kLoading || GpuLoading(); }
  // A GPU copy is being made, or waits to be made, from the host copy: the host copy must stay.
  bool GpuLoading() const {
    for (const auto& [ordinal, g] : gpus)
      if (g.state == ModelState::kLoading) return true;
    return false;
  }
};

// A VMM lease whose fds wait to be fetched over the side channel.
struct PendingFds {
  std::uint64_t session_id = 0;
  std::uint64_t lease_id = 0;
  // The lease pins the copy; a token must not keep it alive past the lease.
  std::weak_ptr<const gpu::GpuCopy> copy;
  std::vector<std::uint32_t> shards;  // in manifest order
  // A host lease: its non-empty segments in manifest order, opened read-only when the client
  // comes for them.
  bool host = false;
  std::vector<std::string> shm_names;
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
  std::unique_ptr<auth::ZapHandler> zap;  // before router: it must outlive the socket it guards
  zmq::socket_t router;
  auth::Policy policy;
  gid_t shm_gid = 0;
  posix::Fd epoll_fd, event_fd, signal_fd;
  posix::Fd socket_lock;
  std::string socket_path;
  Catalog catalog;
  std::map<std::string, ModelEntry> models;
  LeaseTable leases;
  std::uint64_t next_generation = 1;
  std::uint64_t loads_ok = 0, loads_failed = 0, requests = 0, malformed = 0;
  std::uint64_t adopted_models = 0;  // host copies taken back from the previous instance at start
  std::uint64_t watchdog_usec = 0;
  Clock::TimePoint last_watchdog{}, last_expiry_check{}, last_pressure_check{}, last_file_check{};
  bool stopping = false;

  // The cache policy.
  MemoryProbe* memory;  // borrowed, or owned_memory
  std::unique_ptr<MemoryProbe> owned_memory;
  std::uint64_t host_total = 0, host_budget = 0;
  std::map<int, std::uint64_t> gpu_budget;  // by ordinal
  struct Ticket {
    std::string model;
    int ordinal;  // -1: the host copy
  };
  std::deque<Ticket> admissions;  // copies waiting for room, oldest first
  // Bytes of evicted copies that the reaper has not freed yet (shared with it).
  std::atomic<std::uint64_t> reaping_host{0};
  std::unique_ptr<std::atomic<std::uint64_t>[]> reaping_gpu;  // by ordinal
  bool retry_admissions = false;
  bool file_check_running = false;
  // Readiness: preloads not finished yet, as "model/tier".
  std::set<std::string> preloads;
  std::vector<std::string> preload_failures;
  bool ready = false;
  Clock::TimePoint ready_at{};

  // Metrics (the loop's own counters; the rest is read from the state when rendered).
  struct TierMetrics {
    std::uint64_t loads_ok = 0, loads_failed = 0, bytes = 0, hits = 0, misses = 0;
    metrics::Histogram durations = metrics::LoadDurationHistogram();
    std::map<std::string, std::uint64_t> evictions;  // by reason
    std::map<std::string, std::uint64_t> errors;     // by reason of the error
  };
  TierMetrics host_metrics, gpu_metrics;

  // The HTTP listener's requests, answered on the loop thread.
  std::unique_ptr<HttpServer> http;
  struct HttpCall {
    std::string path;
    std::promise<HttpResponse> reply;
  };
  std::mutex http_mu;
  std::deque<std::shared_ptr<HttpCall>> http_calls;  // guarded by http_mu
  // The fd side channel (VMM export only).
  std::optional<fdchan::FdListener> fd_listener;
  std::map<int, FdClient> fd_clients;              // by socket fd
  std::map<std::string, PendingFds> pending_fds;   // by token

  // Shared with worker threads.
  std::mutex completions_mu;
  std::deque<Completion> completions;  // guarded by completions_mu
  std::atomic<bool> stop_requested{false};
  SegmentStore store;  // before the loader, which makes its segments
  Loader loader;
  // Declared last so that they are joined first.
  ThreadPool jobs;        // one host plan or fill per job
  // One GPU materialization or page-locking per job. A pipelined copy holds its thread while the
  // disk is read, hence more threads than GPUs need.
  ThreadPool gpu_jobs;
  ThreadPool check_jobs;  // checks of resident files for changes
  ThreadPool reap_jobs;   // Dispose()

  Impl(DaemonConfig cfg, const Clock* c, gpu::GpuTier* g, MemoryProbe* mem, gid_t shm_group, auth::Policy p)
      : config(std::move(cfg)),
        clock(c),
        started(c->Now()),
        gpu(g),
        policy(std::move(p)),
        shm_gid(shm_group),
        leases(config.max_sessions, config.max_leases_per_client),
        memory(mem),
        store({config.shm_prefix, config.shm_mode, shm_group}),
        loader(LoaderOptionsOf(config, &store)),
        jobs(2, "wd-load"),
        gpu_jobs(4, "wd-gpu"),
        check_jobs(1, "wd-check"),
        reap_jobs(1, "wd-reap") {
    if (memory == nullptr) {
      owned_memory = std::make_unique<SystemMemoryProbe>(g);
      memory = owned_memory.get();
    }
    reaping_gpu = std::make_unique<std::atomic<std::uint64_t>[]>(std::max<std::size_t>(1, gpu_available() ? gpu->Devices().size() : 0));
  }

  ~Impl() {
    if (http) http->Stop();
    for (auto& [name, m] : models)
      if (m.cancel) m.cancel->store(true);
    jobs.Close();
    gpu_jobs.Close();
    check_jobs.Close();
    reap_jobs.Close();
    // Completed host copies stay for the next start to adopt when configured so; a load cut
    // short never does (it has no record).
    for (auto& [name, m] : models)
      if (m.resident && !(config.keep_segments_on_stop && !m.resident->record.empty())) m.resident->RemoveSegments();
    std::lock_guard lock(completions_mu);
    for (auto& c : completions)
      if (c.kind == Completion::kFill && c.result.ok()) c.result.value()->RemoveSegments();
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
  // Returns what changed, so that a reload can start the preloads of new and changed models.
  CatalogDiff ApplyCatalog(const std::vector<ModelConfig>& models);
  void EndSession(std::uint64_t session_id, const char* why);

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
  // A lease on `device` ("cpu" or "cuda:N") of `model` ended: its copy's idle time starts now.
  void TouchCopy(const std::string& model, const std::string& device, Clock::TimePoint now) {
    auto it = models.find(model);
    if (it == models.end()) return;
    if (device == "cpu") it->second.last_used = now;
    for (auto& [ordinal, g] : it->second.gpus)
      if (CudaName(ordinal) == device) g.last_used = now;
  }

  // Loading, in phases (see Phase).
  void StartLoad(ModelEntry& m);
  void OnPlanned(Completion& c);
  void StartFill(ModelEntry& m);
  void Complete(Completion& c);
  void FailHostLoad(ModelEntry& m, const Status& error);
  void RequestGpu(ModelEntry& m, int ordinal);
  void MaybeStartGpu(ModelEntry& m, int ordinal);
  void StartGpuLoad(ModelEntry& m, int ordinal);
  void CompleteGpu(Completion& c);
  void FailGpu(ModelEntry& m, int ordinal, const Status& error);
  void StartPin(ModelEntry& m);
  void CompletePin(Completion& c);

  // The cache policy.
  enum class Admitted { kStarted, kWaiting, kFailed };
  Admitted AdmitHost(ModelEntry& m);
  Admitted AdmitGpu(ModelEntry& m, int ordinal);
  void RetryAdmissions();
  std::vector<policy::Copy> HostCopies(const ModelEntry* except, std::vector<ModelEntry*>* owners);
  std::vector<policy::Copy> GpuCopies(int ordinal, const ModelEntry* except, std::vector<ModelEntry*>* owners);
  std::uint64_t HostUsed() const;
  std::size_t HostCount() const;
  std::uint64_t GpuUsed(int ordinal) const;
  std::size_t GpuCount(int ordinal) const;
  std::string Holders(const std::vector<policy::Copy>& copies, int ordinal) const;
  void EvictHost(ModelEntry& m, policy::EvictReason why);
  void EvictGpu(ModelEntry& m, int ordinal, policy::EvictReason why);
  void ForgetIndexUnlessHeld(ModelEntry& m);
  void EnforcePolicy(Clock::TimePoint now);
  void StartFileCheck();
  void CompleteFileCheck(Completion& c);
  void StartPreloads(ModelEntry& m, bool for_readiness);
  void PreloadDone(const std::string& key, const Status& s);
  void MaybeReady();
  std::string ServingStatus() const;  // "serving N models, L leases; failed preloads: ..."

  // Observability.
  std::string RenderMetrics() const;
  void HandleHttpCalls();
  HttpResponse AnswerHttp(const std::string& path);
  void AnswerWaiters(ModelEntry& m, std::vector<Waiter>& waiters, ModelState state, const Status& error);
  void PostCompletion(Completion c);
  // Unregistering takes time too: done on a GPU worker, never on the loop. `host` keeps the
  // pinned mappings until they are unregistered.
  // Frees what the loop let go of: unpins host pages, unlinks (`unlink`) and unmaps segments,
  // releases GPU copies. For a model of many GB these take from tens of milliseconds to seconds,
  // which the loop must not spend; the reaper thread does them in order. Page-lock handles go
  // first, while the pages are still mapped.
  void Dispose(std::shared_ptr<const ResidentModel> host, std::vector<std::shared_ptr<const void>> pins, bool unlink,
               std::vector<std::shared_ptr<gpu::GpuCopy>> gpu_copies = {}) {
    // Until the reaper has freed them, the budgets count these bytes (AdmitHost, AdmitGpu).
    std::uint64_t host_bytes = 0;
    if (host && unlink)
      for (const ResidentShard& sh : host->shards) host_bytes += sh.segment.mapped_size();
    std::vector<std::pair<int, std::uint64_t>> gpu_bytes;
    for (const auto& c : gpu_copies) gpu_bytes.emplace_back(c->ordinal(), c->allocated_bytes());
    reaping_host += host_bytes;
    for (auto [ordinal, bytes] : gpu_bytes) reaping_gpu[static_cast<std::size_t>(ordinal)] += bytes;
    auto job = [this, h = std::move(host), p = std::move(pins), unlink, g = std::move(gpu_copies), host_bytes,
                gpu_bytes]() mutable {
      p.clear();
      if (h && unlink) h->RemoveSegments();
      h.reset();
      g.clear();
      reaping_host -= host_bytes;
      for (auto [ordinal, bytes] : gpu_bytes) reaping_gpu[static_cast<std::size_t>(ordinal)] -= bytes;
      if (host_bytes > 0 || !gpu_bytes.empty()) {
        Completion c;
        c.kind = Completion::kReaped;
        PostCompletion(std::move(c));
      }
    };
    if (!reap_jobs.Submit(job)) job();
  }
  void ReleasePins(std::vector<std::shared_ptr<const void>> pins, std::shared_ptr<const ResidentModel> host) {
    Dispose(std::move(host), std::move(pins), /*unlink=*/false);
  }
  proto::ReplyBody GrantLease(Session& s, ModelEntry& m, const proto::Acquire& req, int ordinal);
  void AcceptFdClients();
  void ServeFdClient(int fd);
  void ExpireFdState(Clock::TimePoint now);
  Result<std::vector<posix::Fd>> LeaseFds(const PendingFds& p);
  void CloseFdClient(int fd);
  proto::ModelStatus StatusOf(const ModelEntry& m) const;
  proto::DaemonStats StatsNow() const;
  void DropResident(ModelEntry& m);
  void AdoptPrevious();
  void AdoptStoredGpuCopies();
  void StoreGpuCopy(ModelEntry& m, GpuEntry& g);
  // sd_notify goes to a service manager that keeps fds for us.
  bool FdStoreEnabled() const {
    return config.gpu_fd_store && gpu_mode == gpu::ExportMode::kVmm && std::getenv("NOTIFY_SOCKET") != nullptr;
  }
  void InstallHost(ModelEntry& m, std::shared_ptr<ResidentModel> r);
  void BuildIndex(ModelEntry& m, const std::vector<std::string>& files, const std::vector<st::Header>& headers,
                  const std::vector<std::string>& shm_paths);
  void Notify(const std::string& state) { sd_notify(0, state.c_str()); }
  // True once the session's process has exited: its pidfd is readable, or (without a pidfd) the
  // process with its pid started at another time, or is gone.
  static bool PeerGone(const Session& s) {
    if (s.pidfd.valid()) {
      pollfd p{s.pidfd.get(), POLLIN, 0};
      return ::poll(&p, 1, 0) > 0 && (p.revents & POLLIN) != 0;
    }
    return s.start_time != 0 && auth::ProcessStartTime(s.peer.pid) != s.start_time;
  }

  // The socket, its directory (when the daemon made it) and the fd socket belong to the client
  // group, whose members alone may connect (with the 0750/0660 modes).
  Status GiveToClientGroup(const std::string& path) {
    if (::chown(path.c_str(), static_cast<uid_t>(-1), policy.client_gid()) == 0) return Status::Ok();
    return FailedPrecondition("giving " + path + " to the client group (gid " + std::to_string(policy.client_gid()) +
                                  "): " + std::strerror(errno) + "; the daemon's user must be a member of daemon.client_group",
                              "daemon.client_group");
  }
  // PermissionDenied unless `who` is an admin.
  std::optional<proto::ReplyBody> DenyUnlessAdmin(const auth::Identity& who, const char* what) const {
    if (policy.IsAdmin(who)) return std::nullopt;
    return proto::ToErrorReply(PermissionDenied(std::string(what) + " is an admin operation: " + who.ToString() +
                                                    " is neither root, the daemon's user nor in daemon.admin_group",
                                                "auth.admin_only"));
  }
  std::optional<proto::ReplyBody> DenyModel(const auth::Identity& who, const std::string& model) const {
    if (policy.MayAcquire(who, model)) return std::nullopt;
    return proto::ToErrorReply(PermissionDenied(who.ToString() + " may not use model '" + model +
                                                    "' (its allow_users and allow_groups do not include it)",
                                                "auth.model_denied"));
  }
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
      RETURN_IF_ERROR(GiveToClientGroup(dir.string()));
    }
  }
  RETURN_IF_ERROR(CheckSocketPaths(dir.empty() ? std::string(".") : dir.string(),
                                   {socket_path, socket_path + ".lock", config.fd_socket}));
  ASSIGN_OR_RETURN(socket_lock, LockFile(socket_path + ".lock", "the socket " + socket_path));
  RETURN_IF_ERROR(store.Lock());

  try {
    router = zmq::socket_t(ctx, zmq::socket_type::router);
    // Every connection passes the ZAP handler, which stamps it with the peer's credentials; with
    // enforcement, no handler means no connection (fail closed).
    router.set(zmq::sockopt::zap_domain, "weightd");
    // ZMQ_ZAP_ENFORCE_DOMAIN is a draft option in libzmq 4.3 (93 there). Where the library lacks
    // it, a missing handler would let connections through unstamped, and Dispatch refuses every
    // message without the handler's User-Id: closed either way.
    const int enforce = 1;
    if (zmq_setsockopt(router.handle(), kZmqZapEnforceDomain, &enforce, sizeof enforce) != 0)
      spdlog::info("libzmq lacks ZMQ_ZAP_ENFORCE_DOMAIN ({}); unstamped messages are refused instead",
                   zmq_strerror(zmq_errno()));
    router.set(zmq::sockopt::linger, 0);
    router.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(config.max_message_size));
    router.set(zmq::sockopt::router_mandatory, 1);
    router.set(zmq::sockopt::sndhwm, 1000);
    router.set(zmq::sockopt::rcvhwm, 1000);
    // A connection that does not finish its ZMTP handshake (a half-open one) is dropped after
    // this long (libzmq's default is 30 s).
    router.set(zmq::sockopt::handshake_ivl, static_cast<int>(kHandshakeTimeout.count()));
  } catch (const zmq::error_t& e) {
    return Internal("setting up the socket " + config.socket + ": " + e.what(), "daemon.bind_failed");
  }
  // The handler, and its count of each user's connections, must be up before the first one.
  ASSIGN_OR_RETURN(zap, auth::ZapHandler::Start(ctx, router, socket_path, config.max_connections_per_user));
  try {
    ::unlink(socket_path.c_str());  // stale socket of a dead instance: we hold its lock
    router.bind(config.socket);
  } catch (const zmq::error_t& e) {
    return Unavailable("binding " + config.socket + ": " + e.what(), "daemon.bind_failed");
  }
  ::chmod(socket_path.c_str(), 0660);
  RETURN_IF_ERROR(GiveToClientGroup(socket_path));

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
  {
    // Host segments (and VMM exports) reach clients as fds over this socket.
    auto listener = fdchan::FdListener::Bind(config.fd_socket, 0660);
    if (!listener.ok()) return listener.status().WithContext("binding the fd socket");
    fd_listener.emplace(std::move(listener).value());
    RETURN_IF_ERROR(GiveToClientGroup(config.fd_socket));
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

  // Budgets: fractions resolve against the memory there is.
  auto host_mem = memory->Host();
  if (host_mem.ok()) {
    host_total = host_mem->total;
  } else {
    spdlog::warn("cannot read the host's memory ({}); using the physical page count", host_mem.status().ToString());
    host_total = static_cast<std::uint64_t>(::sysconf(_SC_PHYS_PAGES)) * posix::PageSize();
  }
  host_budget = config.cache.host_budget.Resolve(host_total);
  spdlog::info("host budget {} ({} of {})", Gib(host_budget), config.cache.host_budget.ToString(), Gib(host_total));
  if (gpu_available())
    for (const auto& d : gpu->Devices()) {
      gpu_budget[d.ordinal] = config.cache.gpu_budget.Resolve(d.total_bytes);
      spdlog::info("{} budget {} ({} of {})", CudaName(d.ordinal), Gib(gpu_budget[d.ordinal]),
                   config.cache.gpu_budget.ToString(), Gib(d.total_bytes));
    }

  ApplyCatalog(config.models);
  AdoptPrevious();
  AdoptStoredGpuCopies();
  for (auto& [name, m] : models) StartPreloads(m, true);
  if (!preloads.empty()) Notify("STATUS=preloading " + std::to_string(preloads.size()) + " copies");

  if (!config.http_listen.empty()) {
    auto h = HttpServer::Start(config.http_listen, [this](const std::string& path) {
      auto call = std::make_shared<HttpCall>();
      call->path = path;
      std::future<HttpResponse> answer = call->reply.get_future();
      {
        std::lock_guard lock(http_mu);
        http_calls.push_back(call);
      }
      std::uint64_t one = 1;
      (void)!::write(event_fd.get(), &one, sizeof one);
      // A loop that does not answer is itself the health check's answer.
      if (answer.wait_for(std::chrono::seconds(2)) != std::future_status::ready)
        return HttpResponse{503, "text/plain", "the daemon's loop did not answer within 2 s\n"};
      try {
        return answer.get();
      } catch (const std::future_error&) {
        return HttpResponse{503, "text/plain", "the daemon is stopping\n"};
      }
    });
    if (!h.ok()) return h.status();
    http = std::move(h).value();
    spdlog::info("HTTP on {} (/healthz, /readyz, /metrics)", config.http_listen);
  }
  if (sd_watchdog_enabled(0, &watchdog_usec) <= 0) watchdog_usec = 0;
  spdlog::info("weightd {} listening on {} (segment prefix '{}', {} models, {} loader threads, {} MiB chunks)",
               WEIGHTD_VERSION, config.socket, config.shm_prefix, catalog.models().size(), config.loader_threads,
               config.chunk_size >> 20);
  return Status::Ok();
}

Status Server::Impl::Loop() {
  MaybeReady();
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
      EnforcePolicy(now);
      if (!admissions.empty()) retry_admissions = true;  // deadlines
      if (config.cache.file_check_interval.count() > 0 && !file_check_running &&
          now - last_file_check >= config.cache.file_check_interval) {
        last_file_check = now;
        StartFileCheck();
      }
    }
    if (retry_admissions) RetryAdmissions();
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
  // Who sent this: the credentials the ZAP handler stamped on the connection, never the request.
  const auth::Identity who = auth::IdentityOf(payload);
  if (!who.known) {
    SendError(rid, id, PermissionDenied("no peer credentials on this connection", "auth.no_credentials"));
    return;
  }
  Session* s = leases.Find(rid);
  // A session whose process has exited ends now, even if its pidfd event is still queued: a
  // process that got the pid since must not inherit it.
  if (s != nullptr && PeerGone(*s)) {
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
          if (models.count(body.model) != 0)
            if (auto denied = DenyModel(who, body.model)) return denied;
          return OnAcquire(*s, id, body);
        } else if constexpr (std::is_same_v<T, proto::Release>) {
          return OnRelease(*s, body);
        } else if constexpr (std::is_same_v<T, proto::Heartbeat>) {
          return proto::OkReply{};
        } else if constexpr (std::is_same_v<T, proto::List>) {
          proto::ModelList list;  // only the models this peer may use
          for (const auto& [name, m] : models)
            if (policy.MayAcquire(who, name)) list.models.push_back(StatusOf(m));
          return list;
        } else if constexpr (std::is_same_v<T, proto::StatusRequest>) {
          auto it = models.find(body.model);
          if (it == models.end())
            return proto::ToErrorReply(NotFound("model '" + body.model + "' is not in the catalog", "catalog.unknown_model"));
          if (auto denied = DenyModel(who, body.model)) return denied;
          return StatusOf(it->second);
        } else if constexpr (std::is_same_v<T, proto::Load>) {
          if (auto denied = DenyUnlessAdmin(who, "load")) return denied;
          return OnLoad(*s, id, body);
        } else if constexpr (std::is_same_v<T, proto::Evict>) {
          if (auto denied = DenyUnlessAdmin(who, "evict")) return denied;
          return OnEvict(body);
        } else if constexpr (std::is_same_v<T, proto::Stats>) {
          if (auto denied = DenyUnlessAdmin(who, "stats")) return denied;
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
                                                       const auth::Identity& who) {
  if (!policy.MayConnect(who)) {
    spdlog::warn("refused a session for {}: not in the client group, an admin or in any model's ACL", who.ToString());
    return proto::ToErrorReply(PermissionDenied(who.ToString() + " may not use this daemon: it is not in daemon.client_group "
                                                                 "(gid " + std::to_string(policy.client_gid()) +
                                                    "), an admin, or allowed any model",
                                                "auth.not_a_client"));
  }
  const PeerCred peer{who.uid, who.gid, who.pid};
  const bool fresh = leases.Find(rid) == nullptr;
  if (fresh && leases.SessionsOf(who.uid) >= config.max_sessions_per_user)
    return proto::ToErrorReply(ResourceExhausted("uid " + std::to_string(who.uid) + " already holds " +
                                                     std::to_string(config.max_sessions_per_user) +
                                                     " sessions, daemon.max_sessions_per_user; close some first",
                                                 "limits.sessions_per_user"));
  auto s = leases.Open(rid, m.client_name, peer, clock->Now());
  if (!s.ok()) return proto::ToErrorReply(s.status());
  Session& session = **s;
  if (fresh && peer.pid > 0) {
    // A pidfd turns readable when the process exits: death is noticed at once, not after the
    // heartbeat timeout, and a later process with the same pid is not this one.
    int pfd = static_cast<int>(::syscall(SYS_pidfd_open, peer.pid, 0));
    if (pfd < 0 && errno == ESRCH) {
      EndSession(session.id, "the process exited during its handshake");
      return proto::ToErrorReply(FailedPrecondition("the connecting process has exited", "auth.peer_gone"));
    }
    if (pfd >= 0) {
      ::fcntl(pfd, F_SETFD, FD_CLOEXEC);
      session.pidfd.reset(pfd);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = kTagPid | session.id;
      if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, pfd, &ev) != 0) session.pidfd.reset();
    } else {
      spdlog::debug("pidfd_open({}) failed: {}; relying on heartbeats and the start time", peer.pid, std::strerror(errno));
    }
    if (!session.pidfd.valid()) session.start_time = auth::ProcessStartTime(peer.pid);
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
    if (e.state == ModelState::kResident) {
      ++host_metrics.hits;
      return GrantLease(s, e, m, -1);
    }
    if (s.pending >= config.max_leases_per_client) return proto::ToErrorReply(too_many);
    ++host_metrics.misses;
    ++s.pending;
    e.waiters.push_back(std::move(w));
    if (e.state != ModelState::kLoading) StartLoad(e);
    return std::nullopt;
  }
  GpuEntry& g = e.gpus[ordinal];
  if (g.state == ModelState::kResident) {
    ++gpu_metrics.hits;
    return GrantLease(s, e, m, ordinal);
  }
  if (s.pending >= config.max_leases_per_client) return proto::ToErrorReply(too_many);
  ++gpu_metrics.misses;
  ++s.pending;
  g.waiters.push_back(std::move(w));
  RequestGpu(e, ordinal);
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
  // Its unused token goes too: the pending tokens stay bounded by the live leases.
  std::erase_if(pending_fds, [&](const auto& kv) { return kv.second.session_id == s.id && kv.second.lease_id == m.lease_id; });
  TouchCopy(r->model, r->device, clock->Now());
  retry_admissions = true;
  return proto::OkReply{};
}

proto::ReplyBody Server::Impl::OnEvict(const proto::Evict& m) {
  auto it = models.find(m.model);
  if (it == models.end())
    return proto::ToErrorReply(NotFound("model '" + m.model + "' is not in the catalog", "catalog.unknown_model"));
  ModelEntry& e = it->second;
  // Which tiers: every one, the host only, or one GPU.
  const bool all = m.device.empty();
  const bool host = all || m.device == "cpu";
  std::vector<int> ordinals;
  if (all) {
    for (const auto& [ordinal, g] : e.gpus) ordinals.push_back(ordinal);
  } else if (!host) {
    if (gpu == nullptr) return proto::ToErrorReply(Unavailable("this daemon has no GPU tier", "gpu.no_device"));
    auto o = gpu->ResolveDevice(m.device);
    if (!o.ok()) return proto::ToErrorReply(o.status());
    ordinals.push_back(*o);
  }
  const std::uint32_t held =
      all ? leases.LeasesOf(m.model) : leases.LeasesOf(m.model, host ? "cpu" : CudaName(ordinals.front()));
  if (held > 0)
    return proto::ToErrorReply(FailedPrecondition("model '" + m.model + "' has " + std::to_string(held) +
                                                      (held == 1 ? " live lease" : " live leases") +
                                                      (all ? "" : " on " + m.device) +
                                                      "; it cannot be evicted until they are released",
                                                  "evict.leased"));
  // The host copy also stays while any GPU copy is being made from it.
  bool busy = host && e.Busy();
  if (!host) {
    auto g = e.gpus.find(ordinals.front());
    busy = g != e.gpus.end() && g->second.state == ModelState::kLoading;
  }
  if (busy)
    return proto::ToErrorReply(FailedPrecondition("model '" + m.model + "' is loading; evict it once the load finishes",
                                                  "evict.loading"));
  for (int o : ordinals)
    if (e.gpus.count(o)) EvictGpu(e, o, policy::EvictReason::kAdmin);
  if (host && e.resident) EvictHost(e, policy::EvictReason::kAdmin);
  if (host && e.state == ModelState::kFailed) e.state = ModelState::kAbsent;
  retry_admissions = true;
  return proto::OkReply{};
}

// Drops every tier's copy. GPU copies that a lease still pins (after a catalog change) live on
// in the lease table until their leases end.
void Server::Impl::DropResident(ModelEntry& m) {
  std::vector<std::shared_ptr<gpu::GpuCopy>> copies;
  for (auto& [ordinal, g] : m.gpus)
    if (g.copy) copies.push_back(std::move(g.copy));
  Dispose(std::move(m.resident), std::move(m.host_pins), /*unlink=*/true, std::move(copies));
  m.host_pins.clear();
  m.resident.reset();
  m.pinning = false;
  m.files.reset();
  m.shard_sizes.clear();
  m.plan.reset();
  m.progress.reset();
  m.host_reserved = 0;
  m.phase = Phase::kIdle;
  m.segments.clear();
  m.tensors.clear();
  m.tensor_index.clear();
  m.gpus.clear();
  std::erase_if(admissions, [&](const Ticket& t) { return t.model == m.config.name; });
}

// GPU leases still need the tensor records after the host copy went: they, the files'
// fingerprint and the shard sizes go with the last copy.
void Server::Impl::ForgetIndexUnlessHeld(ModelEntry& m) {
  if (m.resident || !m.gpus.empty() || m.state == ModelState::kLoading) return;
  m.segments.clear();
  m.tensors.clear();
  m.tensor_index.clear();
  m.files.reset();
  m.shard_sizes.clear();
}

void Server::Impl::EvictHost(ModelEntry& m, policy::EvictReason why) {
  if (!m.resident) return;
  spdlog::info("evicting model '{}' from the host tier ({} bytes, {})", m.config.name, m.host_bytes, policy::ReasonName(why));
  ++host_metrics.evictions[std::string(policy::ReasonName(why))];
  Dispose(std::move(m.resident), std::move(m.host_pins), /*unlink=*/true);
  m.host_pins.clear();
  m.resident.reset();
  m.pinning = false;
  m.state = ModelState::kAbsent;
  ForgetIndexUnlessHeld(m);
}

void Server::Impl::EvictGpu(ModelEntry& m, int ordinal, policy::EvictReason why) {
  auto it = m.gpus.find(ordinal);
  if (it == m.gpus.end()) return;
  if (it->second.copy) {
    spdlog::info("evicting model '{}' from {} ({} bytes, {})", m.config.name, CudaName(ordinal),
                 it->second.copy->allocated_bytes(), policy::ReasonName(why));
    ++gpu_metrics.evictions[std::string(policy::ReasonName(why))];
  }
  // The copy is freed once no lease pins it (none does: only unleased copies are evicted, or
  // leases of a dropped catalog entry, which keep theirs), on the reaper.
  if (it->second.copy) Dispose(nullptr, {}, false, {std::move(it->second.copy)});
  m.gpus.erase(it);
  ForgetIndexUnlessHeld(m);
}

void Server::Impl::PostCompletion(Completion c) {
  {
    std::lock_guard lock(completions_mu);
    completions.push_back(std::move(c));
  }
  std::uint64_t one = 1;
  (void)!::write(event_fd.get(), &one, sizeof one);
}

// Phase 1 of a host load: read the headers on a worker, so that the bytes it needs are known
// before any memory is taken.
void Server::Impl::StartLoad(ModelEntry& m) {
  if (m.resident) {
    // A second copy would replace this one without unlinking its segments.
    spdlog::error("model '{}': a load was asked for while a host copy is resident; ignored", m.config.name);
    return;
  }
  m.state = ModelState::kLoading;
  m.phase = Phase::kPlanning;
  m.generation = next_generation++;
  m.cancel = std::make_shared<std::atomic<bool>>(false);
  m.waiting_for.clear();
  Notify("STATUS=loading model '" + m.config.name + "'");
  spdlog::info("loading model '{}' from {}", m.config.name, m.config.dir);
  ModelConfig mc = m.config;
  const std::uint64_t gen = m.generation;
  bool ok = jobs.Submit([this, mc, gen] {
    const auto t0 = std::chrono::steady_clock::now();
    Completion c;
    c.kind = Completion::kPlan;
    c.model = mc.name;
    c.generation = gen;
    try {
      auto plan = loader.Plan(mc);
      if (plan.ok()) c.plan = std::make_shared<LoadPlan>(std::move(plan).value());
      else c.status = plan.status();
    } catch (const std::exception& e) {  // bad_alloc of a huge header, and the like
      c.status = Internal(std::string("loading failed: ") + e.what(), "load.exception");
    }
    c.ms = ToMs(std::chrono::steady_clock::now() - t0);
    PostCompletion(std::move(c));
  });
  if (!ok) FailHostLoad(m, Unavailable("the daemon is shutting down", "daemon.stopping"));
}

void Server::Impl::OnPlanned(Completion& c) {
  auto it = models.find(c.model);
  if (it == models.end() || it->second.generation != c.generation || it->second.phase != Phase::kPlanning) return;
  ModelEntry& m = it->second;
  if (c.plan == nullptr) {
    FailHostLoad(m, c.status);
    return;
  }
  m.plan = std::move(c.plan);
  m.plan_ms = c.ms;
  m.host_bytes = 0;
  m.shard_sizes.clear();
  for (const PlannedShard& sh : m.plan->shards) {
    m.host_bytes += posix::RoundUp(sh.header.data_size, posix::PageSize());
    m.shard_sizes.push_back(sh.header.data_size);
  }
  m.phase = Phase::kAdmitting;
  m.admission_deadline = clock->Now() + config.cache.admission_timeout;
  if (AdmitHost(m) == Admitted::kWaiting) {
    spdlog::info("model '{}' waits for room: {}", m.config.name, m.waiting_for);
    admissions.push_back(Ticket{m.config.name, -1});
  }
}

std::uint64_t Server::Impl::HostUsed() const {
  std::uint64_t used = 0;
  for (const auto& [name, m] : models) used += (m.resident ? m.host_bytes : 0) + m.host_reserved;
  return used;
}

std::size_t Server::Impl::HostCount() const {
  std::size_t n = 0;
  for (const auto& [name, m] : models) n += (m.resident || m.host_reserved > 0) ? 1 : 0;
  return n;
}

std::uint64_t Server::Impl::GpuUsed(int ordinal) const {
  std::uint64_t used = 0;
  for (const auto& [name, m] : models) {
    auto g = m.gpus.find(ordinal);
    if (g != m.gpus.end()) used += (g->second.copy ? g->second.copy->allocated_bytes() : 0) + g->second.reserved;
  }
  return used;
}

std::size_t Server::Impl::GpuCount(int ordinal) const {
  std::size_t n = 0;
  for (const auto& [name, m] : models) {
    auto g = m.gpus.find(ordinal);
    if (g != m.gpus.end() && (g->second.copy || g->second.reserved > 0)) ++n;
  }
  return n;
}

std::vector<policy::Copy> Server::Impl::HostCopies(const ModelEntry* except, std::vector<ModelEntry*>* owners) {
  std::vector<policy::Copy> out;
  for (auto& [name, m] : models) {
    if (&m == except || !m.resident) continue;
    policy::Copy c;
    c.model = name;
    c.bytes = m.host_bytes;
    c.evictable = !m.config.pin && m.state == ModelState::kResident && !m.GpuLoading() && leases.LeasesOf(name, "cpu") == 0;
    c.priority = m.config.priority;
    c.last_used = m.last_used;
    c.idle_ttl = m.config.host_idle_ttl.value_or(config.cache.host_idle_ttl);
    out.push_back(std::move(c));
    owners->push_back(&m);
  }
  return out;
}

std::vector<policy::Copy> Server::Impl::GpuCopies(int ordinal, const ModelEntry* except, std::vector<ModelEntry*>* owners) {
  std::vector<policy::Copy> out;
  for (auto& [name, m] : models) {
    if (&m == except) continue;
    auto g = m.gpus.find(ordinal);
    if (g == m.gpus.end() || !g->second.copy) continue;
    policy::Copy c;
    c.model = name;
    c.bytes = g->second.copy->allocated_bytes();
    c.evictable = !m.config.pin && g->second.state == ModelState::kResident && leases.LeasesOf(name, CudaName(ordinal)) == 0;
    c.priority = m.config.priority;
    c.last_used = g->second.last_used;
    c.idle_ttl = m.config.gpu_idle_ttl.value_or(config.cache.gpu_idle_ttl);
    out.push_back(std::move(c));
    owners->push_back(&m);
  }
  return out;
}

// "a (3.0 GiB, 2 leases), b (4.5 GiB, pinned)": what holds a tier that cannot make room.
std::string Server::Impl::Holders(const std::vector<policy::Copy>& copies, int ordinal) const {
  std::string out;
  for (const policy::Copy& c : copies) {
    if (!out.empty()) out += ", ";
    out += c.model + " (" + Gib(c.bytes);
    auto it = models.find(c.model);
    const std::uint32_t n = leases.LeasesOf(c.model, ordinal < 0 ? "cpu" : CudaName(ordinal));
    if (n > 0) out += ", " + std::to_string(n) + (n == 1 ? " lease" : " leases");
    if (it != models.end() && it->second.config.pin) out += ", pinned";
    if (it != models.end() && it->second.config.priority != 0) out += ", priority " + std::to_string(it->second.config.priority);
    out += ")";
  }
  return out.empty() ? "nothing evictable" : out;
}

Server::Impl::Admitted Server::Impl::AdmitHost(ModelEntry& m) {
  std::vector<ModelEntry*> owners;
  std::vector<policy::Copy> copies = HostCopies(&m, &owners);
  const std::size_t cap = config.cache.max_host_models;
  policy::Admission a = policy::Admit(copies, HostUsed(), HostCount(), m.host_bytes, m.config.priority, host_budget, cap);
  if (!a.fits) {
    const std::string budget = "the host budget of " + Gib(host_budget) + " (" + config.cache.host_budget.ToString() + ")";
    if (m.host_bytes > host_budget) {
      FailHostLoad(m, ResourceExhausted("model '" + m.config.name + "' needs " + Gib(m.host_bytes) + ", more than " + budget,
                                        "cache.too_large"));
      return Admitted::kFailed;
    }
    m.waiting_for = "needs " + Gib(m.host_bytes) + " of " + budget + (cap ? " and a slot of " + std::to_string(cap) : "") +
                    "; " + Gib(HostUsed()) + " held by " + Holders(copies, -1);
    return Admitted::kWaiting;
  }
  for (std::size_t i : a.victims) EvictHost(*owners[i], policy::EvictReason::kLru);
  // Evicted copies still hold their memory until the reaper has freed them (milliseconds to
  // seconds); the budget holds for what is really in /dev/shm, so wait for it.
  if (const std::uint64_t freeing = reaping_host.load(); HostUsed() + freeing + m.host_bytes > host_budget) {
    m.waiting_for = "waits for " + Gib(freeing) + " of evicted copies to be freed";
    return Admitted::kWaiting;
  }
  m.host_reserved = m.host_bytes;
  m.waiting_for.clear();
  StartFill(m);
  return Admitted::kStarted;
}

Server::Impl::Admitted Server::Impl::AdmitGpu(ModelEntry& m, int ordinal) {
  GpuEntry& g = m.gpus.at(ordinal);
  const std::uint64_t need = gpu->AllocationBytes(ordinal, m.shard_sizes);
  const std::uint64_t budget = gpu_budget.at(ordinal);
  std::vector<ModelEntry*> owners;
  std::vector<policy::Copy> copies = GpuCopies(ordinal, &m, &owners);
  const std::size_t cap = config.cache.max_gpu_models;
  policy::Admission a = policy::Admit(copies, GpuUsed(ordinal), GpuCount(ordinal), need, m.config.priority, budget, cap);
  if (!a.fits) {
    const std::string what = "the " + CudaName(ordinal) + " budget of " + Gib(budget) + " (" + config.cache.gpu_budget.ToString() + ")";
    if (need > budget) {
      FailGpu(m, ordinal, ResourceExhausted("model '" + m.config.name + "' needs " + Gib(need) + " on " + CudaName(ordinal) +
                                                ", more than " + what,
                                            "cache.too_large"));
      return Admitted::kFailed;
    }
    g.waiting_for = "needs " + Gib(need) + " of " + what + (cap ? " and a slot of " + std::to_string(cap) : "") + "; " +
                    Gib(GpuUsed(ordinal)) + " held by " + Holders(copies, ordinal);
    return Admitted::kWaiting;
  }
  for (std::size_t i : a.victims) EvictGpu(*owners[i], ordinal, policy::EvictReason::kLru);
  if (const std::uint64_t freeing = reaping_gpu[static_cast<std::size_t>(ordinal)].load();
      GpuUsed(ordinal) + freeing + need > budget) {
    g.waiting_for = "waits for " + Gib(freeing) + " of evicted copies to be freed";
    return Admitted::kWaiting;
  }
  g.reserved = need;
  g.waiting_for.clear();
  StartGpuLoad(m, ordinal);
  return Admitted::kStarted;
}

void Server::Impl::RetryAdmissions() {
  retry_admissions = false;
  const auto now = clock->Now();
  for (auto it = admissions.begin(); it != admissions.end();) {
    auto m_it = models.find(it->model);
    if (m_it == models.end()) {
      it = admissions.erase(it);
      continue;
    }
    ModelEntry& m = m_it->second;
    Admitted r = Admitted::kFailed;  // no longer waiting: drop the ticket
    if (it->ordinal < 0) {
      if (m.phase == Phase::kAdmitting) {
        r = AdmitHost(m);
        if (r == Admitted::kWaiting && now >= m.admission_deadline) {
          FailHostLoad(m, ResourceExhausted("model '" + m.config.name + "' waited " +
                                                std::to_string(config.cache.admission_timeout.count()) + " ms for room: it " +
                                                m.waiting_for,
                                            "cache.budget_exhausted"));
          r = Admitted::kFailed;
        }
      }
    } else {
      auto g = m.gpus.find(it->ordinal);
      if (g != m.gpus.end() && g->second.phase == Phase::kAdmitting) {
        r = AdmitGpu(m, it->ordinal);
        if (r == Admitted::kWaiting && now >= g->second.admission_deadline) {
          FailGpu(m, it->ordinal,
                  ResourceExhausted("model '" + m.config.name + "' waited " +
                                        std::to_string(config.cache.admission_timeout.count()) + " ms for room on " +
                                        CudaName(it->ordinal) + ": it " + g->second.waiting_for,
                                    "cache.budget_exhausted"));
          r = Admitted::kFailed;
        }
      }
    }
    if (r == Admitted::kWaiting) ++it;
    else it = admissions.erase(it);
  }
}

// Phase 3 of a host load: the data, read into fresh segments by the loader's readers. GPU
// copies already asked for start at once and follow the reads chunk by chunk.
void Server::Impl::StartFill(ModelEntry& m) {
  m.phase = Phase::kWorking;
  m.progress = std::make_shared<LoadProgress>();
  std::vector<std::string> files, shm_paths;
  std::vector<st::Header> headers;
  for (std::size_t i = 0; i < m.plan->shards.size(); ++i) {
    files.push_back(m.plan->shards[i].file);
    headers.push_back(m.plan->shards[i].header);
    shm_paths.push_back("/" + loader.SegmentName(m.config.name, m.generation, i));
  }
  // The tensor index is known from the headers already, and stays as the fill completes.
  BuildIndex(m, files, headers, shm_paths);
  const std::uint64_t gen = m.generation;
  const std::string name = m.config.name;
  auto cancel = m.cancel;
  auto progress = m.progress;
  std::shared_ptr<LoadPlan> plan = std::move(m.plan);
  const std::uint64_t plan_ms = m.plan_ms;
  bool ok = jobs.Submit([this, plan, gen, name, cancel, progress, plan_ms] {
    const auto t0 = std::chrono::steady_clock::now();
    Completion c;
    c.kind = Completion::kFill;
    c.model = name;
    c.generation = gen;
    try {
      c.result = loader.Fill(std::move(*plan), gen, *cancel, progress);
    } catch (const std::exception& e) {
      c.result = Internal(std::string("loading failed: ") + e.what(), "load.exception");
    }
    c.ms = plan_ms + ToMs(std::chrono::steady_clock::now() - t0);
    PostCompletion(std::move(c));
  });
  if (!ok) {
    FailHostLoad(m, Unavailable("the daemon is shutting down", "daemon.stopping"));
    return;
  }
  for (auto& [ordinal, g] : m.gpus)
    if (g.state == ModelState::kLoading && g.phase == Phase::kWaitHost) MaybeStartGpu(m, ordinal);
}

void Server::Impl::BuildIndex(ModelEntry& m, const std::vector<std::string>& files, const std::vector<st::Header>& headers,
                              const std::vector<std::string>& shm_paths) {
  m.segments.clear();
  m.tensors.clear();
  m.tensor_index.clear();
  for (std::size_t i = 0; i < headers.size(); ++i) {
    const st::Header& h = headers[i];
    m.segments.push_back(proto::SegmentInfo{shm_paths[i], posix::RoundUp(h.data_size, posix::PageSize()), h.data_size,
                                            files[i], h.data_offset, 0, {}});
    for (const auto& t : h.tensors) {
      m.tensor_index[t.name] = m.tensors.size();
      m.tensors.push_back(proto::TensorRecord{t.name, static_cast<std::uint8_t>(t.dtype), t.shape,
                                              static_cast<std::uint32_t>(i), t.begin, t.nbytes()});
    }
  }
}

void Server::Impl::FailHostLoad(ModelEntry& m, const Status& error) {
  ++loads_failed;
  ++host_metrics.loads_failed;
  ++host_metrics.errors[ErrorLabel(error)];
  m.state = ModelState::kFailed;
  m.phase = Phase::kIdle;
  m.last_error = error;
  m.cancel.reset();
  m.plan.reset();
  m.progress.reset();
  m.host_reserved = 0;
  m.waiting_for.clear();
  spdlog::error("model '{}' failed to load: {}", m.config.name, error.ToString());
  std::vector<Waiter> waiters;
  waiters.swap(m.waiters);
  AnswerWaiters(m, waiters, ModelState::kFailed, error);
  // GPU copies that waited for this host copy fail with it, and so do pipelined ones, even if
  // every byte already reached the GPU: those bytes did not verify.
  for (auto& [ordinal, g] : m.gpus) {
    if (g.state != ModelState::kLoading || !(g.phase == Phase::kWaitHost || g.pipelined)) continue;
    g.stashed.reset();
    FailGpu(m, ordinal, error);
  }
  if (!m.resident && m.gpus.empty()) {
    m.segments.clear();
    m.tensors.clear();
    m.tensor_index.clear();
  }
  if (m.preload_host) PreloadDone(m.config.name + "/host", error);
  m.preload_host = false;
  retry_admissions = true;
}

void Server::Impl::HandleCompletions() {
  std::deque<Completion> batch;
  {
    std::lock_guard lock(completions_mu);
    batch.swap(completions);
  }
  if (batch.empty()) return;  // woken for something else (an HTTP call, Stop)
  for (Completion& c : batch) {
    switch (c.kind) {
      case Completion::kPlan: OnPlanned(c); break;
      case Completion::kFill: Complete(c); break;
      case Completion::kGpu: CompleteGpu(c); break;
      case Completion::kPin: CompletePin(c); break;
      case Completion::kCheck: CompleteFileCheck(c); break;
      case Completion::kReaped: break;  // memory came back: the admissions are retried below
    }
  }
  retry_admissions = true;
  if (ready) Notify("STATUS=" + ServingStatus());
}

void Server::Impl::Complete(Completion& c) {
  auto it = models.find(c.model);
  if (it == models.end() || it->second.generation != c.generation || it->second.phase != Phase::kWorking) {
    // The model was removed, changed or evicted while loading: the result is nobody's.
    if (c.result.ok()) Dispose(std::move(c.result).value(), {}, /*unlink=*/true);
    return;
  }
  ModelEntry& m = it->second;
  m.progress.reset();
  if (!c.result.ok()) {
    FailHostLoad(m, c.result.status());
    return;
  }
  std::shared_ptr<ResidentModel> r = std::move(c.result).value();
  m.cancel.reset();
  m.host_reserved = 0;
  m.phase = Phase::kIdle;
  ++loads_ok;
  ++m.loads;
  ++host_metrics.loads_ok;
  host_metrics.bytes += r->bytes;
  host_metrics.durations.Observe(static_cast<double>(c.ms) / 1000.0);
  m.last_load_ms = c.ms;
  m.last_error = Status::Ok();
  // The index StartFill built from the plan already describes these segments.
  ModelRecord record = RecordOf(*r, store.RecordName(m.config.name, m.generation), m.generation);
  if (Status s = store.WriteRecord(record); s.ok())
    r->record = record.name;
  else
    spdlog::warn("model '{}': no adoption record ({}); after a crash it is read from disk again", m.config.name,
                 s.ToString());
  InstallHost(m, std::move(r));
  const double secs = std::max<double>(static_cast<double>(c.ms), 1) / 1000.0;
  spdlog::info("model '{}' resident: {} shards, {} tensors, {} bytes in {} ms ({:.2f} GB/s)", m.config.name,
               m.resident->shards.size(), m.resident->tensor_count, m.resident->bytes, c.ms,
               static_cast<double>(m.resident->bytes) / secs / 1e9);
  StartPin(m);
  std::vector<Waiter> waiters;
  waiters.swap(m.waiters);
  AnswerWaiters(m, waiters, m.state, m.last_error);
  if (m.preload_host) PreloadDone(m.config.name + "/host", Status::Ok());
  m.preload_host = false;
  for (auto& [ordinal, g] : m.gpus) {
    if (g.stashed) {
      Completion done = std::move(*g.stashed);
      g.stashed.reset();
      CompleteGpu(done);
    }
  }
  // GPU copies that waited for the host tier.
  for (auto& [ordinal, g] : m.gpus)
    if (g.state == ModelState::kLoading && g.phase == Phase::kWaitHost) MaybeStartGpu(m, ordinal);
}

// Makes `r` the model's host copy (its index is built already).
void Server::Impl::InstallHost(ModelEntry& m, std::shared_ptr<ResidentModel> r) {
  m.state = ModelState::kResident;
  m.last_used = clock->Now();
  // What the copies were made from, kept while any tier holds one (no segments, no headers).
  auto fingerprint = std::make_shared<ResidentModel>();
  fingerprint->name = r->name;
  fingerprint->dir = r->dir;
  for (const ResidentShard& sh : r->shards) {
    ResidentShard f;
    f.file = sh.file;
    f.file_info = sh.file_info;
    fingerprint->shards.push_back(std::move(f));
  }
  m.files = std::move(fingerprint);
  m.resident = std::move(r);
}

// We hold the prefix lock, so whatever is under the prefix is a dead instance's. Its host copies
// whose records, files and checksums check out are taken back (no byte read from disk), within
// the host budget and model cap, by priority and then newest first; every other name of ours
// under the prefix is removed. Names under the prefix that are not ours (another user's, or not
// a regular file) are never opened.
void Server::Impl::AdoptPrevious() {
  SegmentStore::Listing names = store.List();
  if (names.foreign > 0)
    spdlog::warn("{} names under /dev/shm/{}.* are not this daemon's own files; left alone", names.foreign,
                 config.shm_prefix);
  std::vector<ModelRecord> records;
  for (const std::string& name : names.own) {
    if (!SegmentStore::IsRecordName(name)) continue;
    auto record = store.ReadRecord(name);
    if (!record.ok()) {
      spdlog::warn("not adopting: {}", record.status().ToString());
      continue;
    }
    if (models.count(record->model) == 0) {
      spdlog::info("not adopting model '{}' of the previous instance: it is no longer in the catalog", record->model);
      continue;
    }
    records.push_back(std::move(record).value());
  }
  std::sort(records.begin(), records.end(), [&](const ModelRecord& a, const ModelRecord& b) {
    const int pa = models.at(a.model).config.priority, pb = models.at(b.model).config.priority;
    return pa != pb ? pa > pb : a.generation > b.generation;
  });
  std::set<std::string> keep;
  for (const ModelRecord& record : records) {
    ModelEntry& m = models.at(record.model);
    if (m.resident) continue;  // a newer record of the model was adopted
    const auto t0 = std::chrono::steady_clock::now();
    std::uint64_t bytes = 0;
    for (const auto& sh : record.shards) bytes += posix::RoundUp(sh.data_size, posix::PageSize());
    const std::size_t cap = config.cache.max_host_models;
    if (HostUsed() + bytes > host_budget || (cap > 0 && HostCount() >= cap)) {
      spdlog::info("not adopting model '{}' ({}): no room under the host budget {} or max_host_models", record.model,
                   Gib(bytes), Gib(host_budget));
      continue;
    }
    auto r = Adopt(record, m.config, store, config.verify_checksums, config.loader_threads);
    if (!r.ok()) {
      spdlog::warn("not adopting model '{}' of the previous instance: {}", record.model, r.status().ToString());
      continue;
    }
    std::vector<std::string> files, shm_paths;
    std::vector<st::Header> headers;
    m.shard_sizes.clear();
    for (const ResidentShard& sh : (*r)->shards) {
      files.push_back(sh.file);
      headers.push_back(sh.header);
      shm_paths.push_back(sh.segment.shm_path());
      m.shard_sizes.push_back(sh.header.data_size);
      keep.insert(sh.segment.name());
    }
    keep.insert(record.name);
    m.generation = record.generation;
    next_generation = std::max(next_generation, record.generation + 1);
    m.host_bytes = bytes;
    BuildIndex(m, files, headers, shm_paths);
    InstallHost(m, std::move(r).value());
    ++adopted_models;
    spdlog::info("model '{}' adopted from the previous instance: {} shards, {} verified in {} ms, nothing read from disk",
                 m.config.name, m.resident->shards.size(), Gib(m.resident->bytes),
                 ToMs(std::chrono::steady_clock::now() - t0));
    StartPin(m);
  }
  if (const std::size_t removed = store.RemoveLeftovers(names.own, keep); removed > 0)
    spdlog::warn("removed {} segments of an earlier instance under prefix '{}' that were not adopted", removed,
                 config.shm_prefix);
}

// Hands the copy's fds to systemd's fd store, one message (and name) per shard.
void Server::Impl::StoreGpuCopy(ModelEntry& m, GpuEntry& g) {
  if (!FdStoreEnabled() || !g.copy || !m.resident) return;
  auto fds = g.copy->ExportFds();
  if (!fds.ok()) {
    spdlog::warn("model '{}': not storing its copy on {} with systemd: {}", m.config.name, CudaName(g.copy->ordinal()),
                 fds.status().ToString());
    return;
  }
  auto stored = std::make_shared<StoredCopy>();
  for (std::size_t i = 0; i < fds->size(); ++i) {
    const std::string name = FdStoreName(g.copy->device_uuid(), m.generation, i, m.config.name);
    const int fd = (*fds)[i].get();
    const int r = sd_pid_notify_with_fds(0, 0, ("FDSTORE=1\nFDNAME=" + name).c_str(), &fd, 1);
    if (r <= 0) {
      spdlog::warn("model '{}': systemd did not take the fds of its copy on {} ({}); it is made again after a crash",
                   m.config.name, CudaName(g.copy->ordinal()), r < 0 ? std::strerror(-r) : "no service manager");
      return;  // `stored` removes what was sent
    }
    stored->names.push_back(name);
  }
  g.stored = std::move(stored);
}

// The GPU copies a crashed predecessor left in systemd's fd store (LISTEN_FDS, named): each is
// taken back if its model's host copy of the same generation was adopted, its device is here,
// and every byte equals the host copy's (read back and compared). The rest are closed and
// removed from the store.
void Server::Impl::AdoptStoredGpuCopies() {
  char** raw_names = nullptr;
  const int n = sd_listen_fds_with_names(1, &raw_names);
  if (n <= 0) return;
  struct Group {
    std::map<std::size_t, posix::Fd> fds;
    std::vector<std::string> names;
  };
  std::map<std::tuple<std::string, std::string, std::uint64_t>, Group> groups;  // model, uuid, generation
  std::vector<std::string> dropped;
  for (int i = 0; i < n; ++i) {
    posix::Fd fd(SD_LISTEN_FDS_START + i);
    ::fcntl(fd.get(), F_SETFD, FD_CLOEXEC);
    std::string name = raw_names != nullptr && raw_names[i] != nullptr ? raw_names[i] : "";
    // gpu.<uuid>.<generation>.<shard>.<model>; the uuid has no '.', the model may.
    std::vector<std::string> f;
    std::size_t from = 0;
    for (int k = 0; k < 4 && from != std::string::npos; ++k) {
      const std::size_t dot = name.find('.', from);
      f.push_back(name.substr(from, dot == std::string::npos ? std::string::npos : dot - from));
      from = dot == std::string::npos ? dot : dot + 1;
    }
    std::uint64_t gen = 0, shard = 0;
    if (f.size() != 4 || f[0] != "gpu" || from == std::string::npos || !ParseU64(f[2], &gen) || !ParseU64(f[3], &shard)) {
      spdlog::warn("systemd passed fd {} named '{}', which is not a GPU copy of weightd's; closing it", fd.get(), name);
      if (!name.empty()) dropped.push_back(name);
      continue;
    }
    Group& grp = groups[{name.substr(from), f[1], gen}];
    grp.fds[static_cast<std::size_t>(shard)] = std::move(fd);
    grp.names.push_back(name);
  }
  if (raw_names != nullptr) {
    for (int i = 0; i < n; ++i) std::free(raw_names[i]);
    std::free(raw_names);
  }
  for (auto& [key, grp] : groups) {
    const auto& [model, uuid, gen] = key;
    const auto t0 = std::chrono::steady_clock::now();
    auto why_not = [&]() -> Status {
      auto it = models.find(model);
      if (it == models.end() || !it->second.resident || it->second.generation != gen)
        return FailedPrecondition("its host copy (generation " + std::to_string(gen) + ") was not adopted", "adopt.no_host_copy");
      ModelEntry& m = it->second;
      if (!gpu_available() || gpu_mode != gpu::ExportMode::kVmm)
        return FailedPrecondition("this instance serves no VMM GPU copies", "adopt.no_gpu");
      ASSIGN_OR_RETURN(int ordinal, gpu->ResolveDevice(uuid));
      const auto& shards = m.resident->shards;
      if (grp.fds.size() != shards.size() || grp.fds.rbegin()->first != shards.size() - 1)
        return FailedPrecondition(std::to_string(grp.fds.size()) + " stored fds for " + std::to_string(shards.size()) +
                                      " shards", "adopt.gpu_incomplete");
      std::vector<int> fds;
      std::vector<std::uint64_t> sizes;
      for (const auto& [i, fd] : grp.fds) {
        fds.push_back(fd.get());
        sizes.push_back(shards[i].segment.data_size());
      }
      ASSIGN_OR_RETURN(std::shared_ptr<gpu::GpuCopy> copy, gpu->Adopt(ordinal, fds, sizes));
      // Every byte, against the verified host copy.
      std::vector<std::byte> buf(std::size_t{64} << 20);
      for (std::size_t i = 0; i < shards.size(); ++i)
        for (std::uint64_t off = 0; off < shards[i].segment.data_size(); off += buf.size()) {
          const std::size_t len = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), shards[i].segment.data_size() - off));
          RETURN_IF_ERROR(copy->CopyToHost(i, off, std::span(buf.data(), len)));
          if (std::memcmp(buf.data(), shards[i].segment.data() + off, len) != 0)
            return DataLoss("shard " + std::to_string(i) + " differs from the host copy at byte " + std::to_string(off),
                            "adopt.gpu_mismatch");
        }
      GpuEntry& g = m.gpus[ordinal];
      g.state = ModelState::kResident;
      g.phase = Phase::kIdle;
      g.copy = std::move(copy);
      g.generation = next_generation++;
      g.last_used = clock->Now();
      g.stored = std::make_shared<StoredCopy>();
      g.stored->names = grp.names;
      spdlog::info("model '{}': its copy on {} adopted from systemd's fd store, verified in {} ms", model,
                   CudaName(ordinal), ToMs(std::chrono::steady_clock::now() - t0));
      return Status::Ok();
    }();
    if (!why_not.ok()) {
      spdlog::warn("model '{}': not adopting its stored copy on {}: {}", model, uuid, why_not.ToString());
      dropped.insert(dropped.end(), grp.names.begin(), grp.names.end());
    }
  }
  for (const std::string& name : dropped) sd_notify(0, ("FDSTOREREMOVE=1\nFDNAME=" + name).c_str());
}

// Resident host copies stay page-locked (when GPUs are served), so that later copies to a GPU
// run at PCIe speed. Done after the load, off the path of its first answer.
void Server::Impl::StartPin(ModelEntry& m) {
  if (!gpu_available() || !config.gpu_pin_host || !m.resident) return;
  std::shared_ptr<const ResidentModel> host = m.resident;
  const std::string name = m.config.name;
  const std::uint64_t gen = m.generation;
  m.pinning = gpu_jobs.Submit([this, host, name, gen] {
    const auto t0 = std::chrono::steady_clock::now();
    Completion c;
    c.kind = Completion::kPin;
    c.model = name;
    c.generation = gen;
    for (const ResidentShard& sh : host->shards) {
      if (sh.segment.data_size() == 0) continue;
      auto pin = gpu->PinHost(sh.segment.data(), sh.segment.data_size());
      if (!pin.ok()) {
        // Not fatal: copies then register (or stage) each time.
        spdlog::warn("model '{}': {}", name, pin.status().ToString());
        break;
      }
      c.pins.push_back(std::move(pin).value());
    }
    c.result = std::const_pointer_cast<ResidentModel>(host);
    c.ms = ToMs(std::chrono::steady_clock::now() - t0);
    PostCompletion(std::move(c));
  });
}

void Server::Impl::CompletePin(Completion& c) {
  auto it = models.find(c.model);
  const bool current = it != models.end() && c.result.ok() && it->second.resident == c.result.value();
  if (!current) {
    // Evicted meanwhile: unpin on a worker, keeping the mappings until then.
    ReleasePins(std::move(c.pins), c.result.ok() ? c.result.value() : nullptr);
    return;
  }
  ModelEntry& m = it->second;
  m.pinning = false;
  m.host_pins = std::move(c.pins);
  if (!m.host_pins.empty()) spdlog::info("model '{}' page-locked for GPU copies in {} ms", c.model, c.ms);
  for (auto& [ordinal, g] : m.gpus)
    if (g.state == ModelState::kLoading && g.phase == Phase::kWaitHost) MaybeStartGpu(m, ordinal);
}

// A GPU copy was asked for: start it when its source is there, else load the host copy first.
void Server::Impl::RequestGpu(ModelEntry& m, int ordinal) {
  GpuEntry& g = m.gpus[ordinal];
  if (g.state == ModelState::kLoading || g.state == ModelState::kResident) return;
  g.state = ModelState::kLoading;
  g.phase = Phase::kWaitHost;
  g.generation = next_generation++;
  g.last_error = Status::Ok();
  MaybeStartGpu(m, ordinal);
  // Still waiting: for a host copy that is absent (load it), loading, or being page-locked.
  const bool host_there = m.state == ModelState::kResident && m.resident;
  if (g.phase == Phase::kWaitHost && m.state != ModelState::kLoading && !host_there) StartLoad(m);
}

void Server::Impl::MaybeStartGpu(ModelEntry& m, int ordinal) {
  GpuEntry& g = m.gpus.at(ordinal);
  const bool filling = m.phase == Phase::kWorking && m.progress != nullptr;
  if (!(m.state == ModelState::kResident && m.resident) && !filling) return;  // wait for the host copy
  // A copy from a host copy that is being page-locked waits for it: copying meanwhile would
  // register the same pages a second time, at the same cost.
  if (!filling && m.pinning) return;
  g.phase = Phase::kAdmitting;
  g.pipelined = !(m.state == ModelState::kResident && m.resident);  // see StartGpuLoad
  g.admission_deadline = clock->Now() + config.cache.admission_timeout;
  if (AdmitGpu(m, ordinal) == Admitted::kWaiting) {
    spdlog::info("model '{}' waits for room on {}: {}", m.config.name, CudaName(ordinal), g.waiting_for);
    admissions.push_back(Ticket{m.config.name, ordinal});
  }
}

void Server::Impl::StartGpuLoad(ModelEntry& m, int ordinal) {
  GpuEntry& g = m.gpus.at(ordinal);
  g.phase = Phase::kWorking;
  // Decided now, not at admission: the host copy may have finished while this one waited.
  g.pipelined = !(m.state == ModelState::kResident && m.resident);
  if (g.pipelined && m.progress == nullptr) {
    FailGpu(m, ordinal, Internal("no host copy to copy from", "gpu.no_source"));
    return;
  }
  Notify("STATUS=copying model '" + m.config.name + "' to " + CudaName(ordinal));
  spdlog::info("copying model '{}' to {}{}", m.config.name, CudaName(ordinal), g.pipelined ? " as it is read from disk" : "");
  // The job holds the host copy (or the load's progress, which holds the copy being filled), so
  // its mappings stay valid even if the model is evicted or changed meanwhile; the generation
  // tells the loop whether the result is still wanted.
  std::shared_ptr<const ResidentModel> host = g.pipelined ? nullptr : m.resident;
  std::shared_ptr<LoadProgress> progress = g.pipelined ? m.progress : nullptr;
  const std::uint64_t gen = g.generation;
  const std::string name = m.config.name;
  bool ok = gpu_jobs.Submit([this, host, progress, gen, name, ordinal]() mutable {
    const auto t0 = std::chrono::steady_clock::now();
    Completion c;
    c.kind = Completion::kGpu;
    c.model = name;
    c.generation = gen;
    c.ordinal = ordinal;
    try {
      gpu::WaitReadyFn wait;
      if (progress) {
        auto segments = progress->WaitSegments();
        if (segments.ok()) {
          host = *segments;
          wait = [progress](std::size_t shard, std::uint64_t end) { return progress->WaitFilled(shard, end); };
        } else {
          c.gpu_result = segments.status();
        }
      }
      if (host) {
        std::vector<gpu::HostShard> shards;
        shards.reserve(host->shards.size());
        for (const ResidentShard& sh : host->shards) shards.push_back(gpu::HostShard{sh.segment.data(), sh.segment.data_size()});
        c.gpu_result = gpu->Materialize(ordinal, shards, gpu_mode, wait);
      }
    } catch (const std::exception& e) {
      c.gpu_result = Internal(std::string("GPU copy failed: ") + e.what(), "gpu.exception");
    }
    c.ms = ToMs(std::chrono::steady_clock::now() - t0);
    PostCompletion(std::move(c));
  });
  if (!ok) FailGpu(m, ordinal, Unavailable("the daemon is shutting down", "daemon.stopping"));
}

void Server::Impl::FailGpu(ModelEntry& m, int ordinal, const Status& error) {
  GpuEntry& g = m.gpus.at(ordinal);
  ++gpu_metrics.loads_failed;
  ++gpu_metrics.errors[ErrorLabel(error)];
  g.state = ModelState::kFailed;
  g.phase = Phase::kIdle;
  g.reserved = 0;
  g.last_error = error;
  g.waiting_for.clear();
  spdlog::error("model '{}' failed to copy to {}: {}", m.config.name, CudaName(ordinal), error.ToString());
  std::vector<Waiter> waiters;
  waiters.swap(g.waiters);
  AnswerWaiters(m, waiters, ModelState::kFailed, error);
  if (g.preload) PreloadDone(m.config.name + "/" + CudaName(ordinal), error);
  g.preload = false;
  retry_admissions = true;
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
  if (!c.gpu_result.ok()) {
    g.copy_ms = c.ms;
    FailGpu(m, c.ordinal, c.gpu_result.status());
    return;
  }
  // A pipelined copy is only as good as the load it followed: it waits for the load's verdict
  // (the checksums, the unchanged files).
  if (g.pipelined && m.phase == Phase::kWorking) {
    g.stashed = std::move(c);
    return;
  }
  g.copy_ms = c.ms;
  g.copy = std::move(c.gpu_result).value();
  g.state = ModelState::kResident;
  g.phase = Phase::kIdle;
  g.reserved = 0;
  g.pipelined = false;
  g.last_error = Status::Ok();
  g.last_used = clock->Now();
  ++gpu_metrics.loads_ok;
  gpu_metrics.bytes += g.copy->allocated_bytes();
  gpu_metrics.durations.Observe(static_cast<double>(c.ms) / 1000.0);
  const double secs = std::max(g.copy->copy_seconds(), 1e-6);
  spdlog::info("model '{}' resident on {}: {} bytes in {} ms (host-to-device {:.2f} GB/s)", m.config.name,
               CudaName(c.ordinal), g.copy->allocated_bytes(), c.ms, static_cast<double>(g.copy->allocated_bytes()) / secs / 1e9);
  StoreGpuCopy(m, g);
  std::vector<Waiter> waiters;
  waiters.swap(g.waiters);
  AnswerWaiters(m, waiters, g.state, g.last_error);
  if (g.preload) PreloadDone(m.config.name + "/" + CudaName(c.ordinal), Status::Ok());
  g.preload = false;
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
  }
  // VMM exports and host segments travel as fds over the fd socket, to the process that holds
  // this token (and the session's credentials); a legacy handle is in the manifest itself.
  if (!copy || copy->mode() == gpu::ExportMode::kVmm) {
    std::string token(kFdTokenBytes, '\0');
    Status r = posix::RandomBytes(std::as_writable_bytes(std::span(token.data(), token.size())));
    if (!r.ok()) {
      (void)leases.Release(s, *id);
      return proto::ToErrorReply(r);
    }
    man.fd_socket = config.fd_socket;
    man.fd_token = token;
    PendingFds p{s.id, *id, copy, std::move(shards), !copy, {}, clock->Now() + kFdTokenTtl};
    if (!copy)
      for (const auto& seg : man.segments)
        if (seg.size > 0) p.shm_names.push_back(seg.shm_name);
    pending_fds[token] = std::move(p);
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
  } else if (!m.shard_sizes.empty()) {
    st.shards = static_cast<std::uint32_t>(m.shard_sizes.size());
    st.tensors = static_cast<std::uint32_t>(m.tensors.size());
    for (std::uint64_t n : m.shard_sizes) st.bytes += n;
  }
  if (m.progress)
    for (std::size_t i = 0; i < m.shard_sizes.size(); ++i) st.loaded_bytes += m.progress->filled(i);
  st.waiting_for = m.waiting_for;
  for (const auto& [ordinal, g] : m.gpus)
    if (st.waiting_for.empty() && !g.waiting_for.empty()) st.waiting_for = CudaName(ordinal) + ": " + g.waiting_for;
  st.pinned = m.config.pin ? 1 : 0;
  st.priority = m.config.priority;
  st.leases = leases.LeasesOf(m.config.name);
  st.loads = m.loads;
  st.last_load_ms = m.last_load_ms;
  const auto now = clock->Now();
  st.last_used_ms_ago = m.last_used == Clock::TimePoint{} ? 0 : ToMs(now - m.last_used);
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
    gs.last_used_ms_ago = g.last_used == Clock::TimePoint{} ? 0 : ToMs(now - g.last_used);
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
    for (const gpu::DeviceInfo& d : gpu->Devices()) {
      proto::GpuDeviceStatus ds;
      ds.device = CudaName(d.ordinal);
      ds.uuid = d.uuid;
      ds.name = d.name;
      ds.total_bytes = d.total_bytes;
      ds.resident_bytes = GpuUsed(d.ordinal);
      ds.copies = static_cast<std::uint32_t>(GpuCount(d.ordinal));
      ds.leases = leases.LeasesOn(ds.device);
      ds.budget_bytes = gpu_budget.count(d.ordinal) ? gpu_budget.at(d.ordinal) : 0;
      st.gpus.push_back(std::move(ds));
    }
  } else {
    st.gpu_unavailable = gpu != nullptr ? gpu->unavailable_status().message() : "the GPU tier is disabled";
  }
  st.host_budget_bytes = host_budget;
  st.host_total_bytes = host_total;
  st.ready = ready ? 1 : 0;
  st.ready_ms = ready ? ToMs(ready_at - started) : 0;
  st.metrics = RenderMetrics();
  return st;
}

// Every figure the daemon exports. Label values are model names (validated: [A-Za-z0-9._-]),
// device names and error reasons, so the series stay few and bounded by the catalog.
std::string Server::Impl::RenderMetrics() const {
  metrics::Writer w;
  using metrics::Labels;
  const std::pair<const char*, const TierMetrics*> tiers[] = {{"host", &host_metrics}, {"gpu", &gpu_metrics}};
  w.Family("weightd_loads_total", "counter", "Completed loads, by tier and result.");
  for (auto [tier, t] : tiers) {
    w.Sample("weightd_loads_total", Labels{{"tier", tier}, {"result", "ok"}}, static_cast<double>(t->loads_ok));
    w.Sample("weightd_loads_total", Labels{{"tier", tier}, {"result", "error"}}, static_cast<double>(t->loads_failed));
  }
  w.Family("weightd_adopted_models", "gauge", "Host copies taken back, verified, from the previous instance at start.");
  w.Sample("weightd_adopted_models", {}, static_cast<double>(adopted_models));
  w.Family("weightd_load_bytes_total", "counter", "Bytes made resident by completed loads, by tier.");
  for (auto [tier, t] : tiers) w.Sample("weightd_load_bytes_total", Labels{{"tier", tier}}, static_cast<double>(t->bytes));
  w.Family("weightd_load_duration_seconds", "histogram", "Duration of successful loads (host: disk to segments; gpu: to device).");
  for (auto [tier, t] : tiers) w.HistogramSamples("weightd_load_duration_seconds", Labels{{"tier", tier}}, t->durations);
  w.Family("weightd_load_errors_total", "counter", "Failed loads, by tier and error reason.");
  for (auto [tier, t] : tiers)
    for (const auto& [reason, n] : t->errors)
      w.Sample("weightd_load_errors_total", Labels{{"tier", tier}, {"reason", reason}}, static_cast<double>(n));
  w.Family("weightd_cache_hits_total", "counter", "Acquires served from a resident copy, by tier.");
  for (auto [tier, t] : tiers) w.Sample("weightd_cache_hits_total", Labels{{"tier", tier}}, static_cast<double>(t->hits));
  w.Family("weightd_cache_misses_total", "counter", "Acquires that had to wait for a load, by tier.");
  for (auto [tier, t] : tiers) w.Sample("weightd_cache_misses_total", Labels{{"tier", tier}}, static_cast<double>(t->misses));
  w.Family("weightd_evictions_total", "counter", "Evicted copies, by tier and reason (lru, ttl, pressure, admin, changed).");
  for (auto [tier, t] : tiers)
    for (const char* reason : {"lru", "ttl", "pressure", "admin", "changed"}) {
      auto it = t->evictions.find(reason);
      w.Sample("weightd_evictions_total", Labels{{"tier", tier}, {"reason", reason}},
               it == t->evictions.end() ? 0.0 : static_cast<double>(it->second));
    }
  w.Family("weightd_resident_bytes", "gauge", "Bytes held by model copies (and loads in flight), by tier and device.");
  w.Sample("weightd_resident_bytes", Labels{{"tier", "host"}, {"device", "cpu"}}, static_cast<double>(HostUsed()));
  if (gpu_available())
    for (const auto& d : gpu->Devices())
      w.Sample("weightd_resident_bytes", Labels{{"tier", "gpu"}, {"device", CudaName(d.ordinal)}},
               static_cast<double>(GpuUsed(d.ordinal)));
  w.Family("weightd_freeing_bytes", "gauge", "Bytes of evicted copies not yet freed (they still count against the budget).");
  w.Sample("weightd_freeing_bytes", Labels{{"tier", "host"}, {"device", "cpu"}}, static_cast<double>(reaping_host.load()));
  for (const auto& [ordinal, b] : gpu_budget)
    w.Sample("weightd_freeing_bytes", Labels{{"tier", "gpu"}, {"device", CudaName(ordinal)}},
             static_cast<double>(reaping_gpu[static_cast<std::size_t>(ordinal)].load()));
  w.Family("weightd_budget_bytes", "gauge", "The memory budget, by tier and device.");
  w.Sample("weightd_budget_bytes", Labels{{"tier", "host"}, {"device", "cpu"}}, static_cast<double>(host_budget));
  for (const auto& [ordinal, b] : gpu_budget)
    w.Sample("weightd_budget_bytes", Labels{{"tier", "gpu"}, {"device", CudaName(ordinal)}}, static_cast<double>(b));
  w.Family("weightd_resident_models", "gauge", "Models with a copy in the tier, by tier and device.");
  w.Sample("weightd_resident_models", Labels{{"tier", "host"}, {"device", "cpu"}}, static_cast<double>(HostCount()));
  for (const auto& [ordinal, b] : gpu_budget)
    w.Sample("weightd_resident_models", Labels{{"tier", "gpu"}, {"device", CudaName(ordinal)}},
             static_cast<double>(GpuCount(ordinal)));
  w.Family("weightd_model_leases", "gauge", "Live leases per model and device (cpu: host mappings).");
  for (const auto& [name, m] : models) {
    w.Sample("weightd_model_leases", Labels{{"model", name}, {"device", "cpu"}}, leases.LeasesOf(name, "cpu"));
    for (const auto& [ordinal, g] : m.gpus)
      w.Sample("weightd_model_leases", Labels{{"model", name}, {"device", CudaName(ordinal)}},
               leases.LeasesOf(name, CudaName(ordinal)));
  }
  w.Family("weightd_model_imports", "gauge", "Live GPU imports per model and device (each GPU lease is one import).");
  for (const auto& [name, m] : models)
    for (const auto& [ordinal, g] : m.gpus)
      w.Sample("weightd_model_imports", Labels{{"model", name}, {"device", CudaName(ordinal)}},
               leases.LeasesOf(name, CudaName(ordinal)));
  w.Family("weightd_sessions", "gauge", "Open client sessions.");
  w.Sample("weightd_sessions", {}, static_cast<double>(leases.session_count()));
  w.Family("weightd_connections", "gauge", "Open connections to the control socket.");
  w.Sample("weightd_connections", {}, static_cast<double>(zap->connections()));
  w.Family("weightd_connections_shed_total", "counter",
           "Connections closed at once because their user held max_connections_per_user.");
  w.Sample("weightd_connections_shed_total", {}, static_cast<double>(zap->shed()));
  w.Family("weightd_fd_tokens_pending", "gauge", "Leases whose fds wait to be fetched over the fd socket.");
  w.Sample("weightd_fd_tokens_pending", {}, static_cast<double>(pending_fds.size()));
  w.Family("weightd_fd_connections", "gauge", "Open connections to the fd socket.");
  w.Sample("weightd_fd_connections", {}, static_cast<double>(fd_clients.size()));
  w.Family("weightd_requests_total", "counter", "Requests received, and those that did not decode.");
  w.Sample("weightd_requests_total", Labels{{"result", "all"}}, static_cast<double>(requests));
  w.Sample("weightd_requests_total", Labels{{"result", "malformed"}}, static_cast<double>(malformed));
  w.Family("weightd_disk_read_bytes_total", "counter", "Bytes read from model files.");
  w.Sample("weightd_disk_read_bytes_total", {}, static_cast<double>(loader.bytes_read()));
  w.Family("weightd_admission_waiting", "gauge", "Copies waiting for room under a budget.");
  w.Sample("weightd_admission_waiting", {}, static_cast<double>(admissions.size()));
  w.Family("weightd_ready", "gauge", "1 once every preload has finished.");
  w.Sample("weightd_ready", {}, ready ? 1 : 0);
  w.Family("weightd_start_to_ready_seconds", "gauge", "Seconds from the daemon's start to ready (0 until ready).");
  w.Sample("weightd_start_to_ready_seconds", {},
              ready ? std::chrono::duration<double>(ready_at - started).count() : 0.0);
  w.Family("weightd_preload_failures", "gauge", "Preloads that failed (the daemon is ready without them).");
  w.Sample("weightd_preload_failures", {}, static_cast<double>(preload_failures.size()));
  return w.text();
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
      HandleHttpCalls();
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
  if (s == nullptr || s->leases.count(pending.lease_id) == 0 || PeerGone(*s)) return deny("the lease has ended");
  // The token travelled over the session's ZeroMQ connection; the process presenting it must be
  // the one that opened that session.
  if (conn.peer().uid != s->peer.uid || conn.peer().pid != s->peer.pid)
    return deny("credentials do not match the session (pid " + std::to_string(s->peer.pid) + ")");
  auto fds = LeaseFds(pending);
  if (!fds.ok()) {
    if (fds.status().reason() == "fdchan.lease_ended") return deny("the lease has ended");
    spdlog::error("exporting fds of lease {}: {}", pending.lease_id, fds.status().ToString());
    (void)conn.SendReply(fds.status(), {}, {}, kFdSendTimeout);
    CloseFdClient(fd);
    return;
  }
  std::vector<int> raw;
  raw.reserve(fds->size());
  for (const posix::Fd& f : *fds) raw.push_back(f.get());
  Status sent = conn.SendReply(Status::Ok(), std::to_string(pending.lease_id), raw, kFdSendTimeout);
  if (!sent.ok()) spdlog::warn("fd socket: sending fds of lease {}: {}", pending.lease_id, sent.ToString());
  CloseFdClient(fd);  // our copies of the fds close with `fds`
}

Result<std::vector<posix::Fd>> Server::Impl::LeaseFds(const PendingFds& p) {
  std::vector<posix::Fd> out;
  if (!p.host) {  // a VMM export
    std::shared_ptr<const gpu::GpuCopy> copy = p.copy.lock();
    if (copy == nullptr) return FailedPrecondition("the lease has ended", "fdchan.lease_ended");
    ASSIGN_OR_RETURN(std::vector<posix::Fd> all, copy->ExportFds());
    for (std::uint32_t i : p.shards) out.push_back(std::move(all.at(i)));
    return out;
  }
  // Host segments: a read-only open file description each, so no route through the fd (mmap,
  // mprotect, a reopen of /proc/self/fd) can make it writable. A name that is gone means the
  // segment was replaced (a reload), which ends what the lease referred to.
  for (const std::string& name : p.shm_names) {
    auto fd = store.OpenReadOnly(name);
    if (!fd.ok()) {
      if (fd.status().code() == Code::kNotFound) return FailedPrecondition("the lease has ended", "fdchan.lease_ended");
      return fd.status();
    }
    out.push_back(std::move(fd).value());
  }
  return out;
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
  std::erase_if(pending_fds, [&](const auto& kv) { return kv.second.session_id == session_id; });
  const auto now = clock->Now();
  for (const auto& l : ended) TouchCopy(l.model, l.device, now);
  spdlog::info("session {} of '{}' (pid {}) ended: {}; {} leases freed", session_id, name, pid, why, ended.size());
  retry_admissions = true;
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
  // The ACLs come with the models; the groups they name are looked up again.
  DaemonConfig acl_config = config;
  acl_config.models = merged;
  auto next_policy = auth::Policy::Create(acl_config, ::geteuid(), ::getegid());
  if (next_policy.ok()) s = CheckSegmentGroup(*next_policy, shm_gid, config.shm_mode);
  if (!next_policy.ok() || !s.ok()) {
    spdlog::error("SIGHUP: keeping the current catalog: {}", (next_policy.ok() ? s : next_policy.status()).ToString());
    return;
  }
  policy = std::move(next_policy).value();
  const CatalogDiff diff = ApplyCatalog(merged);
  // Preloads of models the reload added or changed. Readiness counts only the configuration the
  // daemon started with.
  for (const auto& list : {diff.added, diff.updated, diff.changed})
    for (const auto& name : list) StartPreloads(models[name], false);
  Notify("STATUS=catalog reloaded: " + std::to_string(catalog.models().size()) + " models");
}

CatalogDiff Server::Impl::ApplyCatalog(const std::vector<ModelConfig>& list) {
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
  for (const auto& name : diff.updated) {
    models[name].config = *catalog.Find(name);
    spdlog::info("model '{}': new policy settings", name);
  }
  for (const auto& name : diff.added) {
    ModelEntry& m = models[name];
    m.config = *catalog.Find(name);
    spdlog::info("model '{}' added to the catalog ({})", name, m.config.dir);
  }
  retry_admissions = true;
  return diff;
}

// TTLs and memory pressure; budgets and warm-pool caps are enforced when copies are admitted.
void Server::Impl::EnforcePolicy(Clock::TimePoint now) {
  {
    std::vector<ModelEntry*> owners;
    std::vector<policy::Copy> copies = HostCopies(nullptr, &owners);
    for (std::size_t i : policy::Expired(copies, now)) EvictHost(*owners[i], policy::EvictReason::kTtl);
  }
  for (const auto& [ordinal, budget] : gpu_budget) {
    std::vector<ModelEntry*> owners;
    std::vector<policy::Copy> copies = GpuCopies(ordinal, nullptr, &owners);
    for (std::size_t i : policy::Expired(copies, now)) EvictGpu(*owners[i], ordinal, policy::EvictReason::kTtl);
  }
  if (now - last_pressure_check < config.cache.pressure_interval) return;
  last_pressure_check = now;
  // Used above the threshold: evict unleased copies, in eviction order, worth the excess.
  auto excess_of = [](const MemoryProbe::Reading& r, double threshold) -> std::uint64_t {
    if (threshold <= 0 || r.total == 0) return 0;
    const std::uint64_t used = r.total - std::min(r.available, r.total);
    const auto limit = static_cast<std::uint64_t>(static_cast<double>(r.total) * threshold);
    return used > limit ? used - limit : 0;
  };
  if (config.cache.host_pressure > 0) {
    auto reading = memory->Host();
    if (!reading.ok()) {
      spdlog::debug("memory pressure: {}", reading.status().ToString());
    } else if (std::uint64_t excess = excess_of(*reading, config.cache.host_pressure); excess > 0) {
      std::vector<ModelEntry*> owners;
      std::vector<policy::Copy> copies = HostCopies(nullptr, &owners);
      std::vector<std::size_t> victims = policy::Relieve(copies, excess);
      if (!victims.empty())
        spdlog::warn("host memory pressure: {} used over the {:.0f}% threshold; evicting {} models", Gib(excess),
                     config.cache.host_pressure * 100, victims.size());
      for (std::size_t i : victims) EvictHost(*owners[i], policy::EvictReason::kPressure);
    }
  }
  if (config.cache.gpu_pressure > 0) {
    for (const auto& [ordinal, budget] : gpu_budget) {
      auto reading = memory->Gpu(ordinal);
      if (!reading.ok()) continue;
      std::uint64_t excess = excess_of(*reading, config.cache.gpu_pressure);
      if (excess == 0) continue;
      std::vector<ModelEntry*> owners;
      std::vector<policy::Copy> copies = GpuCopies(ordinal, nullptr, &owners);
      std::vector<std::size_t> victims = policy::Relieve(copies, excess);
      if (!victims.empty())
        spdlog::warn("{} memory pressure: {} used over the {:.0f}% threshold; evicting {} models", CudaName(ordinal),
                     Gib(excess), config.cache.gpu_pressure * 100, victims.size());
      for (std::size_t i : victims) EvictGpu(*owners[i], ordinal, policy::EvictReason::kPressure);
    }
  }
}

// Resident copies of files that changed on disk must not be served: checked on a worker (stat
// can block on a slow filesystem), acted on here.
void Server::Impl::StartFileCheck() {
  std::vector<std::shared_ptr<const ResidentModel>> copies;
  for (const auto& [name, m] : models)
    if (m.files && (m.resident || !m.gpus.empty())) copies.push_back(m.files);
  if (copies.empty()) return;
  file_check_running = true;
  bool ok = check_jobs.Submit([this, copies] {
    Completion c;
    c.kind = Completion::kCheck;
    for (const auto& files : copies) {
      auto changed = loader.Changed(*files);
      if (!changed.ok()) spdlog::debug("checking model '{}': {}", files->name, changed.status().ToString());
      // A file that cannot be read any more has changed, as far as serving it goes.
      if (!changed.ok() || *changed) c.changed.push_back(files->name);
    }
    PostCompletion(std::move(c));
  });
  if (!ok) file_check_running = false;
}

void Server::Impl::CompleteFileCheck(Completion& c) {
  file_check_running = false;
  for (const std::string& name : c.changed) {
    auto it = models.find(name);
    if (it == models.end() || !it->second.files) continue;
    ModelEntry& m = it->second;
    if (m.state == ModelState::kLoading) continue;  // a host load in flight reads the new files already
    spdlog::warn("model '{}': its files changed on disk; its copies are dropped and the next request loads them again", name);
    if (m.resident) ++host_metrics.evictions["changed"];
    for (const auto& [ordinal, g] : m.gpus)
      if (g.copy) ++gpu_metrics.evictions["changed"];
    // Every tier's copy is stale. Leases keep what they map. Requests waiting for a GPU copy
    // of the old files move to a load of the new ones.
    std::map<int, std::vector<Waiter>> gpu_waiters;
    for (auto& [ordinal, g] : m.gpus)
      if (!g.waiters.empty()) gpu_waiters[ordinal] = std::move(g.waiters);
    DropResident(m);
    m.state = ModelState::kAbsent;
    for (auto& [ordinal, waiters] : gpu_waiters) {
      m.gpus[ordinal].waiters = std::move(waiters);
      RequestGpu(m, ordinal);
    }
  }
}

void Server::Impl::StartPreloads(ModelEntry& m, bool for_readiness) {
  for (const std::string& tier : m.config.preload) {
    const std::string key = m.config.name + "/" + tier;
    if (tier == "host") {
      if (for_readiness) {
        preloads.insert(key);
        m.preload_host = true;
      }
      if (m.state != ModelState::kLoading && m.state != ModelState::kResident) StartLoad(m);
      else if (m.state == ModelState::kResident && for_readiness) PreloadDone(key, Status::Ok());
      continue;
    }
    auto ordinal = gpu != nullptr ? gpu->ResolveDevice(tier) : Result<int>(Unavailable("no GPU tier", "gpu.no_device"));
    if (!ordinal.ok()) {
      spdlog::error("model '{}': cannot preload '{}': {}", m.config.name, tier, ordinal.status().ToString());
      if (for_readiness) preload_failures.push_back(key);
      continue;
    }
    const std::string device_key = m.config.name + "/" + CudaName(*ordinal);
    if (for_readiness) {
      preloads.insert(device_key);
      m.gpus[*ordinal].preload = true;
    }
    RequestGpu(m, *ordinal);
  }
}

void Server::Impl::PreloadDone(const std::string& key, const Status& s) {
  if (preloads.erase(key) == 0) return;
  if (!s.ok()) {
    preload_failures.push_back(key);
    spdlog::error("preload of {} failed: {}", key, s.ToString());
  }
  if (!ready)
    Notify("STATUS=preloading: " + std::to_string(preloads.size()) + " left, " +
           std::to_string(preload_failures.size()) + " failed");
  MaybeReady();
}

// READY=1 once every preload has finished. A failed preload does not hold the service back
// (a corrupt file would otherwise make systemd restart it forever); it is logged, counted in
// weightd_preload_failures and named in STATUS.
void Server::Impl::MaybeReady() {
  if (ready || !preloads.empty()) return;
  ready = true;
  ready_at = clock->Now();
  spdlog::info("ready in {} ms{}", ToMs(ready_at - started),
               preload_failures.empty() ? "" : " (" + std::to_string(preload_failures.size()) + " preloads failed)");
  Notify("READY=1\nSTATUS=" + ServingStatus());
}

// The failed preloads stay in every later STATUS=, not only the first one after READY=1.
std::string Server::Impl::ServingStatus() const {
  std::string status = "serving " + std::to_string(catalog.models().size()) + " models, " +
                       std::to_string(leases.lease_count()) + " leases";
  if (!preload_failures.empty()) {
    status += "; failed preloads:";
    for (const auto& k : preload_failures) status += " " + k;
  }
  return status;
}

void Server::Impl::HandleHttpCalls() {
  std::deque<std::shared_ptr<HttpCall>> calls;
  {
    std::lock_guard lock(http_mu);
    calls.swap(http_calls);
  }
  for (auto& c : calls) {
    try {
      c->reply.set_value(AnswerHttp(c->path));
    } catch (const std::exception& e) {
      c->reply.set_value(HttpResponse{500, "text/plain", std::string("internal error: ") + e.what() + "\n"});
    }
  }
}

HttpResponse Server::Impl::AnswerHttp(const std::string& path) {
  if (path == "/healthz") return HttpResponse{200, "text/plain", "ok\n"};
  if (path == "/readyz") {
    if (ready) return HttpResponse{200, "text/plain", "ready\n"};
    return HttpResponse{503, "text/plain", "not ready: " + std::to_string(preloads.size()) + " preloads in progress\n"};
  }
  if (path == "/metrics") return HttpResponse{200, "text/plain; version=0.0.4; charset=utf-8", RenderMetrics()};
  return HttpResponse{404, "text/plain", "not found: try /healthz, /readyz or /metrics\n"};
}

Result<MemoryProbe::Reading> SystemMemoryProbe::Host() {
  std::FILE* f = std::fopen("/proc/meminfo", "re");
  if (f == nullptr) return posix::ErrnoStatus("opening /proc/meminfo");
  Reading r;
  bool have_total = false, have_available = false;
  char key[64];
  unsigned long long kib = 0;
  while (std::fscanf(f, "%63s %llu kB\n", key, &kib) == 2) {
    if (std::strcmp(key, "MemTotal:") == 0) {
      r.total = kib * 1024;
      have_total = true;
    } else if (std::strcmp(key, "MemAvailable:") == 0) {
      r.available = kib * 1024;
      have_available = true;
    }
  }
  std::fclose(f);
  if (!have_total || !have_available) return Unavailable("/proc/meminfo has no MemTotal or MemAvailable", "memory.unreadable");
  return r;
}

Result<MemoryProbe::Reading> SystemMemoryProbe::Gpu(int ordinal) {
  if (gpu_ == nullptr || !gpu_->available()) return Unavailable("no GPU tier", "gpu.no_device");
  ASSIGN_OR_RETURN(gpu::MemInfo info, gpu_->Memory(ordinal));
  return Reading{info.total_bytes, info.free_bytes};
}

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

void Server::Stop() {
  impl_->stop_requested.store(true);
  std::uint64_t one = 1;
  (void)!::write(impl_->event_fd.get(), &one, sizeof one);
}
Server::~Server() = default;

Result<std::unique_ptr<Server>> Server::Create(DaemonConfig config, const Clock* clock, gpu::GpuTier* gpu,
                                               MemoryProbe* memory) {
  gid_t shm_group = static_cast<gid_t>(-1);  // the loader leaves the segments' group as created
  gid_t shm_gid = ::getegid();
  if (!config.shm_group.empty()) {
    auto g = auth::ResolveGroup(config.shm_group);
    if (!g.ok()) return g.status().WithContext("daemon.shm_group");
    shm_group = shm_gid = *g;
  }
  ASSIGN_OR_RETURN(auth::Policy policy, auth::Policy::Create(config, ::geteuid(), ::getegid()));
  RETURN_IF_ERROR(CheckSegmentGroup(policy, shm_gid, config.shm_mode));
  auto impl = std::make_unique<Impl>(std::move(config), clock, gpu, memory, shm_group, std::move(policy));
  RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Status Server::Run() {
  Status s = impl_->Loop();
  spdlog::info("stopping: {} sessions, {} leases", impl_->leases.session_count(), impl_->leases.lease_count());
  return s;
}

}  // namespace weightd
