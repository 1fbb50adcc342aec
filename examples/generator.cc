#include "generator.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "classifier_spec.h"
#include "posix.h"
#include "synthetic.h"

namespace weightd::example {
namespace {

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

// Runs fn(0..n-1) on a fixed set of threads (the caller is one of them) and returns when all
// calls are done. Run() is called from one thread at a time.
class ForkJoin {
 public:
  explicit ForkJoin(unsigned threads) {
    for (unsigned i = 1; i < threads; ++i) workers_.emplace_back([this] { Loop(); });
  }
  ~ForkJoin() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
  }
  ForkJoin(const ForkJoin&) = delete;
  ForkJoin& operator=(const ForkJoin&) = delete;

  unsigned size() const { return static_cast<unsigned>(workers_.size()) + 1; }

  void Run(std::size_t n, const std::function<void(std::size_t)>& fn) {
    if (workers_.empty() || n <= 1) {
      for (std::size_t i = 0; i < n; ++i) fn(i);
      return;
    }
    {
      std::lock_guard lk(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      done_ = 0;
      ++generation_;
    }
    cv_.notify_all();
    Work(&fn, n);
    std::unique_lock lk(mu_);
    // Waiting for in_work_ too keeps a straggler from taking an index of the next job with
    // this job's (then dangling) function.
    done_cv_.wait(lk, [&] { return done_ == n && in_work_ == 0; });
    fn_ = nullptr;
    n_ = 0;
  }

 private:
  void Loop() {
    std::uint64_t seen = 0;
    std::unique_lock lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (fn_ == nullptr) continue;
      const auto* fn = fn_;
      const std::size_t n = n_;
      ++in_work_;
      lk.unlock();
      Work(fn, n);
      lk.lock();
      --in_work_;
      done_cv_.notify_all();
    }
  }

