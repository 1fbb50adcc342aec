// loads.h — the two load pipelines of the model table: a host copy read from disk (plan ->
// admit -> fill), and a GPU copy made from it (wait for the host copy, or for its fill to start
// -> admit -> copy), plus the page-locking of resident host copies. Concurrent requests for a
// copy share one load.
//
// Threading: the methods run on the control loop. Each step's blocking work (reading headers,
// reading data, copying to a GPU, page-locking) runs on a worker, which posts the next step
// back to the loop (LoopPost); a result that comes back for a load that was replaced meanwhile
// (another generation, or a model that is gone) is freed, never installed.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cache.h"
#include "gpu_tier.h"
#include "loader.h"
#include "model_table.h"
#include "segment_store.h"
#include "thread_pool.h"

namespace weightd {

class GpuFdStore;

class Loads {
 public:
  struct Options {
    std::chrono::milliseconds admission_timeout{10'000};
    bool pin_host = true;  // page-lock resident host copies when GPUs are served
    gpu::ExportMode gpu_mode = gpu::ExportMode::kVmm;
    bool peer_copy = true;  // copy from another GPU's copy where the pair has peer access
    // Host fills that run at once: [cache] max_loads, so that every load admitted (holding its
    // budget) also reads; with no bound (0), one per loader thread.
    unsigned fill_jobs = 2;
  };

  // Borrows everything; `gpu` may be null (host-only), `fd_store` may be null (no fd store).
  Loads(Options options, const Clock* clock, ModelTable& table, Cache& cache, Loader& loader, const SegmentStore& store,
        gpu::GpuTier* gpu, GpuFdStore* fd_store, Counters& counters, ModelEvents& events, LoopPost post);
  ~Loads() { Close(); }

  // Loads `m`'s host copy; its waiters are answered when it is resident or failed.
  void StartLoad(ModelEntry& m);
  // A copy of `m` on GPU `ordinal` was asked for: starts it when its source is there, else loads
  // the host copy first.
  void RequestGpu(ModelEntry& m, int ordinal);
  // Page-locks `m`'s resident host copy on a worker (an adopted one, say).
  void StartPin(ModelEntry& m);
  // Admits the copies that wait for room again (Cache::Retry) and starts or fails them.
  void RetryAdmissions(Clock::TimePoint now);

  bool gpu_available() const { return gpu_ != nullptr && gpu_->available(); }
  gpu::ExportMode gpu_mode() const { return options_.gpu_mode; }
  // Cancels the loads in flight and joins the workers (the daemon stops).
  void Close();

 private:
  void OnPlanned(const std::string& model, std::uint64_t generation, Result<LoadPlan> plan, std::uint64_t ms);
  void StartFill(ModelEntry& m);
  void OnFilled(const std::string& model, std::uint64_t generation, Result<std::shared_ptr<ResidentModel>> result,
                std::uint64_t ms);
  void FailHostLoad(ModelEntry& m, const Status& error);
  void MaybeStartGpu(ModelEntry& m, int ordinal);
  void StartGpuLoad(ModelEntry& m, int ordinal);
  // Answers the Loads that waited for the host copy's page-locking.
  void AnswerPinWaiters(ModelEntry& m);
  // A resident VMM copy of `m` on another GPU that `ordinal` can copy from directly, if any.
  std::shared_ptr<const gpu::GpuCopy> PeerSource(const ModelEntry& m, int ordinal) const;
  void OnCopied(const std::string& model, int ordinal, CopyResult c);
  void FailGpu(ModelEntry& m, int ordinal, const Status& error);
  void OnPinned(const std::string& model, std::shared_ptr<const ResidentModel> host,
                std::vector<std::shared_ptr<const void>> pins, std::uint64_t ms);
  // Acts on an admission: starts the copy, or fails it.
  Cache::Verdict Act(ModelEntry& m, int ordinal, Cache::Verdict v, const Status& error);

  const Options options_;
  const Clock* const clock_;
  ModelTable& table_;
  Cache& cache_;
  Loader& loader_;
  const SegmentStore& store_;
  gpu::GpuTier* const gpu_;
  GpuFdStore* const fd_store_;
  Counters& counters_;
  ModelEvents& events_;
  const LoopPost post_;
  // Declared last so that they are joined first.
  ThreadPool plan_jobs_{2, "wd-plan"};  // one host plan (headers only) per job, never behind a fill
  ThreadPool jobs_;                     // one host fill per job, options_.fill_jobs of them
  // One GPU materialization or page-locking per job. A pipelined copy holds its thread while the
  // disk is read, hence more threads than GPUs need.
  ThreadPool gpu_jobs_{4, "wd-gpu"};
};

}  // namespace weightd
