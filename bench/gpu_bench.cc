// gpu_bench.cc — the GPU tier's figures on the reference checkpoint of ../shared/GPU.md (a
// DiT-like 5B model in bf16: 270 tensors, 10.19 GB, 3 shards), each next to the physical limit
// measured in the same run. Every benchmark skips where there is no CUDA device.
//
//   BM_PinnedH2D           the host-to-device limit: 1 GiB copies from pinned host memory
//   BM_HostToGpuResidency  the model in the host tier only; Acquire(cuda:0) makes it GPU
//                          resident (the daemon's copy time, and the whole Acquire)
//   BM_PeerCopy            two GPUs or more: the model resident on cuda:0 and in the host tier;
//                          Acquire(cuda:1) makes the second copy GPU-to-GPU (peer_GBps, beside
//                          the pinned host-to-device limit); skipped with one GPU
//   BM_GpuAttach           the model resident on the GPU: Connect + Acquire(cuda:0) until all
//                          270 CUDA tensors are usable, this process's context already made
//   BM_FreshProcessReady   a fresh process, from main() to all 270 CUDA tensors usable, against
//                          a fresh process that only creates its CUDA context: the client
//                          overlaps the context with the attach, so the two should be close
//   BM_GpuMemory/N/shared  GPU memory used by N processes holding the model through weightd,
//   BM_GpuMemory/N/private ... and by N processes that each keep a private device copy
//
// Environment: WEIGHTD_BENCH_DIT_DIR, where the checkpoint is written once and reused (default
// $TMPDIR/weightd-bench-dit5b). The process re-executes itself as the N memory clients.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include "cuda_api.h"
#include "generator.h"
#include "posix.h"
#include "support/child_process.h"
#include "support/daemon_process.h"
#include "weightd/client.h"

namespace weightd::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr const char* kModel = "dit5b";

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

struct Env {
  std::unique_ptr<gpu::CudaApi> api;
  std::string model_dir;
  std::unique_ptr<testing::DaemonProcess> daemon;
  std::uint64_t model_bytes = 0;
  std::size_t tensors = 0;
  double pinned_h2d_gbps = 0;  // measured by BM_PinnedH2D, which runs first
  std::string skip;            // why every benchmark skips
};
Env* g_env = nullptr;

ClientOptions Options(const std::string& endpoint) {
  ClientOptions o;
  o.endpoint = endpoint;
  o.client_name = "weightd_bench_gpu";
  return o;
}

// ---- the memory clients (this binary, re-executed) ------------------------------------------

