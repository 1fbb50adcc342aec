// loader.h — reads a model's shards from disk into host-tier segments, verified.
//
// A load has two phases, so that the server can admit it against a memory budget in between:
//   Plan()  discovers the shard files, opens them, parses and cross-checks their headers and
//           reads the checksum manifest. It creates nothing and costs a few small reads.
//   Fill()  creates one segment per shard and reads the data sections into them with chunked
//           preads on the Loader's reader pool. For a shard the manifest names, a per-shard
//           XXH3-128 of the whole file follows the reads (in file order) and is verified against
//           it; for any other, each reader hashes the 1 MiB blocks it read (BlockChecksum). It
//           checks that no file changed while it was read.
// LoadHost() is Plan() then Fill(). All three block and run on a loader job thread, never on
// the control loop. A failure removes every segment the load created (their names; mappings
// that a LoadProgress consumer holds stay valid until it drops them).
//
// Reads: buffered or O_DIRECT preads (LoaderOptions::io), with a fallback to buffered reads
// where the filesystem refuses O_DIRECT (tmpfs, for one); into a per-reader buffer that is then
// pwritten into the segment (FillMethod::kWrite, the default), or straight into the mapped
// segment (kMap).
// docs/loading.md has the measurements behind the defaults and the manifest format.
//
// Thread safety: a Loader is thread-safe; any number of loads may run at once (they share the
// reader pool). A LoadPlan is a move-only value owned by one thread. A LoadProgress is shared
// between the loader and any number of consumers and is thread-safe. A ResidentModel is
// immutable once Fill() returns it.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <xxhash.h>

#include "config.h"
#include "host_tier.h"
#include "posix.h"
#include "safetensors.h"
#include "segment_store.h"
#include "thread_annotations.h"
#include "thread_pool.h"

namespace weightd {

// Whether a model file is still the one that was read: the same identity (inode, device),
// size, mtime and change time. The one rule for "has this file changed", used at the end of a
// fill, by the periodic check of resident copies and by adoption. The change time is set by
// the kernel on every write, so it catches a rewrite that keeps the size and mtime (rsync -t,
// touch -r).
bool SameFile(const posix::FileInfo& was, const posix::FileInfo& now);

// The name of the checksum manifest in a model directory (xxh128sum's output format).
inline constexpr std::string_view kChecksumManifest = "checksums.xxh128";

// The manifest of `dir` (file name -> checksum), or nullopt if it has none.
Result<std::optional<std::map<std::string, XXH128_hash_t>>> ReadManifest(const std::string& dir);

// 32 lowercase hex digits, as xxh128sum prints them (the canonical, big-endian form).
std::string ChecksumHex(const XXH128_hash_t& h);
// Parses 32 hex digits (either case). nullopt if `hex` is anything else.
std::optional<XXH128_hash_t> ParseChecksumHex(std::string_view hex);

// The bytes of a shard's data section that one digest of a block checksum covers.
inline constexpr std::uint64_t kChecksumBlock = 1ull << 20;

// The block checksum of a shard (ResidentShard::block_checksum): the XXH3-128 of the canonical
// XXH3-128 digests of its header bytes and of each kChecksumBlock bytes of its data (the last
// block shorter), in order. Unlike the whole file's XXH3-128 it has no order to follow: each
// block is hashed on its own, by the reader that holds it. `blocks` are those digests where
// known (one per block; a null `known` entry is hashed from `data`).
XXH128_hash_t BlockChecksum(std::span<const std::byte> header, const std::byte* data, std::uint64_t size,
                            std::span<const XXH128_hash_t> blocks = {}, std::span<const char> known = {});

struct ResidentShard {
  std::string file;  // name inside the model directory
  st::Header header;
  posix::FileInfo file_info;  // size, mtime and identity when it was read
  HostSegment segment;
  // XXH3-128 of the whole file (header + data), as xxh128sum prints it, when the directory's
  // manifest names the file; otherwise (block_checksum) the BlockChecksum, which a fill computes
  // in parallel from the bytes it just read rather than in file order.
  XXH128_hash_t checksum{};
  bool block_checksum = false;
  bool verified = false;      // checksum matched the directory's manifest
  bool direct_io = false;     // the data was read with O_DIRECT
  std::vector<std::byte> header_bytes;  // file bytes [0, data_offset): the checksum's prefix

