// residency.h — test support: the model table, its cache policy and its load pipelines, wired
// as the server wires them but without sockets or sessions, so that the residency state
// machine and the eviction policy can be tested directly. The test is the control loop: Pump()
// runs what the workers post, then the admission retries the loop would run. Loads are real:
// the Loader reads real model files into real segments under a private prefix, and GPU copies
// go through the real GpuTier on the fake CUDA API (fake_cuda.h) when one is given.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cache.h"
#include "clock.h"
#include "gpu_tier.h"
#include "lease_table.h"
#include "loader.h"
#include "loads.h"
#include "model_table.h"
#include "segment_store.h"

namespace weightd::testing {

// Memory readings the test sets (the pressure rule).
class SetMemory final : public MemoryProbe {
 public:
  Result<Reading> Host() override { return Reading{host_total, host_available}; }
  Result<Reading> Gpu(int) override { return Reading{gpu_total, gpu_available}; }
  std::uint64_t host_total = 64ull << 30, host_available = 60ull << 30;
  std::uint64_t gpu_total = 64ull << 20, gpu_available = 60ull << 20;
};

class Residency final : public ModelEvents {
 public:
  // What a copy's waiters were told.
  struct Answered {
    std::string model;
    int ordinal = -1;  // of the first waiter; -1 for the host copy
    std::size_t waiters = 0;
    ModelState state = ModelState::kAbsent;
    Status error;
    Waiter::Kind kind = Waiter::kAcquire;  // of the first waiter
    bool pinned = false;                   // the host copy was page-locked by then
  };

  // `cuda` (may be null: host-only) must outlive this object. `peer_copy` as [gpu] peer_copy.
  // `fill_jobs` as Loads::Options; `io` (may be null: POSIX) is the loader's FileIo, which must
  // outlive this object; the loader has 4 readers per fill job (a test model's 4 chunks each).
  explicit Residency(const CacheConfig& cache_config, gpu::CudaApi* cuda = nullptr, bool peer_copy = true,
                     unsigned fill_jobs = 2, FileIo* io = nullptr)
      : prefix_("wdres-" + std::to_string(::getpid()) + "-" + std::to_string(next_instance_++)),
        store({prefix_, 0600}),
        loader(Options(&store, io, 4 * fill_jobs)),
        gpu(cuda != nullptr ? std::make_unique<gpu::GpuTier>(cuda, gpu::MaterializeOptions{16 * 1024, 2}) : nullptr),
        table(&clock, &counters, gpu && gpu->available() ? gpu->Devices().size() : 0, Poster()),
        leases(64, 64),
        cache(cache_config, table, leases, gpu.get(), &memory),
        loads(Loads::Options{cache_config.admission_timeout, true, gpu::ExportMode::kVmm, peer_copy, fill_jobs}, &clock, table, cache, loader,
              store, gpu.get(), nullptr, counters, *this, Poster()) {
    cache.ResolveBudgets();
  }

  ~Residency() override {
    loads.Close();
    table.Close();
    table.RemoveSegments(false);
    std::lock_guard lock(mu_);
    tasks_.clear();  // fills that never reached the "loop" remove their segments
  }

  ModelEntry& Add(const ModelConfig& config) {
    ModelEntry& m = table.Get(config.name);
    m.config = config;
    return m;
  }

  // Parks a request on `model`'s host copy (ordinal -1) or its copy on a GPU and starts what it
  // needs, as the server does for an Acquire that misses.
  void Request(const std::string& model, int ordinal = -1) {
    ModelEntry& m = *table.Find(model);
    Waiter w{Waiter::kAcquire, "rid", ++next_request_, 1, proto::Acquire{model, "cpu", {}}, ordinal};
    cache.RecordAccess(model, ordinal);
    if (ordinal < 0) {
      m.waiters.push_back(std::move(w));
      if (m.state != ModelState::kLoading) loads.StartLoad(m);
    } else {
      m.gpus[ordinal].waiters.push_back(std::move(w));
      loads.RequestGpu(m, ordinal);
    }
  }

