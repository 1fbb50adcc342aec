#include "stats.h"

namespace weightd {

proto::ModelStatus Report::StatusOf(const ModelEntry& m) const {
  proto::ModelStatus st;
  st.name = m.config.name;
  st.dir = m.config.dir;
  st.state = std::string(proto::ModelStateName(m.state));
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
  st.pinned = m.config.pin;
  st.priority = m.config.priority;
  st.leases = s_.leases->LeasesOf(m.config.name);
  st.loads = m.loads;
  st.last_load_ms = m.last_load_ms;
  const auto now = s_.clock->Now();
  st.idle_ms = m.last_used == Clock::TimePoint{} ? 0 : ToMs(now - m.last_used);
  st.last_error = m.last_error;
  for (const auto& [ordinal, g] : m.gpus) {
    proto::GpuCopyStatus gs;
    gs.device = CudaName(ordinal);
    gs.uuid = s_.gpu->Devices().at(static_cast<std::size_t>(ordinal)).uuid;
    gs.state = std::string(proto::ModelStateName(g.state));
    gs.bytes = g.copy ? g.copy->allocated_bytes() : 0;
    gs.leases = s_.leases->LeasesOf(m.config.name, gs.device);
    gs.copy_ms = g.copy_ms;
    gs.h2d_us = g.copy ? static_cast<std::uint64_t>(g.copy->copy_seconds() * 1e6) : 0;
    gs.last_error = g.last_error;
    gs.idle_ms = g.last_used == Clock::TimePoint{} ? 0 : ToMs(now - g.last_used);
    st.gpus.push_back(std::move(gs));
  }
  return st;
}

proto::DaemonStats Report::Stats() const {
  const Counters& c = *s_.counters;
  const Lifecycle& life = *s_.lifecycle;
  proto::DaemonStats st;
  st.daemon_version = WEIGHTD_VERSION;
  st.uptime_ms = ToMs(s_.clock->Now() - s_.started);
  st.sessions = static_cast<std::uint32_t>(s_.leases->session_count());
  st.leases = static_cast<std::uint32_t>(s_.leases->lease_count());
  st.bytes_read_from_disk = s_.loader->bytes_read();
  st.loads_ok = c.loads_ok;
  st.loads_failed = c.loads_failed;
  st.requests = c.requests;
  st.malformed_requests = c.malformed;
  for (const auto& [name, m] : s_.table->models()) {
    st.models.push_back(StatusOf(m));
    st.host_resident_bytes += st.models.back().resident_bytes;
  }
  if (gpu_available()) {
    for (const gpu::DeviceInfo& d : s_.gpu->Devices()) {
      proto::GpuDeviceStatus ds;
      ds.device = CudaName(d.ordinal);
      ds.uuid = d.uuid;
      ds.name = d.name;
      ds.total_bytes = d.total_bytes;
      ds.resident_bytes = s_.table->GpuUsed(d.ordinal);
      ds.copies = static_cast<std::uint32_t>(s_.table->GpuCount(d.ordinal));
      ds.leases = s_.leases->LeasesOn(ds.device);
      ds.budget_bytes = s_.cache->GpuBudget(d.ordinal);
      st.gpus.push_back(std::move(ds));
    }
  } else {
    st.gpu_unavailable = s_.gpu != nullptr ? s_.gpu->unavailable_status().message() : "the GPU tier is disabled";
  }
  st.host_budget_bytes = s_.cache->host_budget();
  st.host_total_bytes = s_.cache->host_total();
  st.ready = life.ready();
  st.ready_ms = life.ready() ? ToMs(life.ready_at() - s_.started) : 0;
  st.metrics = Metrics();
  return st;
}

std::string Report::Metrics() const {
  const Counters& c = *s_.counters;
  const ModelTable& table = *s_.table;
  const LeaseTable& leases = *s_.leases;
  const Lifecycle& life = *s_.lifecycle;
  const auto& gpu_budget = s_.cache->gpu_budgets();
  metrics::Writer w;
  using metrics::Labels;
  const std::pair<const char*, const TierCounters*> tiers[] = {{"host", &c.host}, {"gpu", &c.gpu}};
  w.Family("weightd_loads_total", "counter", "Completed loads, by tier and result.");
  for (auto [tier, t] : tiers) {
    w.Sample("weightd_loads_total", Labels{{"tier", tier}, {"result", "ok"}}, static_cast<double>(t->loads_ok));
    w.Sample("weightd_loads_total", Labels{{"tier", tier}, {"result", "error"}}, static_cast<double>(t->loads_failed));
  }
  w.Family("weightd_adopted_models", "gauge", "Host copies taken back, verified, from the previous instance at start.");
  w.Sample("weightd_adopted_models", {}, static_cast<double>(c.adopted_models));
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
  w.Family("weightd_gpu_peer_copies_total", "counter", "GPU copies made from another GPU's copy (peer access).");
  w.Sample("weightd_gpu_peer_copies_total", {}, gpu_available() ? static_cast<double>(s_.gpu->Stats().peer_copies) : 0.0);
  w.Family("weightd_resident_bytes", "gauge", "Bytes held by model copies (and loads in flight), by tier and device.");
  w.Sample("weightd_resident_bytes", Labels{{"tier", "host"}, {"device", "cpu"}}, static_cast<double>(table.HostUsed()));
  if (gpu_available())
    for (const auto& d : s_.gpu->Devices())
      w.Sample("weightd_resident_bytes", Labels{{"tier", "gpu"}, {"device", CudaName(d.ordinal)}},
               static_cast<double>(table.GpuUsed(d.ordinal)));
  w.Family("weightd_freeing_bytes", "gauge", "Bytes of evicted copies not yet freed (they still count against the budget).");
  w.Sample("weightd_freeing_bytes", Labels{{"tier", "host"}, {"device", "cpu"}}, static_cast<double>(table.freeing_host()));
  for (const auto& [ordinal, b] : gpu_budget)
    w.Sample("weightd_freeing_bytes", Labels{{"tier", "gpu"}, {"device", CudaName(ordinal)}},
             static_cast<double>(table.freeing_gpu(ordinal)));
  w.Family("weightd_budget_bytes", "gauge", "The memory budget, by tier and device.");
  w.Sample("weightd_budget_bytes", Labels{{"tier", "host"}, {"device", "cpu"}}, static_cast<double>(s_.cache->host_budget()));
  for (const auto& [ordinal, b] : gpu_budget)
    w.Sample("weightd_budget_bytes", Labels{{"tier", "gpu"}, {"device", CudaName(ordinal)}}, static_cast<double>(b));
  w.Family("weightd_resident_models", "gauge", "Models with a copy in the tier, by tier and device.");
  w.Sample("weightd_resident_models", Labels{{"tier", "host"}, {"device", "cpu"}}, static_cast<double>(table.HostCount()));
  for (const auto& [ordinal, b] : gpu_budget)
    w.Sample("weightd_resident_models", Labels{{"tier", "gpu"}, {"device", CudaName(ordinal)}},
             static_cast<double>(table.GpuCount(ordinal)));
  w.Family("weightd_model_leases", "gauge", "Live leases per model and device (cpu: host mappings).");
  for (const auto& [name, m] : table.models()) {
    w.Sample("weightd_model_leases", Labels{{"model", name}, {"device", "cpu"}}, leases.LeasesOf(name, "cpu"));
    for (const auto& [ordinal, g] : m.gpus)
      w.Sample("weightd_model_leases", Labels{{"model", name}, {"device", CudaName(ordinal)}},
               leases.LeasesOf(name, CudaName(ordinal)));
  }
  w.Family("weightd_model_imports", "gauge", "Live GPU imports per model and device (each GPU lease is one import).");
  for (const auto& [name, m] : table.models())
    for (const auto& [ordinal, g] : m.gpus)
      w.Sample("weightd_model_imports", Labels{{"model", name}, {"device", CudaName(ordinal)}},
               leases.LeasesOf(name, CudaName(ordinal)));
  w.Family("weightd_sessions", "gauge", "Open client sessions.");
  w.Sample("weightd_sessions", {}, static_cast<double>(leases.session_count()));
  const auth::ZapHandler& zap = **s_.zap;
  w.Family("weightd_connections", "gauge", "Open connections to the control socket.");
  w.Sample("weightd_connections", {}, static_cast<double>(zap.connections()));
  w.Family("weightd_connections_shed_total", "counter",
           "Connections closed at once because their user held max_connections_per_user.");
  w.Sample("weightd_connections_shed_total", {}, static_cast<double>(zap.shed()));
  w.Family("weightd_fd_tokens_pending", "gauge", "Leases whose fds wait to be fetched over the fd socket.");
  w.Sample("weightd_fd_tokens_pending", {}, static_cast<double>(s_.fds->tokens()));
  w.Family("weightd_fd_connections", "gauge", "Open connections to the fd socket.");
  w.Sample("weightd_fd_connections", {}, static_cast<double>(s_.fds->connections()));
  w.Family("weightd_requests_total", "counter", "Requests received, and those that did not decode.");
  w.Sample("weightd_requests_total", Labels{{"result", "all"}}, static_cast<double>(c.requests));
  w.Sample("weightd_requests_total", Labels{{"result", "malformed"}}, static_cast<double>(c.malformed));
  w.Family("weightd_disk_read_bytes_total", "counter", "Bytes read from model files.");
  w.Sample("weightd_disk_read_bytes_total", {}, static_cast<double>(s_.loader->bytes_read()));
  w.Family("weightd_admission_waiting", "gauge", "Copies waiting for room under a budget.");
  w.Sample("weightd_admission_waiting", {}, static_cast<double>(s_.cache->waiting()));
  w.Family("weightd_ready", "gauge", "1 once every preload has finished.");
  w.Sample("weightd_ready", {}, life.ready() ? 1 : 0);
  w.Family("weightd_start_to_ready_seconds", "gauge", "Seconds from the daemon's start to ready (0 until ready).");
  w.Sample("weightd_start_to_ready_seconds", {},
           life.ready() ? std::chrono::duration<double>(life.ready_at() - s_.started).count() : 0.0);
  w.Family("weightd_preload_failures", "gauge", "Preloads that failed (the daemon is ready without them).");
  w.Sample("weightd_preload_failures", {}, static_cast<double>(life.preload_failures().size()));
  return w.text();
}

}  // namespace weightd
