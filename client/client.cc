// client.cc — libweightd: the control connection, leases, and read-only segment mappings.
//
// One Client::Impl owns one ZeroMQ DEALER socket. Every request is one frame; replies are
// matched by id, and a reply with another id (left over from a request that timed out, or a
// heartbeat answered while a call was waiting) is discarded. All socket use happens under
// `mu_`, so the socket is only ever touched by one thread at a time.
//
// Liveness: the heartbeat thread sends a Heartbeat whenever `heartbeat_interval_ms` has passed
// since the last one. If another call holds the socket (an Acquire waiting minutes for a load),
// that call sends the heartbeats from its own wait loop instead, so the session never starves.
//
// Releases: a Lease::Impl's destructor sends Release and waits briefly for the OkReply. If the
// socket is busy with a long call, the lease id is queued and the busy call sends it, so that a
// tensor deleter on an inference thread never blocks behind a model load.

#include "weightd/client.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <map>
#include <condition_variable>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include <zmq.hpp>

#include "cuda_api.h"
#include "fd_channel.h"
#include "gpu_import.h"
#include "posix.h"
#include "protocol.h"
#include "write_faults.h"

namespace weightd {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// How long a GPU Acquire waits for its fds on the side channel.
constexpr milliseconds kFdFetchTimeout{10'000};
// How long a Lease's destructor waits for the daemon to confirm a Release.
constexpr milliseconds kReleaseTimeout{2000};
// How long the heartbeat thread backs off when another call holds the socket.
constexpr milliseconds kBusyRetry{50};
// Closures before the handshake that mean the daemon refuses this connection.
constexpr int kClosedEarlyLimit = 3;
// Poll slice while a cancellable call waits, so destruction is prompt.
constexpr milliseconds kCancelSlice{50};

std::string Seconds(milliseconds ms) {
  auto tenths = ms.count() / 100;
  std::string s = std::to_string(tenths / 10);
  if (tenths % 10 != 0) s += "." + std::to_string(tenths % 10);
  return s + "s";
}

std::string_view RequestName(const proto::RequestBody& b) {
  static constexpr std::string_view kNames[] = {"Hello",         "Acquire", "Release", "Heartbeat", "List",
                                                "StatusRequest", "Load",    "Evict",   "Stats",     "Goodbye"};
  return b.index() < std::size(kNames) ? kNames[b.index()] : "?";
}

Status UnexpectedReply(const proto::RequestBody& req, const proto::ReplyBody& rep) {
  return Internal("daemon answered " + std::string(RequestName(req)) + " with reply type #" +
                      std::to_string(rep.index()),
                  "protocol.unexpected_reply");
}

Status BadManifest(const std::string& model, const std::string& what) {
  return DataLoss("daemon sent an invalid manifest for model '" + model + "': " + what,
                  "protocol.bad_manifest");
}

std::string ShapeString(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Checks every record against the rules a well-behaved daemon follows. The manifest comes from
// another process; nothing in it is used (as a size, offset or index) before this passes.
// `gpu`: the lease was asked for on a GPU, whose shards map no host segment (size 0);
// ValidateGpuManifest checks their allocations.
Status ValidateManifest(const proto::Manifest& m, bool gpu) {
  std::uint64_t files = 0;
  for (std::size_t i = 0; i < m.segments.size(); ++i) {
    const auto& s = m.segments[i];
    if (!gpu && s.size > 0) {
      if (s.part_size % posix::kHugePageBytes != 0 || s.size % posix::PageSize() != 0)
        return BadManifest(m.model, "segment " + std::to_string(i) + " (" + s.shm_name + ") of " +
                                        std::to_string(s.size) + " bytes in parts of " + std::to_string(s.part_size) +
                                        " bytes: not whole pages and 2 MiB parts");
      files += posix::PartCount(s.size, s.part_size);
      if (files > fdchan::kMaxFdsPerReply)
        return BadManifest(m.model, "its segments are split into more than " +
                                        std::to_string(fdchan::kMaxFdsPerReply) + " files");
    }
    if (!gpu && s.data_size > s.size)
      return BadManifest(m.model, "segment " + std::to_string(i) + " (" + s.shm_name + ") has " +
                                      std::to_string(s.data_size) + " data bytes in a " +
                                      std::to_string(s.size) + "-byte segment");
    if (s.size > std::numeric_limits<std::size_t>::max() / 2)
      return BadManifest(m.model, "segment " + s.shm_name + " size " + std::to_string(s.size) + " is impossible");
    if (s.size > 0 && (s.shm_name.size() < 2 || s.shm_name[0] != '/' ||
                       s.shm_name.find('/', 1) != std::string::npos))
      return BadManifest(m.model, "segment " + std::to_string(i) + " has an invalid shm name '" + s.shm_name + "'");
  }
  std::unordered_set<std::string_view> seen;
  seen.reserve(m.tensors.size());
  for (const auto& t : m.tensors) {
    // Built only on the error paths: this loop runs for every tensor of every attach.
    auto who = [&t] { return "tensor '" + t.name + "'"; };
    if (t.name.empty()) return BadManifest(m.model, "a tensor has an empty name");
    if (!seen.insert(t.name).second) return BadManifest(m.model, who() + " appears twice");
    if (!IsValidDType(t.dtype))
      return BadManifest(m.model, who() + " has unknown dtype code " + std::to_string(t.dtype));
    if (t.segment >= m.segments.size())
      return BadManifest(m.model, who() + " is in segment " + std::to_string(t.segment) + " of " +
                                      std::to_string(m.segments.size()));
    const auto dtype = static_cast<DType>(t.dtype);
    const DTypeBytesResult size = DTypeBytes(dtype, t.shape);
    switch (size.error) {
      case DTypeBytesResult::Error::kNone: break;
      case DTypeBytesResult::Error::kNegativeDimension:
        return BadManifest(m.model, who() + " has negative dimension in shape " + ShapeString(t.shape));
      case DTypeBytesResult::Error::kOverflow:
        return BadManifest(m.model, who() + " shape " + ShapeString(t.shape) + " overflows");
      case DTypeBytesResult::Error::kPartialByte:
        return BadManifest(m.model, who() + " shape " + ShapeString(t.shape) + " of " + std::string(DTypeName(dtype)) +
                                        " does not fill whole bytes");
    }
    if (size.bytes != t.nbytes)
      return BadManifest(m.model, who() + " claims " + std::to_string(t.nbytes) + " bytes, but shape " +
                                      ShapeString(t.shape) + " of " + std::string(DTypeName(dtype)) + " needs " +
                                      std::to_string(size.bytes));
    const auto& seg = m.segments[t.segment];
    if (t.offset > seg.data_size || t.nbytes > seg.data_size - t.offset)
      return BadManifest(m.model, who() + " at [" + std::to_string(t.offset) + ", +" + std::to_string(t.nbytes) +
                                      ") lies outside the " + std::to_string(seg.data_size) +
                                      " data bytes of segment " + std::to_string(t.segment));
  }
  return Status::Ok();
}

// A timed mutex built from std::mutex and a condition variable. std::timed_mutex would do, but
// libstdc++ implements it with pthread_mutex_clocklock, which ThreadSanitizer does not model;
// this keeps the library checkable under TSan. Meets the TimedLockable requirements.
class SocketMutex {
 public:
  void lock() {
    std::unique_lock lk(m_);
    cv_.wait(lk, [&] { return !held_; });
    held_ = true;
  }
  bool try_lock() {
    std::lock_guard lk(m_);
    return !std::exchange(held_, true);
  }
  template <class Rep, class Period>
  bool try_lock_for(std::chrono::duration<Rep, Period> d) {
    std::unique_lock lk(m_);
    if (!cv_.wait_for(lk, d, [&] { return !held_; })) return false;
    held_ = true;
    return true;
  }
  void unlock() {
    {
      std::lock_guard lk(m_);
      held_ = false;
    }
    cv_.notify_one();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool held_ = false;
};

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

// The GPU half of a manifest's rules: device memory instead of shm names, and the export
// mode's own fields. `uuid` is the GPU this process asked for.
Status ValidateGpuManifest(const proto::Manifest& m, std::string_view uuid) {
  if (!EqualsIgnoreCase(m.device, uuid))
    return BadManifest(m.model, "asked for GPU " + std::string(uuid) + ", got memory on '" + m.device + "'");
  const bool vmm = m.gpu_export == static_cast<std::uint8_t>(proto::GpuExport::kVmm);
  if (!vmm && m.gpu_export != static_cast<std::uint8_t>(proto::GpuExport::kLegacy))
    return BadManifest(m.model, "unknown GPU export mode " + std::to_string(m.gpu_export));
  for (std::size_t i = 0; i < m.segments.size(); ++i) {
    const auto& s = m.segments[i];
    auto who = [i] { return "GPU shard " + std::to_string(i); };
    if (s.size != 0 || !s.shm_name.empty()) return BadManifest(m.model, who() + " names a host segment");
    if (s.gpu_alloc_size == 0 || s.gpu_alloc_size < s.data_size)
      return BadManifest(m.model, who() + " allocation of " + std::to_string(s.gpu_alloc_size) + " bytes holds no " +
                                      std::to_string(s.data_size) + " data bytes");
    if (!vmm && s.ipc_handle.size() != gpu::kIpcHandleSize)
      return BadManifest(m.model, who() + " has a CUDA IPC handle of " + std::to_string(s.ipc_handle.size()) + " bytes");
  }
  if (vmm && (m.fd_token.empty() || m.fd_token.size() > fdchan::kMaxTokenBytes || m.fd_socket.empty() ||
              m.fd_socket[0] != '/' || m.fd_socket.size() > 107))
    return BadManifest(m.model, "no usable fd socket and token for the VMM export");
  return Status::Ok();
}

// "cuda", "cuda:N" -> N. Anything else: nullopt.
std::optional<int> ParseCudaOrdinal(std::string_view device) {
  if (device == "cuda") return 0;
  if (!device.starts_with("cuda:") || device.size() > 9) return std::nullopt;
  int n = 0;
  auto digits = device.substr(5);
  auto [p, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), n);
  if (digits.empty() || ec != std::errc() || p != digits.data() + digits.size() || n < 0) return std::nullopt;
  return n;
}

// One device's context creation, shared by the Client's calls (ContextWarmup itself has one
// owner thread).
struct Warmup {
  std::mutex mu;
  gpu::ContextWarmup w;  // guarded by mu
};

}  // namespace

// What a reattach needs of a live lease, shared between the Lease::Impl (its owner) and the
// Client's registry (which holds it weakly), so that a reattach never holds a Lease itself.
struct LeaseRecord {
  // The daemon's id of the lease; 0 once the lease ended or when a re-acquire failed.
  std::atomic<std::uint64_t> id{0};
  std::atomic<bool> ended{false};  // the Lease was dropped
  proto::Acquire request;          // what was asked (the device by UUID)
};

// ---- Client::Impl ---------------------------------------------------------------------------

struct Client::Impl {
  // Const after Connect(), except `hello`, which a reattach replaces (under mu_).
  std::string endpoint;
  ClientOptions options;
  proto::HelloReply hello;

  const pid_t pid = ::getpid();  // leases created here are released only from this process

  Impl(std::string ep, ClientOptions opts) : endpoint(std::move(ep)), options(std::move(opts)) {}
  ~Impl() {
    StopHeartbeats();
    SayGoodbye();
    // Context creation must finish before the CUDA interface goes.
    std::lock_guard g(cuda_mu_);
    warmups_.clear();
  }

  // The CUDA driver, loaded on first use; Unavailable "gpu.no_device" where there is none.
  Result<std::shared_ptr<gpu::CudaApi>> Cuda() {
    std::lock_guard g(cuda_mu_);
    if (!cuda_ && cuda_error_.ok()) {
      auto api = gpu::LoadCudaApi();
      if (api.ok()) cuda_ = std::shared_ptr<gpu::CudaApi>(std::move(api).value());
      else cuda_error_ = api.status();
    }
    if (!cuda_) return cuda_error_;
    return cuda_;
  }

  // The context warm-up of `ordinal`, started on first use.
  std::shared_ptr<Warmup> WarmupOf(gpu::CudaApi* api, int ordinal) {
    std::lock_guard g(cuda_mu_);
    auto& w = warmups_[ordinal];
    if (!w) {
      w = std::make_shared<Warmup>();
      w->w = gpu::ContextWarmup::Start(api, ordinal);
    }
    return w;
  }

  weightd::Status Open() {
    try {
      socket = zmq::socket_t(context, zmq::socket_type::dealer);
      socket.set(zmq::sockopt::linger, 0);
      socket.set(zmq::sockopt::maxmsgsize, static_cast<std::int64_t>(proto::kMaxReplyBytes));
      // Watch the connection, to tell a daemon that refuses it from one that is not there.
      char addr[64];
      std::snprintf(addr, sizeof addr, "inproc://weightd-client-%p", static_cast<void*>(this));
      if (zmq_socket_monitor(socket.handle(), addr,
                             ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) != 0)
        throw zmq::error_t();
      monitor = zmq::socket_t(context, zmq::socket_type::pair);
      monitor.set(zmq::sockopt::linger, 0);
      monitor.set(zmq::sockopt::rcvhwm, 0);
      monitor.connect(addr);
      socket.connect(endpoint);
    } catch (const zmq::error_t& e) {
      return InvalidArgument("cannot connect to '" + endpoint + "': " + e.what(), "client.bad_endpoint");
    }
    return Status::Ok();
  }

  // Sends `body` and waits up to `timeout` for its reply. ErrorReply becomes a Status.
  // `session`, if given, receives the session the reply came in.
  Result<proto::ReplyBody> Call(proto::RequestBody body, milliseconds timeout, std::uint64_t* session = nullptr) {
    RETURN_IF_ERROR(CheckSameProcess());
    std::unique_lock lock(mu_);
    auto r = CallLocked(std::move(body), timeout, nullptr);
    if (session != nullptr) *session = hello.session_id;
    return r;
  }

  // As Call, but gives up (returning false) if the socket is busy for longer than `wait`.
  std::optional<Result<proto::ReplyBody>> TryCall(proto::RequestBody body, milliseconds wait,
                                                  milliseconds timeout) {
    if (auto st = CheckSameProcess(); !st.ok()) return st;
    std::unique_lock lock(mu_, std::defer_lock);
    if (!lock.try_lock_for(wait)) return std::nullopt;
    return CallLocked(std::move(body), timeout, nullptr);
  }

  // A forked child shares its parent's socket, threads and session only as copies of memory:
  // touching them would corrupt the parent's connection.
  weightd::Status CheckSameProcess() const {
    if (::getpid() == pid) return weightd::Status::Ok();
    return FailedPrecondition("this Client was connected in process " + std::to_string(pid) +
                                  "; a forked child cannot use its connection (connect again in the child)",
                              "client.forked");
  }

  // Called by a Lease's destructor: never throws, never blocks behind a long call.
  void ReleaseLease(std::uint64_t lease_id) noexcept {
    // A forked child (a DataLoader worker, say) inherits the lease's tensors but not the lease:
    // only the process that acquired it may talk to the daemon about it.
    if (::getpid() != pid) return;
    try {
      auto r = TryCall(proto::Release{lease_id}, kReleaseTimeout, kReleaseTimeout);
      if (!r.has_value()) {
        std::lock_guard g(pending_mu_);
        pending_releases_.push_back(lease_id);
      }
      // A failed Release is not actionable here: the daemon frees the lease when the session ends.
    } catch (...) {
    }
  }

  void StartHeartbeats() {
    interval_ms_ = hello.heartbeat_interval_ms;
    if (hello.heartbeat_interval_ms == 0) return;
    last_heartbeat_ns_ = Clock::now().time_since_epoch().count();
    heartbeat_thread_ = std::thread([this] { HeartbeatLoop(); });
  }

  // A lease to re-establish after a daemon restart. `session` is the session it was granted in:
  // if a reattach ran since, the lease is acquired again at once.
  void Register(const std::shared_ptr<LeaseRecord>& rec, std::uint64_t session) {
    {
      std::lock_guard g(registry_mu_);
      std::erase_if(registry_, [](const auto& w) { return w.expired(); });
      registry_.push_back(rec);
    }
    std::unique_lock lock(mu_);
    if (hello.session_id != session) Reacquire(*rec, nullptr);
  }
  std::uint64_t reattaches() const { return reattaches_.load(); }
  // Whether the daemon restarted since reattaches() was `before`: asks the daemon for its list,
  // which waits for a daemon that went away (a heartbeat does not) and reattaches if the one
  // answering is a new one. An Acquire whose fd fetch failed because its daemon died between
  // the Manifest and the fetch asks the new daemon again.
  bool RestartedSince(std::uint64_t before) {
    (void)Call(proto::List{}, options.request_timeout);
    return reattaches() != before;
  }

  // A Lease was dropped: release its lease unless a reattach is about to (the record says).
  void EndLease(LeaseRecord& rec) noexcept {
    rec.ended = true;
    if (const std::uint64_t id = rec.id.exchange(0); id != 0) ReleaseLease(id);
  }

 private:
  milliseconds Interval() const { return milliseconds(interval_ms_.load()); }

  // Requires mu_. The daemon does not know this connection's session any more: it restarted (or
  // the connection was replaced). Opens a new session and acquires every live lease again, so
  // that the daemon counts (and keeps) what this process still maps. The mappings themselves
  // never change: they stay valid through the restart.
  weightd::Status ReattachLocked(const std::atomic<bool>* cancel);
  // Requires mu_. Acquires `rec`'s lease again in this session (its fds are fetched and closed).
  void Reacquire(LeaseRecord& rec, const std::atomic<bool>* cancel);
  Clock::time_point LastHeartbeat() const { return Clock::time_point(Clock::duration(last_heartbeat_ns_.load())); }

  // Lets the daemon end the session now instead of at its heartbeat timeout. Best effort:
  // queued without waiting, flushed within the linger time.
  void SayGoodbye() noexcept {
    if (hello.session_id == 0 || ::getpid() != pid) return;
    try {
      socket.set(zmq::sockopt::linger, 200);
      (void)Send(proto::Goodbye{}, next_id_++);
    } catch (...) {
    }
  }

  void StopHeartbeats() {
    {
      std::lock_guard g(hb_mu_);
      stopping_ = true;
    }
    hb_cv_.notify_all();
    if (heartbeat_thread_.joinable()) heartbeat_thread_.join();
  }

  void HeartbeatLoop() {
    std::unique_lock lk(hb_mu_);
    while (!stopping_) {
      if (interval_ms_ == 0) {  // a reattach found a daemon that wants none
        hb_cv_.wait_for(lk, kBusyRetry * 20, [&] { return stopping_.load(); });
        continue;
      }
      auto due = LastHeartbeat() + Interval();
      if (Clock::now() < due) {
        hb_cv_.wait_until(lk, due, [&] { return stopping_.load(); });
        continue;
      }
      lk.unlock();
      std::unique_lock sock(mu_, std::try_to_lock);
      if (sock.owns_lock()) {
        // The reply must arrive within one interval; a late one is discarded by the next call.
        (void)CallLocked(proto::Heartbeat{}, Interval(), &stopping_);
        sock.unlock();
        lk.lock();
      } else {
        // The holder sends heartbeats while it waits; check again shortly in case it is quick.
        lk.lock();
        hb_cv_.wait_for(lk, kBusyRetry, [&] { return stopping_.load(); });
      }
    }
  }

  weightd::Status Send(const proto::RequestBody& body, std::uint64_t id) {
    std::string frame = proto::EncodeRequest(proto::Request{id, body});
    try {
      auto sent = socket.send(zmq::buffer(frame), zmq::send_flags::dontwait);
      if (!sent) return Unavailable("send queue to " + endpoint + " is full", "client.send_failed");
    } catch (const zmq::error_t& e) {
      return Unavailable("send to " + endpoint + ": " + e.what(), "client.send_failed");
    }
    if (std::holds_alternative<proto::Heartbeat>(body))
      last_heartbeat_ns_ = Clock::now().time_since_epoch().count();
    return Status::Ok();
  }

  // Sends queued releases and a due heartbeat; their replies are discarded as leftovers.
  void SendHousekeeping() {
    std::vector<std::uint64_t> releases;
    {
      std::lock_guard g(pending_mu_);
      releases.swap(pending_releases_);
    }
    for (std::uint64_t id : releases) (void)Send(proto::Release{id}, next_id_++);
    if (interval_ms_ != 0 && Clock::now() >= LastHeartbeat() + Interval()) (void)Send(proto::Heartbeat{}, next_id_++);
  }

  // A reply we are not waiting for. If it grants a lease nobody will use (its Acquire timed
  // out), give the lease back so it does not stay pinned until the session ends.
  void DiscardLeftover(const proto::Reply& reply) {
    if (const auto* m = std::get_if<proto::Manifest>(&reply.body); m != nullptr && m->lease_id != 0) {
      std::lock_guard g(pending_mu_);
      pending_releases_.push_back(m->lease_id);
    }
  }

  // Requires mu_. `cancel` (may be null) aborts the wait with Unavailable when it becomes true.
  // A request the daemon answers with protocol.no_session (it restarted) is sent again once,
  // after a reattach; except a Release, whose lease the new daemon never knew (and which must
  // not wait for a reattach: it runs in a Lease's destructor).
  // A request in flight when the connection drops (the daemon died) is sent once more when a
  // daemon is connected again, within connect_timeout; Release, Heartbeat and Goodbye are not
  // (the daemon they were for is gone).
  Result<proto::ReplyBody> CallLocked(proto::RequestBody body, milliseconds timeout,
                                      const std::atomic<bool>* cancel) {
    auto r = CallOnce(body, timeout, cancel);
    const bool once_only = std::holds_alternative<proto::Release>(body) ||
                           std::holds_alternative<proto::Heartbeat>(body) ||
                           std::holds_alternative<proto::Goodbye>(body);
    if (!r.ok() && r.status().reason() == "client.connection_lost" && !once_only) {
      RETURN_IF_ERROR(WaitConnected(body, cancel));
      r = CallOnce(body, timeout, cancel);
    }
    if (r.ok() || r.status().reason() != "protocol.no_session" || std::holds_alternative<proto::Hello>(body) ||
        std::holds_alternative<proto::Release>(body))
      return r;
    RETURN_IF_ERROR(ReattachLocked(cancel));
    return CallOnce(std::move(body), timeout, cancel);
  }

  weightd::Status NoDaemon(const proto::RequestBody& body, const char* what) const {
    return Unavailable("weightd at " + endpoint + " " + what + " (" + std::string(RequestName(body)) +
                           " not answered; waited " + Seconds(options.connect_timeout) + " for it to come back)",
                       "client.no_daemon");
  }

  // Requires mu_. Waits up to connect_timeout for a daemon to accept the connection again.
  weightd::Status WaitConnected(const proto::RequestBody& body, const std::atomic<bool>* cancel) {
    const auto deadline = Clock::now() + options.connect_timeout;
    while (!connected_) {
      const auto now = Clock::now();
      if (now >= deadline) return NoDaemon(body, "went away and did not come back");
      if (cancel != nullptr && cancel->load()) return Unavailable("client is shutting down", "client.closed");
      zmq::pollitem_t item{monitor.handle(), 0, ZMQ_POLLIN, 0};
      try {
        zmq::poll(&item, 1, std::min(kCancelSlice, std::chrono::ceil<milliseconds>(deadline - now)));
      } catch (const zmq::error_t& e) {
        if (e.num() != EINTR) return Internal("zmq poll on " + endpoint + ": " + e.what(), "client.poll_failed");
      }
      RETURN_IF_ERROR(ReadConnectionEvents());
    }
    return weightd::Status::Ok();
  }

  Result<proto::ReplyBody> CallOnce(const proto::RequestBody& body, milliseconds timeout,
                                    const std::atomic<bool>* cancel) {
    const std::uint64_t id = next_id_++;
    // Events from before this request (an earlier disconnect) are not about it.
    RETURN_IF_ERROR(ReadConnectionEvents());
    const std::uint64_t losses_before = losses_;
    RETURN_IF_ERROR(Send(body, id));
    const auto deadline = Clock::now() + timeout;
    std::optional<Clock::time_point> unconnected_since;
    for (;;) {
      SendHousekeeping();
      auto now = Clock::now();
      if (losses_ != losses_before)
        return Unavailable("weightd at " + endpoint + " closed the connection while " +
                               std::string(RequestName(body)) + " was in flight",
                           "client.connection_lost");
      if (connected_) {
        unconnected_since.reset();
      } else if (!unconnected_since) {
        unconnected_since = now;
      } else if (now - *unconnected_since >= options.connect_timeout) {
        return NoDaemon(body, "is not there");
      }
      if (now >= deadline)
        return DeadlineExceeded("no reply to " + std::string(RequestName(body)) + " from " + endpoint +
                                    " within " + Seconds(timeout),
                                "client.timeout");
      auto slice = std::chrono::ceil<milliseconds>(deadline - now);
      if (interval_ms_ != 0)
        slice = std::min(slice, std::max(milliseconds(1), std::chrono::ceil<milliseconds>(
                                                             LastHeartbeat() + Interval() - now)));
      if (cancel != nullptr) {
        if (cancel->load()) return Unavailable("client is shutting down", "client.closed");
        slice = std::min(slice, kCancelSlice);
      }
      if (unconnected_since) slice = std::min(slice, kCancelSlice);
      zmq::pollitem_t items[] = {{socket.handle(), 0, ZMQ_POLLIN, 0}, {monitor.handle(), 0, ZMQ_POLLIN, 0}};
      try {
        zmq::poll(items, 2, slice);
      } catch (const zmq::error_t& e) {
        if (e.num() == EINTR) continue;
        return Internal("zmq poll on " + endpoint + ": " + e.what(), "client.poll_failed");
      }
      // Replies first: one that arrived before the connection dropped still counts.
      if ((items[0].revents & ZMQ_POLLIN) == 0) {
        if ((items[1].revents & ZMQ_POLLIN) != 0) RETURN_IF_ERROR(ReadConnectionEvents());
        continue;
      }
      while (true) {
        zmq::message_t msg;
        try {
          if (!socket.recv(msg, zmq::recv_flags::dontwait)) break;
        } catch (const zmq::error_t& e) {
          if (e.num() == EINTR) continue;
          return Internal("zmq recv on " + endpoint + ": " + e.what(), "client.recv_failed");
        }
        auto reply = proto::DecodeReply(std::string_view(static_cast<const char*>(msg.data()), msg.size()));
        if (!reply.ok()) return reply.status().WithContext("reply from weightd at " + endpoint);
        if (reply->id == 0) {
          // The daemon could not decode a request of ours, so it could not echo its id: the
          // request in flight is the one it means.
          if (auto* err = std::get_if<proto::ErrorReply>(&reply->body))
            return proto::FromErrorReply(*err).WithContext(std::string(RequestName(body)) + " refused");
          continue;
        }
        if (reply->id != id) {
          DiscardLeftover(*reply);
          continue;
        }
        if (auto* err = std::get_if<proto::ErrorReply>(&reply->body)) return proto::FromErrorReply(*err);
        return std::move(reply->body);
      }
      if ((items[1].revents & ZMQ_POLLIN) != 0) RETURN_IF_ERROR(ReadConnectionEvents());
    }
  }

  // Requires mu_. Drains the connection's monitor events. A daemon that closes the connection
  // before its handshake, again and again, refuses this user (its per-user connection limit);
  // one whose ZAP handler refuses it, refuses this peer.
  weightd::Status ReadConnectionEvents() {
    for (;;) {
      zmq::message_t head, addr;
      if (!monitor.recv(head, zmq::recv_flags::dontwait)) return weightd::Status::Ok();
      if (head.more()) (void)monitor.recv(addr, zmq::recv_flags::none);
      const auto ev = proto::DecodeMonitorEvent(head.to_string_view());
      if (!ev) continue;
      const std::uint16_t event = ev->event;
      if (event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
        closed_early_ = 0;
      } else if (event == ZMQ_EVENT_DISCONNECTED && connected_) {
        ++losses_;
      } else if (event == ZMQ_EVENT_DISCONNECTED && !connected_) {
        ++closed_early_;
      } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
        return PermissionDenied("weightd at " + endpoint + " refused this connection (ZAP status " +
                                    std::to_string(ev->value) + "); its log says why",
                                "client.refused");
      }
      connected_ = event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED;
      if (closed_early_ >= kClosedEarlyLimit) {
        closed_early_ = 0;
        return ResourceExhausted("weightd at " + endpoint + " closed this connection before its handshake " +
                                     std::to_string(kClosedEarlyLimit) +
                                     " times in a row: this user holds daemon.max_connections_per_user "
                                     "connections already (close some), or the daemon is overloaded",
                                 "client.connection_refused");
      }
    }
  }

  zmq::context_t context{1};
  SocketMutex mu_;
  // Guarded by mu_.
  zmq::socket_t socket;
  zmq::socket_t monitor;   // PAIR: events of `socket`'s connection
  bool connected_ = false;  // the last event was a finished handshake
  int closed_early_ = 0;    // closures before a handshake since the last finished one
  std::uint64_t losses_ = 0;  // established connections that dropped
  std::uint64_t next_id_ = 1;

  std::mutex pending_mu_;
  std::vector<std::uint64_t> pending_releases_;  // guarded by pending_mu_

  std::mutex registry_mu_;
  std::vector<std::weak_ptr<LeaseRecord>> registry_;  // guarded by registry_mu_
  std::atomic<std::uint64_t> reattaches_{0};

  std::atomic<std::uint32_t> interval_ms_{0};  // the session's heartbeat interval
  std::atomic<Clock::rep> last_heartbeat_ns_{0};
  std::mutex hb_mu_;
  std::condition_variable hb_cv_;
  std::atomic<bool> stopping_{false};  // written under hb_mu_, read anywhere
  std::thread heartbeat_thread_;

  std::mutex cuda_mu_;
  std::shared_ptr<gpu::CudaApi> cuda_;                  // guarded by cuda_mu_
  weightd::Status cuda_error_;                          // guarded by cuda_mu_
  std::map<int, std::shared_ptr<Warmup>> warmups_;      // guarded by cuda_mu_
};

// ---- Lease ----------------------------------------------------------------------------------

struct Lease::Impl {
  std::shared_ptr<Client::Impl> client;  // keeps the connection alive for Release
  std::shared_ptr<gpu::CudaApi> cuda;    // GPU leases; outlives `imports`
  // The daemon's id (replaced by a reattach) and what was asked.
  std::shared_ptr<LeaseRecord> record = std::make_shared<LeaseRecord>();
  std::string model;
  std::string device;
  int cuda_device = -1;
  std::string gpu_uuid;
  std::string model_dir;
  bool writable = false;                 // host mappings are private and copy-on-write
  std::vector<posix::Mapping> mappings;  // one per segment; empty for size-0 segments
  // Read-only host mappings, as the write-fault explainer knows them (ids of its table).
  std::vector<write_faults::RangeInfo> fault_infos;  // never resized once registered
  std::vector<std::size_t> fault_ids;
  std::vector<gpu::GpuImport> imports;   // GPU leases: one per segment
  std::vector<Tensor> tensors;
  std::vector<ShardInfo> shards;
  std::unordered_map<std::string_view, std::size_t> by_name;  // views into tensors[i].name
  std::size_t total_bytes = 0;
  std::chrono::microseconds attach_time{0};

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  ~Impl() {
    for (std::size_t id : fault_ids) write_faults::Unregister(id);
    // Unmap first, so that when the daemon counts the lease as gone no mapping remains. A forked
    // child must not touch its parent's CUDA state.
    mappings.clear();
    if (client != nullptr && ::getpid() != client->pid) {
      for (auto& im : imports) im.Abandon();
      (void)new std::shared_ptr<gpu::CudaApi>(std::move(cuda));  // abandoned, like the Client
    }
    imports.clear();
    if (client != nullptr) client->EndLease(*record);
  }

