#include "fd_server.h"

#include <sys/epoll.h>

#include <cstring>

#include <spdlog/spdlog.h>

namespace weightd {
namespace {

using Ms = std::chrono::milliseconds;

// A token is good for this long after its Manifest was sent, a connection must present its
// token within the second limit, and at most this many may be pending.
constexpr Ms kTokenTtl{30'000};
constexpr Ms kConnTimeout{2'000};
constexpr std::size_t kMaxConnections = 256;
constexpr Ms kSendTimeout{200};
constexpr std::size_t kTokenBytes = 32;

}  // namespace

FdServer::FdServer(const Clock* clock, Sessions& sessions, const SegmentStore& store, const posix::Fd& epoll,
                   std::uint64_t conn_tag)
    : clock_(clock), sessions_(sessions), store_(store), epoll_(epoll), conn_tag_(conn_tag) {}

FdServer::~FdServer() {
  if (listener_) (void)listener_->Unlink();
}

Status FdServer::Bind(const std::string& path, std::uint64_t listen_tag) {
  auto listener = fdchan::FdListener::Bind(path, 0660);
  if (!listener.ok()) return listener.status().WithContext("binding the fd socket");
  listener_.emplace(std::move(listener).value());
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = listen_tag;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, listener_->fd(), &ev) != 0) return posix::ErrnoStatus("epoll_ctl(ADD)");
  return Status::Ok();
}

Result<std::string> FdServer::Offer(std::uint64_t session_id, std::uint64_t lease_id,
                                    std::shared_ptr<const gpu::GpuCopy> copy, std::vector<std::uint32_t> shards,
                                    std::vector<std::string> shm_names) {
  std::string token(kTokenBytes, '\0');
  RETURN_IF_ERROR(posix::RandomBytes(std::as_writable_bytes(std::span(token.data(), token.size()))));
  const bool host = copy == nullptr;
  pending_[token] = Pending{session_id, lease_id, copy, std::move(shards), host, std::move(shm_names),
                            clock_->Now() + kTokenTtl};
  return token;
}

void FdServer::ForgetLease(std::uint64_t session_id, std::uint64_t lease_id) {
  std::erase_if(pending_, [&](const auto& kv) { return kv.second.session_id == session_id && kv.second.lease_id == lease_id; });
}

void FdServer::ForgetLease(std::uint64_t lease_id) {
  std::erase_if(pending_, [&](const auto& kv) { return kv.second.lease_id == lease_id; });
}

void FdServer::ForgetSession(std::uint64_t session_id) {
  std::erase_if(pending_, [&](const auto& kv) { return kv.second.session_id == session_id; });
}

void FdServer::Accept() {
  for (;;) {
    auto conn = listener_->Accept();
    if (!conn.ok()) {
      spdlog::warn("fd socket: {}", conn.status().ToString());
      return;
    }
    if (!conn->has_value()) return;
    fdchan::FdConnection c = std::move(**conn);
    if (clients_.size() >= kMaxConnections) {
      // Never wait on this peer: a fresh socket takes the short reply at once, or it goes unsent.
      (void)c.SendReply(ResourceExhausted("too many pending fd requests; try again", "fdchan.busy"), {}, {}, Ms(0));
      continue;
    }
    const int fd = c.fd();
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = conn_tag_ | static_cast<std::uint64_t>(fd);
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
      spdlog::warn("fd socket: epoll_ctl: {}", std::strerror(errno));
      continue;
    }
    clients_.emplace(fd, Client{std::move(c), clock_->Now() + kConnTimeout});
  }
}

void FdServer::CloseClient(int fd) {
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  clients_.erase(fd);
}

// One request per connection: a token, answered with the lease's fds or an error, then closed.
void FdServer::Serve(int fd) {
  auto it = clients_.find(fd);
  if (it == clients_.end()) return;
  fdchan::FdConnection& conn = it->second.conn;
  auto token = conn.TryReadToken();
  if (token.ok() && !token->has_value()) return;  // not all there yet
  if (!token.ok()) {
    if (token.status().reason() != "fdchan.peer_closed") (void)conn.SendReply(token.status(), {}, {}, kSendTimeout);
    CloseClient(fd);
    return;
  }
  auto deny = [&](const std::string& why) {
    spdlog::warn("fd socket: refused pid {} (uid {}): {}", conn.peer().pid, conn.peer().uid, why);
    (void)conn.SendReply(PermissionDenied("fd request refused: " + why, "fdchan.denied"), {}, {}, kSendTimeout);
    CloseClient(fd);
  };
  auto p = pending_.find(**token);
  if (p == pending_.end()) return deny("unknown, expired or already used token");
  Pending pending = std::move(p->second);
  pending_.erase(p);  // one use, whatever happens next
  Session* s = sessions_.FindById(pending.session_id);
  if (s == nullptr || s->leases.count(pending.lease_id) == 0 || Sessions::PeerGone(*s)) return deny("the lease has ended");
  // The token travelled over the session's ZeroMQ connection; the process presenting it must be
  // the one that opened that session.
  if (conn.peer().uid != s->peer.uid || conn.peer().pid != s->peer.pid)
    return deny("credentials do not match the session (pid " + std::to_string(s->peer.pid) + ")");
  auto fds = LeaseFds(pending);
  if (!fds.ok()) {
    if (fds.status().reason() == "fdchan.lease_ended") return deny("the lease has ended");
    spdlog::error("exporting fds of lease {}: {}", pending.lease_id, fds.status().ToString());
    (void)conn.SendReply(fds.status(), {}, {}, kSendTimeout);
    CloseClient(fd);
    return;
  }
  std::vector<int> raw;
  raw.reserve(fds->size());
  for (const posix::Fd& f : *fds) raw.push_back(f.get());
  Status sent = conn.SendReply(Status::Ok(), std::to_string(pending.lease_id), raw, kSendTimeout);
  if (!sent.ok()) spdlog::warn("fd socket: sending fds of lease {}: {}", pending.lease_id, sent.ToString());
  CloseClient(fd);  // our copies of the fds close with `fds`
}

Result<std::vector<posix::Fd>> FdServer::LeaseFds(const Pending& p) {
  std::vector<posix::Fd> out;
  if (!p.host) {  // a VMM export
    std::shared_ptr<const gpu::GpuCopy> copy = p.copy.lock();
    if (copy == nullptr) return FailedPrecondition("the lease has ended", "fdchan.lease_ended");
    ASSIGN_OR_RETURN(std::vector<posix::Fd> all, copy->ExportFds());
    for (std::uint32_t i : p.shards) out.push_back(std::move(all.at(i)));
    return out;
  }
  // Host segments. A name that is gone means the segment was replaced (a reload), which ends
  // what the lease referred to.
  for (const std::string& name : p.shm_names) {
    auto fd = store_.OpenReadOnly(name);
    if (!fd.ok()) {
      if (fd.status().code() == Code::kNotFound) return FailedPrecondition("the lease has ended", "fdchan.lease_ended");
      return fd.status();
    }
    out.push_back(std::move(fd).value());
  }
  return out;
}

void FdServer::Expire(Clock::TimePoint now) {
  std::erase_if(pending_, [&](const auto& kv) { return kv.second.expires <= now; });
  std::vector<int> stale;
  for (const auto& [fd, c] : clients_)
    if (c.expires <= now) stale.push_back(fd);
  for (int fd : stale) CloseClient(fd);
}

}  // namespace weightd
