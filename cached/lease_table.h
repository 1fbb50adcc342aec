// lease_table.h — client sessions and the leases they hold.
//
// A session is one ZeroMQ connection (keyed by its routing id), opened by Hello and
// identified by the peer credentials libzmq reports for ipc peers. A lease belongs to exactly
// one session and ends on Release, when its session ends (heartbeat timeout, or the client
// process exits and its pidfd becomes readable), or when the daemon stops.
//
// Owned by the control loop; not thread-safe.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "clock.h"
#include "posix.h"
#include "status_macros.h"

namespace weightd {

// From the connection's ZAP stamp (auth.h); every session has one.
struct PeerCred {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
};


struct Session {
  std::uint64_t id = 0;
  std::string routing_id;
  std::string client_name;
  PeerCred peer;
  posix::Fd pidfd;  // readable once the peer process has exited; invalid if unavailable
  // Where pidfd_open is unavailable (a seccomp filter): the peer's start time (clock ticks
  // after boot, /proc/<pid>/stat), so that a process that reuses the pid is not the peer.
  std::uint64_t start_time = 0;
  Clock::TimePoint last_seen;
  std::set<std::uint64_t> leases;
  std::uint32_t pending = 0;  // requests parked until a load completes
};

struct LeaseRecord {
  std::uint64_t id = 0;
  std::uint64_t session = 0;
  std::string model;
  std::string device;  // "cpu" or "cuda:N" (the daemon's numbering)
  // What the lease keeps alive (a GPU copy), whatever the catalog or the policy does to the
  // model meanwhile: the lease table only holds it.
  std::shared_ptr<const void> pin;
};

class LeaseTable {
 public:
  explicit LeaseTable(std::uint32_t max_sessions, std::uint32_t max_leases_per_session);

  // Opens (or returns the existing) session for a routing id.
  Result<Session*> Open(const std::string& routing_id, const std::string& client_name, const PeerCred& peer,
                        Clock::TimePoint now);
  Session* Find(const std::string& routing_id);
  Session* FindById(std::uint64_t session_id);
  // Ends the session and all its leases; returns the leases that ended.
  std::vector<LeaseRecord> Close(std::uint64_t session_id);
  // Sessions not heard from since `now - timeout`.
  std::vector<std::uint64_t> Expired(Clock::TimePoint now, std::chrono::milliseconds timeout) const;

  Result<std::uint64_t> AddLease(Session& s, const std::string& model, const std::string& device,
                                 std::shared_ptr<const void> pin = nullptr);
  // NotFound unless the lease exists and belongs to `s`. Returns the ended lease.
  Result<LeaseRecord> Release(Session& s, std::uint64_t lease_id);

  std::uint32_t LeasesOf(const std::string& model) const;
  std::uint32_t LeasesOf(const std::string& model, const std::string& device) const;
  std::uint32_t LeasesOn(const std::string& device) const;
  std::size_t session_count() const { return sessions_.size(); }
  // Sessions whose peer is `uid`.
  std::size_t SessionsOf(uid_t uid) const;
  std::size_t lease_count() const { return leases_.size(); }
  const std::unordered_map<std::uint64_t, Session>& sessions() const { return sessions_; }

 private:
  const std::uint32_t max_sessions_;
  const std::uint32_t max_leases_;
  std::mt19937_64 rng_;
  std::uint64_t next_session_ = 1;
  std::unordered_map<std::uint64_t, Session> sessions_;
  std::unordered_map<std::string, std::uint64_t> by_routing_;
  std::unordered_map<std::uint64_t, LeaseRecord> leases_;
  void Count(const LeaseRecord& r, int delta);

  std::map<std::string, std::uint32_t> per_model_;
  std::map<std::pair<std::string, std::string>, std::uint32_t> per_model_device_;
  std::map<std::string, std::uint32_t> per_device_;
};

}  // namespace weightd
