// fill_bench.cc — host-tier fill throughput: the daemon's Loader reading a checkpoint into
// fresh shared-memory segments, against a plain `cat` of the same files to /dev/null and
// against the copy limit (the same segments filled by memcpy from memory), all in one run.
//
// The checkpoint is the reference DiT layout (270 BF16 tensors, 3 shards) scaled to
// WEIGHTD_BENCH_FILL_BYTES (default 256MiB; "1GiB" etc. are accepted). The files are written and
// read once before any measurement, so every figure is page-cache-warm: this benchmark cannot
// drop caches (that needs root), and it measures the copy into shared memory, not the disk.
//
//   WEIGHTD_BENCH_FILL_BYTES=1GiB weightd_bench_fill [--benchmark_filter=...]
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include "config.h"
#include "host_tier.h"
#include "loader.h"
#include "models.h"
#include "posix.h"
#include "support/daemon_process.h"

extern char** environ;

namespace weightd::bench {
namespace {

constexpr std::uint64_t kDefaultFillBytes = 256ull << 20;
constexpr int kTensors = 270;
constexpr int kShards = 3;
constexpr std::uint64_t kChunk = 16ull << 20;  // the daemon's default chunk_size

struct Env {
  testing::TempDir dir;
  ModelConfig model;
  std::vector<std::string> files;  // shard paths
  std::uint64_t file_bytes = 0;    // what cat reads
  std::uint64_t data_bytes = 0;    // what the loader reads (the files less their headers)
  std::string shm_prefix;
};
Env* g_env = nullptr;

// Runs `cat FILES... > /dev/null` and waits for it.
Status CatToDevNull(const std::vector<std::string>& files) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  std::vector<std::string> args = {"cat"};
  args.insert(args.end(), files.begin(), files.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  int err = ::posix_spawnp(&pid, "cat", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (err != 0) return posix::ErrnoStatus("posix_spawnp(cat)", err);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return posix::ErrnoStatus("waitpid(cat)");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return Internal("cat exited with status " + std::to_string(status));
  return Status::Ok();
}

// The baseline: one process reading the files sequentially (GNU cat, 128 KiB reads).
void BM_CatFiles(benchmark::State& state) {
  for (auto _ : state) {
    if (Status s = CatToDevNull(g_env->files); !s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      break;
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * g_env->file_bytes));
}
BENCHMARK(BM_CatFiles)->UseRealTime()->Unit(benchmark::kMillisecond);

// The copy limit: what filling the same segments costs without any file: HostSegment::Create
// (which reserves the pages) and a memcpy of every byte from a private buffer of the same size,
// in 16 MiB chunks spread over `threads` threads, as the Loader spreads its preads.
void BM_CopyToFreshShm(benchmark::State& state) {
  const auto threads = static_cast<unsigned>(state.range(0));
  const std::uint64_t bytes = g_env->data_bytes;
  const std::vector<std::byte> source(bytes);  // zero-filled, so its pages are committed
  std::uint64_t generation = 0;
  for (auto _ : state) {
    const std::string name = g_env->shm_prefix + ".copy." + std::to_string(generation++);
    auto created = HostSegment::Create(name, bytes, 0600);
    if (!created.ok()) {
      state.SkipWithError(created.status().ToString().c_str());
      break;
    }
    auto seg = std::make_unique<HostSegment>(std::move(created).value());
    std::atomic<std::uint64_t> next{0};
    auto work = [&] {
      for (std::uint64_t off; (off = next.fetch_add(kChunk)) < bytes;)
        std::memcpy(seg->data() + off, source.data() + off, std::min(kChunk, bytes - off));
    };
    std::vector<std::thread> pool;
    for (unsigned t = 1; t < threads; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    benchmark::ClobberMemory();
    state.PauseTiming();
    (void)HostSegment::Remove(name);
    seg.reset();  // unmaps the last view: the pages are freed here, outside the timed region
    state.ResumeTiming();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
}
BENCHMARK(BM_CopyToFreshShm)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);

// The host tier's fill, as the daemon does it on a load: Loader::LoadHost with `threads`
// readers (the daemon's default is 4) and 16 MiB chunks, into fresh segments. Freeing the
// segments of one iteration is left out of the timing.
void BM_HostTierFill(benchmark::State& state) {
  Loader loader(LoaderOptions{.shm_prefix = g_env->shm_prefix,
                              .shm_mode = 0600,
                              .threads = static_cast<std::uint32_t>(state.range(0)),
                              .chunk_size = kChunk});
  const std::atomic<bool> cancel{false};
  std::uint64_t generation = 0;
  for (auto _ : state) {
    auto loaded = loader.LoadHost(g_env->model, generation++, cancel);
    if (!loaded.ok()) {
      state.SkipWithError(loaded.status().ToString().c_str());
      break;
    }
    std::shared_ptr<ResidentModel> model = std::move(loaded).value();
    state.PauseTiming();
    model->RemoveSegments();
    model.reset();  // unmaps the last view: the pages are freed here, outside the timed region
    state.ResumeTiming();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * g_env->data_bytes));
}
BENCHMARK(BM_HostTierFill)->ArgName("threads")->Arg(1)->Arg(2)->Arg(4)->UseRealTime()->Unit(benchmark::kMillisecond);

// Adds, to the console table, each fill's throughput as a fraction of the cat baseline and of
// the best copy limit measured earlier in the same run.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  using ConsoleReporter::ConsoleReporter;

  void ReportRuns(const std::vector<Run>& runs) override {
    std::vector<Run> out = runs;
    for (Run& r : out) {
      auto it = r.counters.find("bytes_per_second");
      if (r.error_occurred || it == r.counters.end()) continue;
      const double bps = it->second.value;
      const std::string name = r.benchmark_name();
      // The cv of a ratio to a fixed baseline is the cv of the throughput; a stddev scales.
      const bool cv = r.aggregate_name == "cv", spread = cv || r.aggregate_name == "stddev";
      if (name.rfind("BM_CatFiles", 0) == 0) {
        if (!spread) cat_bps_ = std::max(cat_bps_, bps);
      } else if (name.rfind("BM_CopyToFreshShm", 0) == 0) {
        if (!spread) limit_bps_ = std::max(limit_bps_, bps);
      } else if (name.rfind("BM_HostTierFill", 0) == 0) {
        if (cat_bps_ > 0) r.counters["vs_cat"] = cv ? bps : bps / cat_bps_;
        if (limit_bps_ > 0) r.counters["of_limit"] = cv ? bps : bps / limit_bps_;
      }
    }
    ConsoleReporter::ReportRuns(out);
  }

 private:
  double cat_bps_ = 0;
  double limit_bps_ = 0;
};

std::uint64_t FillBytes() {
  const char* env = std::getenv("WEIGHTD_BENCH_FILL_BYTES");
  if (env == nullptr || *env == '\0') return kDefaultFillBytes;
  auto v = ParseSize(env);
  if (!v.ok() || *v < (1u << 20)) {
    std::fprintf(stderr, "WEIGHTD_BENCH_FILL_BYTES='%s' is not a size of at least 1MiB\n", env);
    std::exit(2);
  }
  return *v;
}

// Writes the checkpoint and reads it once, so that every measurement finds it in the page cache.
Status SetUp(Env& env, std::uint64_t target_bytes) {
  const auto tensors = DitLikeTensors(kTensors, target_bytes);
  env.model = ModelConfig{"fill", env.dir.file("fill")};
  RETURN_IF_ERROR(testing::WriteShardedModel(env.model.dir, tensors, kShards, 1));
  for (const auto& e : std::filesystem::directory_iterator(env.model.dir)) {
    if (e.path().extension() != ".safetensors") continue;
    env.files.push_back(e.path().string());
    env.file_bytes += e.file_size();
  }
  std::sort(env.files.begin(), env.files.end());
  for (const auto& t : tensors) env.data_bytes += t.nbytes();
  env.shm_prefix = "wdbench-" + std::to_string(::getpid());
  return CatToDevNull(env.files);
}

}  // namespace
}  // namespace weightd::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  weightd::bench::Env env;
  if (weightd::Status s = weightd::bench::SetUp(env, weightd::bench::FillBytes()); !s.ok()) {
    std::fprintf(stderr, "weightd_bench_fill: setup failed: %s\n", s.ToString().c_str());
    return 1;
  }
  weightd::bench::g_env = &env;
  benchmark::AddCustomContext("checkpoint", std::to_string(env.files.size()) + " shards, " +
                                                std::to_string(env.data_bytes) + " tensor bytes, " +
                                                std::to_string(env.file_bytes) + " file bytes");
  benchmark::AddCustomContext("page_cache", "warm for every benchmark (no root to drop caches)");
  weightd::bench::RatioReporter reporter(::isatty(STDOUT_FILENO) ? benchmark::ConsoleReporter::OO_ColorTabular
                                                                 : benchmark::ConsoleReporter::OO_Tabular);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  for (const auto& name : weightd::ListSegments(env.shm_prefix)) (void)weightd::HostSegment::Remove(name);
  return 0;
}
