// fd_server.h — the daemon's end of the fd side channel (fd_channel.h): a lease's file
// descriptors (a host copy's segments, opened read-only, or a VMM GPU copy's exports) wait under
// a one-time token, which the Acquire's manifest carries, until the session's process comes for
// them over the fd socket. One request per connection; a token is good once, for a limited
// time, and only to the process (uid and pid) of the session that received it.
//
// Threading: owned by the control loop and not thread-safe. Nothing here blocks the loop: the
// listening socket and the connections are in its epoll set, and replies are sent with a short
// timeout.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "clock.h"
#include "fd_channel.h"
#include "gpu_tier.h"
#include "segment_store.h"
#include "sessions.h"

namespace weightd {

class FdServer {
 public:
  // Connections are added to the loop's `epoll` set with event data `conn_tag | fd`.
  FdServer(const Clock* clock, Sessions& sessions, const SegmentStore& store, const posix::Fd& epoll,
           std::uint64_t conn_tag);
  ~FdServer();

  // Binds the fd socket at `path` (mode 0660) and adds it to the epoll set with `listen_tag`.
  Status Bind(const std::string& path, std::uint64_t listen_tag);

  // Leaves the fds of lease `lease_id` of session `session_id` for its process: the files of its
  // host segments `shm_names` (every part, in manifest order; read-only), or every shard of `copy` (a VMM export; the token holds no
  // reference, so the copy stays the lease's) in manifest order `shards`. Returns the token.
  Result<std::string> Offer(std::uint64_t session_id, std::uint64_t lease_id, std::shared_ptr<const gpu::GpuCopy> copy,
                            std::vector<std::uint32_t> shards, std::vector<std::string> shm_names);
  // Drops the unused tokens of a lease, or of every lease of a session.
  void ForgetLease(std::uint64_t session_id, std::uint64_t lease_id);
  void ForgetLease(std::uint64_t lease_id);
  void ForgetSession(std::uint64_t session_id);

  // Loop events: the listening socket is readable; connection `fd` is readable.
  void Accept();
  void Serve(int fd);
  // Expired tokens and connections that did not present theirs in time.
  void Expire(Clock::TimePoint now);

  std::size_t tokens() const { return pending_.size(); }
  std::size_t connections() const { return clients_.size(); }

 private:
  // A lease whose fds wait to be fetched.
  struct Pending {
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
  struct Client {
    fdchan::FdConnection conn;
    Clock::TimePoint expires;
  };
  Result<std::vector<posix::Fd>> LeaseFds(const Pending& p);
  void CloseClient(int fd);

  const Clock* const clock_;
  Sessions& sessions_;
  const SegmentStore& store_;
  const posix::Fd& epoll_;
  const std::uint64_t conn_tag_;
  std::optional<fdchan::FdListener> listener_;
  std::map<int, Client> clients_;              // by socket fd
  std::map<std::string, Pending> pending_;     // by token
};

}  // namespace weightd
