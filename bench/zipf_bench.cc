// zipf_bench.cc — "many models, one budget": a general-recognition service's catalogue of
// classifier-sized models served from a host budget that holds only a few of them at once.
//
// The program writes (once, reused across runs) --models checkpoints: the example `classifier`
// preset (a ResNet-50-like FP32 checkpoint of ~98 MB, examples/generator.h) with seeds 0..N-1,
// or, with --model-bytes, a synthetic DiT-layout checkpoint of that size (bench/models.h) for
// quick runs. It starts the real weightd binary host-only (--no-gpu) with a host budget of
// exactly --budget-models of them, and --clients threads, each with its own Client, acquire
// and release models drawn from a seeded Zipf(s) distribution (model mNN has rank NN + 1).
//
// Reported:
//  - the hit rate, three ways: the daemon's weightd_cache_{hits,misses}_total{tier="host"}
//    (authoritative: a hit is an Acquire that found a resident copy), a client-side
//    classification of every request by its latency (see Calibrate()), and, for reference,
//    the theory: the probability mass of the top --budget-models ranks (an upper bound for any
//    policy that does not know the future), Che's approximation of LRU under independent
//    references, and an exact sequential LRU replay of the very trace that was run;
//  - time-to-tensors: Client::Acquire(model, "cpu") until the Lease with its mapped tensors is
//    returned, p50/p90/p99/max, overall and split by the client-side classification; the
//    release (unmap and the daemon's answer) is timed separately;
//  - resident bytes over time: every --sample-every requests, the daemon's
//    weightd_resident_bytes{tier="host"} (resident copies plus loads in flight: what the budget
//    bounds) and Stats().host_resident_bytes, plus an independent check of the budget: the
//    sizes of the daemon's segments in /dev/shm, polled every few milliseconds;
//  - evictions by reason (weightd_evictions_total{tier="host"}).
//
//   weightd_bench_zipf [--models 50] [--model-bytes 0] [--budget-models 10] [--requests 2000]
//                      [--warmup 100] [--zipf-s 1.0] [--seed 1] [--clients 4]
//                      [--trace zipf|scan] [--scan-every 200] [--eviction lfu|lru]
//                      [--max-loads N] [--device cpu|cuda:N]
//                      [--sample-every 50] [--work DIR] [--clean] [--json FILE]
//
// --trace scan inserts, after every --scan-every Zipf requests, one request for each model in
// catalogue order (a batch job walking the catalogue): the pattern that flushes an LRU cache.
// --device cuda:N acquires GPU copies: the daemon serves the GPU tier with a budget of
// --budget-models models on that device (and the same host budget, which holds their sources);
// the hit rates and the budget check are then the GPU tier's, from the daemon's stats.
//
// Exit status: 0 when the run completed and the budget held; 1 on a setup failure, a failed
// request, or a budget exceeded (the figures are printed in every case).
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "config.h"
#include "generator.h"
#include "models.h"
#include "safetensors.h"
#include "segment_store.h"
#include "support/daemon_process.h"
#include "weightd/client.h"

namespace weightd::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct Options {
  int models = 50;
  std::uint64_t model_bytes = 0;  // 0: the classifier preset
  int budget_models = 10;
  int requests = 2000;
  int warmup = 100;
  double zipf_s = 1.0;
  std::uint64_t seed = 1;
  int clients = 4;
  int sample_every = 50;
  std::string trace = "zipf";  // or "scan": the Zipf trace with a sequential scan of every model
  int scan_every = 200;        // Zipf requests between two scans
  std::string eviction;        // [cache] eviction; empty: the daemon's default
  int max_loads = -1;          // [cache] max_loads; -1: the daemon's default
  std::string device = "cpu";  // or "cuda:N": acquire GPU copies, budget the GPU tier
  std::string work;
  bool clean = false;
  std::string json;
};

double Mib(std::uint64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

std::string ModelName(int i) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "m%02d", i);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

// A checkpoint is complete once its model.safetensors (or, for a sharded one, its index) is in
// place: the generator and st::WriteFile write to a temporary name and rename, so a run that was
// interrupted leaves no file that looks complete.
bool CheckpointComplete(const std::string& dir) {
  return fs::exists(dir + "/" + example::kSingleFileName) || fs::exists(dir + "/" + example::kIndexFileName);
}

// The bytes the daemon charges to the host budget for one copy of the model `name` in `dir`:
// SegmentStore::HostCharge, its segments rounded up to pages and its adoption record. The
// record's size depends on the names it holds; those are given here their longest plausible
// length (a larger pid, generation and instance number than the run will see), so that the
// charge is never below the daemon's. Computing the budget from the same rule is what makes
// "a budget of exactly N models" exact (to a page or two per model).
Result<std::uint64_t> HostBytes(const std::string& name, const std::string& dir) {
  ModelRecord r;
  r.model = name;
  r.dir = dir + std::string(256, '/');  // room for a longer, canonical spelling of it
  const std::string tag = ".18446744073709551615-0123456789abcdef.";
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".safetensors") continue;
    ASSIGN_OR_RETURN(st::Header h, st::ReadHeaderFile(entry.path().string()));
    ModelRecord::Shard sh;
    sh.file = entry.path().filename().string();
    sh.segment = "wdtest-4294967295-999999." + name + tag + std::to_string(r.shards.size());
    sh.data_size = h.data_size;
    sh.header_bytes.assign(h.data_offset, '\0');
    r.shards.push_back(std::move(sh));
  }
  if (r.shards.empty()) return NotFound("no .safetensors file in " + dir);
  return SegmentStore::HostCharge(r);
}