  // Parks a Load of `model`'s host copy, as the server does for a Load of a model that is not
  // resident.
  void RequestLoad(const std::string& model) {
    ModelEntry& m = *table.Find(model);
    m.waiters.push_back(Waiter{Waiter::kLoad, "rid", ++next_request_, 1, {}});
    if (m.state != ModelState::kLoading) loads.StartLoad(m);
  }

  // A client's lease on `model`'s copy on `device` ("cpu", "cuda:N"), as the server adds one
  // when it grants an Acquire; the copy is not evictable while it lives.
  std::uint64_t Lease(const std::string& model, const std::string& device = "cpu") {
    Session* s = *leases.Open("rid", "test", PeerCred{1, 1, 1}, clock.Now());
    return *leases.AddLease(*s, model, device);
  }
  Status Release(std::uint64_t lease) { return leases.Release(*leases.Find("rid"), lease).status(); }

  // Runs posted tasks, and the admission retries they call for, until `done` holds; false if it
  // does not within 10 s.
  bool PumpUntil(const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (;;) {
      if (cache.TakeRetry()) loads.RetryAdmissions(clock.Now());
      if (done()) return true;
      std::deque<std::function<void()>> batch;
      {
        std::unique_lock lock(mu_);
        if (!cv_.wait_until(lock, deadline, [&] { return !tasks_.empty(); })) return done();
        batch.swap(tasks_);
      }
      for (auto& task : batch) task();
      cache.RetrySoon();  // as the server does after every batch
    }
  }
  // Waits, running nothing, until at least `n` posted tasks wait for the "loop"; false if they
  // do not within 10 s. Lets a test line up worker results and run them in one batch, in the
  // order they were posted.
  bool WaitForTasks(std::size_t n) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [&] { return tasks_.size() >= n; });
  }
  bool PumpUntilHost(const std::string& model, ModelState state) {
    return PumpUntil([&] { return table.Find(model)->state == state && table.Find(model)->phase == Phase::kIdle; });
  }
  bool PumpUntilGpu(const std::string& model, int ordinal, ModelState state) {
    return PumpUntil([&] {
      const ModelEntry& m = *table.Find(model);
      auto g = m.gpus.find(ordinal);
      return g != m.gpus.end() && g->second.state == state;
    });
  }
  // Loads `model`'s host copy to residency (no waiter).
  bool Load(const std::string& model) {
    loads.StartLoad(*table.Find(model));
    return PumpUntilHost(model, ModelState::kResident);
  }
  // Names of this instance's segments and records in /dev/shm.
  std::vector<std::string> ShmNames() const { return ListSegments(prefix_); }

  // ModelEvents.
  void Answer(ModelEntry& m, std::vector<Waiter>& waiters, ModelState state, const Status& error) override {
    if (waiters.empty()) return;  // nobody asked
    answers.push_back(Answered{m.config.name, waiters.front().ordinal, waiters.size(), state, error,
                               waiters.front().kind, !m.host_pins.empty()});
  }
  void Refuse(std::vector<Waiter>& waiters, const Status&) override { waiters.clear(); }
  void PreloadDone(const std::string& key, const Status& s) override { preloads_done.emplace_back(key, s); }
  void Notify(const std::string&) override {}

 private:
  static LoaderOptions Options(const SegmentStore* store, FileIo* io, unsigned threads) {
    LoaderOptions o;
    o.segments = store;
    o.io_layer = io;
    o.threads = std::max(2u, threads);
    o.chunk_size = 4096;
    return o;
  }
  LoopPost Poster() {
    return [this](std::function<void()> task) {
      {
        std::lock_guard lock(mu_);
        tasks_.push_back(std::move(task));
      }
      cv_.notify_all();
    };
  }

  static inline std::atomic<int> next_instance_{0};
  const std::string prefix_;
  std::uint64_t next_request_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;  // guarded by mu_

 public:
  FakeClock clock;
  Counters counters;
  SetMemory memory;
  SegmentStore store;
  Loader loader;
  std::unique_ptr<gpu::GpuTier> gpu;
  ModelTable table;
  LeaseTable leases;
  Cache cache;
  Loads loads;
  std::vector<Answered> answers;
  std::vector<std::pair<std::string, Status>> preloads_done;
};

}  // namespace weightd::testing
