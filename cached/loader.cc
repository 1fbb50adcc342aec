#include "loader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <latch>
#include <map>
#include <thread>

#include "catalog.h"

namespace weightd {
namespace {

// O_DIRECT needs file offset, length and buffer address aligned to the logical block size.
// 4096 is a multiple of every common one (512, 4096) and the x86 page size.
constexpr std::uint64_t kDirectAlign = 4096;
// A manifest is a line per file; anything this large is not one.
constexpr std::uint64_t kMaxManifestBytes = 16ull << 20;

std::uint64_t AlignDown(std::uint64_t v, std::uint64_t a) { return v / a * a; }

struct AlignedFree {
  void operator()(std::byte* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<std::byte[], AlignedFree>;

struct XxhStateFree {
  void operator()(XXH3_state_t* s) const { XXH3_freeState(s); }
};

Status Cancelled(const std::string& model) {
  return Unavailable("load of model '" + model + "' cancelled", "loader.cancelled");
}

// True if at least half of the file's pages are in the page cache (mincore of a read-only
// mapping). Reading such a file with O_DIRECT would go to the disk for data that is in memory.
bool MostlyCached(int fd, std::uint64_t size) {
  if (size == 0) return true;
  auto map = posix::Map(fd, size, PROT_READ, MAP_SHARED, "a shard");
  if (!map.ok()) return false;
  const std::size_t page = posix::PageSize();
  std::vector<unsigned char> vec((size + page - 1) / page);
  if (::mincore(map->data(), size, vec.data()) != 0) return false;
  std::size_t resident = 0;
  for (unsigned char v : vec) resident += v & 1;
  return resident * 2 >= vec.size();
}

// Opens a file of a model directory without following a symbolic link: a link could make the
// daemon (which may read more than the model's tenants) serve a file it was never meant to.
Result<posix::Fd> OpenNoFollow(FileIo& io, const std::string& path, int flags) {
  auto fd = io.Open(path, flags | O_NOFOLLOW);
  if (!fd.ok() && fd.status().reason() == "errno.ELOOP")
    return FailedPrecondition(path + " is a symbolic link; weightd does not follow links inside model directories "
                                     "(copy the files, or point the model's path at the directory that holds them)",
                              "loader.symlink");
  return fd;
}

}  // namespace

Result<std::optional<std::map<std::string, XXH128_hash_t>>> ReadManifest(const std::string& dir) {
  const std::string path = dir + "/" + std::string(kChecksumManifest);
  FileIo plain;
  auto opened = OpenNoFollow(plain, path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (!opened.ok()) {
    if (opened.status().code() == Code::kNotFound) return std::optional<std::map<std::string, XXH128_hash_t>>();
    return opened.status();
  }
  posix::Fd fd = std::move(opened).value();
  ASSIGN_OR_RETURN(posix::FileInfo fi, posix::Stat(fd.get(), path));
  if (!S_ISREG(fi.mode)) return InvalidArgument(path + " is not a regular file", "loader.bad_manifest");
  if (fi.size > kMaxManifestBytes)
    return InvalidArgument(path + " is " + std::to_string(fi.size) + " bytes, more than a manifest can be",
                           "loader.bad_manifest");
  std::string text(fi.size, '\0');
  RETURN_IF_ERROR(posix::PreadFull(fd.get(), std::as_writable_bytes(std::span(text)), 0, path));

  std::map<std::string, XXH128_hash_t> out;
  std::size_t line_no = 0;
  for (std::size_t pos = 0; pos < text.size();) {
    std::size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string_view line(text.data() + pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find_first_not_of(" \t") == std::string_view::npos) continue;
    auto bad = [&](const std::string& why) {
      return InvalidArgument(path + ":" + std::to_string(line_no) + ": " + why +
                                 " (expected '<32 hex digits>  <file name>', as xxh128sum prints)",
                             "loader.bad_manifest");
    };
    // xxh128sum starts a line with '\' when it escaped the name; shard names never need it.
    if (line.front() == '\\') return bad("escaped file names are not supported");
    if (line.size() < 35) return bad("line too short");
    auto hash = ParseChecksumHex(line.substr(0, 32));
    if (!hash) return bad("'" + std::string(line.substr(0, 32)) + "' is not 32 hex digits");
    if (line[32] != ' ' || (line[33] != ' ' && line[33] != '*')) return bad("no '  ' or ' *' after the checksum");
    std::string_view name = line.substr(34);
    if (name.starts_with("./")) name.remove_prefix(2);
    if (name.empty()) return bad("no file name");
    if (!out.emplace(std::string(name), *hash).second) return bad("'" + std::string(name) + "' is listed twice");
  }
  return std::optional(std::move(out));
}

namespace {

// One shard while it is read.
struct ShardFill {
  std::string path;
  int fd = -1;                 // the plan's buffered fd
  posix::Fd direct_fd;         // O_DIRECT, when used
  std::atomic<bool> direct{false};
  std::uint64_t data_offset = 0;
  std::uint64_t data_size = 0;
  std::byte* dst = nullptr;
  std::vector<int> part_fds;   // the segment's files, for FillMethod::kWrite
  std::uint64_t part_size = 0; // bytes per file (0: one file)
  std::string segment;         // its name, for messages
  std::size_t chunks = 0;
  std::vector<std::uint64_t> chunk_end;  // where each chunk ends in the data section
  std::unique_ptr<XXH3_state_t, XxhStateFree> hash;  // whole-file hash, in file order
  // Block checksum instead (no manifest names the file): one digest per kChecksumBlock bytes,
  // each written by the one thread that hashed it, read after the readers are done.
  bool blocks = false;
  std::vector<XXH128_hash_t> block_digest;
  std::vector<char> block_known;

  Mutex mu;
  std::vector<bool> done GUARDED_BY(mu);      // chunk finished
  std::size_t next_gap GUARDED_BY(mu) = 0;    // first unfinished chunk
  std::uint64_t filled GUARDED_BY(mu) = 0;    // contiguous prefix in the segment
  std::uint64_t hashed GUARDED_BY(mu) = 0;    // prefix fed to `hash`
  bool hashing GUARDED_BY(mu) = false;        // a thread owns `hash`

  // FillTimes, in nanoseconds, summed over the readers that worked on this shard.
  std::atomic<std::uint64_t> read_ns{0}, write_ns{0}, populate_ns{0}, hash_ns{0};
};

// Adds the time since it was made to `sink` when it goes out of scope.
class ScopedTime {
 public:
  explicit ScopedTime(std::atomic<std::uint64_t>& sink) : sink_(sink), t0_(std::chrono::steady_clock::now()) {}
  ScopedTime(const ScopedTime&) = delete;
  ScopedTime& operator=(const ScopedTime&) = delete;
  ~ScopedTime() {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0_);
    sink_.fetch_add(static_cast<std::uint64_t>(ns.count()), std::memory_order_relaxed);
  }

 private:
  std::atomic<std::uint64_t>& sink_;
  const std::chrono::steady_clock::time_point t0_;
};

}  // namespace

void FillTimes::Add(const FillTimes& o) {
  read_ns += o.read_ns;
  write_ns += o.write_ns;
  populate_ns += o.populate_ns;
  hash_ns += o.hash_ns;
  wall_ns += o.wall_ns;
  readers = o.readers;
}

double FillTimes::Percent(std::uint64_t ns) const {
  const double total = static_cast<double>(readers) * static_cast<double>(wall_ns);
  return total > 0 ? 100.0 * static_cast<double>(ns) / total : 0;
}

std::string FillTimes::Summary() const {
  if (readers == 0 || wall_ns == 0) return std::to_string(readers) + " readers";
  auto pct = [&](std::uint64_t ns) { return static_cast<int>(std::lround(Percent(ns))); };
  const std::uint64_t busy = read_ns + write_ns + populate_ns + hash_ns;
  const std::uint64_t all = std::uint64_t{readers} * wall_ns;
  return std::to_string(readers) + " readers: read " + std::to_string(pct(read_ns)) + "%, write " +
         std::to_string(pct(write_ns)) + "%, populate " + std::to_string(pct(populate_ns)) + "%, hash " +
         std::to_string(pct(hash_ns)) + "%, other " + std::to_string(pct(all > busy ? all - busy : 0)) + "%";
}

std::string ChecksumHex(const XXH128_hash_t& h) {
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, h);
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s(32, '0');
  for (int i = 0; i < 16; ++i) {
    s[2 * i] = kDigits[c.digest[i] >> 4];
    s[2 * i + 1] = kDigits[c.digest[i] & 0xf];
  }
  return s;
}

std::optional<XXH128_hash_t> ParseChecksumHex(std::string_view hex) {
  if (hex.size() != 32) return std::nullopt;
  XXH128_canonical_t c;
  for (int i = 0; i < 32; ++i) {
    const char ch = hex[i];
    int v;
    if (ch >= '0' && ch <= '9') v = ch - '0';
    else if (ch >= 'a' && ch <= 'f') v = ch - 'a' + 10;
    else if (ch >= 'A' && ch <= 'F') v = ch - 'A' + 10;
    else return std::nullopt;
    if (i % 2 == 0) c.digest[i / 2] = static_cast<unsigned char>(v << 4);
    else c.digest[i / 2] |= static_cast<unsigned char>(v);
  }
  return XXH128_hashFromCanonical(&c);
}

void ResidentModel::RemoveSegments() const {
  // The record first: a crash in between leaves segments without one, which the next start
  // removes, never a record that describes missing segments.
  if (!record.empty()) (void)HostSegment::Remove(record);
  for (const auto& s : shards) s.segment.Unlink();
}

// ---- LoadProgress ----

Result<std::shared_ptr<const ResidentModel>> LoadProgress::WaitSegments() const {
  MutexLock lock(mu_);
  cv_.Wait([&] {
    mu_.AssertHeld();
    return model_ != nullptr || !error_.ok() || done_;
  });
  if (model_ != nullptr) return model_;
  if (!error_.ok()) return error_;
  return Internal("load finished without publishing its segments", "loader.no_segments");
}

Status LoadProgress::WaitFilled(std::size_t shard, std::uint64_t end) const {
  MutexLock lock(mu_);
  cv_.Wait([&] {
    mu_.AssertHeld();
    return model_ != nullptr || !error_.ok() || done_;
  });
  if (model_ == nullptr) return error_.ok() ? Internal("load finished without publishing its segments") : error_;
  if (shard >= filled_.size())
    return InvalidArgument("shard " + std::to_string(shard) + " of a model with " + std::to_string(filled_.size()) +
                           " shards", "loader.bad_shard");
  if (end > model_->shards[shard].segment.data_size())
    return InvalidArgument("bytes [0, " + std::to_string(end) + ") of shard " + std::to_string(shard) + ", which has " +
                           std::to_string(model_->shards[shard].segment.data_size()), "loader.bad_range");
  cv_.Wait([&] {
    mu_.AssertHeld();
    return filled_[shard] >= end || !error_.ok() || done_;
  });
  if (filled_[shard] >= end) return Status::Ok();
  if (!error_.ok()) return error_;
  return Internal("load finished with shard " + std::to_string(shard) + " unfilled");
}

Status LoadProgress::Wait() const {
  MutexLock lock(mu_);
  cv_.Wait([&] {
    mu_.AssertHeld();
    return done_;
  });
  return error_;
}

std::uint64_t LoadProgress::filled(std::size_t shard) const {
  MutexLock lock(mu_);
  return shard < filled_.size() ? filled_[shard] : 0;
}

bool LoadProgress::done() const {
  MutexLock lock(mu_);
  return done_;
}

void LoadProgress::PublishSegments(std::shared_ptr<const ResidentModel> model) {
  MutexLock lock(mu_);
  if (model_ != nullptr || done_) return;
  filled_.assign(model->shards.size(), 0);
  model_ = std::move(model);
  cv_.SignalAll();
}

void LoadProgress::SetFilled(std::size_t shard, std::uint64_t end) {
  MutexLock lock(mu_);
  if (shard >= filled_.size() || end <= filled_[shard]) return;
  filled_[shard] = end;
  cv_.SignalAll();
}

void LoadProgress::Finish() {
  MutexLock lock(mu_);
  if (done_) return;
  done_ = true;
  cv_.SignalAll();
}

void LoadProgress::Fail(Status error) {
  MutexLock lock(mu_);
  if (done_) return;
  error_ = error.ok() ? Internal("load failed without an error") : std::move(error);
  done_ = true;
  cv_.SignalAll();
}

// ---- FileIo ----

Result<posix::Fd> FileIo::Open(const std::string& path, int flags) { return posix::Open(path, flags); }

Result<std::size_t> FileIo::Pread(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what) {
  return posix::PreadUpTo(fd, out, offset, what);
}

Status FileIo::Pwrite(int fd, std::span<const std::byte> in, std::uint64_t offset, std::string_view what) {
  return posix::PwriteFull(fd, in, offset, what);
}

// ---- Loader ----

Loader::Loader(LoaderOptions options)
    : options_(std::move(options)),
      own_store_(options_.segments != nullptr ? nullptr
                                              : std::make_unique<SegmentStore>(SegmentStore::Options{
                                                    options_.shm_prefix, options_.shm_mode, options_.shm_group,
                                                    options_.segment_parts})),
      store_(options_.segments != nullptr ? options_.segments : own_store_.get()),
      io_(options_.io_layer != nullptr ? options_.io_layer : &posix_io_),
      hash_probe_(options_.hash_source == HashSource::kAuto ? std::optional(ProbeHashSource(*store_)) : std::nullopt),
      hash_source_(hash_probe_ ? hash_probe_->chosen : options_.hash_source),
      readers_(std::max(1u, options_.threads), "wd-read") {}

HashSourceProbe ProbeHashSource(const SegmentStore& store) {
  HashSourceProbe probe;
  constexpr std::uint64_t kBytes = 1ull << 20;
  static std::atomic<unsigned> serial{0};
  const std::string name = store.prefix() + ".probe-" + std::to_string(::getpid()) + "-" + std::to_string(serial++);
  std::vector<std::byte> buf(kBytes, std::byte{1});
  const double pages = static_cast<double>(kBytes / posix::PageSize());
  double touch = 1e300, read = 1e300;
  for (int rep = 0; rep < 3; ++rep) {
    // Allocated through the fd as a write fill does, then mapped fresh by Create: no page of the
    // mapping is in the page tables yet.
    auto seg = store.Create(name, kBytes, /*reserve=*/false);
    if (seg.ok()) {
      Status w = posix::PwriteFull(seg->part_fd(0), buf, 0, name);
      if (!w.ok()) {
        probe.error = w.ToString();
        break;
      }
      const auto t0 = std::chrono::steady_clock::now();
      unsigned sum = 0;
      for (std::uint64_t p = 0; p < kBytes; p += posix::PageSize())
        sum += static_cast<unsigned>(static_cast<volatile const std::byte*>(seg->data())[p]);
      const auto t1 = std::chrono::steady_clock::now();
      auto got = posix::PreadUpTo(seg->part_fd(0), buf, 0, name);
      const auto t2 = std::chrono::steady_clock::now();
      if (!got.ok() || sum != pages) {
        probe.error = got.ok() ? "the probe read back other bytes" : got.status().ToString();
        break;
      }
      touch = std::min(touch, std::chrono::duration<double, std::nano>(t1 - t0).count() / pages);
      read = std::min(read, std::chrono::duration<double, std::nano>(t2 - t1).count() / pages);
    } else {
      probe.error = seg.status().ToString();
    }
    (void)HostSegment::Remove(name);
    if (!probe.error.empty()) break;
  }
  if (probe.error.empty()) {
    probe.touch_ns_per_page = touch;
    probe.read_ns_per_page = read;
    probe.chosen = touch < read ? HashSource::kMapping : HashSource::kReadBack;
  }
  return probe;
}

Result<LoadPlan> Loader::Plan(const ModelConfig& mc) const {
  LoadPlan plan;
  plan.name = mc.name;
  plan.dir = mc.dir;
  ASSIGN_OR_RETURN(std::vector<std::string> files, DiscoverShards(mc.dir));
  std::vector<st::Header> headers;
  for (const std::string& file : files) {
    const std::string path = mc.dir + "/" + file;
    PlannedShard shard;
    shard.file = file;
    // O_NONBLOCK: a FIFO swapped in for a shard must not hang the loader on open.
    ASSIGN_OR_RETURN(shard.fd, OpenNoFollow(*io_, path, O_RDONLY | O_NONBLOCK));
    ASSIGN_OR_RETURN(shard.file_info, posix::Stat(shard.fd.get(), path));
    if (!S_ISREG(shard.file_info.mode))
      return InvalidArgument(path + " is not a regular file", "loader.not_a_regular_file");
    auto header = st::ReadHeader(shard.fd.get(), shard.file_info.size);
    if (!header.ok()) return header.status().WithContext(path);
    shard.header = std::move(header).value();
    // The checksum covers the whole file, so Fill() needs the header's bytes too; they are
    // few (KBs) and were just read, so read them again rather than re-parse our own copy.
    shard.header_bytes.resize(shard.header.data_offset);
    ASSIGN_OR_RETURN(std::size_t got, io_->Pread(shard.fd.get(), shard.header_bytes, 0, path));
    if (got != shard.header_bytes.size())
      return DataLoss(path + " shrank while its header was read", "loader.file_changed");
    headers.push_back(shard.header);
    plan.bytes += shard.header.data_size;
    plan.tensor_count += static_cast<std::uint32_t>(shard.header.tensors.size());
    plan.shards.push_back(std::move(shard));
  }
  RETURN_IF_ERROR(CheckShardSet(mc.dir, files, headers));

  if (options_.verify_manifest) {
    ASSIGN_OR_RETURN(auto manifest, ReadManifest(mc.dir));
    if (manifest) {
      plan.has_manifest = true;
      for (PlannedShard& s : plan.shards) {
        auto it = manifest->find(s.file);
        // A manifest that does not cover a shard cannot vouch for it; loading it unverified
        // would defeat the manifest.
        if (it == manifest->end())
          return InvalidArgument(mc.dir + "/" + std::string(kChecksumManifest) + " does not list shard " + s.file,
                                 "loader.manifest_incomplete");
        s.expected = it->second;
      }
    }
  }
  return plan;
}

Result<std::shared_ptr<ResidentModel>> Loader::LoadHost(const ModelConfig& mc, std::uint64_t generation,
                                                        const std::atomic<bool>& cancel) {
  ASSIGN_OR_RETURN(LoadPlan plan, Plan(mc));
  return Fill(std::move(plan), generation, cancel);
}

XXH128_hash_t BlockChecksum(std::span<const std::byte> header, const std::byte* data, std::uint64_t size,
                            std::span<const XXH128_hash_t> blocks, std::span<const char> known) {
  const std::uint64_t n = (size + kChecksumBlock - 1) / kChecksumBlock;
  std::vector<XXH128_canonical_t> digests(n + 1);
  XXH128_canonicalFromHash(&digests[0], XXH3_128bits(header.data(), header.size()));
  for (std::uint64_t b = 0; b < n; ++b) {
    const std::uint64_t begin = b * kChecksumBlock;
    const XXH128_hash_t h = b < known.size() && known[b] && b < blocks.size()
                                ? blocks[b]
                                : XXH3_128bits(data + begin, std::min(kChecksumBlock, size - begin));
    XXH128_canonicalFromHash(&digests[b + 1], h);
  }
  return XXH3_128bits(digests.data(), digests.size() * sizeof(XXH128_canonical_t));
}

bool SameFile(const posix::FileInfo& was, const posix::FileInfo& now) {
  return now.inode == was.inode && now.dev == was.dev && now.size == was.size && now.mtime_ns == was.mtime_ns &&
         now.ctime_ns == was.ctime_ns;
}

Result<bool> Loader::Changed(const ResidentModel& model) {
  for (const ResidentShard& s : model.shards) {
    auto now = posix::StatPath(model.dir + "/" + s.file);
    if (!now.ok()) {
      if (now.status().code() == Code::kNotFound) return true;
      return now.status();
    }
    if (!SameFile(s.file_info, *now)) return true;
  }
  return false;
}

Result<std::vector<XXH128_hash_t>> Loader::Checksums(const ResidentModel& model) {
  const std::size_t n = model.shards.size();
  std::vector<XXH128_hash_t> out(n);
  std::vector<char> hashed(n, 0);
  std::latch left(static_cast<std::ptrdiff_t>(n));
  for (std::size_t i = 0; i < n; ++i) {
    auto job = [&, i] {
      const ResidentShard& sh = model.shards[i];
      if (sh.block_checksum) {
        out[i] = BlockChecksum(sh.header_bytes, sh.segment.data(), sh.segment.data_size());
        hashed[i] = 1;
      } else if (XXH3_state_t* st = XXH3_createState()) {
        XXH3_128bits_reset(st);
        XXH3_128bits_update(st, sh.header_bytes.data(), sh.header_bytes.size());
        if (sh.segment.data_size() > 0) XXH3_128bits_update(st, sh.segment.data(), sh.segment.data_size());
        out[i] = XXH3_128bits_digest(st);
        hashed[i] = 1;
        XXH3_freeState(st);
      }
      left.count_down();
    };
    if (!readers_.Submit(job)) job();  // the pool is closed: hash here
  }
  left.wait();
  for (std::size_t i = 0; i < n; ++i)
    if (!hashed[i]) return ResourceExhausted("no memory for the hash state of " + model.shards[i].file, "loader.no_memory");
  return out;
}

struct Loader::FillState {
  struct Chunk {
    std::size_t shard;
    std::size_t index;     // within the shard
    std::uint64_t offset;  // in the data section
    std::uint64_t size;
  };
  std::string model;
  std::uint64_t chunk_size = 0;
  std::vector<std::unique_ptr<ShardFill>> shards;
  std::vector<Chunk> chunks;
  LoadProgress* progress = nullptr;

