#include "lease_table.h"

#include <algorithm>
#include <charconv>
#include <string_view>

namespace weightd {

LeaseTable::LeaseTable(std::uint32_t max_sessions, std::uint32_t max_leases_per_session)
    : max_sessions_(max_sessions), max_leases_(max_leases_per_session), rng_(std::random_device{}()) {}

Result<Session*> LeaseTable::Open(const std::string& routing_id, const std::string& client_name, const PeerCred& peer,
                                  Clock::TimePoint now) {
  if (Session* s = Find(routing_id)) {
    s->last_seen = now;
    return s;
  }
  if (sessions_.size() >= max_sessions_)
    return ResourceExhausted("the daemon holds its maximum of " + std::to_string(max_sessions_) + " sessions",
                             "limits.sessions");
  const std::uint64_t id = next_session_++;
  Session& s = sessions_[id];
  s.id = id;
  s.routing_id = routing_id;
  s.client_name = client_name.substr(0, 128);
  s.peer = peer;
  s.last_seen = now;
  by_routing_[routing_id] = id;
  return &s;
}

Session* LeaseTable::Find(const std::string& routing_id) {
  auto it = by_routing_.find(routing_id);
  return it == by_routing_.end() ? nullptr : &sessions_.at(it->second);
}

Session* LeaseTable::FindById(std::uint64_t session_id) {
  auto it = sessions_.find(session_id);
  return it == sessions_.end() ? nullptr : &it->second;
}

std::vector<LeaseRecord> LeaseTable::Close(std::uint64_t session_id) {
  std::vector<LeaseRecord> ended;
  auto it = sessions_.find(session_id);
  if (it == sessions_.end()) return ended;
  for (std::uint64_t lid : it->second.leases) {
    auto lt = leases_.find(lid);
    if (lt == leases_.end()) continue;
    Count(lt->second, -1);
    ended.push_back(std::move(lt->second));
    leases_.erase(lt);
  }
  by_routing_.erase(it->second.routing_id);
  sessions_.erase(it);
  return ended;
}

std::vector<std::uint64_t> LeaseTable::Expired(Clock::TimePoint now, std::chrono::milliseconds timeout) const {
  std::vector<std::uint64_t> out;
  for (const auto& [id, s] : sessions_)
    if (now - s.last_seen > timeout) out.push_back(id);
  return out;
}

Result<std::uint64_t> LeaseTable::AddLease(Session& s, const std::string& model, const std::string& device,
                                           std::shared_ptr<const void> pin) {
  if (s.leases.size() >= max_leases_)
    return ResourceExhausted("this client already holds " + std::to_string(s.leases.size()) +
                                 " leases, the maximum per client; release some first",
                             "limits.leases");
  std::uint64_t id;
  do id = rng_();  // unguessable, so a lease id from another session is useless
  while (id == 0 || leases_.count(id));
  const LeaseRecord& r = leases_[id] = LeaseRecord{id, s.id, model, device, std::move(pin)};
  s.leases.insert(id);
  Count(r, +1);
  return id;
}

Result<LeaseRecord> LeaseTable::Release(Session& s, std::uint64_t lease_id) {
  auto it = leases_.find(lease_id);
  if (it == leases_.end() || it->second.session != s.id)
    return NotFound("no lease " + std::to_string(lease_id) + " in this session", "lease.unknown");
  LeaseRecord r = std::move(it->second);
  leases_.erase(it);
  s.leases.erase(lease_id);
  Count(r, -1);
  return r;
}

void LeaseTable::Count(const LeaseRecord& r, int delta) {
  auto bump = [delta](auto& map, const auto& key) {
    auto& n = map[key];
    n = static_cast<std::uint32_t>(static_cast<std::int64_t>(n) + delta);
    if (n == 0) map.erase(key);
  };
  bump(per_model_, r.model);
  bump(per_model_device_, std::pair(r.model, r.device));
  bump(per_device_, r.device);
}

std::uint32_t LeaseTable::LeasesOf(const std::string& model, const std::string& device) const {
  auto it = per_model_device_.find(std::pair(model, device));
  return it == per_model_device_.end() ? 0 : it->second;
}

std::uint32_t LeaseTable::LeasesOn(const std::string& device) const {
  auto it = per_device_.find(device);
  return it == per_device_.end() ? 0 : it->second;
}

std::uint32_t LeaseTable::LeasesOf(const std::string& model) const {
  auto it = per_model_.find(model);
  return it == per_model_.end() ? 0 : it->second;
}

std::size_t LeaseTable::SessionsOf(uid_t uid) const {
  return static_cast<std::size_t>(
      std::count_if(sessions_.begin(), sessions_.end(), [&](const auto& kv) { return kv.second.peer.uid == uid; }));
}

}  // namespace weightd