// The device memory of a GPU copy of the model in `dir`: each shard rounded up to the 2 MiB
// allocation granularity of the GPUs the daemon runs on (GpuTier::AllocationBytes).
Result<std::uint64_t> GpuBytes(const std::string& dir) {
  constexpr std::uint64_t kGranularity = 2ull << 20;
  std::uint64_t total = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".safetensors") continue;
    ASSIGN_OR_RETURN(st::Header h, st::ReadHeaderFile(entry.path().string()));
    total += std::max<std::uint64_t>((h.data_size + kGranularity - 1) / kGranularity * kGranularity, kGranularity);
  }
  return total;
}

struct Catalogue {
  std::string root;                    // where the checkpoints are
  std::vector<std::string> dirs;       // by model index
  std::uint64_t host_bytes = 0;        // per model (the largest, should they differ)
  std::uint64_t gpu_bytes = 0;         // per model, on a GPU
  std::uint64_t file_bytes_total = 0;  // on disk, all models
  int generated = 0;
  double generate_seconds = 0;
};

Result<Catalogue> PrepareCheckpoints(const Options& o) {
  Catalogue c;
  c.root = o.work + "/" + (o.model_bytes == 0 ? std::string("classifier") : "synthetic-" + std::to_string(o.model_bytes));
  const auto t0 = Clock::now();
  // The synthetic layout: the first 90 tensors (10 blocks) of the DiT stack, scaled so that
  // the total is close to --model-bytes; enough tensors for a realistic manifest.
  const std::vector<st::TensorSpec> synthetic =
      o.model_bytes == 0 ? std::vector<st::TensorSpec>{} : DitLikeTensors(90, o.model_bytes);
  for (int i = 0; i < o.models; ++i) {
    const std::string dir = c.root + "/" + ModelName(i);
    c.dirs.push_back(dir);
    if (CheckpointComplete(dir)) continue;
    std::fprintf(stderr, "writing %s\n", dir.c_str());
    if (o.model_bytes == 0) {
      example::GenerateOptions g;
      g.preset = "classifier";
      g.out_dir = dir;
      g.seed = static_cast<std::uint64_t>(i);
      g.threads = std::max(1u, std::thread::hardware_concurrency());
      auto r = example::Generate(g);
      if (!r.ok()) return r.status();
    } else {
      RETURN_IF_ERROR(testing::WriteModel(dir, synthetic, static_cast<std::uint64_t>(i)));
    }
    ++c.generated;
  }
  c.generate_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  for (int i = 0; i < o.models; ++i) {
    const std::string& dir = c.dirs[static_cast<std::size_t>(i)];
    ASSIGN_OR_RETURN(std::uint64_t b, HostBytes(ModelName(i), dir));
    c.host_bytes = std::max(c.host_bytes, b);
    ASSIGN_OR_RETURN(std::uint64_t g, GpuBytes(dir));
    c.gpu_bytes = std::max(c.gpu_bytes, g);
    for (const auto& entry : fs::directory_iterator(dir))
      if (entry.is_regular_file()) c.file_bytes_total += entry.file_size();
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// The request mix and its theory

// Zipf(s) over ranks 1..n: p_k = k^-s / H(n, s).
std::vector<double> ZipfProbabilities(int n, double s) {
  std::vector<double> p(static_cast<std::size_t>(n));
  double h = 0;
  for (int k = 1; k <= n; ++k) h += p[static_cast<std::size_t>(k - 1)] = std::pow(static_cast<double>(k), -s);
  for (double& x : p) x /= h;
  return p;
}

// The whole trace (warmup then measured requests) is drawn up front from one seed, so it does
// not depend on the number of clients or on timing, and the LRU replay sees the same requests.
// Sampling is an inverse CDF over 53-bit uniforms from mt19937_64, whose output the standard
// fixes, rather than std::discrete_distribution, whose algorithm it does not.
std::vector<int> DrawTrace(const std::vector<double>& p, int count, std::uint64_t seed) {
  std::vector<double> cdf(p.size());
  double acc = 0;
  for (std::size_t i = 0; i < p.size(); ++i) cdf[i] = acc += p[i];
  cdf.back() = 1.0;
  std::mt19937_64 rng(seed);
  std::vector<int> out;
  out.reserve(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) {
    const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
    out.push_back(static_cast<int>(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin()));
  }
  return out;
}

// The scan-heavy variant: after every `scan_every` requests of `zipf`, one request for each of
// the `models` in catalogue order; `count` requests in all.
std::vector<int> WithScans(const std::vector<int>& zipf, int models, int scan_every, std::size_t count) {
  std::vector<int> out;
  out.reserve(count);
  for (std::size_t i = 0; out.size() < count && i < zipf.size(); ++i) {
    out.push_back(zipf[i]);
    if ((i + 1) % static_cast<std::size_t>(scan_every) == 0)
      for (int m = 0; m < models && out.size() < count; ++m) out.push_back(m);
  }
  return out;
}

// Che's approximation of an LRU cache of `c` equal-sized items under independent references:
// the characteristic time T solves sum_i (1 - e^{-p_i T}) = c, and the hit rate is
// sum_i p_i (1 - e^{-p_i T}). Accurate to a few tenths of a percent for Zipf popularity.
double CheLruHitRate(const std::vector<double>& p, int c) {
  if (c >= static_cast<int>(p.size())) return 1.0;
  auto occupancy = [&](double t) {
    double s = 0;
    for (double x : p) s += 1 - std::exp(-x * t);
    return s;
  };
  double lo = 0, hi = 1;
  while (occupancy(hi) < c) hi *= 2;
  for (int i = 0; i < 200; ++i) {
    const double mid = (lo + hi) / 2;
    (occupancy(mid) < c ? lo : hi) = mid;
  }
  double h = 0;
  for (double x : p) h += x * (1 - std::exp(-x * hi));
  return h;
}

// Hits of an exact LRU cache of `c` models replaying trace[from, to) after trace[0, from) has
// warmed it: what a daemon serving these requests one at a time would score.
int LruReplayHits(const std::vector<int>& trace, std::size_t from, std::size_t to, int c) {
  std::list<int> order;  // most recent first
  std::unordered_map<int, std::list<int>::iterator> where;
  int hits = 0;
  for (std::size_t i = 0; i < to; ++i) {
    const int m = trace[i];
    auto it = where.find(m);
    if (it != where.end()) {
      if (i >= from) ++hits;
      order.erase(it->second);
    } else if (static_cast<int>(order.size()) == c) {
      where.erase(order.back());
      order.pop_back();
    }
    order.push_front(m);
    where[m] = order.begin();
  }
  return hits;
}

// ---------------------------------------------------------------------------------------------
// The daemon's metrics

// One sample of a Prometheus text exposition: `name{k="v",...} value` whose labels include
// every pair of `want`. Returns nullopt when no such line exists. The daemon's label values
// are model and device names and reasons ([A-Za-z0-9._:-]), so no escaping needs handling.
std::optional<double> Metric(const std::string& text, const std::string& name,
                             const std::map<std::string, std::string>& want = {}) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#' || line.compare(0, name.size(), name) != 0) continue;
    const char next = line.size() > name.size() ? line[name.size()] : '\0';
    if (next != '{' && next != ' ') continue;  // another metric with this prefix
    std::string labels;
    std::size_t value_at = name.size();
    if (next == '{') {
      const std::size_t close = line.find('}', name.size());
      if (close == std::string::npos) continue;
      labels = line.substr(name.size() + 1, close - name.size() - 1);
      value_at = close + 1;
    }
    bool match = true;
    for (const auto& [k, v] : want) match = match && labels.find(k + "=\"" + v + "\"") != std::string::npos;
    if (match) return std::strtod(line.c_str() + value_at, nullptr);
  }
  return std::nullopt;
}