  // Tells the write-fault explainer about the read-only host mappings.
  void RegisterReadOnlyRanges() {
    fault_infos.reserve(mappings.size());
    for (std::size_t i = 0; i < mappings.size(); ++i)
      fault_infos.push_back(write_faults::RangeInfo{model, i < shards.size() ? shards[i].file : std::string(), &tensors});
    for (std::size_t i = 0; i < mappings.size(); ++i)
      if (std::size_t id = write_faults::Register(mappings[i].data(), mappings[i].size(), &fault_infos[i]); id != 0)
        fault_ids.push_back(id);
  }
};


namespace {
const std::string kEmptyString;
const std::vector<Tensor> kNoTensors;
const std::vector<ShardInfo> kNoShards;
}  // namespace

std::uint64_t Lease::id() const { return impl_ ? impl_->record->id.load() : 0; }
int Lease::cuda_device() const { return impl_ ? impl_->cuda_device : -1; }
const std::string& Lease::gpu_uuid() const { return impl_ ? impl_->gpu_uuid : kEmptyString; }
const std::string& Lease::model() const { return impl_ ? impl_->model : kEmptyString; }
const std::string& Lease::device() const { return impl_ ? impl_->device : kEmptyString; }
const std::string& Lease::model_dir() const { return impl_ ? impl_->model_dir : kEmptyString; }
bool Lease::writable() const { return impl_ && impl_->writable; }
const std::vector<Tensor>& Lease::tensors() const { return impl_ ? impl_->tensors : kNoTensors; }
const std::vector<ShardInfo>& Lease::shards() const { return impl_ ? impl_->shards : kNoShards; }
std::size_t Lease::total_bytes() const { return impl_ ? impl_->total_bytes : 0; }
std::chrono::microseconds Lease::attach_time() const {
  return impl_ ? impl_->attach_time : std::chrono::microseconds(0);
}
Status Lease::copy_to_host(const Tensor& t, std::uint64_t offset, std::uint64_t size, void* dst) const {
  if (!impl_) return FailedPrecondition("empty lease", "client.empty_lease");
  const Tensor* own = find(t.name);
  if (own == nullptr || own->data != t.data || own->nbytes != t.nbytes)
    return InvalidArgument("tensor '" + t.name + "' is not a tensor of this lease", "client.bad_tensor");
  if (offset > t.nbytes || size > t.nbytes - offset)
    return InvalidArgument("bytes [" + std::to_string(offset) + ", +" + std::to_string(size) + ") lie outside tensor '" +
                               t.name + "' of " + std::to_string(t.nbytes) + " bytes",
                           "client.bad_range");
  if (size == 0) return Status::Ok();
  if (impl_->cuda_device < 0) {
    std::memcpy(dst, t.data + offset, size);
    return Status::Ok();
  }
  RETURN_IF_ERROR(impl_->cuda->SetDevice(impl_->cuda_device));
  return impl_->cuda->CopyDeviceToHost(dst, reinterpret_cast<gpu::DevicePtr>(t.data) + offset, size)
      .WithContext("copying tensor '" + t.name + "' to the host");
}

const Tensor* Lease::find(std::string_view name) const {
  if (!impl_) return nullptr;
  auto it = impl_->by_name.find(name);
  return it == impl_->by_name.end() ? nullptr : &impl_->tensors[it->second];
}

// ---- Client ---------------------------------------------------------------------------------

Client::Client(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::Client(Client&&) noexcept = default;
Client& Client::operator=(Client&&) noexcept = default;
Client::~Client() = default;

namespace {
Status MovedFrom() { return FailedPrecondition("this Client was moved from", "client.moved_from"); }
}  // namespace

Result<Client> Client::Connect(ClientOptions options) {
  std::string endpoint = options.endpoint;
  if (endpoint.empty()) {
    const char* env = std::getenv("WEIGHTD_SOCKET");
    endpoint = env != nullptr && *env != '\0' ? env : kDefaultEndpoint;
  }
  // libzmq retries a refused ipc connect silently until the timeout; say at once when it is the
  // socket's (or its directory's) permissions.
  if (endpoint.starts_with("ipc://") && ::access(endpoint.c_str() + 6, R_OK | W_OK) != 0 && errno == EACCES)
    return PermissionDenied("may not connect to " + endpoint + ": permission denied (the socket belongs to the "
                            "daemon's client group; ask its admin to add this user to it)",
                            "client.socket_denied");
  // In a forked child the Impl is a copy of the parent's memory: its heartbeat thread and its
  // ZeroMQ context's threads do not exist there, so tearing it down would hang or corrupt the
  // parent's connection. The child abandons it.
  auto impl = std::shared_ptr<Impl>(new Impl(endpoint, options), [](Impl* p) {
    if (::getpid() == p->pid) delete p;
  });
  RETURN_IF_ERROR(impl->Open());
  if (options.prepare_cuda_device >= 0) {
    // Overlap the context's creation with the handshake; errors surface at Acquire.
    if (auto api = impl->Cuda(); api.ok()) (void)impl->WarmupOf(api->get(), options.prepare_cuda_device);
  }
  auto reply = impl->Call(proto::Hello{options.client_name}, options.connect_timeout);
  if (!reply.ok()) {
    if (reply.status().code() == Code::kDeadlineExceeded)
      return Unavailable("no weightd daemon answered at " + endpoint + " within " + Seconds(options.connect_timeout),
                         "client.no_daemon");
    return reply.status().WithContext("handshake with weightd at " + endpoint);
  }
  auto* hello = std::get_if<proto::HelloReply>(&*reply);
  if (hello == nullptr) return UnexpectedReply(proto::Hello{}, *reply);
  impl->hello = *hello;
  impl->StartHeartbeats();
  return Client(std::move(impl));
}

namespace {

// The files a host lease's segments come in: the fds the daemon offers for it.
std::size_t HostFileCount(const proto::Manifest& m) {
  std::uint64_t n = 0;
  for (const auto& s : m.segments) n += posix::PartCount(s.size, s.part_size);
  return static_cast<std::size_t>(n);
}

// The lease's fds from the daemon's fd socket: `expected` of them, in manifest order. None
// (and no connection) when `expected` is 0.
Result<std::vector<posix::Fd>> FetchLeaseFds(const proto::Manifest& m, std::size_t expected) {
  if (expected == 0) return std::vector<posix::Fd>();
  if (m.fd_token.empty() || m.fd_token.size() > fdchan::kMaxTokenBytes || m.fd_socket.empty() ||
      m.fd_socket[0] != '/' || m.fd_socket.size() > 107)
    return BadManifest(m.model, "no usable fd socket and token");
  ASSIGN_OR_RETURN(fdchan::FdReply reply, fdchan::FetchFds(m.fd_socket, m.fd_token, kFdFetchTimeout, expected));
  if (reply.payload != std::to_string(m.lease_id) || reply.fds.size() != expected)
    return BadManifest(m.model, "the fd socket answered for lease '" + reply.payload.substr(0, 32) + "' with " +
                                    std::to_string(reply.fds.size()) + " fds, expected lease " +
                                    std::to_string(m.lease_id) + " with " + std::to_string(expected));
  return std::move(reply.fds);
}

// Maps the host segments of a validated manifest. The daemon hands them over as read-only fds
// (the segments themselves need not be readable by this process's uid or groups).
// `writable`: private copy-on-write mappings (the fd is read-only, which MAP_PRIVATE allows).
// A segment may come in several files (SegmentInfo::part_size), mapped back to back.
// `writable`: private copy-on-write mappings (the fd is read-only, which MAP_PRIVATE allows).
Status MapHostSegments(const proto::Manifest& m, bool writable, Lease::Impl& lease) {
  ASSIGN_OR_RETURN(std::vector<posix::Fd> fds, FetchLeaseFds(m, HostFileCount(m)));
  lease.mappings.reserve(m.segments.size());
  std::size_t next = 0;
  for (const auto& seg : m.segments) {
    const std::string ctx = "mapping model '" + m.model + "' shard " + seg.file;
    const std::uint64_t parts = posix::PartCount(seg.size, seg.part_size);
    std::vector<int> raw;
    for (std::uint64_t k = 0; k < parts; ++k) {
      const int fd = fds[next++].get();
      // Every file but the last holds part_size bytes; the last the rest.
      const std::uint64_t want = parts == 1 ? seg.size : std::min(seg.part_size, seg.size - k * seg.part_size);
      ASSIGN_OR_RETURN(posix::FileInfo st, posix::Stat(fd, seg.shm_name));
      if (st.size < want)
        return DataLoss(ctx + ": segment " + seg.shm_name + " part " + std::to_string(k) + " holds " +
                            std::to_string(st.size) + " bytes, the manifest says " + std::to_string(want),
                        "client.segment_truncated");
      raw.push_back(fd);
    }
    auto mapping = posix::MapParts(raw, seg.size, parts == 1 ? 0 : seg.part_size,
                                   writable ? PROT_READ | PROT_WRITE : PROT_READ, writable ? MAP_PRIVATE : MAP_SHARED,
                                   seg.shm_name);
    if (!mapping.ok()) return mapping.status().WithContext(ctx);
    lease.mappings.push_back(std::move(mapping).value());
  }
  return Status::Ok();
}

// Fetches the fds of a VMM lease (or takes the legacy handles) and imports every shard on
// `ordinal`, once the context warm-up is done.
Status ImportGpuSegments(const proto::Manifest& m, gpu::CudaApi* api, int ordinal, Warmup& warm,
                         Lease::Impl& lease) {
  const bool vmm = m.gpu_export == static_cast<std::uint8_t>(proto::GpuExport::kVmm);
  std::vector<posix::Fd> fds;
  if (vmm) {
    ASSIGN_OR_RETURN(fds, FetchLeaseFds(m, m.segments.size()));
  }
  {
    std::lock_guard g(warm.mu);
    RETURN_IF_ERROR(warm.w.Wait().status());
  }
  lease.imports.reserve(m.segments.size());
  for (std::size_t i = 0; i < m.segments.size(); ++i) {
    const auto& seg = m.segments[i];
    auto im = vmm ? gpu::GpuImport::ImportVmm(api, ordinal, fds[i].get(), seg.gpu_alloc_size)
                  : gpu::GpuImport::ImportLegacy(api, ordinal, seg.ipc_handle, seg.data_size);
    if (!im.ok()) return im.status().WithContext("model '" + m.model + "' shard " + seg.file);
    lease.imports.push_back(std::move(im).value());
  }
  return Status::Ok();
}

}  // namespace

weightd::Status Client::Impl::ReattachLocked(const std::atomic<bool>* cancel) {
  auto reply = CallOnce(proto::Hello{options.client_name}, options.connect_timeout, cancel);
  if (!reply.ok()) return reply.status().WithContext("reattaching to weightd at " + endpoint);
  auto* h = std::get_if<proto::HelloReply>(&*reply);
  if (h == nullptr) return UnexpectedReply(proto::Hello{}, *reply);
  hello = *h;
  interval_ms_ = h->heartbeat_interval_ms;
  std::vector<std::shared_ptr<LeaseRecord>> live;
  {
    std::lock_guard g(registry_mu_);
    for (const auto& w : registry_)
      if (auto l = w.lock()) live.push_back(std::move(l));
  }
  for (const auto& rec : live) Reacquire(*rec, cancel);
  reattaches_.fetch_add(1);
  return weightd::Status::Ok();
}

void Client::Impl::Reacquire(LeaseRecord& rec, const std::atomic<bool>* cancel) {
  // The old daemon's id means nothing to the new one.
  rec.id = 0;
  if (rec.ended) return;
  auto r = CallOnce(rec.request, options.request_timeout, cancel);
  if (!r.ok()) return;  // the mappings stay valid; the daemon does not count them
  auto* m = std::get_if<proto::Manifest>(&*r);
  if (m == nullptr) return;
  // The mappings stay as they are; take the fds the daemon prepared and close them, so that its
  // one-time token does not wait for its timeout.
  const bool host = m->device == "cpu";
  const bool vmm = !host && m->gpu_export == static_cast<std::uint8_t>(proto::GpuExport::kVmm);
  const std::size_t expected = host ? HostFileCount(*m) : m->segments.size();
  if ((host || vmm) && expected > 0) (void)FetchLeaseFds(*m, expected);
  rec.id = m->lease_id;
  // Dropped meanwhile: whichever of this and EndLease takes the id back releases it.
  if (rec.ended)
    if (const std::uint64_t id = rec.id.exchange(0); id != 0) {
      std::lock_guard g(pending_mu_);
      pending_releases_.push_back(id);
    }
}

Result<Lease> Client::Acquire(std::string_view model, const AcquireOptions& options) {
  if (!impl_) return MovedFrom();
  const auto start = Clock::now();
  proto::Acquire req{std::string(model), options.device, options.tensor_filter};

  // GPU: find the device, start its context, and ask the daemon by UUID (ordinals differ
  // between processes).
  std::shared_ptr<gpu::CudaApi> api;
  std::shared_ptr<Warmup> warm;
  int ordinal = -1;
  std::string uuid;
  if (options.device != "cpu") {
    if (options.writable)
      return InvalidArgument("a writable lease maps host memory copy-on-write; on " + options.device +
                                 " take a device-to-device copy of the tensors instead",
                             "client.writable_gpu");
    auto cuda_ordinal = ParseCudaOrdinal(options.device);
    const bool by_uuid = options.device.size() > 4 && EqualsIgnoreCase(options.device.substr(0, 4), "gpu-");
    if (!cuda_ordinal && !by_uuid)
      return InvalidArgument("unknown device '" + options.device + "' (use cpu, cuda:N or GPU-<uuid>)",
                             "client.bad_device");
    ASSIGN_OR_RETURN(api, impl_->Cuda());
    if (cuda_ordinal) {
      ordinal = *cuda_ordinal;
    } else {
      ASSIGN_OR_RETURN(ordinal, gpu::FindLocalOrdinal(api.get(), options.device));
    }
    warm = impl_->WarmupOf(api.get(), ordinal);
    {
      std::lock_guard g(warm->mu);
      const Result<gpu::DeviceInfo>& info = warm->w.Device();
      if (!info.ok()) return info.status().WithContext("device " + options.device);
      uuid = info->uuid;
    }
    req.device = uuid;
  }

  // The session the lease is granted in (a reattach may run before it is registered).
  std::uint64_t session = 0;
  const std::uint64_t reattaches = impl_->reattaches();
  ASSIGN_OR_RETURN(proto::ReplyBody body, impl_->Call(req, impl_->options.request_timeout, &session));
  auto* manifest = std::get_if<proto::Manifest>(&body);
  if (manifest == nullptr) return UnexpectedReply(req, body);
  proto::Manifest& m = *manifest;

  // From here on the lease exists on the daemon; any early return destroys `lease`, whose
  // destructor sends the Release.
  auto lease = std::make_shared<Lease::Impl>();
  lease->client = impl_;
  lease->record->id = m.lease_id;
  lease->model = m.model;
  lease->model_dir = m.model_dir;
  RETURN_IF_ERROR(ValidateManifest(m, ordinal >= 0));
  if (ordinal < 0) {
    if (m.device != "cpu") return BadManifest(m.model, "asked for host memory, got memory on '" + m.device + "'");
    lease->device = "cpu";
    lease->writable = options.writable;
    if (weightd::Status st = MapHostSegments(m, options.writable, *lease); !st.ok())
      return impl_->RestartedSince(reattaches) ? Acquire(model, options) : Result<Lease>(st);
  } else {
    RETURN_IF_ERROR(ValidateGpuManifest(m, uuid));
    lease->cuda = api;
    lease->cuda_device = ordinal;
    lease->device = "cuda:" + std::to_string(ordinal);
    lease->gpu_uuid = uuid;
    if (weightd::Status st = ImportGpuSegments(m, api.get(), ordinal, *warm, *lease); !st.ok())
      return impl_->RestartedSince(reattaches) ? Acquire(model, options) : Result<Lease>(st);
  }

  lease->shards.reserve(m.segments.size());
  for (const auto& seg : m.segments) lease->shards.push_back(ShardInfo{seg.file, seg.file_data_offset, seg.data_size});
  lease->tensors.reserve(m.tensors.size());
  lease->by_name.reserve(m.tensors.size());
  for (auto& rec : m.tensors) {
    Tensor t;
    t.name = std::move(rec.name);
    t.dtype = static_cast<DType>(rec.dtype);
    t.shape = std::move(rec.shape);
    const std::byte* base = nullptr;
    if (ordinal < 0) base = lease->mappings[rec.segment].data();
    else base = reinterpret_cast<const std::byte*>(lease->imports[rec.segment].ptr());
    t.data = base != nullptr ? base + rec.offset : nullptr;
    t.nbytes = static_cast<std::size_t>(rec.nbytes);
    t.shard = rec.segment;
    t.offset = rec.offset;
    lease->total_bytes += t.nbytes;
    lease->tensors.push_back(std::move(t));
  }
  for (std::size_t i = 0; i < lease->tensors.size(); ++i) lease->by_name.emplace(lease->tensors[i].name, i);
  if (ordinal < 0 && !lease->writable) lease->RegisterReadOnlyRanges();
  lease->attach_time = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start);
  lease->record->request = std::move(req);
  impl_->Register(lease->record, session);
  return Lease(std::shared_ptr<const Lease::Impl>(std::move(lease)));
}

std::uint64_t Client::reconnects() const { return impl_ ? impl_->reattaches() : 0; }

Result<std::vector<ModelInfo>> Client::List() {
  if (!impl_) return MovedFrom();
  ASSIGN_OR_RETURN(proto::ReplyBody body, impl_->Call(proto::List{}, impl_->options.request_timeout));
  auto* list = std::get_if<proto::ModelList>(&body);
  if (list == nullptr) return UnexpectedReply(proto::List{}, body);
  return std::move(list->models);
}

Result<ModelInfo> Client::Status(std::string_view model) {
  if (!impl_) return MovedFrom();
  proto::StatusRequest req{std::string(model)};
  ASSIGN_OR_RETURN(proto::ReplyBody body, impl_->Call(req, impl_->options.request_timeout));
  auto* s = std::get_if<proto::ModelStatus>(&body);
  if (s == nullptr) return UnexpectedReply(req, body);
  return std::move(*s);
}

Result<ModelInfo> Client::Load(std::string_view model) {
  if (!impl_) return MovedFrom();
  proto::Load req{std::string(model)};
  ASSIGN_OR_RETURN(proto::ReplyBody body, impl_->Call(req, impl_->options.request_timeout));
  auto* s = std::get_if<proto::ModelStatus>(&body);
  if (s == nullptr) return UnexpectedReply(req, body);
  return std::move(*s);
}

weightd::Status Client::Evict(std::string_view model, std::string_view device) {
  if (!impl_) return MovedFrom();
  proto::Evict req{std::string(model), std::string(device)};
  ASSIGN_OR_RETURN(proto::ReplyBody body, impl_->Call(req, impl_->options.request_timeout));
  if (!std::holds_alternative<proto::OkReply>(body)) return UnexpectedReply(req, body);
  return weightd::Status::Ok();
}

Result<DaemonStats> Client::Stats() {
  if (!impl_) return MovedFrom();
  ASSIGN_OR_RETURN(proto::ReplyBody body, impl_->Call(proto::Stats{}, impl_->options.request_timeout));
  auto* s = std::get_if<proto::DaemonStats>(&body);
  if (s == nullptr) return UnexpectedReply(proto::Stats{}, body);
  return std::move(*s);
}

}  // namespace weightd
