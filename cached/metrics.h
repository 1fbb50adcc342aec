// metrics.h — Prometheus text exposition (format 0.0.4): a writer for counter, gauge and
// histogram families, and the histogram type the daemon keeps its load durations in.
//
// Not thread-safe: the server renders on its loop thread, from its own state.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace weightd::metrics {

using Labels = std::vector<std::pair<std::string, std::string>>;

// Cumulative buckets with fixed upper bounds (seconds, bytes, ...), plus +Inf.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);

  const std::vector<double>& bounds() const { return bounds_; }
  const std::vector<std::uint64_t>& counts() const { return counts_; }  // per bucket, not cumulative
  std::uint64_t count() const { return count_; }
  double sum() const { return sum_; }

 private:
  std::vector<double> bounds_;
  std::vector<std::uint64_t> counts_;  // bounds_.size() + 1 (the last is +Inf)
  std::uint64_t count_ = 0;
  double sum_ = 0;
};

// Load durations: 10 ms to 10 min.
Histogram LoadDurationHistogram();

class Writer {
 public:
  // Starts a family: "# HELP" and "# TYPE" lines. `type` is "counter", "gauge" or "histogram".
  void Family(std::string_view name, std::string_view type, std::string_view help);
  void Sample(std::string_view name, const Labels& labels, double value);
  // The _bucket, _sum and _count samples of a histogram family.
  void HistogramSamples(std::string_view name, const Labels& labels, const Histogram& h);

  const std::string& text() const { return out_; }

 private:
  std::string out_;
};

// A label value with \, " and newlines escaped as the format requires.
std::string EscapeLabelValue(std::string_view v);

}  // namespace weightd::metrics

namespace weightd {

// The daemon's own counters (the rest of /metrics is read from the state when rendered), kept
// by the control loop's parts and read by the report (stats.h). Not thread-safe: the loop's.
struct TierCounters {
  std::uint64_t loads_ok = 0, loads_failed = 0, bytes = 0, hits = 0, misses = 0;
  metrics::Histogram durations = metrics::LoadDurationHistogram();
  std::map<std::string, std::uint64_t> evictions;  // by reason
  std::map<std::string, std::uint64_t> errors;     // by reason of the error
};
struct Counters {
  TierCounters host, gpu;
  std::uint64_t loads_ok = 0, loads_failed = 0, requests = 0, malformed = 0;
  std::uint64_t adopted_models = 0;  // host copies taken back from the previous instance at start
};

}  // namespace weightd