  std::string checksum_hex() const { return ChecksumHex(checksum); }
};

// Where a fill's readers spent their time, summed over the readers (so the parts add up to
// `readers` x `wall_ns`, less what they spent elsewhere: waiting for a shard's lock, idle at the
// end). `read`: preads from the files (a map fill's preads write straight into the segment);
// `write`: a write fill's pwrites into the segments (each holds the segment file's inode lock);
// `populate`: a map fill's MADV_POPULATE_WRITE of its chunks; `hash`: XXH3 of the data, with a
// write fill's reading back of chunks that finished out of order. For logs and benchmarks.
struct FillTimes {
  std::uint64_t read_ns = 0;
  std::uint64_t write_ns = 0;
  std::uint64_t populate_ns = 0;
  std::uint64_t hash_ns = 0;
  std::uint64_t wall_ns = 0;  // from the first chunk to the last reader's end
  std::uint32_t readers = 0;

  // Adds another fill's times (a benchmark's iterations); `readers` becomes the other's.
  void Add(const FillTimes& o);
  // `ns` in percent of readers x wall time; 0 when there is no wall time.
  double Percent(std::uint64_t ns) const;
  // "16 readers: read 12%, write 61%, populate 0%, hash 19%, other 8%" (shares of readers x wall).
  std::string Summary() const;
};

// A model resident in the host tier. Immutable once Fill() returns it; shared by the server and
// by anything that reads the segments (the GPU tier).
struct ResidentModel {
  std::string name;
  std::string dir;
  std::vector<ResidentShard> shards;
  std::uint64_t bytes = 0;  // tensor data, all shards
  std::uint32_t tensor_count = 0;
  // The name of its adoption record (adopt.h) once the server wrote one; empty before.
  std::string record;
  std::uint64_t record_bytes = 0;  // its size in /dev/shm (SegmentStore::RecordBytes)
  FillTimes fill_times;             // how Fill() spent its time (zero for an adopted copy)

  // Unlinks the record, then the segment names (the daemon's own mappings go with the object).
  void RemoveSegments() const;
};

// One shard file of a plan: opened, its header parsed, its expected checksum (if the manifest
// names it) known.
struct PlannedShard {
  std::string file;  // name inside the model directory
  st::Header header;
  posix::FileInfo file_info;
  posix::Fd fd;  // O_RDONLY | O_NONBLOCK, buffered
  std::vector<std::byte> header_bytes;  // file bytes [0, data_offset): the checksum's prefix
  std::optional<XXH128_hash_t> expected;  // from the manifest
};

// What Plan() found. Move-only (it holds the open files).
struct LoadPlan {
  LoadPlan() = default;
  LoadPlan(LoadPlan&&) noexcept = default;
  LoadPlan& operator=(LoadPlan&&) noexcept = default;
  LoadPlan(const LoadPlan&) = delete;
  LoadPlan& operator=(const LoadPlan&) = delete;

  std::string name;
  std::string dir;
  std::vector<PlannedShard> shards;
  std::uint64_t bytes = 0;  // tensor data, all shards: what the segments will hold
  std::uint32_t tensor_count = 0;
  bool has_manifest = false;  // a manifest was read and every shard will be verified
};

// The state of one Fill(), for a consumer that streams the data while it loads (the GPU copy
// pipelines disk -> host -> GPU with it). Thread-safe. The loader publishes the model as soon
// as its segments exist, then, per shard, the length of the contiguous prefix of the data
// section that is in the segment (chunks finish out of order; the watermark only moves over
// finished ones), then the end of the load.
//
// Only the segments and the headers of the published model may be read before Wait() returns
// OK; checksums and flags are written at the end. The published pointer keeps the mappings
// valid even if the load fails and its segment names are removed.
class LoadProgress {
 public:
  LoadProgress() = default;
  LoadProgress(const LoadProgress&) = delete;
  LoadProgress& operator=(const LoadProgress&) = delete;

  // Consumer side. Each blocks until it can answer.
  // The model with its segments, or the load's error if it failed before making them.
  Result<std::shared_ptr<const ResidentModel>> WaitSegments() const;
  // OK once bytes [0, end) of shard `shard`'s data section are in its segment. The load's error
  // (Unavailable "loader.cancelled" for a cancellation) if it fails first; InvalidArgument for a
  // shard or an end the model does not have. Bytes that were filled stay OK even if the load
  // later fails, so a consumer must still check Wait() (or Fill()'s result) before using them.
  Status WaitFilled(std::size_t shard, std::uint64_t end) const;
  // The load's outcome: OK once every byte is in and every checksum verified.
  Status Wait() const;
  // Non-blocking: the filled prefix of a shard now (0 before the segments exist).
  std::uint64_t filled(std::size_t shard) const;
  bool done() const;