struct Counters {
  double hits = 0, misses = 0, loads_ok = 0, loads_failed = 0, disk_bytes = 0;
  std::map<std::string, double> evictions;  // by reason

  // `tier`: "host" or "gpu", the tier the run acquires.
  static Counters From(const std::string& metrics, const std::string& tier) {
    Counters c;
    const std::map<std::string, std::string> t{{"tier", tier}};
    c.hits = Metric(metrics, "weightd_cache_hits_total", t).value_or(0);
    c.misses = Metric(metrics, "weightd_cache_misses_total", t).value_or(0);
    c.loads_ok = Metric(metrics, "weightd_loads_total", {{"tier", tier}, {"result", "ok"}}).value_or(0);
    c.loads_failed = Metric(metrics, "weightd_loads_total", {{"tier", tier}, {"result", "error"}}).value_or(0);
    c.disk_bytes = Metric(metrics, "weightd_disk_read_bytes_total").value_or(0);
    for (const char* reason : {"lru", "ttl", "pressure", "admin", "changed"})
      c.evictions[reason] = Metric(metrics, "weightd_evictions_total", {{"tier", tier}, {"reason", reason}}).value_or(0);
    return c;
  }
  Counters operator-(const Counters& b) const {
    Counters d = *this;
    d.hits -= b.hits;
    d.misses -= b.misses;
    d.loads_ok -= b.loads_ok;
    d.loads_failed -= b.loads_failed;
    d.disk_bytes -= b.disk_bytes;
    for (auto& [k, v] : d.evictions) v -= b.evictions.count(k) ? b.evictions.at(k) : 0;
    return d;
  }
};

// ---------------------------------------------------------------------------------------------
// The run

struct Request {
  int model = -1;
  int client = -1;
  double acquire_us = 0;  // time-to-tensors
  double release_us = 0;
  bool ok = false;
  std::string error;
};

struct Sample {
  int done = 0;          // measured requests completed when sampled (negative: warmup)
  double t_ms = 0;       // since the measured phase began (negative: warmup)
  std::uint64_t used = 0;      // weightd_resident_bytes{tier="host"}: resident + reserved
  std::uint64_t resident = 0;  // Stats().host_resident_bytes: resident copies only
  int models = 0;              // weightd_resident_models{tier="host"}
  std::uint64_t shm = 0;       // the daemon's segments in /dev/shm (st_size)
};

// Sum of the sizes of the daemon's segments in /dev/shm. Independent of the daemon's own
// accounting, so it checks the budget rather than restating it.
std::uint64_t ShmBytes(const testing::DaemonProcess& d) {
  std::uint64_t total = 0;
  for (const std::string& name : d.Segments()) {
    struct stat sb;
    if (::stat(("/dev/shm/" + name).c_str(), &sb) == 0) total += static_cast<std::uint64_t>(sb.st_size);
  }
  return total;
}