  unsigned readers = 0;  // how many ReadShards ran
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> next_prefault{0};
  std::atomic<bool> failed{false};
  Mutex mu;
  Status first_error GUARDED_BY(mu);

  void Fail(Status s) {
    MutexLock lock(mu);
    if (first_error.ok()) first_error = std::move(s);
    failed = true;
  }
};

Result<std::shared_ptr<ResidentModel>> Loader::Fill(LoadPlan plan, std::uint64_t generation,
                                                    const std::atomic<bool>& cancel,
                                                    std::shared_ptr<LoadProgress> progress) {
  auto model = std::make_shared<ResidentModel>();
  model->name = plan.name;
  model->dir = plan.dir;
  model->bytes = plan.bytes;
  model->tensor_count = plan.tensor_count;
  // Whatever this function leaves half-built is unlinked on the way out, and a consumer of
  // `progress` learns why.
  struct Cleanup {
    ResidentModel* m;
    LoadProgress* progress;
    Status* error;
    ~Cleanup() {
      if (m) m->RemoveSegments();
      if (progress) progress->Fail(*error);
    }
  };
  Status error = Internal("load abandoned", "loader.abandoned");
  Cleanup cleanup{model.get(), progress.get(), &error};
  auto fail = [&](Status s) {
    error = s;
    return s;
  };

  if (cancel.load()) return fail(Cancelled(plan.name));
  const std::uint64_t part_size = store_->PartSize(plan.bytes);
  for (std::size_t i = 0; i < plan.shards.size(); ++i) {
    PlannedShard& p = plan.shards[i];
    ResidentShard shard;
    shard.file = p.file;
    shard.header = p.header;
    shard.file_info = p.file_info;
    // A write fill allocates the pages as it writes them, and reports a full /dev/shm from the
    // write; a map fill stores through the mapping and must have them reserved first.
    auto seg = store_->Create(SegmentName(plan.name, generation, i), p.header.data_size,
                              /*reserve=*/options_.fill == FillMethod::kMap, part_size);
    if (!seg.ok()) return fail(seg.status());
    shard.segment = std::move(seg).value();
    model->shards.push_back(std::move(shard));
  }
  if (progress) progress->PublishSegments(model);

  FillState fs;
  fs.model = plan.name;
  fs.progress = progress.get();
  // O_DIRECT lengths and offsets must stay block-aligned, and so must the chunks.
  fs.chunk_size = posix::RoundUp(std::max<std::uint64_t>(options_.chunk_size, 1), kDirectAlign);
  for (std::size_t i = 0; i < plan.shards.size(); ++i) {
    PlannedShard& p = plan.shards[i];
    auto sf = std::make_unique<ShardFill>();
    sf->path = plan.dir + "/" + p.file;
    sf->fd = p.fd.get();
    sf->data_offset = p.header.data_offset;
    sf->data_size = p.header.data_size;
    sf->dst = model->shards[i].segment.data();
    const HostSegment& seg = model->shards[i].segment;
    for (std::size_t k = 0; k < seg.parts(); ++k) sf->part_fds.push_back(seg.part_fd(k));
    sf->part_size = seg.part_size();
    sf->segment = seg.shm_path();
    sf->blocks = !p.expected.has_value();
    if (sf->blocks) {
      const auto n = static_cast<std::size_t>((sf->data_size + kChecksumBlock - 1) / kChecksumBlock);
      sf->block_digest.resize(n);
      sf->block_known.assign(n, 0);
    }
    if (!sf->blocks) sf->hash.reset(XXH3_createState());
    if (!sf->blocks && (sf->hash == nullptr || XXH3_128bits_reset(sf->hash.get()) == XXH_ERROR ||
                        XXH3_128bits_update(sf->hash.get(), p.header_bytes.data(), p.header_bytes.size()) == XXH_ERROR))
      return fail(Internal("cannot start the XXH3 hash of " + sf->path, "loader.hash_failed"));
    bool direct = options_.io == IoMode::kDirect ||
                  (options_.io == IoMode::kAuto && !MostlyCached(sf->fd, p.file_info.size));
    if (direct && sf->data_size > 0) {
      auto opened = io_->Open(sf->path, O_RDONLY | O_NONBLOCK | O_DIRECT | O_NOFOLLOW);
      if (opened.ok()) {
        // The name may point at another file by now; only the file the plan parsed will do.
        auto fi = posix::Stat(opened->get(), sf->path);
        if (!fi.ok()) return fail(fi.status());
        if (fi->inode != p.file_info.inode || fi->dev != p.file_info.dev)
          return fail(DataLoss(sf->path + " was replaced while it was being loaded", "loader.file_changed"));
        sf->direct_fd = std::move(opened).value();
        sf->direct = true;
      } else if (opened.status().reason() != "errno.EINVAL") {
        return fail(opened.status());
      }  // else: the filesystem has no O_DIRECT (tmpfs); read buffered.
    }
    // Chunks of chunk_size, cut at the part boundaries: a chunk is written into one file.
    const std::uint64_t part_bytes = sf->part_size == 0 ? sf->data_size : sf->part_size;
    for (std::uint64_t part_start = 0; part_start < sf->data_size; part_start += part_bytes) {
      const std::uint64_t part_end = std::min(sf->data_size, part_start + part_bytes);
      for (std::uint64_t at = part_start; at < part_end; at += fs.chunk_size)
        sf->chunk_end.push_back(std::min(part_end, at + fs.chunk_size));
    }
    sf->chunks = sf->chunk_end.size();
    {
      MutexLock lock(sf->mu);
      sf->done.assign(sf->chunks, false);
    }
    fs.shards.push_back(std::move(sf));
  }
  // The readers take chunks round-robin over the shards (chunk 0 of every shard, then chunk 1,
  // ...), not shard after shard. A write into a tmpfs file holds its inode lock, so readers
  // writing the same shard take turns (perf on the VM: rwsem_spin_on_owner); spread over the
  // shards, as many write at once as there are shards. Each shard's front chunk is also more
  // often the one a reader holds, so its bytes are hashed from that reader's buffer. The GPU
  // copy walks the chunks in the same order (GpuTier::Materialize).
  for (std::size_t c = 0, left = fs.shards.size(); left > 0; ++c) {
    left = 0;
    for (std::size_t i = 0; i < fs.shards.size(); ++i) {
      const ShardFill& sf = *fs.shards[i];
      if (c >= sf.chunks) continue;
      const std::uint64_t off = c == 0 ? 0 : sf.chunk_end[c - 1];
      fs.chunks.push_back({i, c, off, sf.chunk_end[c] - off});
      ++left;
    }
  }

  const auto read_start = std::chrono::steady_clock::now();
  if (Status s = ReadShards(fs, cancel); !s.ok()) return fail(s);
  FillTimes& times = model->fill_times;
  for (const auto& sf : fs.shards)
    times.Add({sf->read_ns.load(), sf->write_ns.load(), sf->populate_ns.load(), sf->hash_ns.load(), 0, fs.readers});
  times.wall_ns = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - read_start).count());

