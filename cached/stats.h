// stats.h — what the daemon says about itself: a model's status (the Status and List
// requests), the daemon's stats (Stats) and every figure of /metrics (metrics.h's format), read
// from the state of the other parts whenever asked, so that `weightctl stats` and a scrape
// always agree.
//
// Threading: the control loop's; it reads state that only the loop changes.
#pragma once

#include <memory>
#include <string>

#include "auth.h"
#include "cache.h"
#include "clock.h"
#include "fd_server.h"
#include "lease_table.h"
#include "lifecycle.h"
#include "loader.h"
#include "metrics.h"
#include "model_table.h"
#include "protocol.h"

namespace weightd {

class Report {
 public:
  struct Sources {
    const Clock* clock = nullptr;
    Clock::TimePoint started{};
    const ModelTable* table = nullptr;
    const Cache* cache = nullptr;
    const LeaseTable* leases = nullptr;
    const Loader* loader = nullptr;
    const FdServer* fds = nullptr;
    const Lifecycle* lifecycle = nullptr;
    const Counters* counters = nullptr;
    gpu::GpuTier* gpu = nullptr;                          // may be null: host-only
    const std::unique_ptr<auth::ZapHandler>* zap = nullptr;  // set once the socket is up
  };
  explicit Report(Sources s) : s_(s) {}

  proto::ModelStatus StatusOf(const ModelEntry& m) const;
  proto::DaemonStats Stats() const;
  // Label values are model names (validated: [A-Za-z0-9._-]), device names and error reasons,
  // so the series stay few and bounded by the catalog.
  std::string Metrics() const;

 private:
  bool gpu_available() const { return s_.gpu != nullptr && s_.gpu->available(); }
  const Sources s_;
};

}  // namespace weightd
