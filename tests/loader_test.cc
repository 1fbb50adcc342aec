// Tests of the loader: byte-exact fills across chunk boundaries in every I/O mode and both fill
// methods (write and map), a full /dev/shm during a write fill, the O_DIRECT fallback, checksums against xxh128sum, the manifest, change detection, injected read errors,
// cancellation and LoadProgress. Files are a few KB and chunks 4096 bytes, so a "multi-chunk"
// shard is tiny.
#include "loader.h"
#include "segment_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
#include <map>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <xxhash.h>

#include "posix.h"
#include "safetensors_writer.h"
#include "support/daemon_process.h"

namespace weightd {
namespace {

using namespace std::chrono_literals;
constexpr std::uint64_t kChunk = 4096;

static_assert(!std::is_copy_constructible_v<LoadPlan> && std::is_move_constructible_v<LoadPlan>);

std::string UniquePrefix() {
  static int n = 0;
  return "wdlt-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
}

std::vector<std::byte> ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> v((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(v.size());
  std::memcpy(out.data(), v.data(), v.size());
  return out;
}

XXH128_hash_t HashOfFile(const std::string& path) {
  auto bytes = ReadAll(path);
  return XXH3_128bits(bytes.data(), bytes.size());
}

// A one-tensor model of `data_bytes` bytes of U8. `meta_pad` bytes of metadata move the data
// section's offset in the file.
Status WriteModelOfSize(const std::string& dir, std::uint64_t data_bytes, std::size_t meta_pad = 0, std::uint64_t seed = 7) {
  RETURN_IF_ERROR(posix::MakeDirs(dir));
  std::vector<st::TensorSpec> t = {{"w", DType::kU8, {static_cast<std::int64_t>(data_bytes)}}};
  std::map<std::string, std::string> meta;
  if (meta_pad > 0) meta["pad"] = std::string(meta_pad, 'x');
  auto r = st::WriteFile(dir + "/model.safetensors", t, testing::PatternFill(seed), meta);
  return r.ok() ? Status::Ok() : r.status();
}

// The block checksum of a file's bytes, by its definition (loader.h): the XXH3-128 of the
// canonical digests of the header, then of each 1 MiB of the data section.
XXH128_hash_t BlockChecksumOfFile(const std::vector<std::byte>& file, std::uint64_t data_offset) {
  std::vector<XXH128_canonical_t> d;
  auto add = [&](const std::byte* p, std::size_t n) {
    d.emplace_back();
    XXH128_canonicalFromHash(&d.back(), XXH3_128bits(p, n));
  };
  add(file.data(), data_offset);
  for (std::size_t at = data_offset; at < file.size(); at += 1u << 20)
    add(file.data() + at, std::min<std::size_t>(1u << 20, file.size() - at));
  return XXH3_128bits(d.data(), d.size() * sizeof(XXH128_canonical_t));
}

// The data section of shard `i` must equal the file's bytes after the header, and its checksum
// the file's: the whole file's XXH3-128 where a manifest named it, else the block checksum.
void ExpectMatchesFile(const ResidentModel& m) {
  for (const ResidentShard& s : m.shards) {
    const auto file = ReadAll(m.dir + "/" + s.file);
    ASSERT_EQ(file.size(), s.header.data_offset + s.header.data_size) << s.file;
    ASSERT_EQ(s.segment.data_size(), s.header.data_size);
    if (s.header.data_size > 0) {
      EXPECT_EQ(0, std::memcmp(s.segment.data(), file.data() + s.header.data_offset, s.header.data_size)) << s.file;
    }
    EXPECT_EQ(s.block_checksum, !s.verified) << s.file;
    const XXH128_hash_t want = s.block_checksum ? BlockChecksumOfFile(file, s.header.data_offset)
                                                : XXH3_128bits(file.data(), file.size());
    EXPECT_TRUE(XXH128_isEqual(s.checksum, want)) << s.file;
  }
}

// True if files in `dir` can be opened with O_DIRECT and read with 4096-aligned buffers.
bool SupportsDirect(const std::string& dir) {
  const std::string probe = dir + "/.direct-probe";
  {
    std::ofstream(probe) << std::string(8192, 'x');
  }
  int fd = ::open(probe.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  bool ok = false;
  if (fd >= 0) {
    void* buf = std::aligned_alloc(4096, 4096);
    ok = ::pread(fd, buf, 4096, 0) == 4096;
    std::free(buf);
    ::close(fd);
  }
  ::unlink(probe.c_str());
  return ok;
}

// A directory in /dev/shm (tmpfs: no O_DIRECT), removed on destruction.
class ShmDir {
 public:
  ShmDir() {
    std::string t = "/dev/shm/wdlt-dir.XXXXXX";
    if (::mkdtemp(t.data()) != nullptr) path_ = t;
  }
  ~ShmDir() {
    if (!path_.empty()) (void)posix::RemoveTree(path_);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct Fixture : ::testing::Test {
  void TearDown() override {
    for (const auto& n : ListSegments(prefix)) (void)HostSegment::Remove(n);
  }
  LoaderOptions Options(std::uint32_t threads = 2, IoMode io = IoMode::kBuffered) {
    LoaderOptions o;
    o.shm_prefix = prefix;
    o.shm_mode = 0600;
    o.threads = threads;
    o.chunk_size = kChunk;
    o.io = io;
    return o;
  }
  std::string prefix = UniquePrefix();
  testing::TempDir tmp;
  const std::atomic<bool> no_cancel{false};
};

// ---- chunk boundaries, in every mode ----

struct FillCase {
  std::uint64_t size;
  IoMode io;
  std::uint32_t threads;
  std::uint32_t prefault;
  FillMethod fill;
};

std::string ModeName(IoMode m) {
  return m == IoMode::kBuffered ? "buffered" : m == IoMode::kDirect ? "direct" : "auto";
}

class ChunkBoundaries : public Fixture, public ::testing::WithParamInterface<FillCase> {};

TEST_P(ChunkBoundaries, FillsByteExactWithTheFileChecksum) {
  const FillCase c = GetParam();
  const std::string dir = tmp.file("m");
  ASSERT_TRUE(WriteModelOfSize(dir, c.size).ok());
  LoaderOptions o = Options(c.threads, c.io);
  o.prefault_threads = c.prefault;
  o.fill = c.fill;
  o.write_buffer = 1000;  // rounded up to 4096: a piece per 4096-byte chunk
  Loader loader(o);
  auto m = loader.LoadHost({"m", dir}, 1, no_cancel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ExpectMatchesFile(**m);
  EXPECT_EQ((*m)->bytes, c.size);
  EXPECT_EQ(loader.bytes_read(), c.size);
  if (c.io == IoMode::kDirect && c.size > 0 && SupportsDirect(tmp.path())) {
    EXPECT_TRUE((*m)->shards[0].direct_io) << "the temp dir supports O_DIRECT";
  }
  if (c.io == IoMode::kBuffered) {
    EXPECT_FALSE((*m)->shards[0].direct_io);
  }
}

std::vector<FillCase> FillCases() {
  std::vector<FillCase> out;
  for (std::uint64_t size : {std::uint64_t{0}, std::uint64_t{1}, kChunk - 1, kChunk, kChunk + 1, 3 * kChunk + 777})
    for (IoMode io : {IoMode::kBuffered, IoMode::kDirect, IoMode::kAuto})
      for (std::uint32_t threads : {1u, 3u})
        for (FillMethod fill : {FillMethod::kWrite, FillMethod::kMap})
          out.push_back({size, io, threads, threads == 3 ? 2u : 0u, fill});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Loader, ChunkBoundaries, ::testing::ValuesIn(FillCases()),
                         [](const ::testing::TestParamInfo<FillCase>& i) {
                           return "size" + std::to_string(i.param.size) + "_" + ModeName(i.param.io) + "_threads" +
                                  std::to_string(i.param.threads) + "_prefault" + std::to_string(i.param.prefault) +
                                  (i.param.fill == FillMethod::kWrite ? "_write" : "_map");
                         });

TEST_F(Fixture, DirectModeUsesODirectWhereTheFilesystemSupportsIt) {
  if (!SupportsDirect(tmp.path())) GTEST_SKIP() << tmp.path() << " does not support O_DIRECT";
  // Unaligned data section (the bounce-buffer path) and a block-aligned one (read in place).
  const std::string base = st::BuildHeaderJson({{"w", DType::kU8, {5 * 4096 + 3}}}, {{"pad", ""}});
  const std::size_t aligned_pad = 4096 - 8 - base.size() - 4;  // json padded to 8 -> 4088 bytes
  for (std::size_t pad : {std::size_t{0}, std::size_t{13}, aligned_pad}) {
    const std::string dir = tmp.file("d" + std::to_string(pad));
    ASSERT_TRUE(WriteModelOfSize(dir, 5 * 4096 + 3, pad).ok());
    Loader loader(Options(3, IoMode::kDirect));
    auto m = loader.LoadHost({"d", dir}, pad, no_cancel);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    if (pad == aligned_pad) {
      EXPECT_EQ((*m)->shards[0].header.data_offset, 4096u);
    } else {
      EXPECT_NE((*m)->shards[0].header.data_offset % 4096, 0u);
    }
    EXPECT_TRUE((*m)->shards[0].direct_io);
    ExpectMatchesFile(**m);
  }
}

// tmpfs refused O_DIRECT before Linux 6.6 and accepts it since; either way the fill is exact
// and reports what it used.
TEST_F(Fixture, DirectModeOnTmpfsUsesWhatTheKernelOffers) {
  ShmDir shm;
  ASSERT_FALSE(shm.path().empty());
  const bool direct = SupportsDirect(shm.path());
  const std::string dir = shm.path() + "/m";
  ASSERT_TRUE(WriteModelOfSize(dir, 3 * kChunk + 5).ok());
  Loader loader(Options(2, IoMode::kDirect));
  auto m = loader.LoadHost({"m", dir}, 1, no_cancel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ((*m)->shards[0].direct_io, direct);
  ExpectMatchesFile(**m);
}

// A filesystem without O_DIRECT: open(O_DIRECT) fails with EINVAL.
class DirectOpenRefused : public FileIo {
 public:
  Result<posix::Fd> Open(const std::string& path, int flags) override {
    if (flags & O_DIRECT) {
      ++refused;
      return posix::ErrnoStatus("open(" + path + ", O_DIRECT)", EINVAL);
    }
    return FileIo::Open(path, flags);
  }
  std::atomic<int> refused{0};
};

TEST_F(Fixture, SymbolicLinksInsideTheModelDirectoryAreRefused) {
  // The real files live elsewhere; the model directory holds links to them.
  const std::string real = tmp.file("real");
  ASSERT_TRUE(WriteModelOfSize(real, 3 * kChunk).ok());
  const std::string dir = tmp.file("linked");
  ASSERT_TRUE(posix::MakeDirs(dir).ok());
  ASSERT_EQ(::symlink((real + "/model.safetensors").c_str(), (dir + "/model.safetensors").c_str()), 0);
  Loader loader(Options(2, IoMode::kBuffered));
  auto m = loader.LoadHost({"m", dir}, 1, no_cancel);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kFailedPrecondition) << m.status().ToString();
  EXPECT_EQ(m.status().reason(), "loader.symlink");
  EXPECT_NE(m.status().message().find("symbolic link"), std::string::npos);
  EXPECT_TRUE(ListSegments(prefix).empty());

  // A linked index is refused too, not silently ignored.
  const std::string dir2 = tmp.file("linked-index");
  ASSERT_TRUE(posix::MakeDirs(dir2).ok());
  ASSERT_EQ(::symlink((real + "/model.safetensors").c_str(), (dir2 + "/model.safetensors.index.json").c_str()), 0);
  EXPECT_EQ(loader.Plan({"m2", dir2}).status().reason(), "loader.symlink");

  // The model's own path may be a link: the operator chose it.
  const std::string dir3 = tmp.file("dir-link");
  ASSERT_EQ(::symlink(real.c_str(), dir3.c_str()), 0);
  auto ok = loader.LoadHost({"m3", dir3}, 2, no_cancel);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  (*ok)->RemoveSegments();
}

TEST_F(Fixture, DirectOpenRefusedWithEinvalFallsBackToBuffered) {
  const std::string dir = tmp.file("m");
  ASSERT_TRUE(WriteModelOfSize(dir, 3 * kChunk + 5).ok());
  DirectOpenRefused io;
  LoaderOptions o = Options(2, IoMode::kDirect);
  o.io_layer = &io;
  Loader loader(o);
  auto m = loader.LoadHost({"m", dir}, 1, no_cancel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(io.refused.load(), 1);
  EXPECT_FALSE((*m)->shards[0].direct_io);
  ExpectMatchesFile(**m);
}

// A layer whose O_DIRECT reads fail with EINVAL although the open succeeded, as on some
// filesystems: the loader must read buffered instead.
class DirectReadRefused : public FileIo {
 public:
  Result<posix::Fd> Open(const std::string& path, int flags) override {
    auto fd = FileIo::Open(path, flags & ~O_DIRECT);
    if (fd.ok() && (flags & O_DIRECT)) {
      std::lock_guard lock(mu_);
      direct_fds_.push_back(fd->get());
    }
    return fd;
  }
  Result<std::size_t> Pread(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what) override {
    {
      std::lock_guard lock(mu_);
      for (int d : direct_fds_)
        if (d == fd) {
          ++refused;
          return posix::ErrnoStatus("pread(O_DIRECT)", EINVAL);
        }
    }
    return FileIo::Pread(fd, out, offset, what);
  }
  std::atomic<int> refused{0};

 private:
  std::mutex mu_;
  std::vector<int> direct_fds_;
};

TEST_F(Fixture, DirectReadRefusedWithEinvalFallsBackToBuffered) {
  const std::string dir = tmp.file("m");
  ASSERT_TRUE(WriteModelOfSize(dir, 4 * kChunk + 1).ok());
  DirectReadRefused io;
  LoaderOptions o = Options(2, IoMode::kDirect);
  o.io_layer = &io;
  Loader loader(o);
  auto m = loader.LoadHost({"m", dir}, 1, no_cancel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_GE(io.refused.load(), 1);
  EXPECT_FALSE((*m)->shards[0].direct_io);
  ExpectMatchesFile(**m);
}

TEST_F(Fixture, LoadsEveryShardOfAShardedModel) {
  const std::string dir = tmp.file("s");
  ASSERT_TRUE(testing::WriteShardedModel(dir, testing::SmallTensors(40), 3, 5).ok());
  Loader loader(Options(3, IoMode::kAuto));
  auto m = loader.LoadHost({"s", dir}, 1, no_cancel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ASSERT_EQ((*m)->shards.size(), 3u);
  ExpectMatchesFile(**m);
  EXPECT_EQ(ListSegments(prefix).size(), 3u);
}

// ---- write fill against map fill ----

// The bytes of every shard's segment, the page-rounded tail included.
std::vector<std::vector<std::byte>> SegmentBytes(const ResidentModel& m) {
  std::vector<std::vector<std::byte>> out;
  for (const ResidentShard& s : m.shards)
    out.emplace_back(s.segment.data(), s.segment.data() + s.segment.mapped_size());
  return out;
}

TEST_F(Fixture, WriteFillAndMapFillMakeByteIdenticalSegments) {
  // Several shards; the data sections start at offsets that are not multiples of 8 KiB, the
  // chunks (16 KiB) hold several write pieces (4 KiB) and end mid-piece at each shard's end.
  const std::string dir = tmp.file("s");
  ASSERT_TRUE(testing::WriteShardedModel(dir, {{"a", DType::kU8, {70001}}, {"b", DType::kBF16, {3, 9999}},
                                              {"c", DType::kF32, {12345}}, {"d", DType::kU8, {1}}},
                                         3, 11).ok());
  for (IoMode io : {IoMode::kBuffered, IoMode::kDirect}) {
    std::vector<std::vector<std::byte>> bytes[2];
    std::vector<XXH128_hash_t> sums[2];
    int k = 0;
    for (FillMethod fill : {FillMethod::kWrite, FillMethod::kMap}) {
      LoaderOptions o = Options(3, io);
      o.chunk_size = 4 * kChunk;
      o.write_buffer = kChunk;
      o.fill = fill;
      Loader loader(o);
      auto m = loader.LoadHost({"s", dir}, static_cast<std::uint64_t>(k + 1), no_cancel);
      ASSERT_TRUE(m.ok()) << m.status().ToString();
      ASSERT_GE((*m)->shards.size(), 2u);
      ExpectMatchesFile(**m);
      bytes[k] = SegmentBytes(**m);
      for (const ResidentShard& sh : (*m)->shards) sums[k].push_back(sh.checksum);
      // Every page of a write-filled segment is allocated: none is left for a later SIGBUS.
      for (const ResidentShard& sh : (*m)->shards) {
        struct stat st {};
        ASSERT_EQ(::stat(("/dev/shm/" + sh.segment.name()).c_str(), &st), 0);
        EXPECT_EQ(static_cast<std::uint64_t>(st.st_blocks) * 512, sh.segment.mapped_size()) << sh.file;
        EXPECT_EQ(sh.segment.part_fd(0), -1) << "a resident copy keeps no fds";
      }
      (*m)->RemoveSegments();
      ++k;
    }
    ASSERT_EQ(bytes[0].size(), bytes[1].size());
    for (std::size_t i = 0; i < bytes[0].size(); ++i) {
      EXPECT_TRUE(bytes[0][i] == bytes[1][i]) << "shard " << i << ", " << ModeName(io);
      EXPECT_TRUE(XXH128_isEqual(sums[0][i], sums[1][i])) << "shard " << i;
    }
  }
}

// A copy split into parts (several tmpfs files per shard, mapped back to back) holds the same
// bytes and checksums as one file per shard, with every method and hash source; each part is a
// file of its size, all of it allocated, and removing the copy removes every part.
TEST_F(Fixture, FillIntoPartsMatchesTheFilesWithEveryMethod) {
  const std::string dir = tmp.file("parts");
  // Two shards of about 5.3 and 2.1 MiB behind unaligned headers: 2 MiB parts cut the first in
  // three (the last part short) and the second in two.
  ASSERT_TRUE(testing::WriteShardedModel(dir, {{"a", DType::kU8, {5'500'001}}, {"b", DType::kF32, {550'003}}}, 2, 13)
                  .ok());
  SegmentStore store({prefix, 0600, static_cast<gid_t>(-1), /*max_parts=*/64, /*min_part_bytes=*/2ull << 20});
  struct Case {
    FillMethod fill;
    HashSource hash;
  };
  std::uint64_t gen = 1;
  for (Case c : {Case{FillMethod::kWrite, HashSource::kMapping}, Case{FillMethod::kWrite, HashSource::kReadBack},
                 Case{FillMethod::kMap, HashSource::kMapping}}) {
    LoaderOptions o = Options(4);
    o.segments = &store;
    o.chunk_size = 768 << 10;  // 2 MiB parts end inside a chunk: the fill cuts it there
    o.write_buffer = 256 << 10;
    o.fill = c.fill;
    o.hash_source = c.hash;
    Loader loader(o);
    auto m = loader.LoadHost({"parts", dir}, gen++, no_cancel);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    ASSERT_EQ((*m)->shards.size(), 2u);
    ExpectMatchesFile(**m);
    std::size_t files = 0;
    for (const ResidentShard& sh : (*m)->shards) {
      EXPECT_EQ(sh.segment.part_size(), 2ull << 20);
      const std::vector<std::string> names = sh.segment.part_names();
      EXPECT_EQ(names.size(), (sh.segment.mapped_size() + (2ull << 20) - 1) / (2ull << 20));
      std::uint64_t total = 0;
      for (const std::string& n : names) {
        struct stat st {};
        ASSERT_EQ(::stat(("/dev/shm/" + n).c_str(), &st), 0) << n;
        EXPECT_LE(static_cast<std::uint64_t>(st.st_size), 2ull << 20) << n;
        EXPECT_EQ(static_cast<std::uint64_t>(st.st_blocks) * 512, static_cast<std::uint64_t>(st.st_size)) << n;
        EXPECT_EQ(st.st_mode & 07777, 0600u) << n;
        total += static_cast<std::uint64_t>(st.st_size);
      }
      EXPECT_EQ(total, sh.segment.mapped_size());
      files += names.size();
    }
    EXPECT_EQ(files, 5u);
    EXPECT_EQ(ListSegments(prefix).size(), 5u);
    // The same copy through a fresh mapping of its parts (what adoption does).
    const ResidentShard& first = (*m)->shards[0];
    auto again = store.Open(first.segment.name(), first.segment.data_size(), first.segment.part_size());
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    EXPECT_EQ(0, std::memcmp(again->data(), first.segment.data(), first.segment.data_size()));
    (*m)->RemoveSegments();
    EXPECT_TRUE(ListSegments(prefix).empty());
  }
}

// Without a manifest the readers hash the 1 MiB blocks they read, in any order (FillTimes counts
// it), and the checksum is the file's block checksum whichever fill method ran.
TEST_F(Fixture, ReadersHashTheirBlocksWhenNoManifestNamesTheFile) {
  const std::string dir = tmp.file("b");
  ASSERT_TRUE(testing::WriteShardedModel(dir, {{"a", DType::kU8, {5'000'003}}, {"b", DType::kF32, {900'001}}}, 2, 17)
                  .ok());
  std::uint64_t gen = 1;
  for (FillMethod fill : {FillMethod::kWrite, FillMethod::kMap}) {
    LoaderOptions o = Options(3);
    o.chunk_size = 2ull << 20;
    o.write_buffer = 1ull << 20;
    o.fill = fill;
    Loader loader(o);
    auto m = loader.LoadHost({"b", dir}, gen++, no_cancel);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    for (const ResidentShard& sh : (*m)->shards) EXPECT_TRUE(sh.block_checksum);
    ExpectMatchesFile(**m);
    EXPECT_GT((*m)->fill_times.hash_ns, 0u) << "the readers hashed no block";
    (*m)->RemoveSegments();
  }
}

// A write fill hashes the chunks that finish out of order from either source (HashSource); the
// checksum is the file's either way, with many small chunks over several readers so that most
// bytes are not the next ones the hash needs when they land.
TEST_F(Fixture, WriteFillHashesOutOfOrderChunksFromEitherSource) {
  const std::string dir = tmp.file("h");
  ASSERT_TRUE(testing::WriteShardedModel(dir, {{"a", DType::kU8, {200003}}, {"b", DType::kBF16, {2, 50001}}}, 2, 9).ok());
  for (HashSource source : {HashSource::kReadBack, HashSource::kMapping}) {
    LoaderOptions o = Options(4);
    o.chunk_size = 2 * kChunk;
    o.write_buffer = kChunk;
    o.hash_source = source;
    Loader loader(o);
    auto m = loader.LoadHost({"h", dir}, static_cast<std::uint64_t>(source) + 1, no_cancel);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    ExpectMatchesFile(**m);
    (*m)->RemoveSegments();
  }
}

// kAuto measures both sources once, in the Loader's constructor, picks the cheaper, and leaves
// nothing behind; the fills use the pick.
TEST_F(Fixture, AutoHashSourceProbesOnceAndPicksTheCheaper) {
  LoaderOptions o = Options(2);
  o.hash_source = HashSource::kAuto;
  Loader loader(o);
  ASSERT_TRUE(loader.hash_probe().has_value());
  const HashSourceProbe& p = *loader.hash_probe();
  ASSERT_TRUE(p.error.empty()) << p.error;
  EXPECT_GT(p.touch_ns_per_page, 0);
  EXPECT_GT(p.read_ns_per_page, 0);
  EXPECT_EQ(loader.hash_source(), p.touch_ns_per_page < p.read_ns_per_page ? HashSource::kMapping : HashSource::kReadBack);
  EXPECT_TRUE(ListSegments(prefix).empty());
  const std::string dir = tmp.file("a");
  ASSERT_TRUE(WriteModelOfSize(dir, 5 * kChunk + 3).ok());
  auto m = loader.LoadHost({"a", dir}, 1, no_cancel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ExpectMatchesFile(**m);
  // An explicit source is used as set, without a probe.
  LoaderOptions fixed = Options(2);
  fixed.hash_source = HashSource::kReadBack;
  Loader plain(fixed);
  EXPECT_FALSE(plain.hash_probe().has_value());
  EXPECT_EQ(plain.hash_source(), HashSource::kReadBack);
}

TEST_F(Fixture, FillTimesSayWhereTheReadersSpentTheirTime) {
  const std::string dir = tmp.file("t");
  // Shard a holds 1 MiB blocks for the readers to hash (no manifest: block checksums).
  ASSERT_TRUE(testing::WriteShardedModel(dir, {{"a", DType::kU8, {3'100'001}}, {"b", DType::kF32, {70000}}}, 2, 5).ok());
  for (FillMethod fill : {FillMethod::kWrite, FillMethod::kMap}) {
    SCOPED_TRACE(fill == FillMethod::kWrite ? "write fill" : "map fill");
    LoaderOptions o = Options(3);
    o.chunk_size = 1ull << 20;
    o.write_buffer = 256 * kChunk;
    o.fill = fill;
    Loader loader(o);
    auto m = loader.LoadHost({"t", dir}, fill == FillMethod::kWrite ? 1 : 2, no_cancel);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    const FillTimes& t = (*m)->fill_times;
    EXPECT_EQ(t.readers, 3u);
    EXPECT_GT(t.wall_ns, 0u);
    EXPECT_GT(t.read_ns, 0u);
    EXPECT_GT(t.hash_ns, 0u);
    if (fill == FillMethod::kWrite) {
      EXPECT_GT(t.write_ns, 0u);
      EXPECT_EQ(t.populate_ns, 0u);  // a write fill maps no page
    } else {
      EXPECT_EQ(t.write_ns, 0u);     // a map fill's preads write into the segment
      EXPECT_GT(t.populate_ns, 0u);
    }
    // Each reader's timed parts are disjoint and inside the fill.
    EXPECT_LE(t.read_ns + t.write_ns + t.populate_ns + t.hash_ns, std::uint64_t{t.readers} * t.wall_ns);
    EXPECT_NE(t.Summary().find("3 readers: read "), std::string::npos) << t.Summary();
    (*m)->RemoveSegments();
  }
  EXPECT_EQ(FillTimes{}.Summary(), "0 readers");
}

TEST(SegmentStoreHugePages, NamesTheDevShmMountsSetting) {
  // Every value the tmpfs huge= option takes, "never" when it is absent; this machine has a
  // /dev/shm, so never "unknown".
  const std::string huge = SegmentStore::HugePages();
  EXPECT_TRUE(huge == "never" || huge == "always" || huge == "within_size" || huge == "advise") << huge;
}

// Writes into segments fail with ENOSPC once `room` bytes have been written in all, as tmpfs
// does when /dev/shm is full.
class FullShmIo : public FileIo {
 public:
  explicit FullShmIo(std::uint64_t room) : room_(room) {}
  Status Pwrite(int fd, std::span<const std::byte> in, std::uint64_t offset, std::string_view what) override {
    if (written_.fetch_add(in.size()) + in.size() > room_) {
      ++failures;
      return posix::ErrnoStatus("pwrite(" + std::string(what) + ") [injected]", ENOSPC);
    }
    return FileIo::Pwrite(fd, in, offset, what);
  }
  std::atomic<int> failures{0};

 private:
  const std::uint64_t room_;
  std::atomic<std::uint64_t> written_{0};
};

TEST_F(Fixture, FullShmDuringAWriteFillIsNoSpaceAndLeaksNoSegment) {
  const std::string dir = tmp.file("s");
  ASSERT_TRUE(testing::WriteShardedModel(dir, {{"a", DType::kU8, {40000}}, {"b", DType::kU8, {40000}}}, 2, 3).ok());
  // A model already resident stays whole.
  const std::string other = tmp.file("o");
  ASSERT_TRUE(WriteModelOfSize(other, 3 * kChunk + 5).ok());
  Loader plain(Options());
  auto kept = plain.LoadHost({"o", other}, 1, no_cancel);
  ASSERT_TRUE(kept.ok()) << kept.status().ToString();

  FullShmIo full(5 * kChunk);
  LoaderOptions o = Options(3);
  o.io_layer = &full;
  Loader loader(o);
  auto progress = std::make_shared<LoadProgress>();
  auto plan = loader.Plan({"s", dir});
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  auto m = loader.Fill(std::move(plan).value(), 2, no_cancel, progress);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kResourceExhausted) << m.status().ToString();
  EXPECT_EQ(m.status().reason(), "shm.no_space");
  EXPECT_NE(m.status().message().find("[injected]"), std::string::npos) << m.status().ToString();
  EXPECT_GE(full.failures.load(), 1);
  EXPECT_EQ(progress->Wait().reason(), "shm.no_space");
  // Only the resident model's segment is left, with its bytes.
  EXPECT_EQ(ListSegments(prefix), std::vector<std::string>{(*kept)->shards[0].segment.name()});
  ExpectMatchesFile(**kept);
}

TEST_F(Fixture, FullShmDuringAFillIntoPartsLeaksNoPart) {
  const std::string dir = tmp.file("s");
  ASSERT_TRUE(WriteModelOfSize(dir, (5ull << 20) + 77).ok());
  SegmentStore store({prefix, 0600, static_cast<gid_t>(-1), /*max_parts=*/64, /*min_part_bytes=*/2ull << 20});
  FullShmIo full(3ull << 20);  // room for a part and a half
  LoaderOptions o = Options(3);
  o.segments = &store;
  o.chunk_size = 1ull << 20;
  o.io_layer = &full;
  Loader loader(o);
  auto m = loader.LoadHost({"s", dir}, 1, no_cancel);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().reason(), "shm.no_space") << m.status().ToString();
  EXPECT_TRUE(ListSegments(prefix).empty());
}

// Parts are whole 2 MiB multiples; a part name that exists (not this store's to remove) fails
// the segment, which removes the parts it made and leaves that name alone.
TEST_F(Fixture, HostSegmentPartsAreCheckedAndAFailedOneLeavesNoPartOfItsOwn) {
  EXPECT_EQ(HostSegment::Create(prefix + ".x.0", 5ull << 20, 0600, static_cast<gid_t>(-1), true, 4096).status().reason(),
            "shm.bad_part_size");
  EXPECT_EQ(HostSegment::Open(prefix + ".x.0", 5ull << 20, 0600, static_cast<gid_t>(-1), 3ull << 20).status().reason(),
            "shm.bad_part_size");
  const std::string name = prefix + ".y.0";
  const std::string planted = HostSegment::PartName(name, 2);
  EXPECT_EQ(planted, name + "~2");
  auto other = HostSegment::Create(planted, 100, 0600);
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  auto seg = HostSegment::Create(name, 5ull << 20, 0600, static_cast<gid_t>(-1), true, 2ull << 20);
  ASSERT_FALSE(seg.ok());
  EXPECT_EQ(seg.status().reason(), "shm.exists");
  EXPECT_EQ(ListSegments(prefix), std::vector<std::string>{planted});
  // One part holds a segment no larger than a part: its name is the segment's.
  auto one = HostSegment::Create(prefix + ".z.0", 2ull << 20, 0600, static_cast<gid_t>(-1), true, 2ull << 20);
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  EXPECT_EQ(one->part_size(), 0u);
  EXPECT_EQ(one->part_names(), std::vector<std::string>{prefix + ".z.0"});
  // The mapping of several parts is one range, aligned for huge pages.
  auto three = HostSegment::Create(prefix + ".w.0", 5ull << 20, 0600, static_cast<gid_t>(-1), true, 2ull << 20);
  ASSERT_TRUE(three.ok()) << three.status().ToString();
  EXPECT_EQ(three->parts(), 3u);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(three->data()) % (2ull << 20), 0u);
  std::memset(three->data(), 0x5a, 5ull << 20);
  auto reopened = HostSegment::Open(prefix + ".w.0", 5ull << 20, 0600, static_cast<gid_t>(-1), 2ull << 20);
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  EXPECT_EQ(reopened->data()[(5ull << 20) - 1], std::byte{0x5a});
  EXPECT_EQ(reopened->data()[(2ull << 20)], std::byte{0x5a});
  // A part of the wrong size is not one this daemon made.
  ASSERT_EQ(::truncate(("/dev/shm/" + HostSegment::PartName(prefix + ".w.0", 1)).c_str(), 4096), 0);
  EXPECT_EQ(HostSegment::Open(prefix + ".w.0", 5ull << 20, 0600, static_cast<gid_t>(-1), 2ull << 20).status().reason(),
            "shm.not_adoptable");
  three->Unlink();
  for (const std::string& n : ListSegments(prefix)) EXPECT_TRUE(n == planted || n == prefix + ".z.0") << n;
}

// A real full /dev/shm: a child process mounts a 64 KiB tmpfs over /dev/shm in a private mount
// namespace and loads a 256 KiB model with each fill method. Needs CAP_SYS_ADMIN (root, or a
// user namespace the test can make); skipped where it has neither.
TEST_F(Fixture, RealFullShmIsNoSpaceForBothFillMethods) {
  const std::string dir = tmp.file("m");
  ASSERT_TRUE(WriteModelOfSize(dir, 256 * 1024).ok());
  if (dir.rfind("/dev/shm", 0) == 0) GTEST_SKIP() << "the temp dir is in /dev/shm";
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(pipefd[0]);
    auto say = [&](const std::string& line) { (void)!::write(pipefd[1], line.data(), line.size()); };
    const uid_t uid = ::geteuid();
    const gid_t gid = ::getegid();
    if (::unshare(CLONE_NEWNS) != 0) {
      // Not root: a user namespace where this uid is root, if the kernel allows one.
      if (::unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0) {
        say("skip: unshare: " + std::string(std::strerror(errno)));
        ::_exit(0);
      }
      auto put = [](const char* path, const std::string& text) {
        int fd = ::open(path, O_WRONLY | O_CLOEXEC);
        bool ok = fd >= 0 && ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
        if (fd >= 0) ::close(fd);
        return ok;
      };
      if (!put("/proc/self/setgroups", "deny") || !put("/proc/self/uid_map", "0 " + std::to_string(uid) + " 1") ||
          !put("/proc/self/gid_map", "0 " + std::to_string(gid) + " 1")) {
        say("skip: cannot map ids in a user namespace");
        ::_exit(0);
      }
    }
    if (::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        ::mount("tmpfs", "/dev/shm", "tmpfs", 0, "size=64k,mode=1777") != 0) {
      say("skip: mount: " + std::string(std::strerror(errno)));
      ::_exit(0);
    }
    int bad = 0;
    for (FillMethod fill : {FillMethod::kWrite, FillMethod::kMap}) {
      LoaderOptions o = Options(2);
      o.fill = fill;
      Loader loader(o);
      auto m = loader.LoadHost({"m", dir}, 1, no_cancel);
      const std::string what = fill == FillMethod::kWrite ? "write" : "map";
      if (m.ok()) {
        say(what + ": loaded 256 KiB into a 64 KiB /dev/shm\n");
        ++bad;
      } else if (m.status().reason() != "shm.no_space" || m.status().code() != Code::kResourceExhausted) {
        say(what + ": " + m.status().ToString() + "\n");
        ++bad;
      }
      if (!ListSegments(prefix).empty()) {
        say(what + ": segments left behind\n");
        ++bad;
      }
    }
    ::_exit(bad == 0 ? 0 : 1);
  }
  ::close(pipefd[1]);
  std::string out;
  char buf[512];
  for (ssize_t n; (n = ::read(pipefd[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<std::size_t>(n));
  ::close(pipefd[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  if (out.rfind("skip:", 0) == 0) GTEST_SKIP() << out;
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
}

// ---- Plan ----

TEST_F(Fixture, PlanOpensAndChecksWithoutCreatingSegments) {
  const std::string dir = tmp.file("s");
  const auto tensors = testing::SmallTensors(12);
  ASSERT_TRUE(testing::WriteShardedModel(dir, tensors, 2, 5).ok());
  Loader loader(Options());
  auto plan = loader.Plan({"s", dir});
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  std::uint64_t bytes = 0;
  for (const auto& t : tensors) bytes += t.nbytes();
  EXPECT_EQ(plan->bytes, bytes);
  EXPECT_EQ(plan->tensor_count, 12u);
  ASSERT_EQ(plan->shards.size(), 2u);
  for (const auto& s : plan->shards) EXPECT_TRUE(s.fd.valid());
  EXPECT_FALSE(plan->has_manifest);
  EXPECT_TRUE(ListSegments(prefix).empty());
  auto m = loader.Fill(std::move(plan).value(), 3, no_cancel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ((*m)->bytes, bytes);
  EXPECT_EQ((*m)->shards[1].segment.name(), loader.SegmentName("s", 3, 1));
  ExpectMatchesFile(**m);
}

// ---- checksums and the manifest ----

// stdout of `sh -c cmd`, or "" if it failed (xxh128sum not installed).
std::string RunShell(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(("(" + cmd + ") 2>/dev/null").c_str(), "r");
  if (p == nullptr) return out;
  char buf[512];
  while (std::fgets(buf, sizeof buf, p) != nullptr) out += buf;
  return ::pclose(p) == 0 ? out : std::string();
}

// A shard the manifest names is hashed whole, in file order, as xxh128sum does; one it does not
// name gets the block checksum, hashed by the readers in any order.
TEST_F(Fixture, ChecksumIsWhatXxh128sumPrints) {
  const std::string dir = tmp.file("m");
  ASSERT_TRUE(WriteModelOfSize(dir, (3ull << 20) + 11).ok());
  const std::string path = dir + "/model.safetensors";
  LoaderOptions o = Options(3);
  o.chunk_size = 768 << 10;  // chunks end inside 1 MiB blocks: those are hashed after the fill
  {
    Loader loader(o);
    auto m = loader.LoadHost({"m", dir}, 1, no_cancel);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    EXPECT_TRUE((*m)->shards[0].block_checksum);
    const std::vector<std::byte> file = ReadAll(path);
    EXPECT_EQ((*m)->shards[0].checksum_hex(), ChecksumHex(BlockChecksumOfFile(file, (*m)->shards[0].header.data_offset)));
    (*m)->RemoveSegments();
  }
  std::ofstream(dir + "/checksums.xxh128") << ChecksumHex(HashOfFile(path)) << "  model.safetensors\n";
  Loader loader(o);
  auto m = loader.LoadHost({"m", dir}, 2, no_cancel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_FALSE((*m)->shards[0].block_checksum);
  EXPECT_TRUE((*m)->shards[0].verified);
  EXPECT_EQ((*m)->shards[0].checksum_hex(), ChecksumHex(HashOfFile(path)));
  const std::string tool = RunShell("xxh128sum '" + path + "'");
  if (tool.empty()) GTEST_SKIP() << "xxh128sum is not installed (Debian package xxhash); compared with XXH3_128bits only";
  EXPECT_EQ(tool, (*m)->shards[0].checksum_hex() + "  " + path + "\n");
}

TEST(ChecksumHex, RoundTripsAndRejectsNonHex) {
  const XXH128_hash_t h{0x0123456789abcdefull, 0xfedcba9876543210ull};  // low64, high64
  EXPECT_EQ(ChecksumHex(h), "fedcba98765432100123456789abcdef");  // canonical: high64 first
  auto back = ParseChecksumHex("FEDCBA98765432100123456789ABCDEF");
  ASSERT_TRUE(back.has_value());
  EXPECT_TRUE(XXH128_isEqual(*back, h));
  EXPECT_FALSE(ParseChecksumHex("fedcba98765432100123456789abcde").has_value());
  EXPECT_FALSE(ParseChecksumHex("gedcba98765432100123456789abcdef").has_value());
}

void WriteText(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

TEST_F(Fixture, ManifestThatMatchesVerifiesEveryShard) {
  const std::string dir = tmp.file("s");
  ASSERT_TRUE(testing::WriteShardedModel(dir, testing::SmallTensors(20), 2, 5).ok());
  const std::string a = "model-00001-of-00002.safetensors", b = "model-00002-of-00002.safetensors";
  // Both markers ("  " text, " *" binary), a "./" prefix, a CRLF, blank lines and an extra file.
  WriteText(dir + "/checksums.xxh128", ChecksumHex(HashOfFile(dir + "/" + a)) + "  ./" + a + "\r\n\n" +
                                           ChecksumHex(HashOfFile(dir + "/" + b)) + " *" + b + "\n" +
                                           std::string(32, '0') + "  config.json\n");
  Loader loader(Options());
  auto m = loader.LoadHost({"s", dir}, 1, no_cancel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  for (const auto& s : (*m)->shards) EXPECT_TRUE(s.verified) << s.file;
}

TEST_F(Fixture, ManifestWrittenByXxh128sumVerifies) {
  const std::string dir = tmp.file("s");
  ASSERT_TRUE(testing::WriteShardedModel(dir, testing::SmallTensors(20), 2, 5).ok());
  // xxh128sum names files as given on its command line, so run it in the directory.
  const std::string text = RunShell("cd '" + dir + "' && xxh128sum model-0000*.safetensors");
  if (text.empty()) GTEST_SKIP() << "xxh128sum is not installed (Debian package xxhash)";
  WriteText(dir + "/checksums.xxh128", text);
  Loader loader(Options());
  auto m = loader.LoadHost({"s", dir}, 1, no_cancel);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  for (const auto& s : (*m)->shards) EXPECT_TRUE(s.verified) << s.file;
}

TEST_F(Fixture, ManifestMismatchIsDataLossNamingTheFileAndLeavesNoSegment) {
  const std::string dir = tmp.file("m");
  ASSERT_TRUE(WriteModelOfSize(dir, 2 * kChunk + 9).ok());
  const std::string actual = ChecksumHex(HashOfFile(dir + "/model.safetensors"));
  std::string wrong = actual;
  wrong[5] = wrong[5] == '0' ? '1' : '0';
  WriteText(dir + "/checksums.xxh128", wrong + "  model.safetensors\n");
  auto progress = std::make_shared<LoadProgress>();
  Loader loader(Options());
  auto plan = loader.Plan({"m", dir});
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  EXPECT_TRUE(plan->has_manifest);
  auto m = loader.Fill(std::move(plan).value(), 1, no_cancel, progress);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kDataLoss);
  EXPECT_EQ(m.status().reason(), "loader.checksum_mismatch");
  EXPECT_NE(m.status().message().find("model.safetensors"), std::string::npos) << m.status().message();
  EXPECT_NE(m.status().message().find(wrong), std::string::npos) << m.status().message();
  EXPECT_NE(m.status().message().find(actual), std::string::npos) << m.status().message();
  EXPECT_TRUE(ListSegments(prefix).empty());
  EXPECT_EQ(progress->Wait().reason(), "loader.checksum_mismatch");

  // verify_manifest = false loads it anyway, with the block checksum (no manifest was read).
  LoaderOptions o = Options();
  o.verify_manifest = false;
  Loader lax(o);
  auto m2 = lax.LoadHost({"m", dir}, 2, no_cancel);
  ASSERT_TRUE(m2.ok()) << m2.status().ToString();
  EXPECT_FALSE((*m2)->shards[0].verified);
  EXPECT_TRUE((*m2)->shards[0].block_checksum);
  ExpectMatchesFile(**m2);
}

TEST_F(Fixture, MalformedManifestIsInvalidArgument) {
  const std::string dir = tmp.file("m");
  ASSERT_TRUE(WriteModelOfSize(dir, 100).ok());
  const std::string good = ChecksumHex(HashOfFile(dir + "/model.safetensors"));
  const std::vector<std::string> bad = {
      good.substr(0, 31) + "  model.safetensors\n",             // short hash
      std::string(31, 'a') + "z  model.safetensors\n",          // not hex
      good + " model.safetensors\n",                            // one space
      good + "  \n",                                            // no name
      "\\" + good + "  model.safetensors\n",                    // escaped name
      good + "  model.safetensors\n" + good + "  model.safetensors\n",  // listed twice
      "XXH128 (model.safetensors) = " + good + "\n",            // BSD tag style
  };
  Loader loader(Options());
  for (const auto& text : bad) {
    WriteText(dir + "/checksums.xxh128", text);
    auto m = loader.LoadHost({"m", dir}, 1, no_cancel);
    ASSERT_FALSE(m.ok()) << text;
    EXPECT_EQ(m.status().code(), Code::kInvalidArgument) << text;
    EXPECT_EQ(m.status().reason(), "loader.bad_manifest") << text;
    EXPECT_NE(m.status().message().find("checksums.xxh128:"), std::string::npos) << m.status().message();
  }
  EXPECT_TRUE(ListSegments(prefix).empty());
}

TEST_F(Fixture, ManifestThatOmitsAShardIsRefused) {
  const std::string dir = tmp.file("s");
  ASSERT_TRUE(testing::WriteShardedModel(dir, testing::SmallTensors(20), 2, 5).ok());
  const std::string a = "model-00001-of-00002.safetensors";
  WriteText(dir + "/checksums.xxh128", ChecksumHex(HashOfFile(dir + "/" + a)) + "  " + a + "\n");
  Loader loader(Options());
  auto m = loader.LoadHost({"s", dir}, 1, no_cancel);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(m.status().reason(), "loader.manifest_incomplete");
  EXPECT_NE(m.status().message().find("model-00002-of-00002.safetensors"), std::string::npos);
}

// ---- change detection ----

TEST_F(Fixture, ChangedDetectsSizeMtimeReplacementAndRemoval) {
  const std::string dir = tmp.file("m");
  const std::string path = dir + "/model.safetensors";
  ASSERT_TRUE(WriteModelOfSize(dir, 1000).ok());
  Loader loader(Options());
  auto load = [&] {
    auto m = loader.LoadHost({"m", dir}, 1, no_cancel);
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    auto r = *m;
    r->RemoveSegments();
    return r;
  };
  auto m = load();
  EXPECT_FALSE(*Loader::Changed(*m));

  // mtime only: same bytes, another timestamp.
  struct timespec ts[2] = {{0, UTIME_OMIT}, {1'000'000, 5}};
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), ts, 0), 0);
  EXPECT_TRUE(*Loader::Changed(*m));
  m = load();
  EXPECT_FALSE(*Loader::Changed(*m));

  // Size.
  ASSERT_TRUE(WriteModelOfSize(dir, 1001).ok());
  EXPECT_TRUE(*Loader::Changed(*m));
  m = load();

  // Replaced by a file of the same size and mtime (another inode).
  const auto info = posix::StatPath(path);
  ASSERT_TRUE(WriteModelOfSize(dir, 1001, 0, 99).ok());
  struct timespec same[2] = {{0, UTIME_OMIT}, {info->mtime_ns / 1'000'000'000, info->mtime_ns % 1'000'000'000}};
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), same, 0), 0);
  EXPECT_TRUE(*Loader::Changed(*m));
  m = load();

  ASSERT_EQ(::unlink(path.c_str()), 0);
  EXPECT_TRUE(*Loader::Changed(*m));
}

// ---- injected faults and cancellation ----

// Fails every read that reaches past `fail_at` in the file with EIO.
class FailingIo : public FileIo {
 public:
  explicit FailingIo(std::uint64_t fail_at) : fail_at_(fail_at) {}
  Result<std::size_t> Pread(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what) override {
    if (offset + out.size() > fail_at_) {
      ++failures;
      return posix::ErrnoStatus("pread(" + std::string(what) + ") [injected]", EIO);
    }
    return FileIo::Pread(fd, out, offset, what);
  }
  std::atomic<int> failures{0};

 private:
  const std::uint64_t fail_at_;
};

TEST_F(Fixture, ReadErrorMidFileFailsCleanlyAndLeaksNoSegment) {
  const std::string dir = tmp.file("s");
  ASSERT_TRUE(testing::WriteShardedModel(dir, {{"a", DType::kU8, {20000}}, {"b", DType::kU8, {20000}}}, 2, 3).ok());
  for (IoMode io : {IoMode::kBuffered, IoMode::kDirect}) {
    FailingIo failing(3 * kChunk);
    LoaderOptions o = Options(3, io);
    o.io_layer = &failing;
    o.prefault_threads = 1;
    Loader loader(o);
    auto progress = std::make_shared<LoadProgress>();
    auto plan = loader.Plan({"s", dir});
    ASSERT_TRUE(plan.ok()) << plan.status().ToString();
    auto m = loader.Fill(std::move(plan).value(), 1, no_cancel, progress);
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), Code::kDataLoss) << m.status().ToString();
    EXPECT_EQ(m.status().reason(), "errno.EIO");
    EXPECT_NE(m.status().message().find("[injected]"), std::string::npos);
    EXPECT_GE(failing.failures.load(), 1);
    EXPECT_TRUE(ListSegments(prefix).empty()) << ModeName(io);
    // The consumer learns the error; its mappings stay valid though the names are gone.
    EXPECT_EQ(progress->Wait().reason(), "errno.EIO");
    auto segs = progress->WaitSegments();
    ASSERT_TRUE(segs.ok());
    EXPECT_EQ(progress->WaitFilled(0, 20000).reason(), "errno.EIO");
    // Chunks 0 and 1 end before the failing offset, and a chunk once taken is always read.
    EXPECT_TRUE(progress->WaitFilled(0, 2 * kChunk).ok());
    EXPECT_EQ((*segs)->shards[0].segment.data()[0], testing::PatternByte(3, 0, 0));
  }
}

TEST_F(Fixture, CancelledLoadIsUnavailableAndLeaksNoSegment) {
  const std::string dir = tmp.file("m");
  ASSERT_TRUE(WriteModelOfSize(dir, 10 * kChunk).ok());
  Loader loader(Options(2));
  const std::atomic<bool> cancelled{true};
  auto m = loader.LoadHost({"m", dir}, 1, cancelled);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kUnavailable);
  EXPECT_EQ(m.status().reason(), "loader.cancelled");
  EXPECT_TRUE(ListSegments(prefix).empty());
}

// Sets `cancel` on the `n`-th data read.
class CancellingIo : public FileIo {
 public:
  CancellingIo(std::atomic<bool>& cancel, int n) : cancel_(cancel), n_(n) {}
  Result<std::size_t> Pread(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what) override {
    if (++reads_ == n_) cancel_ = true;
    return FileIo::Pread(fd, out, offset, what);
  }

 private:
  std::atomic<bool>& cancel_;
  const int n_;
  std::atomic<int> reads_{0};
};

TEST_F(Fixture, CancelMidLoadStopsAndLeaksNoSegment) {
  const std::string dir = tmp.file("m");
  ASSERT_TRUE(WriteModelOfSize(dir, 20 * kChunk).ok());
  std::atomic<bool> cancel{false};
  CancellingIo io(cancel, 3);  // read 1 is the header in Plan
  LoaderOptions o = Options(1);
  o.io_layer = &io;
  Loader loader(o);
  auto progress = std::make_shared<LoadProgress>();
  auto plan = loader.Plan({"m", dir});
  ASSERT_TRUE(plan.ok());
  auto m = loader.Fill(std::move(plan).value(), 1, cancel, progress);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().reason(), "loader.cancelled");
  EXPECT_LT(loader.bytes_read(), 20 * kChunk);
  EXPECT_TRUE(ListSegments(prefix).empty());
  EXPECT_EQ(progress->WaitFilled(0, 20 * kChunk).reason(), "loader.cancelled");
}

// ---- LoadProgress ----

TEST(LoadProgress, WaitFilledBlocksUntilTheWatermarkPassesTheEnd) {
  auto model = std::make_shared<ResidentModel>();
  model->shards.resize(2);
  const std::string prefix = UniquePrefix();
  auto seg = HostSegment::Create(prefix + ".p.0", 10000, 0600);
  ASSERT_TRUE(seg.ok());
  model->shards[0].segment = std::move(seg).value();
  LoadProgress p;
  auto waiter = std::async(std::launch::async, [&] { return p.WaitFilled(0, 8000); });
  EXPECT_EQ(waiter.wait_for(50ms), std::future_status::timeout);
  p.PublishSegments(model);
  p.SetFilled(0, 4096);
  EXPECT_EQ(waiter.wait_for(50ms), std::future_status::timeout);
  EXPECT_EQ(p.filled(0), 4096u);
  p.SetFilled(0, 2048);  // never moves back
  EXPECT_EQ(p.filled(0), 4096u);
  p.SetFilled(0, 8192);
  EXPECT_TRUE(waiter.get().ok());
  EXPECT_EQ(p.WaitFilled(1, 1).reason(), "loader.bad_range");  // shard 1 holds nothing
  EXPECT_EQ(p.WaitFilled(2, 0).reason(), "loader.bad_shard");
  EXPECT_TRUE(p.WaitSegments().ok());
  EXPECT_FALSE(p.done());
  p.Finish();
  EXPECT_TRUE(p.Wait().ok());
  (void)HostSegment::Remove(prefix + ".p.0");
}

TEST(LoadProgress, FailureWakesEveryWaiter) {
  LoadProgress p;
  auto segs = std::async(std::launch::async, [&] { return p.WaitSegments().status(); });
  auto filled = std::async(std::launch::async, [&] { return p.WaitFilled(0, 1); });
  auto done = std::async(std::launch::async, [&] { return p.Wait(); });
  EXPECT_EQ(segs.wait_for(50ms), std::future_status::timeout);
  p.Fail(DataLoss("disk on fire", "test.fire"));
  p.Fail(Internal("second error is ignored"));
  EXPECT_EQ(segs.get().reason(), "test.fire");
  EXPECT_EQ(filled.get().reason(), "test.fire");
  EXPECT_EQ(done.get().reason(), "test.fire");
}

TEST(LoadProgress, FailureAfterSegmentsWakesWaitersOnUnfilledBytes) {
  auto model = std::make_shared<ResidentModel>();
  model->shards.resize(1);
  const std::string prefix = UniquePrefix();
  auto seg = HostSegment::Create(prefix + ".p.0", 10000, 0600);
  ASSERT_TRUE(seg.ok());
  model->shards[0].segment = std::move(seg).value();
  LoadProgress p;
  p.PublishSegments(model);
  p.SetFilled(0, 100);
  auto waiter = std::async(std::launch::async, [&] { return p.WaitFilled(0, 5000); });
  EXPECT_EQ(waiter.wait_for(50ms), std::future_status::timeout);
  p.Fail(Unavailable("cancelled", "loader.cancelled"));
  EXPECT_EQ(waiter.get().reason(), "loader.cancelled");
  EXPECT_TRUE(p.WaitFilled(0, 100).ok());  // what was filled stays filled
  (void)HostSegment::Remove(prefix + ".p.0");
}

// Holds the read of the first chunk of the data section until released, so that the chunks
// after it finish first.
class GatedIo : public FileIo {
 public:
  explicit GatedIo(std::uint64_t gated_offset) : gated_(gated_offset) {}
  Result<std::size_t> Pread(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what) override {
    if (offset == gated_) gate_.get_future().wait();
    return FileIo::Pread(fd, out, offset, what);
  }
  void Release() { gate_.set_value(); }

 private:
  const std::uint64_t gated_;
  std::promise<void> gate_;
};

TEST_F(Fixture, ProgressWatermarkWaitsForOutOfOrderChunks) {
  const std::string dir = tmp.file("m");
  const std::uint64_t size = 6 * kChunk + 100;
  ASSERT_TRUE(WriteModelOfSize(dir, size).ok());
  Loader probe(Options());
  auto planned = probe.Plan({"m", dir});
  ASSERT_TRUE(planned.ok());
  GatedIo io(planned->shards[0].header.data_offset);
  LoaderOptions o = Options(2);
  o.io_layer = &io;
  Loader loader(o);
  auto progress = std::make_shared<LoadProgress>();
  auto plan = loader.Plan({"m", dir});
  ASSERT_TRUE(plan.ok());
  auto fill = std::async(std::launch::async, [&, p = std::move(plan).value()]() mutable {
    return loader.Fill(std::move(p), 1, no_cancel, progress);
  });
  auto segs = progress->WaitSegments();
  ASSERT_TRUE(segs.ok()) << segs.status().ToString();
  // The other reader does chunks 1..6 while chunk 0 is held.
  for (int i = 0; i < 500 && loader.bytes_read() < size - kChunk; ++i) std::this_thread::sleep_for(2ms);
  EXPECT_EQ(loader.bytes_read(), size - kChunk);
  EXPECT_EQ(progress->filled(0), 0u);
  auto waiter = std::async(std::launch::async, [&] { return progress->WaitFilled(0, 1); });
  EXPECT_EQ(waiter.wait_for(20ms), std::future_status::timeout);
  io.Release();
  EXPECT_TRUE(waiter.get().ok());
  EXPECT_TRUE(progress->WaitFilled(0, size).ok());
  EXPECT_EQ(progress->filled(0), size);
  auto m = fill.get();
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_TRUE(progress->Wait().ok());
  EXPECT_EQ(segs->get(), m->get());
  ExpectMatchesFile(**m);
}

}  // namespace
}  // namespace weightd