  void Work(const std::function<void(std::size_t)>* fn, std::size_t n) {
    std::size_t finished = 0;
    for (std::size_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) {
      (*fn)(i);
      ++finished;
    }
    if (finished > 0) {
      std::lock_guard lk(mu_);
      done_ += finished;
      done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  const std::function<void(std::size_t)>* fn_ = nullptr;  // guarded by mu_
  std::size_t n_ = 0;                                     // guarded by mu_
  std::size_t done_ = 0;                                  // guarded by mu_
  unsigned in_work_ = 0;                                  // guarded by mu_
  std::uint64_t generation_ = 0;                          // guarded by mu_
  bool stop_ = false;                                     // guarded by mu_
  std::atomic<std::size_t> next_{0};
  std::vector<std::thread> workers_;  // last: started after the fields above exist
};

// One element of `t` holding `v`, little-endian; false if `t` cannot hold it exactly.
bool EncodeConstant(DType t, double v, std::byte* out) {
  std::uint64_t bits = 0;
  const bool integral = v == static_cast<double>(static_cast<std::int64_t>(v));
  switch (t) {
    case DType::kF64: bits = std::bit_cast<std::uint64_t>(v); break;
    case DType::kF32: bits = std::bit_cast<std::uint32_t>(static_cast<float>(v)); break;
    case DType::kBF16: bits = FloatBitsToBf16(std::bit_cast<std::uint32_t>(static_cast<float>(v))); break;
    case DType::kF16:
      if (v == 0) bits = 0;
      else if (v == 1) bits = 0x3c00;
      else return false;
      break;
    case DType::kF8E4M3: case DType::kF8E5M2:
      if (v == 0) bits = 0;
      else if (v == 1) bits = t == DType::kF8E4M3 ? 0x38 : 0x3c;
      else return false;
      break;
    case DType::kBool:
      if (v != 0 && v != 1) return false;
      bits = static_cast<std::uint64_t>(v);
      break;
    case DType::kI64: case DType::kI32: case DType::kI16: case DType::kI8:
    case DType::kU64: case DType::kU32: case DType::kU16: case DType::kU8:
      if (!integral) return false;
      bits = static_cast<std::uint64_t>(static_cast<std::int64_t>(v));
      break;
    default:  // no preset uses the other types (some narrower than a byte)
      return false;
  }
  std::memcpy(out, &bits, DTypeBits(t) / 8);
  return true;
}

struct TensorPlan {
  DType dtype;
  InitRule rule;
  std::uint64_t key = 0;
  std::byte constant[8] = {};  // one element, for kConstant
};

// Fills bytes [offset, offset + out.size()) of a tensor. A pure function of its arguments,
// for any offset (chunk boundaries need not fall on elements).
void FillBytes(const TensorPlan& p, std::uint64_t offset, std::span<std::byte> out) {
  const std::size_t es = DTypeBits(p.dtype) / 8;  // whole-byte types only: see Generate
  switch (p.rule.kind) {
    case InitRule::Kind::kConstant:
      if (p.rule.value == 0) {
        std::memset(out.data(), 0, out.size());
      } else {
        for (std::size_t i = 0; i < out.size(); ++i) out[i] = p.constant[(offset + i) % es];
      }
      return;
    case InitRule::Kind::kNormal:
      break;
  }
  constexpr std::size_t kBlock = 2048;
  float vals[kBlock];
  alignas(8) std::byte bytes[kBlock * 8];
  const std::uint64_t end = offset + out.size();
  const std::uint64_t first = offset / es, last = (end + es - 1) / es;
  for (std::uint64_t e = first; e < last; e += kBlock) {
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(kBlock, last - e));
    NormalValues(p.key, e, p.rule.stddev, {vals, n});
    switch (p.dtype) {
      case DType::kF32:
        std::memcpy(bytes, vals, n * 4);
        break;
      case DType::kF64:
        for (std::size_t i = 0; i < n; ++i) {
          const double d = vals[i];
          std::memcpy(bytes + 8 * i, &d, 8);
        }
        break;
      default: {  // kBF16, checked by the planner
        std::uint16_t h[kBlock];
        for (std::size_t i = 0; i < n; ++i) h[i] = FloatBitsToBf16(std::bit_cast<std::uint32_t>(vals[i]));
        std::memcpy(bytes, h, n * 2);
        break;
      }
    }
    const std::uint64_t lo = std::max(e * es, offset), hi = std::min((e + n) * es, end);
    std::memcpy(out.data() + (lo - offset), bytes + (lo - e * es), hi - lo);
  }
}

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool IsCheckpointFileName(const std::string& name) {
  if (name == kSingleFileName || name == kIndexFileName) return true;
  // model-NNNNN-of-NNNNN.safetensors
  if (name.size() != 32 || name.rfind("model-", 0) != 0 || !EndsWith(name, ".safetensors")) return false;
  for (std::size_t i : {6u, 7u, 8u, 9u, 10u, 15u, 16u, 17u, 18u, 19u})
    if (name[i] < '0' || name[i] > '9') return false;
  return name.compare(11, 4, "-of-") == 0;
}

Status WriteTextFile(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  ::unlink(tmp.c_str());
  {
    ASSIGN_OR_RETURN(posix::Fd fd, posix::Open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    Status s = posix::WriteFull(fd.get(), std::as_bytes(std::span(text.data(), text.size())), tmp);
    if (s.ok() && ::fsync(fd.get()) != 0) s = posix::ErrnoStatus("fsync(" + tmp + ")");
    if (!s.ok()) {
      ::unlink(tmp.c_str());
      return s;
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    Status s = posix::ErrnoStatus("rename(" + tmp + ", " + path + ")");
    ::unlink(tmp.c_str());
    return s;
  }
  return Status::Ok();
}

}  // namespace

InitRule RuleFor(std::string_view preset, const st::TensorSpec& t) {
  using K = InitRule::Kind;
  if (!IsClassifierPreset(preset)) return {K::kNormal, 0, 0.02};
  const std::string_view n = t.name;
  if (EndsWith(n, ".num_batches_tracked") || EndsWith(n, ".running_mean")) return {K::kConstant, 0, 0};
  if (EndsWith(n, ".running_var")) return {K::kConstant, 1, 0};
  if (t.shape.size() >= 2) {  // conv [out, in, kh, kw] or linear [out, in]
    std::int64_t fan_in = 1;
    for (std::size_t i = 1; i < t.shape.size(); ++i) fan_in *= t.shape[i];
    return {K::kNormal, 0, std::sqrt(2.0 / static_cast<double>(std::max<std::int64_t>(fan_in, 1)))};
  }
  if (EndsWith(n, ".bias")) return {K::kConstant, 0, 0};  // BatchNorm biases and fc.bias
  // A BatchNorm weight. The last one of each residual branch is scaled down (see header).
  auto config = ClassifierPreset(preset);
  if (config.ok() && n.starts_with("layer") &&
      EndsWith(n, config->block == BlockKind::kBasic ? ".bn2.weight" : ".bn3.weight")) {
    int blocks = 0;
    for (int b : config->blocks_per_stage) blocks += b;
    return {K::kConstant, 1.0 / std::sqrt(static_cast<double>(blocks)), 0};
  }
  return {K::kConstant, 1, 0};
}

std::vector<std::vector<std::size_t>> PlanShards(const std::vector<st::TensorSpec>& tensors, std::uint64_t shard_size) {
  std::vector<std::vector<std::size_t>> shards;
  std::uint64_t current = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const std::uint64_t b = tensors[i].nbytes();
    if (shards.empty() || (shard_size > 0 && !shards.back().empty() && current + b > shard_size)) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(i);
    current += b;
  }
  if (shards.empty()) shards.emplace_back();
  return shards;
}

std::string ShardFileName(std::size_t index, std::size_t count) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return buf;
}

Result<GenerateReport> Generate(const GenerateOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(std::vector<st::TensorSpec> tensors, PresetTensors(options.preset));
  if (options.out_dir.empty()) return InvalidArgument("no output directory given", "example.bad_options");

  std::vector<TensorPlan> plans(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const st::TensorSpec& t = tensors[i];
    TensorPlan& p = plans[i];
    p.dtype = t.dtype;
    p.rule = RuleFor(options.preset, t);
    p.key = StreamKey(options.seed, t.name);
    if (p.rule.kind == InitRule::Kind::kConstant && !EncodeConstant(t.dtype, p.rule.value, p.constant))
      return Internal("constant " + std::to_string(p.rule.value) + " has no exact encoding in dtype " +
                      std::string(DTypeName(t.dtype)) + " (tensor '" + t.name + "')");
    if (p.rule.kind == InitRule::Kind::kNormal && t.dtype != DType::kF32 && t.dtype != DType::kBF16 &&
        t.dtype != DType::kF64)
      return Internal("random values are not implemented for dtype " + std::string(DTypeName(t.dtype)) +
                      " (tensor '" + t.name + "')");
  }

  RETURN_IF_ERROR(posix::MakeDirs(options.out_dir).WithContext("creating the output directory"));

  const auto shards = PlanShards(tensors, options.shard_size);
  const bool sharded = shards.size() > 1;
  std::vector<std::string> names;
  for (std::size_t s = 0; s < shards.size(); ++s) names.push_back(sharded ? ShardFileName(s, shards.size()) : kSingleFileName);

  // Files of another layout would survive this run and mislead loaders: refuse rather than
  // delete anything of the user's.
  std::set<std::string> ours(names.begin(), names.end());
  if (sharded) ours.insert(kIndexFileName);
  std::vector<std::string> stale;
  ASSIGN_OR_RETURN(std::vector<std::string> present, posix::ListDir(options.out_dir));
  for (const std::string& fn : present)
    if (IsCheckpointFileName(fn) && !ours.contains(fn)) stale.push_back(fn);
  std::sort(stale.begin(), stale.end());
  if (!stale.empty()) {
    std::string list;
    for (const auto& f : stale) list += (list.empty() ? "" : ", ") + f;
    return FailedPrecondition(options.out_dir + " holds checkpoint files of another layout (" + list +
                                  "); remove them or pick another directory",
                              "example.stale_checkpoint");
  }

  const unsigned threads = options.threads > 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  ForkJoin pool(threads);
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"generator", "weightd-gen"}, {"preset", options.preset},
      {"seed", std::to_string(options.seed)}};

  GenerateReport report;
  report.tensors = tensors.size();
  nlohmann::json weight_map = nlohmann::json::object();
  for (std::size_t s = 0; s < shards.size(); ++s) {
    std::vector<st::TensorSpec> subset;
    subset.reserve(shards[s].size());
    for (std::size_t i : shards[s]) subset.push_back(tensors[i]);
    const std::vector<std::size_t>& global = shards[s];
    auto fill = [&](std::size_t local, std::uint64_t offset, std::span<std::byte> out) {
      constexpr std::size_t kMinPiece = std::size_t{256} << 10;
      const TensorPlan& p = plans[global[local]];
      const std::size_t pieces = std::min<std::size_t>(pool.size(), (out.size() + kMinPiece - 1) / kMinPiece);
      pool.Run(pieces, [&](std::size_t k) {
        const std::size_t lo = out.size() * k / pieces, hi = out.size() * (k + 1) / pieces;
        FillBytes(p, offset + lo, out.subspan(lo, hi - lo));
      });
    };
    const std::string path = options.out_dir + "/" + names[s];
    ASSIGN_OR_RETURN(std::uint64_t bytes, st::WriteFile(path, subset, fill, metadata));
    report.files.push_back({path, subset.size(), bytes});
    report.file_bytes += bytes;
    for (const st::TensorSpec& t : subset) {
      weight_map[t.name] = names[s];
      report.tensor_bytes += t.nbytes();
    }
  }
  if (sharded) {
    // transformers writes json.dumps(index, indent=2, sort_keys=True) + "\n"; so do we.
    nlohmann::json index = {{"metadata", {{"total_size", report.tensor_bytes}}}, {"weight_map", std::move(weight_map)}};
    report.index_path = options.out_dir + "/" + kIndexFileName;
    RETURN_IF_ERROR(WriteTextFile(report.index_path, index.dump(2) + "\n"));
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace weightd::example