// --child=shared|private ENDPOINT: acquires the model on cuda:0; "private" then copies it into
// memory of its own and drops the lease. Prints "ready", then waits for stdin to close.
// --child=startup|context ENDPOINT: prints the milliseconds from process start to tensors
// ready (Connect with prepare_cuda_device, Acquire on cuda:0), or to a CUDA context alone.
int ChildMain(const std::string& mode, const std::string& endpoint, Clock::time_point start) {
  if (mode == "context" || mode == "startup") {
    if (mode == "context") {
      auto api = gpu::LoadCudaApi();
      if (!api.ok() || !(*api)->SetDevice(0).ok()) return std::printf("bad no CUDA\n"), 1;
    } else {
      ClientOptions o = Options(endpoint);
      o.prepare_cuda_device = 0;
      auto c = Client::Connect(o);
      if (!c.ok()) return std::printf("bad %s\n", c.status().ToString().c_str()), 1;
      auto lease = c->Acquire(kModel, AcquireOptions{"cuda:0", {}});
      if (!lease.ok()) return std::printf("bad %s\n", lease.status().ToString().c_str()), 1;
    }
    std::printf("%.3f\n", std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    return 0;
  }
  auto client = Client::Connect(Options(endpoint));
  if (!client.ok()) return std::printf("bad %s\n", client.status().ToString().c_str()), 1;
  auto lease = client->Acquire(kModel, AcquireOptions{"cuda:0", {}});
  if (!lease.ok()) return std::printf("bad %s\n", lease.status().ToString().c_str()), 1;
  std::unique_ptr<gpu::CudaApi> api;
  std::vector<gpu::DevicePtr> own;
  if (mode == "private") {
    auto a = gpu::LoadCudaApi();
    if (!a.ok() || !(*a)->SetDevice(0).ok()) return std::printf("bad no CUDA\n"), 1;
    api = std::move(a).value();
    auto stream = api->StreamCreate();
    if (!stream.ok()) return std::printf("bad stream\n"), 1;
    for (const Tensor& t : lease->tensors()) {
      auto p = api->Malloc(std::max<std::uint64_t>(t.nbytes, 1));
      if (!p.ok()) return std::printf("bad %s\n", p.status().ToString().c_str()), 1;
      own.push_back(*p);
      if (!api->CopyDeviceToDeviceAsync(*p, reinterpret_cast<gpu::DevicePtr>(t.data), t.nbytes, *stream).ok())
        return std::printf("bad copy\n"), 1;
    }
    if (!api->StreamSynchronize(*stream).ok()) return std::printf("bad sync\n"), 1;
    (void)api->StreamDestroy(*stream);
    *lease = Lease();  // the private copy is all this process keeps
  }
  std::printf("ready\n");
  std::fflush(stdout);
  char c;
  while (::read(STDIN_FILENO, &c, 1) > 0) {
  }
  for (gpu::DevicePtr p : own) (void)api->Free(p);
  return 0;
}

// ---- setup ---------------------------------------------------------------------------------

bool Setup() {
  auto api = gpu::LoadCudaApi();
  if (!api.ok()) {
    g_env->skip = "no CUDA device: " + api.status().ToString();
    return false;
  }
  g_env->api = std::move(api).value();
  if (Status s = g_env->api->SetDevice(0); !s.ok()) {
    g_env->skip = s.ToString();
    return false;
  }
  const char* dir = std::getenv("WEIGHTD_BENCH_DIT_DIR");
  const char* tmp = std::getenv("TMPDIR");
  g_env->model_dir = dir != nullptr ? dir : std::string(tmp != nullptr ? tmp : "/tmp") + "/weightd-bench-dit5b";
  if (::access((g_env->model_dir + "/model.safetensors.index.json").c_str(), F_OK) != 0) {
    example::GenerateOptions g;
    g.preset = "dit5b";
    g.out_dir = g_env->model_dir;
    g.seed = 1;
    const auto t0 = Clock::now();
    auto r = example::Generate(g);
    if (!r.ok()) {
      g_env->skip = "generating the checkpoint: " + r.status().ToString();
      return false;
    }
    std::fprintf(stderr, "wrote %s: %zu tensors, %llu bytes in %.1f s\n", g_env->model_dir.c_str(), r->tensors,
                 static_cast<unsigned long long>(r->tensor_bytes), Seconds(Clock::now() - t0));
  }
  auto d = testing::DaemonProcess::Start(testing::DaemonOptions{.models = {{kModel, g_env->model_dir}}});
  if (!d.ok()) {
    g_env->skip = d.status().ToString();
    return false;
  }
  g_env->daemon = std::move(d).value();
  auto c = Client::Connect(Options(g_env->daemon->endpoint()));
  if (!c.ok()) {
    g_env->skip = c.status().ToString();
    return false;
  }
  const auto t0 = Clock::now();
  auto info = c->Load(kModel);
  if (!info.ok()) {
    g_env->skip = info.status().ToString();
    return false;
  }
  g_env->model_bytes = info->bytes;
  g_env->tensors = info->tensors;
  std::fprintf(stderr, "host tier: %u tensors, %llu bytes resident in %.2f s (page cache to shm, pinned)\n",
               info->tensors, static_cast<unsigned long long>(info->bytes), Seconds(Clock::now() - t0));
  return true;
}

bool SkipIfNoGpu(benchmark::State& state) {
  if (g_env->skip.empty()) return false;
  state.SkipWithError(g_env->skip.c_str());
  return true;
}

void ModelCounters(benchmark::State& state) {
  state.counters["tensors"] = static_cast<double>(g_env->tensors);
  state.counters["GB"] = static_cast<double>(g_env->model_bytes) / 1e9;
}

// ---- benchmarks ----------------------------------------------------------------------------

void BM_PinnedH2D(benchmark::State& state) {
  if (SkipIfNoGpu(state)) return;
  gpu::CudaApi* api = g_env->api.get();
  constexpr std::uint64_t kBytes = 1ull << 30;
  auto host = api->HostAllocPinned(kBytes);
  auto dev = api->Malloc(kBytes);
  auto stream = api->StreamCreate();
  if (!host.ok() || !dev.ok() || !stream.ok()) return state.SkipWithError("cannot allocate 1 GiB pinned + device");
  std::memset(*host, 1, kBytes);
  double best = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    (void)api->CopyHostToDeviceAsync(*dev, *host, kBytes, *stream);
    (void)api->StreamSynchronize(*stream);
    const double s = Seconds(Clock::now() - t0);
    state.SetIterationTime(s);
    best = std::max(best, static_cast<double>(kBytes) / s / 1e9);
  }
  g_env->pinned_h2d_gbps = best;
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * kBytes));
  state.counters["best_GBps"] = best;
  (void)api->StreamDestroy(*stream);
  (void)api->Free(*dev);
  (void)api->HostFreePinned(*host);
}