  for (std::size_t i = 0; i < fs.shards.size(); ++i) {
    ShardFill& sf = *fs.shards[i];
    ResidentShard& shard = model->shards[i];
    const std::uint64_t hashed = [&] {
      MutexLock lock(sf.mu);  // the readers are done; the lock only satisfies the analysis
      return sf.hashed;
    }();
    if (sf.blocks) {
      shard.block_checksum = true;
      shard.checksum = BlockChecksum(plan.shards[i].header_bytes, sf.dst, sf.data_size, sf.block_digest, sf.block_known);
    } else {
      if (hashed != sf.data_size)
        return fail(Internal(sf.path + ": hashed " + std::to_string(hashed) + " of " + std::to_string(sf.data_size) +
                             " bytes", "loader.hash_incomplete"));
      shard.checksum = XXH3_128bits_digest(sf.hash.get());
    }
    shard.header_bytes = std::move(plan.shards[i].header_bytes);
    shard.direct_io = sf.direct.load();
    const auto& expected = plan.shards[i].expected;
    if (expected) {
      if (!XXH128_isEqual(*expected, shard.checksum))
        return fail(DataLoss(sf.path + " does not match " + plan.dir + "/" + std::string(kChecksumManifest) +
                                 ": the manifest says " + ChecksumHex(*expected) + ", the file is " +
                                 ChecksumHex(shard.checksum),
                             "loader.checksum_mismatch"));
      shard.verified = true;
    }
    // A file rewritten while we read it would give a mix of old and new bytes.
    auto now = posix::Stat(sf.fd, sf.path);
    if (!now.ok()) return fail(now.status());
    if (!SameFile(shard.file_info, *now))
      return fail(DataLoss(sf.path + " changed while it was being loaded", "loader.file_changed"));
  }
  // The mappings keep the pages; a copy of many parts would otherwise hold an fd per part.
  for (ResidentShard& shard : model->shards) shard.segment.CloseFds();
  cleanup.m = nullptr;
  cleanup.progress = nullptr;
  if (progress) progress->Finish();
  return model;
}

