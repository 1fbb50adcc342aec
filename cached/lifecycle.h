// lifecycle.h — the daemon's models from start to stop, around the requests: the catalog (at
// start and on SIGHUP), adoption of what a previous instance left, the preloads and readiness
// (READY=1 once every preload has finished), and the periodic check that resident copies'
// files have not changed on disk.
//
// Threading: owned by the control loop and not thread-safe. The file check stats the files on
// a worker (stat can block on a slow filesystem) and posts its verdict back to the loop.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "auth.h"
#include "cache.h"
#include "catalog.h"
#include "clock.h"
#include "config.h"
#include "lease_table.h"
#include "loads.h"
#include "model_table.h"
#include "thread_pool.h"

namespace weightd {

class GpuFdStore;

class Lifecycle {
 public:
  // Borrows everything; `gpu` (host-only) and `fd_store` may be null. `started`: when the
  // daemon started (readiness is counted from it); `shm_gid`: the segments' group (auth.h's
  // CheckSegmentGroup on reload).
  Lifecycle(const DaemonConfig& config, const Clock* clock, Clock::TimePoint started, gid_t shm_gid, ModelTable& table,
            Cache& cache, Loads& loads, const LeaseTable& leases, Loader& loader, const SegmentStore& store,
            gpu::GpuTier* gpu, GpuFdStore* fd_store, Counters& counters, ModelEvents& events, LoopPost post);
  ~Lifecycle() { Close(); }

  // The catalog of the configuration, then what the previous instance left (adopt.h), then the
  // preloads that readiness waits for. Once, at start.
  void Start();
  // SIGHUP: re-reads the config file's catalog (the command line's models stay, and win) and
  // its ACLs into `policy`; keeps everything as it is when the new configuration is invalid.
  void Reload(auth::Policy* policy);
  const Catalog& catalog() const { return catalog_; }

  // Readiness.
  void PreloadDone(const std::string& key, const Status& s);
  void MaybeReady();
  bool ready() const { return ready_; }
  // "serving N models, L leases; failed preloads: ..." (STATUS= once ready).
  std::string ServingStatus() const;
  Clock::TimePoint ready_at() const { return ready_at_; }
  std::size_t preloads_left() const { return preloads_.size(); }
  const std::vector<std::string>& preload_failures() const { return preload_failures_; }

  // Starts a check of the resident copies' files when one is due (cache.file_check_interval).
  void CheckFiles(Clock::TimePoint now);
  // Joins the file checker (the daemon stops).
  void Close() { checker_.Close(); }

 private:
  // Returns what changed, so that a reload can start the preloads of new and changed models.
  CatalogDiff ApplyCatalog(const std::vector<ModelConfig>& models);
  void StartPreloads(ModelEntry& m, bool for_readiness);
  void OnChecked(const std::vector<std::string>& changed);

  const DaemonConfig& config_;
  const Clock* const clock_;
  const Clock::TimePoint started_;
  const gid_t shm_gid_;
  ModelTable& table_;
  Cache& cache_;
  Loads& loads_;
  const LeaseTable& leases_;
  Loader& loader_;
  const SegmentStore& store_;
  gpu::GpuTier* const gpu_;
  GpuFdStore* const fd_store_;
  Counters& counters_;
  ModelEvents& events_;
  const LoopPost post_;

  Catalog catalog_;
  // Readiness: preloads not finished yet, as "model/tier".
  std::set<std::string> preloads_;
  std::vector<std::string> preload_failures_;
  bool ready_ = false;
  Clock::TimePoint ready_at_{};
  bool checking_ = false;
  Clock::TimePoint last_check_{};
  ThreadPool checker_{1, "wd-check"};  // last: joined first
};

}  // namespace weightd