void BM_HostToGpuResidency(benchmark::State& state) {
  if (SkipIfNoGpu(state)) return;
  auto c = Client::Connect(Options(g_env->daemon->endpoint()));
  if (!c.ok()) return state.SkipWithError(c.status().ToString().c_str());
  double copy_s = 0, h2d_s = 0, acquire_s = 0;
  // Host-warm: the host copy has been resident a while (page-locked, as the daemon keeps it).
  // One untimed GPU copy first: it waits for the page-locking that follows a fresh load.
  if (auto l = c->Load(kModel); !l.ok()) return state.SkipWithError(l.status().ToString().c_str());
  if (auto w = c->Acquire(kModel, AcquireOptions{"cuda:0", {}}); !w.ok()) return state.SkipWithError(w.status().ToString().c_str());
  for (auto _ : state) {
    // Back to host-only: drop the GPU copy alone; the host copy stays (not timed).
    if (Status s = c->Evict(kModel, "cuda:0"); !s.ok()) return state.SkipWithError(s.ToString().c_str());
    const auto t0 = Clock::now();
    auto lease = c->Acquire(kModel, AcquireOptions{"cuda:0", {}});
    const double s = Seconds(Clock::now() - t0);
    if (!lease.ok()) return state.SkipWithError(lease.status().ToString().c_str());
    state.SetIterationTime(s);
    acquire_s += s;
    auto st = c->Status(kModel);
    if (st.ok() && !st->gpus.empty()) {
      copy_s += static_cast<double>(st->gpus[0].copy_ms) / 1e3;
      h2d_s += static_cast<double>(st->gpus[0].h2d_us) / 1e6;
    }
  }
  const double n = static_cast<double>(state.iterations()), gb = static_cast<double>(g_env->model_bytes) / 1e9;
  ModelCounters(state);
  state.counters["copy_GBps"] = gb / (copy_s / n);      // the daemon's whole materialization
  state.counters["h2d_GBps"] = gb / (h2d_s / n);        // its host-to-device copies alone
  state.counters["acquire_GBps"] = gb / (acquire_s / n);  // what the client waited for
  state.counters["limit_GBps"] = g_env->pinned_h2d_gbps;
  if (g_env->pinned_h2d_gbps > 0) state.counters["copy_of_limit"] = gb / (copy_s / n) / g_env->pinned_h2d_gbps;
}

void BM_PeerCopy(benchmark::State& state) {
  if (SkipIfNoGpu(state)) return;
  auto devices = g_env->api->DeviceCount();
  if (!devices.ok() || *devices < 2) return state.SkipWithError("needs two GPUs");
  auto c = Client::Connect(Options(g_env->daemon->endpoint()));
  if (!c.ok()) return state.SkipWithError(c.status().ToString().c_str());
  if (auto w = c->Acquire(kModel, AcquireOptions{"cuda:0", {}}); !w.ok()) return state.SkipWithError(w.status().ToString().c_str());
  auto peer_copies = [&] {
    auto st = c->Stats();
    return st.ok() ? testing::MetricValue(st->metrics, "weightd_gpu_peer_copies_total") : -1.0;
  };
  const double before = peer_copies();
  double copy_s = 0, acquire_s = 0;
  for (auto _ : state) {
    if (Status s = c->Evict(kModel, "cuda:1"); !s.ok() && s.code() != Code::kNotFound)
      return state.SkipWithError(s.ToString().c_str());
    const auto t0 = Clock::now();
    auto lease = c->Acquire(kModel, AcquireOptions{"cuda:1", {}});
    const double s = Seconds(Clock::now() - t0);
    if (!lease.ok()) return state.SkipWithError(lease.status().ToString().c_str());
    state.SetIterationTime(s);
    acquire_s += s;
    auto st = c->Status(kModel);
    if (st.ok())
      for (const auto& g : st->gpus)
        if (g.device == "cuda:1") copy_s += static_cast<double>(g.h2d_us) / 1e6;
  }
  const double n = static_cast<double>(state.iterations()), gb = static_cast<double>(g_env->model_bytes) / 1e9;
  if (peer_copies() - before != n) return state.SkipWithError("the copies did not go GPU-to-GPU (no peer access?)");
  ModelCounters(state);
  state.counters["peer_GBps"] = gb / (copy_s / n);        // the daemon's device-to-device copies
  state.counters["acquire_GBps"] = gb / (acquire_s / n);  // what the client waited for
  state.counters["h2d_limit_GBps"] = g_env->pinned_h2d_gbps;
}