namespace {

// Reads one chunk of a shard into its segment.
Status ReadChunk(FileIo& io, ShardFill& sf, std::uint64_t off, std::uint64_t size, AlignedBuffer& bounce,
                 std::uint64_t bounce_size) {
  std::byte* dst = sf.dst + off;
  const std::uint64_t begin = sf.data_offset + off;
  if (sf.direct.load(std::memory_order_relaxed)) {
    const std::uint64_t a0 = AlignDown(begin, kDirectAlign);
    const std::uint64_t a1 = posix::RoundUp(begin + size, kDirectAlign);
    Result<std::size_t> got = std::size_t{0};
    if (a0 == begin) {
      // The data section is block-aligned in the file, so is the chunk in the page-aligned
      // segment: read straight into it. The rounded-up tail stays inside the mapping, which
      // is page-rounded, and the file ends there anyway.
      got = io.Pread(sf.direct_fd.get(), std::span(dst, a1 - a0), a0, sf.path);
      if (got.ok() && *got >= size) return Status::Ok();
    } else {
      // Unaligned (the usual case: the header is padded to 8 bytes only): read the aligned
      // range into a bounce buffer and copy out.
      if (bounce == nullptr) {
        bounce.reset(static_cast<std::byte*>(std::aligned_alloc(kDirectAlign, bounce_size)));
        if (bounce == nullptr) return ResourceExhausted("no memory for a " + std::to_string(bounce_size) + "-byte O_DIRECT buffer");
      }
      got = io.Pread(sf.direct_fd.get(), std::span(bounce.get(), a1 - a0), a0, sf.path);
      if (got.ok() && *got >= begin + size - a0) {
        std::memcpy(dst, bounce.get() + (begin - a0), size);
        return Status::Ok();
      }
    }
    if (got.ok())
      return DataLoss(sf.path + ": unexpected end of file at " + std::to_string(a0 + *got), "io.short_read");
    // Some filesystems accept O_DIRECT at open and refuse the read; read buffered instead.
    if (got.status().reason() != "errno.EINVAL") return got.status();
    sf.direct.store(false, std::memory_order_relaxed);
  }
  ASSIGN_OR_RETURN(std::size_t got, io.Pread(sf.fd, std::span(dst, size), begin, sf.path));
  if (got != size)
    return DataLoss(sf.path + ": unexpected end of file at " + std::to_string(begin + got), "io.short_read");
  return Status::Ok();
}

// A failed write into a segment. A full /dev/shm is the error that a map fill's reservation
// gives (HostSegment::Create), so callers see one code whichever fill method ran.
Status SegmentWriteError(Status s) {
  if (s.reason() == "errno.ENOSPC" || s.reason() == "errno.EDQUOT")
    return ResourceExhausted(s.message() + " (is /dev/shm large enough?)", "shm.no_space");
  return s;
}

// Hashes what it can of bytes [at, at + n) of a shard's data section, which a reader just read
// into `src`. A block checksum takes every block that lies wholly in them. The whole-file hash
// takes them if they are the next ones it needs and no other thread hashes it: a write fill then
// hashes most bytes while they are in the cache, and reads back from the segment only those of
// chunks that finished out of order (ChunkDone).
void HashPiece(ShardFill& sf, std::uint64_t at, const std::byte* src, std::uint64_t n) {
  if (sf.blocks) {
    // Every block that lies wholly in these bytes; a block cut by a piece or chunk boundary is
    // hashed from the segment after the fill (not timed here).
    std::uint64_t b = (at + kChecksumBlock - 1) / kChecksumBlock;
    auto whole = [&] { return std::min((b + 1) * kChecksumBlock, sf.data_size) <= at + n && b * kChecksumBlock < at + n; };
    if (!whole()) return;
    ScopedTime t(sf.hash_ns);
    for (; whole(); ++b) {
      const std::uint64_t begin = b * kChecksumBlock;
      sf.block_digest[b] = XXH3_128bits(src + (begin - at), std::min(kChecksumBlock, sf.data_size - begin));
      sf.block_known[b] = 1;
    }
    return;
  }
  {
    MutexLock lock(sf.mu);
    if (sf.hashing || sf.hashed != at) return;
    sf.hashing = true;
  }
  {
    ScopedTime t(sf.hash_ns);
    XXH3_128bits_update(sf.hash.get(), src, n);
  }
  MutexLock lock(sf.mu);
  sf.hashed = at + n;
  sf.hashing = false;
  // The bytes after these belong to the chunk this thread is writing (it hashes its next piece
  // itself) or to one already done, which this thread's own ChunkDone catches up on.
}

// Reads one chunk of a shard into `buf`, a piece at a time, and writes each piece into the
// segment's fd (FillMethod::kWrite). `buf` holds `piece` + 2 * kDirectAlign bytes, aligned for
// O_DIRECT: a direct read of a piece covers the aligned range around it.
Status WriteChunk(FileIo& io, ShardFill& sf, std::uint64_t off, std::uint64_t size, std::byte* buf,
                  std::uint64_t piece) {
  // A chunk never crosses a part boundary (Fill cuts them so).
  const std::size_t part = sf.part_size == 0 ? 0 : static_cast<std::size_t>(off / sf.part_size);
  const int part_fd = sf.part_fds[part];
  const std::uint64_t part_start = part * sf.part_size;
  for (std::uint64_t done = 0; done < size;) {
    const std::uint64_t n = std::min(piece, size - done);
    const std::uint64_t begin = sf.data_offset + off + done;
    const std::byte* src = buf;
    if (sf.direct.load(std::memory_order_relaxed)) {
      const std::uint64_t a0 = AlignDown(begin, kDirectAlign);
      const std::uint64_t a1 = posix::RoundUp(begin + n, kDirectAlign);
      auto got = io.Pread(sf.direct_fd.get(), std::span(buf, a1 - a0), a0, sf.path);
      if (!got.ok()) {
        // Some filesystems accept O_DIRECT at open and refuse the read; read buffered instead.
        if (got.status().reason() != "errno.EINVAL") return got.status();
        sf.direct.store(false, std::memory_order_relaxed);
        continue;
      }
      if (*got < begin + n - a0)
        return DataLoss(sf.path + ": unexpected end of file at " + std::to_string(a0 + *got), "io.short_read");
      src = buf + (begin - a0);
    } else {
      Result<std::size_t> got = [&] {
        ScopedTime t(sf.read_ns);
        return io.Pread(sf.fd, std::span(buf, n), begin, sf.path);
      }();
      if (!got.ok()) return got.status();
      if (*got != n)
        return DataLoss(sf.path + ": unexpected end of file at " + std::to_string(begin + *got), "io.short_read");
    }
    {
      ScopedTime t(sf.write_ns);
      if (Status w = io.Pwrite(part_fd, std::span(src, n), off + done - part_start, sf.segment); !w.ok())
        return SegmentWriteError(std::move(w));
    }
    HashPiece(sf, off + done, src, n);
    done += n;
  }
  return Status::Ok();
}

// Marks chunk `index` done, moves the shard's watermark over finished chunks, and feeds the
// newly contiguous bytes that are not hashed yet to the shard's hash unless another thread
// already hashes it. With `buf` (a write fill: the reader's buffer, free between chunks, of
// `piece` bytes or more), the bytes are read back from the segment's fd into it; else they are
// hashed through the mapping. A write fill with 4 KiB pages reads back (HashSource): through
// the mapping the daemon would map every page of the segment one fault at a time (on the
// development VM a first touch of a mapped page costs ~25 us, whether or not the page exists;
// docs/loading.md), where a pread copies out of the same pages with no fault.
Status ChunkDone(ShardFill& sf, std::size_t shard, std::size_t index, std::uint64_t chunk_size, LoadProgress* progress,
                 const std::atomic<bool>& failed, std::byte* buf, std::uint64_t piece) {
  sf.mu.Lock();
  sf.done[index] = true;
  while (sf.next_gap < sf.chunks && sf.done[sf.next_gap]) ++sf.next_gap;
  sf.filled = sf.next_gap == 0 ? 0 : sf.chunk_end[sf.next_gap - 1];
  if (progress) progress->SetFilled(shard, sf.filled);
  if (sf.hashing || sf.blocks) {
    sf.mu.Unlock();
    return Status::Ok();
  }
  sf.hashing = true;
  Status status;
  ScopedTime timed(sf.hash_ns);
  // Hash at most a chunk (or a buffer) at a time, so that a failure elsewhere stops this thread
  // soon.
  while (sf.hashed < sf.filled && !failed.load(std::memory_order_relaxed)) {
    const std::uint64_t from = sf.hashed;
    std::uint64_t to = std::min(sf.filled, from + (buf ? piece : chunk_size));
    sf.mu.Unlock();
    if (buf != nullptr) {
      // A read back stays inside one part.
      const std::uint64_t part = sf.part_size == 0 ? 0 : from / sf.part_size;
      if (sf.part_size != 0) to = std::min(to, (part + 1) * sf.part_size);
      auto got = posix::PreadUpTo(sf.part_fds[part], std::span(buf, to - from), from - part * sf.part_size, sf.segment);
      if (!got.ok() || *got != to - from) {
        status = got.ok() ? Internal(sf.segment + ": read back " + std::to_string(*got) + " of " +
                                         std::to_string(to - from) + " bytes at " + std::to_string(from),
                                     "loader.short_readback")
                          : got.status();
        sf.mu.Lock();
        break;
      }
      XXH3_128bits_update(sf.hash.get(), buf, to - from);
    } else {
      XXH3_128bits_update(sf.hash.get(), sf.dst + from, to - from);
    }
    sf.mu.Lock();
    sf.hashed = to;
  }
  sf.hashing = false;
  sf.mu.Unlock();
  return status;
}

// Maps the segment pages of a chunk in before a reader writes them. MADV_POPULATE_WRITE does
// it in one call; without it (EINVAL before Linux 5.14), an atomic add of zero per page
// write-faults the page without changing a byte a reader may already have written.
void Prefault(std::byte* base, std::uint64_t mapped_size, std::uint64_t off, std::uint64_t size,
              std::atomic<bool>& use_madvise, bool touch_fallback = true) {
  const std::uint64_t page = posix::PageSize();
  const std::uint64_t a0 = AlignDown(off, page);
  const std::uint64_t a1 = std::min(mapped_size, posix::RoundUp(off + size, page));
  if (a1 <= a0) return;
  if (use_madvise.load(std::memory_order_relaxed)) {
    if (::madvise(base + a0, a1 - a0, MADV_POPULATE_WRITE) == 0) return;
    if (errno == EINVAL) use_madvise = false;
    else return;  // ENOMEM, EFAULT...: the reader's own faults will report the problem
  }
  if (!touch_fallback) return;
  for (std::uint64_t p = a0; p < a1; p += page)
    __atomic_fetch_add(reinterpret_cast<unsigned char*>(base + p), 0, __ATOMIC_RELAXED);
}

}  // namespace

