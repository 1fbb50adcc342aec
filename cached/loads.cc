#include "loads.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <iterator>

#include "adopt.h"

namespace weightd {
namespace {

using SteadyClock = std::chrono::steady_clock;

// The label of weightd_load_errors_total: the error's reason, or its code when it has none.
std::string ErrorLabel(const Status& s) { return s.reason().empty() ? std::string(CodeName(s.code())) : s.reason(); }

// A fill's result on its way to the loop. If the loop never takes it (the daemon stops first),
// the segments go with it: a load cut short leaves nothing in /dev/shm.
struct FilledCopy {
  Result<std::shared_ptr<ResidentModel>> result{Status(Code::kInternal, "unset")};
  Result<std::shared_ptr<ResidentModel>> Take() { return std::exchange(result, Status(Code::kInternal, "taken")); }
  ~FilledCopy() {
    if (result.ok()) result.value()->RemoveSegments();
  }
};

}  // namespace

Loads::Loads(Options options, const Clock* clock, ModelTable& table, Cache& cache, Loader& loader,
             const SegmentStore& store, gpu::GpuTier* gpu, GpuFdStore* fd_store, Counters& counters, ModelEvents& events,
             LoopPost post)
    : options_(options),
      clock_(clock),
      table_(table),
      cache_(cache),
      loader_(loader),
      store_(store),
      gpu_(gpu),
      fd_store_(fd_store),
      counters_(counters),
      events_(events),
      post_(std::move(post)),
      jobs_(std::max(1u, options_.fill_jobs), "wd-load") {}

void Loads::Close() {
  for (auto& [name, m] : table_.models())
    if (m.cancel) m.cancel->store(true);
  plan_jobs_.Close();
  jobs_.Close();
  gpu_jobs_.Close();
}

Cache::Verdict Loads::Act(ModelEntry& m, int ordinal, Cache::Verdict v, const Status& error) {
  if (v == Cache::Verdict::kAdmitted) {
    if (ordinal < 0) StartFill(m);
    else StartGpuLoad(m, ordinal);
  } else if (v == Cache::Verdict::kRefused) {
    if (ordinal < 0) FailHostLoad(m, error);
    else FailGpu(m, ordinal, error);
  }
  return v;
}

void Loads::RetryAdmissions(Clock::TimePoint now) {
  cache_.Retry(now, [this](ModelEntry& m, int ordinal, Cache::Verdict v, const Status& error) { Act(m, ordinal, v, error); });
}

// ---- the host copy ----

// Phase 1 of a host load: read the headers on a worker, so that the bytes it needs are known
// before any memory is taken.
void Loads::StartLoad(ModelEntry& m) {
  if (m.resident) {
    // A second copy would replace this one without unlinking its segments.
    spdlog::error("model '{}': a load was asked for while a host copy is resident; ignored", m.config.name);
    return;
  }
  m.state = ModelState::kLoading;
  m.phase = Phase::kPlanning;
  m.generation = table_.NextGeneration();
  m.cancel = std::make_shared<std::atomic<bool>>(false);
  m.waiting_for.clear();
  events_.Notify("STATUS=loading model '" + m.config.name + "'");
  spdlog::info("loading model '{}' from {}", m.config.name, m.config.dir);
  ModelConfig mc = m.config;
  const std::uint64_t gen = m.generation;
  bool ok = plan_jobs_.Submit([this, mc, gen] {
    const auto t0 = SteadyClock::now();
    Result<LoadPlan> plan = Status(Code::kInternal, "unset");
    try {
      plan = loader_.Plan(mc);
    } catch (const std::exception& e) {  // bad_alloc of a huge header, and the like
      plan = Internal(std::string("loading failed: ") + e.what(), "load.exception");
    }
    const std::uint64_t ms = ToMs(SteadyClock::now() - t0);
    // A plan holds open files (move-only); it travels in a shared_ptr.
    auto p = std::make_shared<Result<LoadPlan>>(std::move(plan));
    post_([this, name = mc.name, gen, p, ms] { OnPlanned(name, gen, std::move(*p), ms); });
  });
  if (!ok) FailHostLoad(m, Unavailable("the daemon is shutting down", "daemon.stopping"));
}

void Loads::OnPlanned(const std::string& model, std::uint64_t generation, Result<LoadPlan> plan, std::uint64_t ms) {
  ModelEntry* e = table_.Find(model);
  if (e == nullptr || e->generation != generation || e->phase != Phase::kPlanning) return;
  ModelEntry& m = *e;
  if (!plan.ok()) {
    FailHostLoad(m, plan.status());
    return;
  }
  m.plan = std::make_shared<LoadPlan>(std::move(plan).value());
  m.plan_ms = ms;
  m.shard_sizes.clear();
  for (const PlannedShard& sh : m.plan->shards) m.shard_sizes.push_back(sh.header.data_size);
  // The segments and the adoption record the copy will leave in /dev/shm.
  m.host_bytes = SegmentStore::HostCharge(PlannedRecord(*m.plan, store_, m.config.name, m.generation));
  m.phase = Phase::kAdmitting;
  m.admission_deadline = clock_->Now() + options_.admission_timeout;
  Status error;
  if (const Cache::Verdict v = Act(m, -1, cache_.Arrive(m, -1, &error), error);
      v == Cache::Verdict::kWaiting || v == Cache::Verdict::kQueued)
    spdlog::info("model '{}' waits: {}", m.config.name, m.waiting_for);
}

// Phase 3 of a host load: the data, read into fresh segments by the loader's readers. GPU
// copies already asked for start at once and follow the reads chunk by chunk.
void Loads::StartFill(ModelEntry& m) {
  m.phase = Phase::kWorking;
  m.progress = std::make_shared<LoadProgress>();
  std::vector<std::string> files, shm_paths;
  std::vector<st::Header> headers;
  for (std::size_t i = 0; i < m.plan->shards.size(); ++i) {
    files.push_back(m.plan->shards[i].file);
    headers.push_back(m.plan->shards[i].header);
    shm_paths.push_back("/" + store_.SegmentName(m.config.name, m.generation, i));
  }
  // The tensor index is known from the headers already, and stays as the fill completes.
  table_.BuildIndex(m, files, headers, shm_paths, store_.PartSize(m.plan->bytes));
  const std::uint64_t gen = m.generation;
  const std::string name = m.config.name;
  auto cancel = m.cancel;
  auto progress = m.progress;
  std::shared_ptr<LoadPlan> plan = std::move(m.plan);
  const std::uint64_t plan_ms = m.plan_ms;
  bool ok = jobs_.Submit([this, plan, gen, name, cancel, progress, plan_ms] {
    const auto t0 = SteadyClock::now();
    auto filled = std::make_shared<FilledCopy>();
    try {
      filled->result = loader_.Fill(std::move(*plan), gen, *cancel, progress);
    } catch (const std::exception& e) {
      filled->result = Internal(std::string("loading failed: ") + e.what(), "load.exception");
    }
    const std::uint64_t ms = plan_ms + ToMs(SteadyClock::now() - t0);
    post_([this, name, gen, filled, ms] { OnFilled(name, gen, filled->Take(), ms); });
  });
  if (!ok) {
    FailHostLoad(m, Unavailable("the daemon is shutting down", "daemon.stopping"));
    return;
  }
  for (auto& [ordinal, g] : m.gpus)
    if (g.state == ModelState::kLoading && g.phase == Phase::kWaitHost) MaybeStartGpu(m, ordinal);
}

void Loads::FailHostLoad(ModelEntry& m, const Status& error) {
  ++counters_.loads_failed;
  ++counters_.host.loads_failed;
  ++counters_.host.errors[ErrorLabel(error)];
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
  events_.Answer(m, waiters, ModelState::kFailed, error);
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
  if (m.preload_host) events_.PreloadDone(m.config.name + "/host", error);
  m.preload_host = false;
  cache_.RetrySoon();
}

void Loads::OnFilled(const std::string& model, std::uint64_t generation, Result<std::shared_ptr<ResidentModel>> result,
                     std::uint64_t ms) {
  ModelEntry* e = table_.Find(model);
  if (e == nullptr || e->generation != generation || e->phase != Phase::kWorking) {
    // The model was removed, changed or evicted while loading: the result is nobody's.
    if (result.ok()) table_.Dispose(std::move(result).value(), {}, /*unlink=*/true);
    return;
  }
  ModelEntry& m = *e;
  m.progress.reset();
  if (!result.ok()) {
    FailHostLoad(m, result.status());
    return;
  }
  std::shared_ptr<ResidentModel> r = std::move(result).value();
  m.cancel.reset();
  m.host_reserved = 0;
  m.phase = Phase::kIdle;
  ++counters_.loads_ok;
  ++m.loads;
  ++counters_.host.loads_ok;
  counters_.host.bytes += r->bytes;
  counters_.host.durations.Observe(static_cast<double>(ms) / 1000.0);
  m.last_load_ms = ms;
  m.last_error = Status::Ok();
  // The index StartFill built from the plan already describes these segments.
  ModelRecord record = RecordOf(*r, store_.RecordName(m.config.name, m.generation), m.generation);
  if (Status s = store_.WriteRecord(record); s.ok()) {
    r->record = record.name;
    r->record_bytes = SegmentStore::RecordBytes(record);
  } else
    spdlog::warn("model '{}': no adoption record ({}); after a crash it is read from disk again", m.config.name,
                 s.ToString());
  table_.InstallHost(m, std::move(r));
  const double secs = std::max<double>(static_cast<double>(ms), 1) / 1000.0;
  spdlog::info("model '{}' resident: {} shards, {} tensors, {} bytes in {} ms ({:.2f} GB/s; {})", m.config.name,
               m.resident->shards.size(), m.resident->tensor_count, m.resident->bytes, ms,
               static_cast<double>(m.resident->bytes) / secs / 1e9, m.resident->fill_times.Summary());
  StartPin(m);
  std::vector<Waiter> waiters;
  waiters.swap(m.waiters);
  if (m.pinning) {
    auto loads = std::stable_partition(waiters.begin(), waiters.end(), [](const Waiter& w) { return w.kind != Waiter::kLoad; });
    std::move(loads, waiters.end(), std::back_inserter(m.pin_waiters));
    waiters.erase(loads, waiters.end());
  }
  events_.Answer(m, waiters, m.state, m.last_error);
  if (m.preload_host) events_.PreloadDone(m.config.name + "/host", Status::Ok());
  m.preload_host = false;
  for (auto& [ordinal, g] : m.gpus) {
    if (g.stashed) {
      CopyResult done = std::move(*g.stashed);
      g.stashed.reset();
      OnCopied(model, ordinal, std::move(done));
    }
  }
  // GPU copies that waited for the host tier.
  for (auto& [ordinal, g] : m.gpus)
    if (g.state == ModelState::kLoading && g.phase == Phase::kWaitHost) MaybeStartGpu(m, ordinal);
}

// ---- page-locking ----

// Resident host copies stay page-locked (when GPUs are served), so that later copies to a GPU
// run at PCIe speed. Done after the load, off the path of its first answer.
void Loads::StartPin(ModelEntry& m) {
  if (!gpu_available() || !options_.pin_host || !m.resident) return;
  std::shared_ptr<const ResidentModel> host = m.resident;
  const std::string name = m.config.name;
  m.pinning = gpu_jobs_.Submit([this, host, name] {
    const auto t0 = SteadyClock::now();
    std::vector<std::shared_ptr<const void>> pins;
    for (const ResidentShard& sh : host->shards) {
      if (sh.segment.data_size() == 0) continue;
      auto pin = gpu_->PinHost(sh.segment.data(), sh.segment.data_size());
      if (!pin.ok()) {
        // Not fatal: copies then register (or stage) each time.
        spdlog::warn("model '{}': {}", name, pin.status().ToString());
        break;
      }
      pins.push_back(std::move(pin).value());
    }
    const std::uint64_t ms = ToMs(SteadyClock::now() - t0);
    post_([this, name, host, pins, ms] { OnPinned(name, host, pins, ms); });
  });
}

void Loads::OnPinned(const std::string& model, std::shared_ptr<const ResidentModel> host,
                     std::vector<std::shared_ptr<const void>> pins, std::uint64_t ms) {
  ModelEntry* e = table_.Find(model);
  if (e == nullptr || e->resident != host) {
    // Evicted meanwhile: unpin on a worker, keeping the mappings until then. The Loads that
    // waited were served (the copy was resident); their answer tells what is left of it.
    table_.ReleasePins(std::move(pins), std::move(host));
    if (e != nullptr) AnswerPinWaiters(*e);
    return;
  }
  ModelEntry& m = *e;
  m.pinning = false;
  m.host_pins = std::move(pins);
  if (!m.host_pins.empty()) spdlog::info("model '{}' page-locked for GPU copies in {} ms", model, ms);
  AnswerPinWaiters(m);
  for (auto& [ordinal, g] : m.gpus)
    if (g.state == ModelState::kLoading && g.phase == Phase::kWaitHost) MaybeStartGpu(m, ordinal);
}

void Loads::AnswerPinWaiters(ModelEntry& m) {
  std::vector<Waiter> waiters;
  waiters.swap(m.pin_waiters);
  events_.Answer(m, waiters, ModelState::kResident, Status::Ok());
}

// ---- GPU copies ----

void Loads::RequestGpu(ModelEntry& m, int ordinal) {
  GpuEntry& g = m.gpus[ordinal];
  if (g.state == ModelState::kLoading || g.state == ModelState::kResident) return;
  g.state = ModelState::kLoading;
  g.phase = Phase::kWaitHost;
  g.generation = table_.NextGeneration();
  g.last_error = Status::Ok();
  MaybeStartGpu(m, ordinal);
  // Still waiting: for a host copy that is absent (load it), loading, or being page-locked.
  const bool host_there = m.state == ModelState::kResident && m.resident;
  if (g.phase == Phase::kWaitHost && m.state != ModelState::kLoading && !host_there) StartLoad(m);
}

void Loads::MaybeStartGpu(ModelEntry& m, int ordinal) {
  GpuEntry& g = m.gpus.at(ordinal);
  const bool filling = m.phase == Phase::kWorking && m.progress != nullptr;
  if (!(m.state == ModelState::kResident && m.resident) && !filling) return;  // wait for the host copy
  // A copy from a host copy that is being page-locked waits for it: copying meanwhile would
  // register the same pages a second time, at the same cost.
  if (!filling && m.pinning) return;
  g.phase = Phase::kAdmitting;
  g.pipelined = !(m.state == ModelState::kResident && m.resident);  // see StartGpuLoad
  g.admission_deadline = clock_->Now() + options_.admission_timeout;
  Status error;
  if (const Cache::Verdict v = Act(m, ordinal, cache_.Arrive(m, ordinal, &error), error);
      v == Cache::Verdict::kWaiting || v == Cache::Verdict::kQueued)
    spdlog::info("model '{}' waits on {}: {}", m.config.name, CudaName(ordinal), g.waiting_for);
}

void Loads::StartGpuLoad(ModelEntry& m, int ordinal) {
  GpuEntry& g = m.gpus.at(ordinal);
  g.phase = Phase::kWorking;
  // Decided now, not at admission: the host copy may have finished while this one waited.
  g.pipelined = !(m.state == ModelState::kResident && m.resident);
  if (g.pipelined && m.progress == nullptr) {
    FailGpu(m, ordinal, Internal("no host copy to copy from", "gpu.no_source"));
    return;
  }
  events_.Notify("STATUS=copying model '" + m.config.name + "' to " + CudaName(ordinal));
  spdlog::info("copying model '{}' to {}{}", m.config.name, CudaName(ordinal), g.pipelined ? " as it is read from disk" : "");
  // The job holds the host copy (or the load's progress, which holds the copy being filled), so
  // its mappings stay valid even if the model is evicted or changed meanwhile; the generation
  // tells the loop whether the result is still wanted.
  std::shared_ptr<const ResidentModel> host = g.pipelined ? nullptr : m.resident;
  std::shared_ptr<LoadProgress> progress = g.pipelined ? m.progress : nullptr;
  // A copy already resident on a GPU that this one can read directly is the faster source; the
  // job holds it, so an eviction meanwhile frees it only after the copy.
  std::shared_ptr<const gpu::GpuCopy> peer = g.pipelined ? nullptr : PeerSource(m, ordinal);
  const std::uint64_t gen = g.generation;
  const std::string name = m.config.name;
  bool ok = gpu_jobs_.Submit([this, host, progress, peer, gen, name, ordinal]() mutable {
    const auto t0 = SteadyClock::now();
    CopyResult c;
    c.generation = gen;
    try {
      if (peer) {
        c.copy = gpu_->MaterializeFromPeer(ordinal, *peer);
        // Out of memory is out of memory from any source; anything else tries the host path.
        if (c.copy.ok() || c.copy.status().code() == Code::kResourceExhausted) {
          c.ms = ToMs(SteadyClock::now() - t0);
          post_([this, name, ordinal, c] { OnCopied(name, ordinal, c); });
          return;
        }
        spdlog::warn("model '{}': {}; copying from host memory instead", name, c.copy.status().ToString());
      }
      gpu::WaitReadyFn wait;
      if (progress) {
        auto segments = progress->WaitSegments();
        if (segments.ok()) {
          host = *segments;
          wait = [progress](std::size_t shard, std::uint64_t end) { return progress->WaitFilled(shard, end); };
        } else {
          c.copy = segments.status();
        }
      }
      if (host) {
        std::vector<gpu::HostShard> shards;
        shards.reserve(host->shards.size());
        for (const ResidentShard& sh : host->shards) shards.push_back(gpu::HostShard{sh.segment.data(), sh.segment.data_size()});
        c.copy = gpu_->Materialize(ordinal, shards, options_.gpu_mode, wait);
      }
    } catch (const std::exception& e) {
      c.copy = Internal(std::string("GPU copy failed: ") + e.what(), "gpu.exception");
    }
    c.ms = ToMs(SteadyClock::now() - t0);
    post_([this, name, ordinal, c] { OnCopied(name, ordinal, c); });
  });
  if (!ok) FailGpu(m, ordinal, Unavailable("the daemon is shutting down", "daemon.stopping"));
}

std::shared_ptr<const gpu::GpuCopy> Loads::PeerSource(const ModelEntry& m, int ordinal) const {
  if (!options_.peer_copy || options_.gpu_mode != gpu::ExportMode::kVmm) return nullptr;
  for (const auto& [from, other] : m.gpus)
    if (from != ordinal && other.state == ModelState::kResident && other.copy != nullptr &&
        other.copy->mode() == gpu::ExportMode::kVmm && gpu_->CanCopyPeer(from, ordinal))
      return other.copy;
  return nullptr;
}

void Loads::FailGpu(ModelEntry& m, int ordinal, const Status& error) {
  GpuEntry& g = m.gpus.at(ordinal);
  ++counters_.gpu.loads_failed;
  ++counters_.gpu.errors[ErrorLabel(error)];
  g.state = ModelState::kFailed;
  g.phase = Phase::kIdle;
  g.reserved = 0;
  g.last_error = error;
  g.waiting_for.clear();
  spdlog::error("model '{}' failed to copy to {}: {}", m.config.name, CudaName(ordinal), error.ToString());
  std::vector<Waiter> waiters;
  waiters.swap(g.waiters);
  events_.Answer(m, waiters, ModelState::kFailed, error);
  if (g.preload) events_.PreloadDone(m.config.name + "/" + CudaName(ordinal), error);
  g.preload = false;
  cache_.RetrySoon();
}

void Loads::OnCopied(const std::string& model, int ordinal, CopyResult c) {
  ModelEntry* e = table_.Find(model);
  if (e == nullptr) return;  // the copy (if any) is freed with `c`
  auto g_it = e->gpus.find(ordinal);
  if (g_it == e->gpus.end() || g_it->second.generation != c.generation || g_it->second.state != ModelState::kLoading)
    return;
  ModelEntry& m = *e;
  GpuEntry& g = g_it->second;
  if (!c.copy.ok()) {
    g.copy_ms = c.ms;
    FailGpu(m, ordinal, c.copy.status());
    return;
  }
  // A pipelined copy is only as good as the load it followed: it waits for the load's verdict
  // (the checksums, the unchanged files).
  if (g.pipelined && m.phase == Phase::kWorking) {
    g.stashed = std::move(c);
    return;
  }
  g.copy_ms = c.ms;
  g.copy = std::move(c.copy).value();
  g.state = ModelState::kResident;
  g.phase = Phase::kIdle;
  g.reserved = 0;
  g.pipelined = false;
  g.last_error = Status::Ok();
  g.last_used = clock_->Now();
  ++counters_.gpu.loads_ok;
  counters_.gpu.bytes += g.copy->allocated_bytes();
  counters_.gpu.durations.Observe(static_cast<double>(c.ms) / 1000.0);
  const double secs = std::max(g.copy->copy_seconds(), 1e-6);
  spdlog::info("model '{}' resident on {}: {} bytes in {} ms ({} {:.2f} GB/s)", m.config.name, CudaName(ordinal),
               g.copy->allocated_bytes(), c.ms,
               g.copy->copied_from() < 0 ? std::string("host-to-device") : "peer copy from " + CudaName(g.copy->copied_from()),
               static_cast<double>(g.copy->allocated_bytes()) / secs / 1e9);
  if (fd_store_ != nullptr) fd_store_->Store(m, g);
  std::vector<Waiter> waiters;
  waiters.swap(g.waiters);
  events_.Answer(m, waiters, g.state, g.last_error);
  if (g.preload) events_.PreloadDone(m.config.name + "/" + CudaName(ordinal), Status::Ok());
  g.preload = false;
}

}  // namespace weightd
