// attach_bench.cc — how long a process takes to attach to a model the daemon already holds:
// the handshake (Client::Connect), the manifest (Acquire), the read-only mappings of the
// segments, and the release of the lease. The real weightd binary serves three resident models
// of 10, 270 and 2,000 tensors (the DiT layout of the reference workload, about 4 MiB each, in
// 3 shards), so that the cost per tensor shows. Issue 2's target: under 1 ms for 270 tensors.
//
//   weightd_bench_attach [--benchmark_filter=...] [--benchmark_repetitions=N]
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include <benchmark/benchmark.h>

#include "models.h"
#include "support/daemon_process.h"
#include "weightd/client.h"

namespace weightd::bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kTensorCounts[] = {10, 270, 2000};
constexpr std::uint64_t kModelBytes = 4ull << 20;
constexpr int kShards = 3;

struct ModelFacts {
  std::string name;
  std::size_t tensors = 0;
  std::size_t shards = 0;
  std::size_t bytes = 0;
};

struct Env {
  testing::TempDir dir;
  std::unique_ptr<testing::DaemonProcess> daemon;
  std::map<int, ModelFacts> models;  // by tensor count
};
Env* g_env = nullptr;

ClientOptions Options() {
  ClientOptions o;
  o.endpoint = g_env->daemon->endpoint();
  o.client_name = "weightd_bench_attach";
  return o;
}

const ModelFacts& ModelFor(const benchmark::State& state) {
  return g_env->models.at(static_cast<int>(state.range(0)));
}

void SetModelCounters(benchmark::State& state, const ModelFacts& m) {
  state.counters["tensors"] = static_cast<double>(m.tensors);
  state.counters["shards"] = static_cast<double>(m.shards);
  state.counters["bytes"] = benchmark::Counter(static_cast<double>(m.bytes), benchmark::Counter::kDefaults,
                                               benchmark::Counter::kIs1024);
}

// A fresh process's attach: handshake, manifest, mappings, release. The timed loop also
// destroys the Client (its ZeroMQ context and threads), which an attaching process does only
// at exit; attach_us leaves that out. The other counters split attach_us into its steps.
void BM_AttachNewClient(benchmark::State& state) {
  const ModelFacts& m = ModelFor(state);
  const ClientOptions options = Options();
  double connect_us = 0, acquire_us = 0, release_us = 0, teardown_us = 0;
  auto us_since = [](Clock::time_point& t) {
    const auto now = Clock::now();
    return std::chrono::duration<double, std::micro>(now - std::exchange(t, now)).count();
  };
  for (auto _ : state) {
    auto t = Clock::now();
    {
      auto client = Client::Connect(options);
      if (!client.ok()) {
        state.SkipWithError(client.status().ToString().c_str());
        break;
      }
      connect_us += us_since(t);
      auto lease = client->Acquire(m.name);
      if (!lease.ok()) {
        state.SkipWithError(lease.status().ToString().c_str());
        break;
      }
      benchmark::DoNotOptimize(lease->tensors().data());
      acquire_us += us_since(t);
      lease->release();  // the last copy: unmaps and waits for the daemon's answer to Release
      release_us += us_since(t);
    }
    teardown_us += us_since(t);
  }
  SetModelCounters(state, m);
  const auto avg = benchmark::Counter::kAvgIterations;
  state.counters["attach_us"] = benchmark::Counter(connect_us + acquire_us + release_us, avg);
  state.counters["connect_us"] = benchmark::Counter(connect_us, avg);
  state.counters["acquire_us"] = benchmark::Counter(acquire_us, avg);
  state.counters["release_us"] = benchmark::Counter(release_us, avg);
  state.counters["teardown_us"] = benchmark::Counter(teardown_us, avg);
}
BENCHMARK(BM_AttachNewClient)->ArgName("tensors")->Arg(10)->Arg(270)->Arg(2000)->UseRealTime()->Unit(benchmark::kMicrosecond);