void BM_GpuAttach(benchmark::State& state) {
  if (SkipIfNoGpu(state)) return;
  const ClientOptions options = Options(g_env->daemon->endpoint());
  {
    auto c = Client::Connect(options);  // make sure the copy is resident
    if (!c.ok() || !c->Acquire(kModel, AcquireOptions{"cuda:0", {}}).ok())
      return state.SkipWithError("cannot make the model GPU resident");
  }
  double connect_us = 0, acquire_us = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    auto c = Client::Connect(options);
    const auto t1 = Clock::now();
    auto lease = c.ok() ? c->Acquire(kModel, AcquireOptions{"cuda:0", {}}) : Result<Lease>(c.status());
    const auto t2 = Clock::now();
    if (!lease.ok()) return state.SkipWithError(lease.status().ToString().c_str());
    if (lease->tensors().size() != g_env->tensors) return state.SkipWithError("wrong tensor count");
    state.SetIterationTime(Seconds(t2 - t0));
    connect_us += std::chrono::duration<double, std::micro>(t1 - t0).count();
    acquire_us += std::chrono::duration<double, std::micro>(t2 - t1).count();
  }
  const double n = static_cast<double>(state.iterations());
  ModelCounters(state);
  state.counters["connect_us"] = connect_us / n;
  state.counters["acquire_import_us"] = acquire_us / n;
}

void BM_GpuMemory(benchmark::State& state) {
  if (SkipIfNoGpu(state)) return;
  const int n = static_cast<int>(state.range(0));
  const bool shared = state.range(1) == 0;
  auto used = [] {
    auto m = g_env->api->GetMemInfo(0);
    return m.ok() ? m->total_bytes - m->free_bytes : 0;
  };
  for (auto _ : state) {
    const std::uint64_t before = used();  // the daemon's copy and this process's context
    std::vector<std::unique_ptr<testing::ChildProcess>> kids;
    for (int i = 0; i < n; ++i)
      kids.push_back(std::make_unique<testing::ChildProcess>(
          std::vector<std::string>{std::string("--child=") + (shared ? "shared" : "private"), g_env->daemon->endpoint()}));
    for (auto& k : kids) {
      std::string r = k->ReadLine(std::chrono::seconds(120));
      if (r != "ready") return state.SkipWithError(("client: " + r).c_str());
    }
    const std::uint64_t during = used();
    kids.clear();
    state.counters["added_GiB"] = static_cast<double>(during - before) / (1ull << 30);
    state.counters["per_process_GiB"] = static_cast<double>(during - before) / (1ull << 30) / n;
    state.counters["model_GiB"] = static_cast<double>(g_env->model_bytes) / (1ull << 30);
    std::this_thread::sleep_for(std::chrono::milliseconds(500));  // let the driver reclaim
  }
}

void BM_FreshProcessReady(benchmark::State& state) {
  if (SkipIfNoGpu(state)) return;
  {
    auto c = Client::Connect(Options(g_env->daemon->endpoint()));  // make sure the copy is resident
    if (!c.ok() || !c->Acquire(kModel, AcquireOptions{"cuda:0", {}}).ok())
      return state.SkipWithError("cannot make the model GPU resident");
  }
  auto run = [](const char* mode) -> double {
    testing::ChildProcess p({std::string("--child=") + mode, g_env->daemon->endpoint()});
    std::string line = p.ReadLine(std::chrono::seconds(60));
    return line.empty() || line[0] == 'b' ? -1 : std::stod(line);
  };
  std::vector<double> ready, context;
  for (auto _ : state) {
    const double r = run("startup"), c = run("context");
    if (r < 0 || c < 0) return state.SkipWithError("a child process failed");
    state.SetIterationTime(r / 1e3);
    ready.push_back(r);
    context.push_back(c);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  ModelCounters(state);
  state.counters["ready_ms"] = median(ready);
  state.counters["context_only_ms"] = median(context);
  state.counters["attach_beyond_context_ms"] = median(ready) - median(context);
}

BENCHMARK(BM_PinnedH2D)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_HostToGpuResidency)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PeerCopy)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_GpuAttach)->UseManualTime()->Iterations(50)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FreshProcessReady)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_GpuMemory)
    ->ArgsProduct({{1, 2, 4, 8}, {0, 1}})
    ->ArgNames({"N", "private"})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace weightd::bench

int main(int argc, char** argv) {
  const auto start = weightd::bench::Clock::now();
  if (argc >= 3 && std::strncmp(argv[1], "--child=", 8) == 0)
    return weightd::bench::ChildMain(argv[1] + 8, argv[2], start);
  weightd::bench::Env env;
  weightd::bench::g_env = &env;
  benchmark::Initialize(&argc, argv);
  if (!weightd::bench::Setup()) std::fprintf(stderr, "weightd_bench_gpu: %s\n", env.skip.c_str());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