Status Loader::ReadShards(FillState& fs, const std::atomic<bool>& cancel) {
  if (fs.chunks.empty()) return Status::Ok();

  struct Done {
    Mutex mu;
    CondVar cv{&mu};
    unsigned running GUARDED_BY(mu) = 0;
  } done;
  const std::uint64_t bounce_size = fs.chunk_size + 2 * kDirectAlign;
  const bool write_fill = options_.fill == FillMethod::kWrite;
  const std::uint64_t piece =
      std::min(fs.chunk_size, posix::RoundUp(std::max<std::uint64_t>(options_.write_buffer, 1), kDirectAlign));
  const std::uint64_t buffer_size = piece + 2 * kDirectAlign;
  std::atomic<bool> use_madvise{true};
  const bool hash_mapped = hash_source_ == HashSource::kMapping;

  auto work = [&] {
    AlignedBuffer bounce;
    if (write_fill) {
      bounce.reset(static_cast<std::byte*>(std::aligned_alloc(kDirectAlign, buffer_size)));
      if (bounce == nullptr)
        fs.Fail(ResourceExhausted("no memory for a " + std::to_string(buffer_size) + "-byte read buffer",
                                  "loader.no_memory"));
    }
    for (;;) {
      if (fs.failed.load(std::memory_order_relaxed)) break;
      if (cancel.load(std::memory_order_relaxed)) {
        fs.Fail(Cancelled(fs.model));
        break;
      }
      const std::size_t i = fs.next.fetch_add(1, std::memory_order_relaxed);
      if (i >= fs.chunks.size()) break;
      const FillState::Chunk& c = fs.chunks[i];
      ShardFill& sf = *fs.shards[c.shard];
      Status s;
      if (write_fill) {
        s = WriteChunk(*io_, sf, c.offset, c.size, bounce.get(), piece);
      } else {
        // Populating the destination in one call costs about half of taking its page faults one
        // by one inside pread or memcpy (docs/loading.md); a no-op where a pre-faulter was first.
        {
          ScopedTime t(sf.populate_ns);
          Prefault(sf.dst, posix::RoundUp(sf.data_size, posix::PageSize()), c.offset, c.size, use_madvise, false);
        }
        {
          ScopedTime t(sf.read_ns);
          s = ReadChunk(*io_, sf, c.offset, c.size, bounce, bounce_size);
        }
        if (s.ok() && sf.blocks) HashPiece(sf, c.offset, sf.dst + c.offset, c.size);
      }
      if (!s.ok()) {
        fs.Fail(std::move(s));
        break;
      }
      bytes_read_.fetch_add(c.size, std::memory_order_relaxed);
      if (Status h = ChunkDone(sf, c.shard, c.index, fs.chunk_size, fs.progress, fs.failed,
                               write_fill && !hash_mapped ? bounce.get() : nullptr, piece);
          !h.ok()) {
        fs.Fail(std::move(h));
        break;
      }
    }
    MutexLock lock(done.mu);
    if (--done.running == 0) done.cv.SignalAll();
  };

  // Pre-faulters walk the chunks in the readers' order and skip what the readers have passed,
  // so the pages a reader is about to write are usually mapped already.
  std::vector<std::jthread> prefaulters;
  // A write fill takes no page faults, so there is nothing to pre-fault.
  const unsigned n_prefault =
      write_fill ? 0u : static_cast<unsigned>(std::min<std::size_t>(options_.prefault_threads, fs.chunks.size()));
  for (unsigned t = 0; t < n_prefault; ++t) {
    prefaulters.emplace_back([&] {
      for (;;) {
        if (fs.failed.load(std::memory_order_relaxed) || cancel.load(std::memory_order_relaxed)) break;
        std::size_t i = fs.next_prefault.fetch_add(1, std::memory_order_relaxed);
        if (i >= fs.chunks.size()) break;
        if (i < fs.next.load(std::memory_order_relaxed)) {
          // Behind the readers: jump ahead of them.
          std::size_t ahead = fs.next.load(std::memory_order_relaxed) + 1;
          std::size_t cur = i + 1;
          fs.next_prefault.compare_exchange_strong(cur, ahead, std::memory_order_relaxed);
          continue;
        }
        const FillState::Chunk& c = fs.chunks[i];
        const ShardFill& sf = *fs.shards[c.shard];
        Prefault(sf.dst, posix::RoundUp(sf.data_size, posix::PageSize()), c.offset, c.size, use_madvise);
      }
    });
  }

  const unsigned n = static_cast<unsigned>(std::min<std::size_t>(readers_.size(), fs.chunks.size()));
  fs.readers = n;
  {
    MutexLock lock(done.mu);
    done.running = n;
  }
  for (unsigned t = 0; t < n; ++t) {
    if (!readers_.Submit(work)) {
      {
        MutexLock lock(done.mu);
        done.running -= (n - t);
      }
      fs.Fail(Unavailable("the daemon is shutting down", "loader.closed"));
      break;
    }
  }
  {
    MutexLock lock(done.mu);
    done.cv.Wait([&] {
      done.mu.AssertHeld();
      return done.running == 0;
    });
  }
  // Readers are done; pre-faulters still walking would only waste time.
  fs.next_prefault.store(fs.chunks.size());
  prefaulters.clear();
  MutexLock lock(fs.mu);
  return fs.first_error;
}

}  // namespace weightd