// An attach by a process that is already connected: Acquire (manifest + mappings) and release.
void BM_AttachConnected(benchmark::State& state) {
  const ModelFacts& m = ModelFor(state);
  auto client = Client::Connect(Options());
  if (!client.ok()) {
    state.SkipWithError(client.status().ToString().c_str());
    return;
  }
  for (auto _ : state) {
    auto lease = client->Acquire(m.name);
    if (!lease.ok()) {
      state.SkipWithError(lease.status().ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(lease->tensors().data());
    lease->release();
  }
  SetModelCounters(state, m);
}
BENCHMARK(BM_AttachConnected)->ArgName("tensors")->Arg(10)->Arg(270)->Arg(2000)->UseRealTime()->Unit(benchmark::kMicrosecond);

// The handshake alone (Connect and the Client's destruction), to split BM_AttachNewClient.
void BM_Connect(benchmark::State& state) {
  const ClientOptions options = Options();
  for (auto _ : state) {
    auto client = Client::Connect(options);
    if (!client.ok()) {
      state.SkipWithError(client.status().ToString().c_str());
      break;
    }
  }
}
BENCHMARK(BM_Connect)->UseRealTime()->Unit(benchmark::kMicrosecond);

// Writes the models, starts weightd with them, loads them and checks that a lease maps the
// bytes that were written.
Status SetUp(Env& env) {
  testing::DaemonOptions options;
  std::map<int, std::vector<st::TensorSpec>> specs;
  for (int count : kTensorCounts) {
    specs[count] = DitLikeTensors(count, kModelBytes);
    const std::string name = "dit" + std::to_string(count);
    const std::string dir = env.dir.file(name);
    RETURN_IF_ERROR(testing::WriteShardedModel(dir, specs[count], kShards, static_cast<std::uint64_t>(count)));
    options.models[name] = dir;
    env.models[count].name = name;
  }
  // Each BM_AttachNewClient iteration opens a session, and a session whose process lives on ends
  // only at the heartbeat timeout (10 s by default). A short timeout keeps the thousands of
  // sessions that one benchmark process opens from reaching max_sessions or the fd limit.
  options.config_toml =
      "[daemon]\n"
      "heartbeat_interval = \"250ms\"\n"
      "heartbeat_timeout = \"1s\"\n"
      "max_sessions = 16384\n";
  ASSIGN_OR_RETURN(env.daemon, testing::DaemonProcess::Start(options));

  ClientOptions co;
  co.endpoint = env.daemon->endpoint();
  co.client_name = "weightd_bench_attach";
  ASSIGN_OR_RETURN(Client client, Client::Connect(co));
  for (auto& [count, facts] : env.models) {
    ASSIGN_OR_RETURN(ModelInfo info, client.Load(facts.name));
    if (info.state != "resident") return Internal("model " + facts.name + " is " + info.state + " after Load");
    ASSIGN_OR_RETURN(Lease lease, client.Acquire(facts.name));
    const auto& want = specs[count];
    if (lease.tensors().size() != want.size())
      return DataLoss(facts.name + ": lease has " + std::to_string(lease.tensors().size()) + " tensors, wrote " +
                      std::to_string(want.size()));
    for (std::size_t i = 0; i < want.size(); ++i) {
      const Tensor* t = lease.find(want[i].name);
      if (t == nullptr || t->nbytes != want[i].nbytes()) return DataLoss(facts.name + ": tensor " + want[i].name);
      const auto seed = static_cast<std::uint64_t>(count);
      if (t->data[0] != testing::PatternByte(seed, i, 0) ||
          t->data[t->nbytes - 1] != testing::PatternByte(seed, i, t->nbytes - 1))
        return DataLoss(facts.name + ": tensor " + want[i].name + " does not hold the bytes written");
    }
    facts.tensors = lease.tensors().size();
    facts.shards = lease.shards().size();
    facts.bytes = lease.total_bytes();
  }
  return Status::Ok();
}

}  // namespace
}  // namespace weightd::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  weightd::bench::Env env;
  if (weightd::Status s = weightd::bench::SetUp(env); !s.ok()) {
    std::fprintf(stderr, "weightd_bench_attach: setup failed: %s\n", s.ToString().c_str());
    if (env.daemon) std::fprintf(stderr, "daemon log:\n%s\n", env.daemon->Log().c_str());
    return 1;
  }
  weightd::bench::g_env = &env;
  benchmark::AddCustomContext("weightd", "real daemon, host tier, models resident (3 shards, ~4 MiB each)");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (!env.daemon->running()) {
    std::fprintf(stderr, "weightd_bench_attach: the daemon died during the run:\n%s\n", env.daemon->Log().c_str());
    return 1;
  }
  return 0;
}