  // Loader side. PublishSegments once; SetFilled with ends that never decrease; then Finish or
  // Fail once (later calls are ignored, so the first error wins).
  void PublishSegments(std::shared_ptr<const ResidentModel> model);
  void SetFilled(std::size_t shard, std::uint64_t end);
  void Finish();
  void Fail(Status error);

 private:
  mutable Mutex mu_;
  mutable CondVar cv_{&mu_};
  std::shared_ptr<const ResidentModel> model_ GUARDED_BY(mu_);
  std::vector<std::uint64_t> filled_ GUARDED_BY(mu_);
  bool done_ GUARDED_BY(mu_) = false;
  Status error_ GUARDED_BY(mu_);
};

// The file reads of a load and its writes into segments, behind an interface so that tests can
// inject faults. Must be thread-safe: the reader pool calls it concurrently.
class FileIo {
 public:
  virtual ~FileIo() = default;
  // open(path, flags | O_CLOEXEC). O_DIRECT in `flags` asks for direct I/O; a filesystem that
  // does not support it fails with EINVAL (reason "errno.EINVAL").
  virtual Result<posix::Fd> Open(const std::string& path, int flags);
  // Reads up to out.size() bytes at `offset`, short only at end of file (posix::PreadUpTo).
  virtual Result<std::size_t> Pread(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what);
  // Writes all of `in` at `offset` of a segment's fd (FillMethod::kWrite; posix::PwriteFull).
  virtual Status Pwrite(int fd, std::span<const std::byte> in, std::uint64_t offset, std::string_view what);
};

enum class IoMode {
  kBuffered,  // page-cache preads straight into the segment
  kDirect,    // O_DIRECT; buffered for a file whose filesystem refuses O_DIRECT (EINVAL)
  kAuto,      // O_DIRECT for a file that is not in the page cache, buffered for one that is
};

// How the bytes get into a fresh segment.
enum class FillMethod {
  // Each reader preads a piece of its chunk into a small private buffer and pwrites it into the
  // segment's fd. tmpfs allocates the pages inside the write, in bulk, with no page fault; the
  // segment is not reserved upfront, so a full /dev/shm is ENOSPC from a write
  // (ResourceExhausted "shm.no_space", the load fails and removes its segments).
  kWrite,
  // The segment is reserved (posix_fallocate) and mapped; each reader populates its chunk's
  // pages (MADV_POPULATE_WRITE) and preads straight into the mapping.
  kMap,
};

// Where a write fill's whole-file hash (of a shard the manifest names) reads the bytes of chunks
// that finished out of order (the bytes of the next piece in order are hashed from the reader's
// buffer either way; a block checksum needs neither).
enum class HashSource {
  kReadBack,  // pread them back from the segment's fd into the reader's buffer (one more copy)
  kMapping,   // hash them through the daemon's mapping of the segment (a page fault per page)
  kAuto,      // whichever ProbeHashSource() finds cheaper on this machine, once per Loader
};

// What the two hash sources cost here, per 4 KiB page of a fresh segment in `store`'s tmpfs:
// the first touch of a page through a new mapping (a page fault; ~25 us where the guest's page
// tables trap to the hypervisor, well under 1 us on bare metal) and a pread of its bytes into a
// buffer. Best of 3 over 1 MiB; a few ms. `chosen` is kMapping when the touch is the cheaper,
// kReadBack otherwise (and when the probe fails: `error` says why).
struct HashSourceProbe {
  HashSource chosen = HashSource::kReadBack;
  double touch_ns_per_page = 0;
  double read_ns_per_page = 0;
  std::string error;
};
HashSourceProbe ProbeHashSource(const SegmentStore& store);

struct LoaderOptions {
  // Where segments are made and how they are named: the daemon's store (not owned; it must
  // outlive the Loader). nullptr: the Loader makes its own from shm_prefix, shm_mode and
  // shm_group.
  const SegmentStore* segments = nullptr;
  std::string shm_prefix;
  mode_t shm_mode = 0640;
  std::uint32_t threads = 4;
  std::uint64_t chunk_size = 64ull << 20;  // rounded up to a multiple of 4096 for O_DIRECT
  // Write fill by default: on the 2-core development VM it filled from the page cache 6-9x as
  // fast as the map fill (docs/loading.md).
  FillMethod fill = FillMethod::kWrite;
  // kWrite: bytes per pread/pwrite pair, the size of each reader's private buffer (rounded up
  // to 4096, at most a chunk). Small enough to stay in a core's cache between the two copies;
  // 256 KiB to 4 MiB were within the noise of each other on the VM.
  std::uint64_t write_buffer = 1ull << 20;
  // Buffered by default: cold O_DIRECT reads were slower than buffered ones on both machines
  // measured (docs/loading.md), and the fill ran at the same speed either way.
  IoMode io = IoMode::kBuffered;
  // FillMethod::kMap only: extra threads that pre-fault the fresh segment pages ahead of the readers
  // (MADV_POPULATE_WRITE, or a touch per page where the kernel lacks it). Each reader already
  // populates its own chunk before reading into it; on the 2-core development VM extra threads
  // only competed with the readers (docs/loading.md), so they are off by default.
  std::uint32_t prefault_threads = 0;
  // FillMethod::kWrite only ([daemon] fill_hash, whose default is kAuto). Through the mapping
  // the fill was 13 % faster on a 16-core H200 host, with 4 KiB and 2 MiB pages; reading back
  // was 2.2x faster with 4 readers on the 2-core development VM (a PVM guest, where a first
  // touch of a mapped page costs ~25 us); docs/loading.md. weightd_bench_fill's `hash` rows
  // compare the two.
  HashSource hash_source = HashSource::kMapping;
  // Verify shards against the directory's checksums.xxh128 when there is one.
  bool verify_manifest = true;
  // Not owned; must outlive the Loader. nullptr: plain POSIX calls.
  FileIo* io_layer = nullptr;
  // The group that owns new segments ((gid_t)-1: the daemon's own), without `segments`.
  gid_t shm_group = static_cast<gid_t>(-1);
  // The most files a host copy is split into, without `segments` (SegmentStore::Options).
  std::uint32_t segment_parts = 1;
};

class Loader {
 public:
  explicit Loader(LoaderOptions options);