// Samples the host tier every `every` completed requests (on request of the workers) and polls
// /dev/shm every few milliseconds in between, so that a short excursion over the budget between
// two samples is still seen.
class Sampler {
 public:
  // `tier`, `device`: the labels of the tier whose bytes are sampled ("host", "cpu").
  Sampler(const testing::DaemonProcess& d, ClientOptions co, std::string tier, std::string device)
      : daemon_(d), co_(std::move(co)), tier_(std::move(tier)), device_(std::move(device)) {}

  Status Start() {
    ASSIGN_OR_RETURN(Client c, Client::Connect(co_));
    client_.emplace(std::move(c));
    thread_ = std::thread([this] { Loop(); });
    return Status::Ok();
  }
  // Called by a worker: take a sample labelled `done` as soon as possible.
  void Request(int done) {
    {
      std::lock_guard lock(mu_);
      due_.push_back(done);
    }
    cv_.notify_one();
  }
  void SetOrigin(Clock::time_point t) {
    std::lock_guard lock(mu_);
    origin_ = t;
  }
  // Takes a sample from the caller's thread; only after Stop(), when the sampler's thread,
  // which owns the Client and the maxima, is gone.
  void SampleAfterStop(int done) { Take(done); }
  void Stop() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
  }
  const std::vector<Sample>& samples() const { return samples_; }
  std::uint64_t shm_max() const { return shm_max_; }
  std::uint64_t used_max() const { return used_max_; }
  int polls() const { return polls_; }
  const std::string& error() const { return error_; }

 private:
  void Loop() {
    std::unique_lock lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, std::chrono::milliseconds(5));
      std::vector<int> due;
      due.swap(due_);
      lock.unlock();
      Poll();
      for (int d : due) Take(d);
      lock.lock();
    }
  }
  void Poll() {
    shm_max_ = std::max(shm_max_, ShmBytes(daemon_));
    ++polls_;
  }
  void Take(int done) {
    Sample s;
    s.done = done;
    {
      std::lock_guard lock(mu_);
      s.t_ms = std::chrono::duration<double, std::milli>(Clock::now() - origin_).count();
    }
    auto st = client_->Stats();
    if (!st.ok()) {
      if (error_.empty()) error_ = st.status().ToString();
      return;
    }
    s.resident = st->host_resident_bytes;
    s.used = static_cast<std::uint64_t>(
        Metric(st->metrics, "weightd_resident_bytes", {{"tier", tier_}, {"device", device_}}).value_or(0));
    s.models = static_cast<int>(
        Metric(st->metrics, "weightd_resident_models", {{"tier", tier_}, {"device", device_}}).value_or(0));
    s.shm = ShmBytes(daemon_);
    shm_max_ = std::max(shm_max_, s.shm);
    used_max_ = std::max(used_max_, s.used);
    samples_.push_back(s);
  }

  const testing::DaemonProcess& daemon_;
  ClientOptions co_;
  const std::string tier_, device_;
  std::optional<Client> client_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int> due_;
  bool stop_ = false;
  Clock::time_point origin_ = Clock::now();
  // Written by the sampler thread only (or by SampleAfterStop); read after Stop().
  std::vector<Sample> samples_;
  std::uint64_t shm_max_ = 0, used_max_ = 0;
  int polls_ = 0;
  std::string error_;
};

// Runs trace[from, to) on `clients` threads, each with its own Client, pulling the next request
// from a shared index, so the order of issue is the trace's order. Each request is acquire,
// a touch of the first and last byte of the first tensor (the mapping is real), and release.
std::vector<Request> RunPhase(const std::vector<int>& trace, std::size_t from, std::size_t to, int clients,
                              const ClientOptions& co, const std::string& device, Sampler* sampler, int sample_every,
                              bool measured) {
  AcquireOptions ao;
  ao.device = device;
  const bool host = device == "cpu";
  std::vector<Request> out(to - from);
  std::atomic<std::size_t> next{from};
  std::atomic<int> done{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      ClientOptions mine = co;
      mine.client_name = "weightd_bench_zipf." + std::to_string(c);
      auto client = Client::Connect(mine);
      for (std::size_t i; (i = next.fetch_add(1)) < to;) {
        Request& r = out[i - from];
        r.model = trace[i];
        r.client = c;
        if (!client.ok()) {
          r.error = client.status().ToString();
          continue;
        }
        const auto t0 = Clock::now();
        auto lease = client->Acquire(ModelName(r.model), ao);
        const auto t1 = Clock::now();
        r.acquire_us = std::chrono::duration<double, std::micro>(t1 - t0).count();
        if (!lease.ok()) {
          r.error = lease.status().ToString();
        } else if (lease->tensors().empty() || lease->tensors().front().data == nullptr) {
          r.error = "lease without mapped tensors";
        } else {
          if (host) {  // a GPU lease's data is device memory
            const Tensor& t = lease->tensors().front();
            volatile std::byte sink = t.data[0];
            sink = t.data[t.nbytes - 1];
            (void)sink;
          }
          const auto t2 = Clock::now();
          lease->release();  // the last copy: unmaps and waits for the daemon's answer
          r.release_us = std::chrono::duration<double, std::micro>(Clock::now() - t2).count();
          r.ok = true;
        }
        const int n = done.fetch_add(1) + 1;
        if (sampler != nullptr && n % sample_every == 0) sampler->Request(measured ? n : -n);
      }
    });
  }
  for (auto& t : threads) t.join();
  return out;
}

