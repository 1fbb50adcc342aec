// sessions.h — client sessions as the control loop sees them: the lease table, the per-user
// session limit, and how a session's end is noticed (a pidfd in the loop's epoll set, a
// process start time where pidfd_open is unavailable, and the heartbeat timeout).
//
// Threading: owned by the control loop and not thread-safe.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "auth.h"
#include "clock.h"
#include "lease_table.h"

namespace weightd {

class Sessions {
 public:
  struct Limits {
    std::uint32_t max_sessions = 4096;
    std::uint32_t max_sessions_per_user = 512;
    std::uint32_t max_leases_per_client = 256;
    std::chrono::milliseconds heartbeat_timeout{10'000};
  };
  // A session's pidfd is added to the loop's `epoll` set (made later, before the first session)
  // with event data `pid_tag | session id`.
  Sessions(Limits limits, const Clock* clock, const posix::Fd& epoll, std::uint64_t pid_tag);

  LeaseTable& leases() { return leases_; }
  const LeaseTable& leases() const { return leases_; }
  Session* Find(const std::string& routing_id) { return leases_.Find(routing_id); }
  Session* FindById(std::uint64_t id) { return leases_.FindById(id); }

  // Opens the session of a Hello from `who` on connection `routing_id`, or returns the one it
  // has. A new session counts against the per-user limit (ResourceExhausted
  // "limits.sessions_per_user") and watches its process: FailedPrecondition "auth.peer_gone"
  // when it has already exited, in which case the caller ends the session (`*opened` set).
  Result<Session*> Open(const std::string& routing_id, const std::string& client_name, const auth::Identity& who,
                        std::uint64_t* opened);

  // True once the session's process has exited: its pidfd is readable, or (without a pidfd) the
  // process with its pid started at another time, or is gone.
  static bool PeerGone(const Session& s);

  // Ends a session: stops watching its process and returns the leases that ended.
  std::vector<LeaseRecord> Close(std::uint64_t session_id);
  // Sessions not heard from within the heartbeat timeout.
  std::vector<std::uint64_t> Expired(Clock::TimePoint now) const { return leases_.Expired(now, limits_.heartbeat_timeout); }

 private:
  const Limits limits_;
  const Clock* const clock_;
  const posix::Fd& epoll_;
  const std::uint64_t pid_tag_;
  LeaseTable leases_;
};

}  // namespace weightd