  // Discovers, opens and checks the shards of `model`; reads the manifest. Creates nothing.
  Result<LoadPlan> Plan(const ModelConfig& model) const;

  // Reads the plan's shards into new segments. `generation` makes the segment names of this
  // load unique. `cancel` may be set by another thread to abandon the load (Unavailable,
  // "loader.cancelled"). `progress`, if given, is published to as the load advances, and is
  // finished or failed before Fill returns.
  Result<std::shared_ptr<ResidentModel>> Fill(LoadPlan plan, std::uint64_t generation, const std::atomic<bool>& cancel,
                                              std::shared_ptr<LoadProgress> progress = nullptr);

  // Plan() then Fill().
  Result<std::shared_ptr<ResidentModel>> LoadHost(const ModelConfig& model, std::uint64_t generation,
                                                  const std::atomic<bool>& cancel);

  // True if any shard file of `model` is no longer the one that was read (SameFile), or is
  // gone. Errors other than a missing file (EACCES, ...) are returned.
  static Result<bool> Changed(const ResidentModel& model);

  // The checksum of each shard of `model` as its file has it (the shard's header bytes, then its
  // segment's data; the whole file's XXH3-128, or the BlockChecksum where block_checksum),
  // hashed on the reader pool. ResourceExhausted "loader.no_memory" when a hash
  // state cannot be allocated.
  Result<std::vector<XXH128_hash_t>> Checksums(const ResidentModel& model);

  // The segment name of a shard: "<prefix>.<model>.<generation>-<salt>.<index>" (SegmentStore).
  std::string SegmentName(const std::string& model, std::uint64_t generation, std::size_t shard) const {
    return store_->SegmentName(model, generation, shard);
  }

  std::uint64_t bytes_read() const { return bytes_read_.load(std::memory_order_relaxed); }
  // The hash source the fills use (never kAuto), and the probe that chose it under kAuto.
  HashSource hash_source() const { return hash_source_; }
  const std::optional<HashSourceProbe>& hash_probe() const { return hash_probe_; }

 private:
  struct FillState;
  Status ReadShards(FillState& fs, const std::atomic<bool>& cancel);

  const LoaderOptions options_;
  std::unique_ptr<SegmentStore> own_store_;  // without options_.segments
  const SegmentStore* const store_;
  FileIo posix_io_;
  FileIo* const io_;
  const std::optional<HashSourceProbe> hash_probe_;
  const HashSource hash_source_;
  ThreadPool readers_;
  std::atomic<std::uint64_t> bytes_read_{0};
};

}  // namespace weightd