// A per-request, client-side view of hits and misses. The reply to an Acquire does not say
// whether it waited for a load, but a miss must copy the whole model into fresh shared memory,
// which takes orders of magnitude longer than an attach. Calibrate() measures both on this
// machine before the run: one cold Acquire (load + attach) and the median of warm ones (attach
// only) of the least popular model, which is then evicted again so that the run starts cold.
// Requests slower than the geometric mean of the two are classified as misses. A request that
// joins a load already in flight near its end is a miss for the daemon but may fall below the
// threshold; so may a hit that waited behind CPU contention rise above it. The two views are
// reported side by side for that reason.
struct Calibration {
  double cold_us = 0, warm_us = 0, threshold_us = 0;
};

Result<Calibration> Calibrate(Client& client, const std::string& model, const std::string& device) {
  AcquireOptions ao;
  ao.device = device;
  Calibration cal;
  {
    const auto t0 = Clock::now();
    ASSIGN_OR_RETURN(Lease lease, client.Acquire(model, ao));
    cal.cold_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  }
  std::vector<double> warm;
  for (int i = 0; i < 7; ++i) {
    const auto t0 = Clock::now();
    ASSIGN_OR_RETURN(Lease lease, client.Acquire(model, ao));
    warm.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  std::sort(warm.begin(), warm.end());
  cal.warm_us = warm[warm.size() / 2];
  cal.threshold_us = std::sqrt(cal.cold_us * cal.warm_us);
  if (device != "cpu") RETURN_IF_ERROR(client.Evict(model, device));
  RETURN_IF_ERROR(client.Evict(model, "cpu"));
  return cal;
}

// Nearest-rank percentile of an unsorted sample.
double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const auto rank = static_cast<std::size_t>(std::ceil(q / 100.0 * static_cast<double>(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

struct Dist {
  std::size_t n = 0;
  double p50 = 0, p90 = 0, p99 = 0, max = 0, mean = 0;
  static Dist Of(const std::vector<double>& v) {
    Dist d;
    d.n = v.size();
    if (v.empty()) return d;
    d.p50 = Percentile(v, 50);
    d.p90 = Percentile(v, 90);
    d.p99 = Percentile(v, 99);
    d.max = *std::max_element(v.begin(), v.end());
    for (double x : v) d.mean += x / static_cast<double>(v.size());
    return d;
  }
  nlohmann::json Json() const { return {{"n", n}, {"p50_us", p50}, {"p90_us", p90}, {"p99_us", p99}, {"max_us", max}, {"mean_us", mean}}; }
};

std::string Ms(double us) {
  char buf[32];
  std::snprintf(buf, sizeof buf, us < 10'000 ? "%.2f" : "%.1f", us / 1000.0);
  return buf;
}

std::string MachineLine() {
  std::string cpu = "?";
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  const double mem_gib = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE)) /
                         (1024.0 * 1024.0 * 1024.0);
  char buf[256];
  std::snprintf(buf, sizeof buf, "%ld CPUs (%s), %.1f GiB RAM", ::sysconf(_SC_NPROCESSORS_ONLN), cpu.c_str(), mem_gib);
  return buf;
}

int Run(const Options& o) {
  const bool gpu = o.device != "cpu";
  const std::string tier = gpu ? "gpu" : "host";
  std::printf("weightd_bench_zipf: %d models, budget %d, %d+%d requests, Zipf s=%.3g, seed %llu, %d clients, trace %s, "
              "eviction %s, max_loads %s, device %s\n",
              o.models, o.budget_models, o.warmup, o.requests, o.zipf_s, static_cast<unsigned long long>(o.seed),
              o.clients, o.trace.c_str(), o.eviction.empty() ? "(default)" : o.eviction.c_str(),
              o.max_loads < 0 ? "(default)" : std::to_string(o.max_loads).c_str(), o.device.c_str());
  std::printf("machine: %s\n", MachineLine().c_str());

  auto cat = PrepareCheckpoints(o);
  if (!cat.ok()) {
    std::fprintf(stderr, "weightd_bench_zipf: checkpoints: %s\n", cat.status().ToString().c_str());
    return 1;
  }
  const std::uint64_t budget = cat->host_bytes * static_cast<std::uint64_t>(o.budget_models);
  std::printf("checkpoints: %s (%d written in %.1f s, %d reused), %.1f MiB each in the host tier, %.2f GiB on disk\n",
              cat->root.c_str(), cat->generated, cat->generate_seconds, o.models - cat->generated, Mib(cat->host_bytes),
              Mib(cat->file_bytes_total) / 1024.0);
  std::printf("host budget: %llu bytes (%.1f MiB) = %d models\n", static_cast<unsigned long long>(budget), Mib(budget),
              o.budget_models);
  const std::uint64_t gpu_budget = cat->gpu_bytes * static_cast<std::uint64_t>(o.budget_models);
  if (gpu)
    std::printf("%s budget: %llu bytes (%.1f MiB) = %d models\n", o.device.c_str(),
                static_cast<unsigned long long>(gpu_budget), Mib(gpu_budget), o.budget_models);
  // The budget the run checks: the tier it acquires.
  const std::uint64_t tier_budget = gpu ? gpu_budget : budget;

  // The theory, from the same distribution and trace.
  const std::vector<double> p = ZipfProbabilities(o.models, o.zipf_s);
  double top_mass = 0;
  for (int k = 0; k < std::min(o.budget_models, o.models); ++k) top_mass += p[static_cast<std::size_t>(k)];
  const double che = CheLruHitRate(p, o.budget_models);
  const std::size_t total = static_cast<std::size_t>(o.warmup + o.requests);
  const std::vector<int> trace = o.trace == "scan" ? WithScans(DrawTrace(p, static_cast<int>(total), o.seed), o.models,
                                                               o.scan_every, total)
                                                   : DrawTrace(p, static_cast<int>(total), o.seed);
  const int replay_hits = LruReplayHits(trace, static_cast<std::size_t>(o.warmup), total, o.budget_models);
  int trace_top = 0;
  for (std::size_t i = static_cast<std::size_t>(o.warmup); i < total; ++i) trace_top += trace[i] < o.budget_models;

  // The daemon: host-only, the budget, no idle TTL (this measures the budget's LRU alone; the
  // pressure rule keeps its default and shows up among the evictions if it fires).
  testing::DaemonOptions dopt;
  for (int i = 0; i < o.models; ++i) dopt.models[ModelName(i)] = cat->dirs[static_cast<std::size_t>(i)];
  dopt.config_toml = "[cache]\nhost_budget = \"" + std::to_string(budget) + "\"\nhost_idle_ttl = \"0\"\n";
  if (!o.eviction.empty()) dopt.config_toml += "eviction = \"" + o.eviction + "\"\n";
  if (o.max_loads >= 0) dopt.config_toml += "max_loads = " + std::to_string(o.max_loads) + "\n";
  if (gpu) dopt.config_toml += "gpu_budget = \"" + std::to_string(gpu_budget) + "\"\ngpu_idle_ttl = \"0\"\n";
  else dopt.extra_args = {"--no-gpu"};
  auto daemon = testing::DaemonProcess::Start(dopt);
  if (!daemon.ok()) {
    std::fprintf(stderr, "weightd_bench_zipf: daemon: %s\n", daemon.status().ToString().c_str());
    return 1;
  }
  testing::DaemonProcess& d = **daemon;
  ClientOptions co;
  co.endpoint = d.endpoint();
  co.client_name = "weightd_bench_zipf";
  auto control = Client::Connect(co);
  if (!control.ok()) {
    std::fprintf(stderr, "weightd_bench_zipf: connect: %s\n", control.status().ToString().c_str());
    return 1;
  }
  auto cal = Calibrate(*control, ModelName(o.models - 1), o.device);
  if (!cal.ok()) {
    std::fprintf(stderr, "weightd_bench_zipf: calibration: %s\n%s\n", cal.status().ToString().c_str(), d.Log().c_str());
    return 1;
  }
  std::printf("calibration (%s): cold acquire %s ms, warm acquire %s ms; miss threshold %s ms\n",
              ModelName(o.models - 1).c_str(), Ms(cal->cold_us).c_str(), Ms(cal->warm_us).c_str(),
              Ms(cal->threshold_us).c_str());

  Sampler sampler(d, co, tier, gpu ? o.device : "cpu");
  if (Status s = sampler.Start(); !s.ok()) {
    std::fprintf(stderr, "weightd_bench_zipf: sampler: %s\n", s.ToString().c_str());
    return 1;
  }
  sampler.SetOrigin(Clock::now());
  RunPhase(trace, 0, static_cast<std::size_t>(o.warmup), o.clients, co, o.device, &sampler, o.sample_every, false);
  auto before = control->Stats();
  if (!before.ok()) {
    std::fprintf(stderr, "weightd_bench_zipf: stats: %s\n", before.status().ToString().c_str());
    return 1;
  }
  const auto t0 = Clock::now();
  sampler.SetOrigin(t0);
  sampler.Request(0);
  std::vector<Request> reqs =
      RunPhase(trace, static_cast<std::size_t>(o.warmup), total, o.clients, co, o.device, &sampler, o.sample_every, true);
  const double wall_s = std::chrono::duration<double>(Clock::now() - t0).count();
  sampler.Stop();
  sampler.SampleAfterStop(o.requests);
  auto after = control->Stats();
  if (!after.ok()) {
    std::fprintf(stderr, "weightd_bench_zipf: stats: %s\n", after.status().ToString().c_str());
    return 1;
  }
  const Counters dc = Counters::From(after->metrics, tier) - Counters::From(before->metrics, tier);
  const bool daemon_alive = d.running();

  // Client-side figures.
  std::vector<double> all, hit_t, miss_t, rel;
  int failed = 0;
  std::string first_error;
  for (const Request& r : reqs) {
    if (!r.ok) {
      ++failed;
      if (first_error.empty()) first_error = r.error;
      continue;
    }
    all.push_back(r.acquire_us);
    rel.push_back(r.release_us);
    (r.acquire_us < cal->threshold_us ? hit_t : miss_t).push_back(r.acquire_us);
  }
  const Dist d_all = Dist::Of(all), d_hit = Dist::Of(hit_t), d_miss = Dist::Of(miss_t), d_rel = Dist::Of(rel);
  const double n_req = static_cast<double>(o.requests);
  const double daemon_rate = dc.hits + dc.misses > 0 ? dc.hits / (dc.hits + dc.misses) : std::nan("");
  const double client_rate = all.empty() ? std::nan("") : static_cast<double>(hit_t.size()) / static_cast<double>(all.size());

  // Resident bytes over time, compact: one line per sample.
  std::printf("\n%s tier over the measured requests (budget %.1f MiB; used = resident + loads in flight; shm: the host "
              "tier's /dev/shm, budget %.1f MiB):\n",
              tier.c_str(), Mib(tier_budget), Mib(budget));
  std::printf("%8s %9s %9s %9s %7s %9s\n", "request", "t_s", "used_MiB", "res_MiB", "models", "shm_MiB");
  for (const Sample& s : sampler.samples()) {
    if (s.done < 0) continue;
    std::printf("%8d %9.2f %9.1f %9.1f %7d %9.1f\n", s.done, s.t_ms / 1000.0, Mib(s.used), Mib(s.resident), s.models,
                Mib(s.shm));
  }
  const std::uint64_t used_max = sampler.used_max(), shm_max = sampler.shm_max();
  const bool budget_held = used_max <= tier_budget && shm_max <= budget;
  std::printf("samples: %zu (every %d requests, warmup included in the maxima); /dev/shm polls: %d\n",
              sampler.samples().size(), o.sample_every, sampler.polls());
  if (!sampler.error().empty()) std::printf("sampler error: %s\n", sampler.error().c_str());

  // The summary, last.
  auto pct = [](double x) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f %%", 100 * x);
    return std::string(buf);
  };
  std::printf("\n== summary: %d models x %.1f MiB, %s budget %d models (%.1f MiB), Zipf s=%.3g%s, %d requests, %d clients, "
              "eviction %s, max_loads %s ==\n",
              o.models, Mib(cat->host_bytes), o.device.c_str(), o.budget_models, Mib(tier_budget), o.zipf_s,
              o.trace == "scan" ? " with scans" : "", o.requests, o.clients,
              o.eviction.empty() ? "(default)" : o.eviction.c_str(),
              o.max_loads < 0 ? "(default)" : std::to_string(o.max_loads).c_str());
  std::printf("%-44s %s\n", "hit rate, daemon counters", pct(daemon_rate).c_str());
  std::printf("%-44s %.0f hits, %.0f misses\n", "", dc.hits, dc.misses);
  std::printf("%-44s %s (threshold %s ms)\n", "hit rate, client latency classification", pct(client_rate).c_str(),
              Ms(cal->threshold_us).c_str());
  std::printf("%-44s %s\n", "hit rate, sequential LRU replay of the trace", pct(replay_hits / n_req).c_str());
  std::printf("%-44s %s\n", "hit rate, Che approximation of LRU", pct(che).c_str());
  std::printf("%-44s %s (in the trace: %s)\n", "top-budget probability mass (upper bound)", pct(top_mass).c_str(),
              pct(trace_top / n_req).c_str());
  std::printf("%-44s p50 %s  p90 %s  p99 %s  max %s ms\n", "time-to-tensors, all", Ms(d_all.p50).c_str(),
              Ms(d_all.p90).c_str(), Ms(d_all.p99).c_str(), Ms(d_all.max).c_str());
  std::printf("%-44s p50 %s  p90 %s  p99 %s  max %s ms (n=%zu)\n", "time-to-tensors, client-classified hits",
              Ms(d_hit.p50).c_str(), Ms(d_hit.p90).c_str(), Ms(d_hit.p99).c_str(), Ms(d_hit.max).c_str(), d_hit.n);
  std::printf("%-44s p50 %s  p90 %s  p99 %s  max %s ms (n=%zu)\n", "time-to-tensors, client-classified misses",
              Ms(d_miss.p50).c_str(), Ms(d_miss.p90).c_str(), Ms(d_miss.p99).c_str(), Ms(d_miss.max).c_str(), d_miss.n);
  std::printf("%-44s p50 %s  p99 %s ms\n", "release", Ms(d_rel.p50).c_str(), Ms(d_rel.p99).c_str());
  std::printf("%-44s %.0f ok, %.0f failed; %.2f GiB read\n", "host loads", dc.loads_ok, dc.loads_failed,
              dc.disk_bytes / (1024.0 * 1024.0 * 1024.0));
  std::printf("%-44s lru %.0f, ttl %.0f, pressure %.0f, admin %.0f, changed %.0f\n", "evictions by reason",
              dc.evictions.at("lru"), dc.evictions.at("ttl"), dc.evictions.at("pressure"), dc.evictions.at("admin"),
              dc.evictions.at("changed"));
  if (gpu)
    std::printf("%-44s used %.1f MiB, budget %.1f MiB; /dev/shm %.1f MiB, host budget %.1f MiB: %s\n",
                ("max " + o.device + " bytes").c_str(), Mib(used_max), Mib(tier_budget), Mib(shm_max), Mib(budget),
                budget_held ? "within the budgets" : "BUDGET EXCEEDED");
  else
    std::printf("%-44s used %.1f MiB, /dev/shm %.1f MiB, budget %.1f MiB: %s\n", "max host bytes", Mib(used_max),
                Mib(shm_max), Mib(budget), budget_held ? "within the budget" : "BUDGET EXCEEDED");
  std::printf("%-44s %.1f s, %.1f requests/s; %d failed%s%s\n", "wall time (measured requests)", wall_s,
              n_req / wall_s, failed, failed ? ": " : "", first_error.c_str());
  if (!daemon_alive) std::printf("the daemon died during the run:\n%s\n", d.Log().c_str());

  if (!o.json.empty()) {
    nlohmann::json j;
    j["machine"] = MachineLine();
    j["options"] = {{"models", o.models},   {"model_bytes", o.model_bytes}, {"budget_models", o.budget_models},
                    {"requests", o.requests}, {"warmup", o.warmup},       {"zipf_s", o.zipf_s},
                    {"seed", o.seed},         {"clients", o.clients},     {"sample_every", o.sample_every},
                    {"trace", o.trace},       {"scan_every", o.scan_every}, {"eviction", o.eviction},
                    {"max_loads", o.max_loads}, {"device", o.device}};
    j["model_host_bytes"] = cat->host_bytes;
    j["budget_bytes"] = budget;
    j["gpu_budget_bytes"] = gpu ? gpu_budget : 0;
    j["calibration"] = {{"cold_us", cal->cold_us}, {"warm_us", cal->warm_us}, {"threshold_us", cal->threshold_us}};
    j["hit_rate"] = {{"daemon", daemon_rate},       {"client_latency", client_rate}, {"lru_replay", replay_hits / n_req},
                     {"che_lru", che},             {"top_mass", top_mass},          {"trace_top_share", trace_top / n_req}};
    j["daemon"] = {{"hits", dc.hits},         {"misses", dc.misses},         {"loads_ok", dc.loads_ok},
                   {"loads_failed", dc.loads_failed}, {"disk_read_bytes", dc.disk_bytes}, {"evictions", dc.evictions}};
    j["time_to_tensors"] = {{"all", d_all.Json()}, {"hits", d_hit.Json()}, {"misses", d_miss.Json()}};
    j["release"] = d_rel.Json();
    nlohmann::json series = nlohmann::json::array();
    for (const Sample& s : sampler.samples())
      series.push_back({{"request", s.done}, {"t_ms", s.t_ms}, {"used", s.used}, {"resident", s.resident},
                        {"models", s.models}, {"shm", s.shm}});
    j["host_series"] = series;
    j["max"] = {{"used", used_max}, {"shm", shm_max}, {"budget_held", budget_held}};
    j["wall_s"] = wall_s;
    j["failed"] = failed;
    nlohmann::json per = nlohmann::json::array();
    for (const Request& r : reqs)
      per.push_back({{"model", r.model}, {"client", r.client}, {"acquire_us", r.acquire_us}, {"ok", r.ok}});
    j["requests"] = per;
    std::ofstream(o.json) << j.dump(1) << "\n";
  }

  if (o.clean) {
    std::error_code ec;
    fs::remove_all(cat->root, ec);
    if (ec) std::fprintf(stderr, "weightd_bench_zipf: --clean: %s\n", ec.message().c_str());
  }
  return failed == 0 && budget_held && daemon_alive && sampler.error().empty() ? 0 : 1;
}

}  // namespace
}  // namespace weightd::bench

