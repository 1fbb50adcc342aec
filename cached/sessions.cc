#include "sessions.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include <spdlog/spdlog.h>

namespace weightd {

Sessions::Sessions(Limits limits, const Clock* clock, const posix::Fd& epoll, std::uint64_t pid_tag)
    : limits_(limits),
      clock_(clock),
      epoll_(epoll),
      pid_tag_(pid_tag),
      leases_(limits.max_sessions, limits.max_leases_per_client) {}

Result<Session*> Sessions::Open(const std::string& rid, const std::string& client_name, const auth::Identity& who,
                                std::uint64_t* opened) {
  const PeerCred peer{who.uid, who.gid, who.pid};
  const bool fresh = leases_.Find(rid) == nullptr;
  if (fresh && leases_.SessionsOf(who.uid) >= limits_.max_sessions_per_user)
    return ResourceExhausted("uid " + std::to_string(who.uid) + " already holds " +
                                 std::to_string(limits_.max_sessions_per_user) +
                                 " sessions, daemon.max_sessions_per_user; close some first",
                             "limits.sessions_per_user");
  ASSIGN_OR_RETURN(Session * s, leases_.Open(rid, client_name, peer, clock_->Now()));
  if (fresh && peer.pid > 0) {
    // A pidfd turns readable when the process exits: death is noticed at once, not after the
    // heartbeat timeout, and a later process with the same pid is not this one.
    int pfd = static_cast<int>(::syscall(SYS_pidfd_open, peer.pid, 0));
    if (pfd < 0 && errno == ESRCH) {
      *opened = s->id;
      return FailedPrecondition("the connecting process has exited", "auth.peer_gone");
    }
    if (pfd >= 0) {
      ::fcntl(pfd, F_SETFD, FD_CLOEXEC);
      s->pidfd.reset(pfd);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = pid_tag_ | s->id;
      if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, pfd, &ev) != 0) s->pidfd.reset();
    } else {
      spdlog::debug("pidfd_open({}) failed: {}; relying on heartbeats and the start time", peer.pid, std::strerror(errno));
    }
    if (!s->pidfd.valid()) s->start_time = auth::ProcessStartTime(peer.pid);
  }
  if (fresh) spdlog::info("session {} opened by '{}' (uid {}, pid {})", s->id, s->client_name, peer.uid, peer.pid);
  return s;
}

bool Sessions::PeerGone(const Session& s) {
  if (s.pidfd.valid()) {
    pollfd p{s.pidfd.get(), POLLIN, 0};
    return ::poll(&p, 1, 0) > 0 && (p.revents & POLLIN) != 0;
  }
  return s.start_time != 0 && auth::ProcessStartTime(s.peer.pid) != s.start_time;
}

std::vector<LeaseRecord> Sessions::Close(std::uint64_t session_id) {
  Session* s = leases_.FindById(session_id);
  if (s == nullptr) return {};
  if (s->pidfd.valid()) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, s->pidfd.get(), nullptr);
  return leases_.Close(session_id);
}

}  // namespace weightd