int main(int argc, char** argv) {
  weightd::bench::Options o;
  const char* tmp = std::getenv("TMPDIR");
  o.work = std::string(tmp && *tmp ? tmp : "/tmp") + "/weightd-bench-zipf";
  std::string model_bytes;
  CLI::App app{"Many models, one host budget: a Zipf request mix against the real weightd daemon."};
  app.add_option("--models", o.models, "models in the catalogue")->capture_default_str()->check(CLI::Range(1, 999));
  app.add_option("--model-bytes", model_bytes,
                 "size of each synthetic model (\"16MiB\"); default: the classifier preset (~98 MB, ResNet-50-like)");
  app.add_option("--budget-models", o.budget_models, "host budget, in models")->capture_default_str()->check(CLI::Range(1, 999));
  app.add_option("--requests", o.requests, "measured requests")->capture_default_str()->check(CLI::Range(1, 100'000'000));
  app.add_option("--warmup", o.warmup, "requests before the measured ones (the cache starts empty)")
      ->capture_default_str()
      ->check(CLI::Range(0, 100'000'000));
  app.add_option("--zipf-s", o.zipf_s, "Zipf exponent s (p_k ~ k^-s)")->capture_default_str()->check(CLI::Range(0.0, 10.0));
  app.add_option("--seed", o.seed, "seed of the request trace")->capture_default_str();
  app.add_option("--clients", o.clients, "concurrent client threads, each with its own Client")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  app.add_option("--sample-every", o.sample_every, "sample the host tier every N requests")
      ->capture_default_str()
      ->check(CLI::Range(1, 100'000'000));
  app.add_option("--trace", o.trace, "zipf, or scan: the Zipf trace with a scan of every model every --scan-every requests")
      ->capture_default_str()
      ->check(CLI::IsMember({"zipf", "scan"}));
  app.add_option("--scan-every", o.scan_every, "Zipf requests between two scans (--trace scan)")
      ->capture_default_str()
      ->check(CLI::Range(1, 100'000'000));
  app.add_option("--eviction", o.eviction, "the daemon's [cache] eviction (default: its default, lfu)")
      ->check(CLI::IsMember({"lfu", "lru"}));
  app.add_option("--max-loads", o.max_loads, "the daemon's [cache] max_loads, 0: no bound (default: its default, 2)")
      ->check(CLI::Range(0, 1'000'000));
  app.add_option("--device", o.device, "cpu, or cuda:N: acquire GPU copies and check the GPU budget")
      ->capture_default_str();
  app.add_option("--work", o.work, "where checkpoints are written once and reused")->capture_default_str();
  app.add_flag("--clean", o.clean, "remove this run's checkpoints at the end");
  app.add_option("--json", o.json, "write the figures, the time series and every request here");
  CLI11_PARSE(app, argc, argv);
  if (o.device != "cpu" && !o.device.starts_with("cuda:")) {
    std::fprintf(stderr, "weightd_bench_zipf: --device: cpu or cuda:N, not '%s'\n", o.device.c_str());
    return 2;
  }
  if (!model_bytes.empty()) {
    auto b = weightd::ParseSize(model_bytes);
    if (!b.ok() || *b == 0) {
      std::fprintf(stderr, "weightd_bench_zipf: --model-bytes: %s\n", b.ok() ? "must be > 0" : b.status().ToString().c_str());
      return 2;
    }
    o.model_bytes = *b;
  }
  return weightd::bench::Run(o);
}
