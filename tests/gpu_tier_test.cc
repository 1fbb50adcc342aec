// GPU tier bookkeeping, chunking, export and import against the memfd-backed FakeCudaApi.
#include "gpu_tier.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <random>
#include <set>
#include <thread>

#include "gpu_import.h"
#include "support/fake_cuda.h"

namespace weightd::gpu {
namespace {

using testing::FakeCudaApi;

constexpr std::uint64_t kGranularity = 64 * 1024;
constexpr std::uint64_t kChunk = 16 * 1024;

// Page-aligned host memory filled with a seeded pattern, like an shm segment.
struct HostBuffer {
  explicit HostBuffer(std::uint64_t size, std::uint32_t seed) : size(size) {
    std::size_t map = std::max<std::uint64_t>(posix::RoundUp(size, posix::PageSize()), posix::PageSize());
    void* p = ::mmap(nullptr, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(p, MAP_FAILED);
    mapping = posix::Mapping(p, map);
    std::mt19937 rng(seed);
    for (std::uint64_t i = 0; i < size; ++i) mapping.data()[i] = static_cast<std::byte>(rng());
  }
  HostShard shard() const { return HostShard{mapping.data(), size}; }
  std::uint64_t size;
  posix::Mapping mapping;
};

std::vector<FakeCudaApi::Device> TwoDevices(std::uint64_t total = 64ull << 20) {
  return {FakeCudaApi::Device{"Fake A", "", total, true, true}, FakeCudaApi::Device{"Fake B", "", total, true, true}};
}

void ExpectNothingLive(const FakeCudaApi& fake) {
  auto c = fake.counters();
  EXPECT_EQ(c.live_allocations, 0);
  EXPECT_EQ(c.live_reservations, 0);
  EXPECT_EQ(c.live_mappings, 0);
  EXPECT_EQ(c.live_ipc_opens, 0);
  EXPECT_EQ(c.live_streams, 0);
  EXPECT_EQ(c.live_host_registrations, 0);
  EXPECT_EQ(c.live_pinned, 0);
  EXPECT_EQ(c.unsafe_host_releases, 0);
  EXPECT_EQ(c.bad_copies, 0);
}

std::vector<std::byte> ReadBack(const GpuCopy& copy, std::size_t shard) {
  std::vector<std::byte> out(copy.shards()[shard].data_size);
  EXPECT_TRUE(copy.CopyToHost(shard, 0, out).ok());
  return out;
}

bool SameBytes(const std::vector<std::byte>& got, const HostBuffer& want) {
  return got.size() == want.size && (want.size == 0 || std::memcmp(got.data(), want.mapping.data(), want.size) == 0);
}

TEST(GpuTier, HostOnlyTierRejectsGpuRequests) {
  GpuTier tier(nullptr);
  EXPECT_FALSE(tier.available());
  EXPECT_TRUE(tier.Devices().empty());
  auto r = tier.ResolveDevice("cuda:0");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kUnavailable);
  EXPECT_EQ(r.status().reason(), "gpu.no_device");
  EXPECT_NE(r.status().message().find("no CUDA device"), std::string::npos);
  HostBuffer b(100, 1);
  std::vector<HostShard> shards{b.shard()};
  auto m = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kUnavailable);
  EXPECT_EQ(m.status().reason(), "gpu.no_device");
}

TEST(GpuTier, ZeroDevicesMeansHostOnly) {
  FakeCudaApi fake({});
  GpuTier tier(&fake);
  EXPECT_FALSE(tier.available());
  EXPECT_EQ(tier.ResolveDevice("cuda:0").status().reason(), "gpu.no_device");
}

TEST(GpuTier, ListsDevicesWithUuidAndMemory) {
  FakeCudaApi fake(TwoDevices(32ull << 20));
  GpuTier tier(&fake);
  ASSERT_TRUE(tier.available());
  ASSERT_EQ(tier.Devices().size(), 2u);
  EXPECT_EQ(tier.Devices()[1].ordinal, 1);
  EXPECT_EQ(tier.Devices()[1].name, "Fake B");
  EXPECT_EQ(tier.Devices()[1].uuid, testing::FakeUuid(1));
  EXPECT_EQ(tier.Devices()[1].total_bytes, 32ull << 20);
  auto mem = tier.Memory(1);
  ASSERT_TRUE(mem.ok()) << mem.status().ToString();
  EXPECT_EQ(mem->free_bytes, 32ull << 20);
}

TEST(GpuTier, ResolvesDeviceNames) {
  FakeCudaApi fake(TwoDevices());
  GpuTier tier(&fake);
  EXPECT_EQ(*tier.ResolveDevice("cuda:0"), 0);
  EXPECT_EQ(*tier.ResolveDevice("cuda:1"), 1);
  EXPECT_EQ(*tier.ResolveDevice("cuda"), 0);
  EXPECT_EQ(*tier.ResolveDevice(testing::FakeUuid(1)), 1);
  std::string upper = testing::FakeUuid(1);
  std::transform(upper.begin(), upper.end(), upper.begin(), [](char c) { return std::toupper(c); });
  EXPECT_EQ(*tier.ResolveDevice(upper), 1);

  for (std::string bad : {"cuda:", "cuda:x", "cuda:-1", "cuda:1x", "cuda:99999", "cpu", "", "gpu:0",
                          "GPU-1234", "GPU-zzzzzzzz-0000-0000-0000-000000000000", "cuda 0"}) {
    auto r = tier.ResolveDevice(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << bad;
    EXPECT_EQ(r.status().reason(), "gpu.bad_device") << bad;
  }
  for (std::string missing : {"cuda:2", "GPU-00000000-0000-0000-0000-000000000000"}) {
    auto r = tier.ResolveDevice(missing);
    ASSERT_FALSE(r.ok()) << missing;
    EXPECT_EQ(r.status().code(), Code::kNotFound) << missing;
    EXPECT_EQ(r.status().reason(), "gpu.unknown_device") << missing;
  }
}

TEST(GpuTier, ParsesExportMode) {
  EXPECT_EQ(*ParseExportMode("vmm"), ExportMode::kVmm);
  EXPECT_EQ(*ParseExportMode("legacy"), ExportMode::kLegacy);
  EXPECT_EQ(ParseExportMode("VMM").status().reason(), "config.bad_gpu_export");
}

TEST(GpuTier, VmmCopyRoundsEachShardToGranularityAndCopiesEveryByte) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 4});
  std::vector<HostBuffer> bufs;
  const std::vector<std::uint64_t> sizes{1, kGranularity, kGranularity + 1, 7 * kChunk + 123, 0};
  for (std::size_t i = 0; i < sizes.size(); ++i) bufs.emplace_back(sizes[i], 100 + static_cast<std::uint32_t>(i));
  std::vector<HostShard> shards;
  for (auto& b : bufs) shards.push_back(b.shard());

  auto copy = tier.Materialize(1, shards, ExportMode::kVmm);
  ASSERT_TRUE(copy.ok()) << copy.status().ToString();
  const GpuCopy& c = **copy;
  EXPECT_EQ(c.ordinal(), 1);
  EXPECT_EQ(c.device_uuid(), testing::FakeUuid(1));
  ASSERT_EQ(c.shards().size(), sizes.size());
  const std::vector<std::uint64_t> want_alloc{kGranularity, kGranularity, 2 * kGranularity, 2 * kGranularity,
                                              kGranularity};
  std::uint64_t total_alloc = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_EQ(c.shards()[i].data_size, sizes[i]);
    EXPECT_EQ(c.shards()[i].alloc_size, want_alloc[i]) << i;
    EXPECT_EQ(c.shards()[i].ptr % kGranularity, 0u);
    EXPECT_TRUE(SameBytes(ReadBack(c, i), bufs[i])) << "shard " << i;
    total_alloc += want_alloc[i];
  }
  EXPECT_EQ(c.allocated_bytes(), total_alloc);

  // Every byte of every shard was copied exactly once, in chunks of at most kChunk, and
  // consecutive chunks went to different streams.
  auto log = fake.h2d_log();
  std::set<Stream> streams;
  for (std::size_t i = 0; i < shards.size(); ++i) {
    std::vector<std::pair<DevicePtr, std::uint64_t>> pieces;
    for (auto& r : log)
      if (r.dst >= c.shards()[i].ptr && r.dst < c.shards()[i].ptr + c.shards()[i].alloc_size) {
        EXPECT_LE(r.size, kChunk);
        pieces.emplace_back(r.dst, r.size);
      }
    std::sort(pieces.begin(), pieces.end());
    DevicePtr next = c.shards()[i].ptr;
    for (auto& [dst, n] : pieces) {
      EXPECT_EQ(dst, next) << "gap or overlap in shard " << i;
      next = dst + n;
    }
    EXPECT_EQ(next - c.shards()[i].ptr, sizes[i]) << "shard " << i;
  }
  for (std::size_t k = 0; k < log.size(); ++k) {
    streams.insert(log[k].stream);
    if (k > 0) {
      EXPECT_NE(log[k].stream, log[k - 1].stream);
    }
  }
  EXPECT_EQ(streams.size(), 4u);
  EXPECT_EQ(fake.counters().pageable_copies, 0);
  EXPECT_EQ(fake.counters().live_host_registrations, 0) << "registrations outlived the copy";
  EXPECT_EQ(fake.counters().live_streams, 0);

  auto stats = tier.Stats();
  ASSERT_EQ(stats.devices.size(), 2u);
  EXPECT_EQ(stats.devices[0].resident_bytes, 0u);
  EXPECT_EQ(stats.devices[1].resident_bytes, total_alloc);
  EXPECT_EQ(stats.devices[1].copies, 1u);
  EXPECT_EQ(stats.materializations, 1u);
  EXPECT_EQ(stats.staged_shards, 0u);
  EXPECT_EQ(stats.last_h2d_bytes, 1 + kGranularity + kGranularity + 1 + 7 * kChunk + 123);
  EXPECT_EQ(fake.allocated_bytes(1), total_alloc);

  copy = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  EXPECT_EQ(tier.Stats().devices[1].resident_bytes, 0u);
  EXPECT_EQ(tier.Stats().devices[1].copies, 0u);
  EXPECT_EQ(fake.allocated_bytes(1), 0u);
  ExpectNothingLive(fake);
}

// A copy pipelined behind a load waits for its chunks in the order the loader fills them:
// round-robin over the shards, so that it follows the fill (Loader::Fill).
TEST(GpuTier, PipelinedCopyWaitsForChunksRoundRobinOverShards) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  MaterializeOptions options{kChunk, 2};
  options.pin_threads = 1;  // one thread waits for the chunks, in the copy's order
  GpuTier tier(&fake, options);
  HostBuffer a(3 * kChunk, 1), b(kChunk + 5, 2), c(0, 3), d(2 * kChunk - 1, 4);
  std::vector<HostShard> shards{a.shard(), b.shard(), c.shard(), d.shard()};
  std::vector<std::pair<std::size_t, std::uint64_t>> waits;
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm, [&](std::size_t shard, std::uint64_t end) {
    waits.emplace_back(shard, end);
    return Status::Ok();
  });
  ASSERT_TRUE(copy.ok()) << copy.status().ToString();
  const std::vector<std::pair<std::size_t, std::uint64_t>> want{
      {0, kChunk}, {1, kChunk}, {3, kChunk}, {0, 2 * kChunk}, {1, kChunk + 5}, {3, 2 * kChunk - 1}, {0, 3 * kChunk}};
  EXPECT_EQ(waits, want);
  EXPECT_TRUE(SameBytes(ReadBack(**copy, 0), a));
  EXPECT_TRUE(SameBytes(ReadBack(**copy, 1), b));
  EXPECT_TRUE(SameBytes(ReadBack(**copy, 3), d));
  copy = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  ExpectNothingLive(fake);
}

// Behind a fill, each chunk is page-locked once it has landed, not the whole fresh shard first
// (which would page-lock every page before the first chunk could go). A PinHost of a shard
// meanwhile waits until the copy's chunks cover it, then takes them over instead of registering
// the shard again; later copies of the pinned shard share them too.
TEST(GpuTier, PipelinedCopyPageLocksChunkByChunkAndPinHostTakesTheChunksOver) {
  using namespace std::chrono_literals;
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
  // Chunk order: a0 b0 a1 b1 a2 b2 a3 b3 b4.
  HostBuffer a(4 * kChunk, 1), b(5 * kChunk, 2);
  std::vector<HostShard> shards{a.shard(), b.shard()};
  // Each registration must cover only bytes the fill has reported ready (the chunks are
  // registered on the pinner's threads, ahead of the copy, in any order).
  std::mutex mu;
  std::uint64_t ready[2] = {0, 0};
  std::vector<std::uint64_t> early;  // offsets of ranges registered before they were ready
  fake.SetHostRegisterHook([&](const void* p, std::uint64_t size) {
    std::lock_guard lock(mu);
    for (int i = 0; i < 2; ++i) {
      const HostBuffer& h = i == 0 ? a : b;
      // As integers: `p` may lie in the other buffer (unsigned wrap-around keeps it out of range).
      const std::uint64_t begin =
          reinterpret_cast<std::uintptr_t>(p) - reinterpret_cast<std::uintptr_t>(h.mapping.data());
      if (begin < h.size && begin + size > ready[i]) early.push_back(begin);
    }
  });
  std::future<Result<std::shared_ptr<const void>>> pin;
  std::atomic<bool> pin_done{false};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm, [&](std::size_t shard, std::uint64_t end) {
    if (shard == 0 && end == 3 * kChunk) {
      // The pinner's threads run ahead of this one: wait for one chunk to be page-locked.
      const auto deadline = std::chrono::steady_clock::now() + 10s;
      while (fake.counters().live_host_registrations == 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(1ms);
      pin = std::async(std::launch::async, [&] {
        auto r = tier.PinHost(a.mapping.data(), a.size);
        pin_done = true;
        return r;
      });
      EXPECT_EQ(pin.wait_for(100ms), std::future_status::timeout) << "PinHost must wait for the copy's chunks";
    }
    if (shard == 1 && end == b.size) {  // the last chunk: the copy ends after the pin
      const auto deadline = std::chrono::steady_clock::now() + 10s;
      while (!pin_done && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
    }
    std::lock_guard lock(mu);
    ready[shard] = std::max(ready[shard], end);
    return Status::Ok();
  });
  ASSERT_TRUE(copy.ok()) << copy.status().ToString();
  EXPECT_TRUE(early.empty()) << "a chunk was page-locked before its bytes were ready";
  EXPECT_TRUE(SameBytes(ReadBack(**copy, 0), a));
  EXPECT_TRUE(SameBytes(ReadBack(**copy, 1), b));
  EXPECT_EQ(tier.Stats().staged_shards, 0u);
  auto pinned = pin.get();
  ASSERT_TRUE(pinned.ok()) << pinned.status().ToString();
  copy = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  EXPECT_EQ(fake.counters().live_host_registrations, 4) << "the pin holds a's 4 chunks";
  EXPECT_EQ(fake.counters().host_registrations_total, 9) << "one per chunk; the pin registered nothing again";
  std::vector<HostShard> just_a{a.shard()};
  auto again = tier.Materialize(1, just_a, ExportMode::kVmm, [](std::size_t, std::uint64_t) { return Status::Ok(); });
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_TRUE(SameBytes(ReadBack(**again, 0), a));
  auto whole = tier.Materialize(0, just_a, ExportMode::kVmm);  // not pipelined: the whole shard at once
  ASSERT_TRUE(whole.ok()) << whole.status().ToString();
  EXPECT_TRUE(SameBytes(ReadBack(**whole, 0), a));
  EXPECT_EQ(fake.counters().host_registrations_total, 9) << "the pin's chunks serve every later copy";
  EXPECT_EQ(tier.Stats().staged_shards, 0u);
  EXPECT_EQ(fake.counters().unsafe_host_releases, 0);
  again = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  whole = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  pinned = Result<std::shared_ptr<const void>>(Internal("unpinned"));
  ExpectNothingLive(fake);
}

// cudaHostRegister page-locks at ~20 GB/s on one thread, slower than a fill from the page cache:
// a pipelined copy registers its chunks on several threads at once, and a PinHost of a chunk
// whose registration is still being made waits for it and shares it.
TEST(GpuTier, PipelinedCopyPageLocksChunksOnSeveralThreadsAndPinHostSharesOneInFlight) {
  using namespace std::chrono_literals;
  FakeCudaApi fake(TwoDevices(), kGranularity);
  MaterializeOptions options{kChunk, 2};
  options.pin_threads = 4;
  GpuTier tier(&fake, options);
  HostBuffer a(16 * kChunk, 1);
  std::vector<HostShard> shards{a.shard()};
  // The first registration is held until the test lets it go.
  std::promise<const void*> entered;
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> first{true};
  fake.SetHostRegisterHook([&](const void* p, std::uint64_t) {
    if (!first.exchange(false)) return;
    entered.set_value(p);
    released.wait();
  });
  // The copy's last chunk waits for the pin, so that the copy's registrations outlive it.
  std::atomic<bool> pin_done{false};
  auto copy = std::async(std::launch::async, [&] {
    return tier.Materialize(0, shards, ExportMode::kVmm, [&](std::size_t, std::uint64_t end) {
      const auto deadline = std::chrono::steady_clock::now() + 10s;
      while (end == a.size && !pin_done && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(1ms);
      return Status::Ok();
    });
  });
  auto held = entered.get_future();
  ASSERT_EQ(held.wait_for(10s), std::future_status::ready);
  const void* chunk = held.get();
  auto pin = std::async(std::launch::async, [&] {
    auto r = tier.PinHost(chunk, kChunk);
    pin_done = true;
    return r;
  });
  EXPECT_EQ(pin.wait_for(100ms), std::future_status::timeout) << "PinHost must wait for the registration in flight";
  const auto deadline = std::chrono::steady_clock::now() + 2s;
  while (fake.counters().host_registrations_at_once < 2 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  EXPECT_GE(fake.counters().host_registrations_at_once, 2) << "chunks were page-locked one at a time";
  release.set_value();
  auto c = copy.get();
  auto pinned = pin.get();
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_TRUE(pinned.ok()) << pinned.status().ToString();
  EXPECT_TRUE(SameBytes(ReadBack(**c, 0), a));
  EXPECT_EQ(tier.Stats().staged_shards, 0u);
  EXPECT_EQ(fake.counters().host_registrations_total, 16) << "the pin shares its chunk's registration";
  c = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  EXPECT_EQ(fake.counters().live_host_registrations, 1) << "the pin keeps its chunk";
  pinned = Result<std::shared_ptr<const void>>(Internal("unpinned"));
  EXPECT_EQ(fake.counters().unsafe_host_releases, 0);
  ExpectNothingLive(fake);
}

// Registrations side by side that cover a range are shared by it; registrations that cover only
// part of a range cannot be (CUDA refuses overlapping registrations), so a copy stages it.
TEST(GpuTier, HostRangesSharePinsThatCoverThemAndStageRangesPinnedInPart) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
  HostBuffer a(4 * kChunk, 1);
  auto front = tier.PinHost(a.mapping.data(), 2 * kChunk);
  auto back = tier.PinHost(a.mapping.data() + 2 * kChunk, 2 * kChunk);
  ASSERT_TRUE(front.ok() && back.ok());
  auto whole = tier.PinHost(a.mapping.data(), a.size);
  ASSERT_TRUE(whole.ok()) << whole.status().ToString();
  EXPECT_EQ(fake.counters().host_registrations_total, 2) << "the two halves cover the whole";
  back = Result<std::shared_ptr<const void>>(Internal("unpinned"));
  whole = Result<std::shared_ptr<const void>>(Internal("unpinned"));
  EXPECT_EQ(fake.counters().live_host_registrations, 1);
  std::vector<HostShard> shards{a.shard()};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_TRUE(copy.ok()) << copy.status().ToString();
  EXPECT_TRUE(SameBytes(ReadBack(**copy, 0), a));
  EXPECT_EQ(tier.Stats().staged_shards, 1u) << "half pinned: staged";
  EXPECT_EQ(fake.counters().host_registrations_total, 2);
  copy = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  front = Result<std::shared_ptr<const void>>(Internal("unpinned"));
  ExpectNothingLive(fake);
}

// A copy whose fill fails stops at the first chunk that will never be ready, gives back every
// chunk it page-locked, and says why.
TEST(GpuTier, PipelinedCopyBehindAFailedFillGivesBackItsChunks) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
  HostBuffer a(8 * kChunk, 1);
  std::vector<HostShard> shards{a.shard()};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm, [](std::size_t, std::uint64_t end) {
    return end > 5 * kChunk ? Unavailable("the fill failed", "loader.cancelled") : Status::Ok();
  });
  ASSERT_FALSE(copy.ok());
  EXPECT_EQ(copy.status().reason(), "loader.cancelled") << copy.status().ToString();
  EXPECT_EQ(fake.counters().unsafe_host_releases, 0);
  ExpectNothingLive(fake);
}

// The GPU budget's estimate uses the device's own granularity once a copy has learned it.
TEST(GpuTier, AllocationBytesUsesTheDevicesGranularityOnceKnown) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
  const std::vector<std::uint64_t> sizes{1, kGranularity + 1};
  EXPECT_EQ(tier.AllocationBytes(0, sizes), 2 * (2ull << 20)) << "2 MiB before the granularity is known";
  HostBuffer a(kChunk, 1);
  std::vector<HostShard> shards{a.shard()};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_TRUE(copy.ok()) << copy.status().ToString();
  EXPECT_EQ(tier.AllocationBytes(0, sizes), kGranularity + 2 * kGranularity);
  EXPECT_EQ(tier.AllocationBytes(1, sizes), 2 * (2ull << 20)) << "cuda:1 has not been asked";
  copy = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  ExpectNothingLive(fake);
}

TEST(GpuTier, FallsBackToPinnedStagingWhenRegistrationFails) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  fake.SetHostRegisterFails(true);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 3});
  HostBuffer a(11 * kChunk + 7, 1), b(kChunk / 2, 2);
  std::vector<HostShard> shards{a.shard(), b.shard()};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_TRUE(copy.ok()) << copy.status().ToString();
  EXPECT_TRUE(SameBytes(ReadBack(**copy, 0), a));
  EXPECT_TRUE(SameBytes(ReadBack(**copy, 1), b));
  EXPECT_EQ(tier.Stats().staged_shards, 2u);
  auto c = fake.counters();
  EXPECT_EQ(c.pageable_copies, 0) << "staged copies must come from pinned memory";
  EXPECT_EQ(c.pinned_total, 3) << "one staging buffer per stream";
  EXPECT_EQ(c.live_pinned, 0);
  EXPECT_EQ(c.unsafe_host_releases, 0);
  copy = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  ExpectNothingLive(fake);
}

TEST(GpuTier, OutOfMemoryAtAnyAllocationLeavesNothingBehind) {
  for (int fail_at = 1; fail_at <= 3; ++fail_at) {
    for (ExportMode mode : {ExportMode::kVmm, ExportMode::kLegacy}) {
      FakeCudaApi fake(TwoDevices(), kGranularity);
      GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
      HostBuffer a(3 * kChunk, 1), b(kChunk, 2), c(5, 3);
      std::vector<HostShard> shards{a.shard(), b.shard(), c.shard()};
      fake.FailAllocationAt(fail_at);
      auto copy = tier.Materialize(0, shards, mode);
      ASSERT_FALSE(copy.ok());
      EXPECT_EQ(copy.status().code(), Code::kResourceExhausted) << copy.status().ToString();
      EXPECT_EQ(copy.status().reason(), "gpu.out_of_memory");
      EXPECT_NE(copy.status().message().find("cuda:0"), std::string::npos) << copy.status().message();
      EXPECT_EQ(tier.Stats().devices[0].resident_bytes, 0u);
      EXPECT_EQ(tier.Stats().materialize_failures, 1u);
      EXPECT_EQ(fake.allocated_bytes(0), 0u);
      ExpectNothingLive(fake);
    }
  }
}

TEST(GpuTier, DeviceTooSmallIsResourceExhausted) {
  FakeCudaApi fake({FakeCudaApi::Device{"Tiny", "", 2 * kGranularity, true, true}}, kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
  HostBuffer a(2 * kGranularity, 1), b(1, 2);
  std::vector<HostShard> shards{a.shard(), b.shard()};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_FALSE(copy.ok());
  EXPECT_EQ(copy.status().code(), Code::kResourceExhausted);
  ExpectNothingLive(fake);
}

TEST(GpuTier, VmmNotSupportedIsFailedPrecondition) {
  FakeCudaApi fake({FakeCudaApi::Device{"Old", "", 64ull << 20, true, false}}, kGranularity);
  GpuTier tier(&fake);
  HostBuffer a(10, 1);
  std::vector<HostShard> shards{a.shard()};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_FALSE(copy.ok());
  EXPECT_EQ(copy.status().reason(), "gpu.vmm_unsupported");
  EXPECT_TRUE(tier.Materialize(0, shards, ExportMode::kLegacy).ok());
}

TEST(GpuTier, ConcurrentCopiesOfOneShardShareItsRegistration) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 4});
  HostBuffer a(9 * kChunk + 1, 7);
  std::vector<HostShard> shards{a.shard()};
  Result<std::shared_ptr<GpuCopy>> r0(Internal("unset")), r1(Internal("unset"));
  std::thread t0([&] { r0 = tier.Materialize(0, shards, ExportMode::kVmm); });
  std::thread t1([&] { r1 = tier.Materialize(1, shards, ExportMode::kLegacy); });
  t0.join();
  t1.join();
  ASSERT_TRUE(r0.ok()) << r0.status().ToString();
  ASSERT_TRUE(r1.ok()) << r1.status().ToString();
  EXPECT_TRUE(SameBytes(ReadBack(**r0, 0), a));
  EXPECT_TRUE(SameBytes(ReadBack(**r1, 0), a));
  EXPECT_EQ(tier.Stats().staged_shards, 0u);
  EXPECT_EQ(fake.counters().pageable_copies, 0);
  r0 = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  r1 = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  ExpectNothingLive(fake);
}

TEST(GpuTier, ExportsAFreshCloexecFdPerCallAndOnlyInItsMode) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
  HostBuffer a(kChunk, 1), b(3, 2);
  std::vector<HostShard> shards{a.shard(), b.shard()};
  auto vmm = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_TRUE(vmm.ok());
  auto f1 = (*vmm)->ExportFds();
  auto f2 = (*vmm)->ExportFds();
  ASSERT_TRUE(f1.ok() && f2.ok());
  ASSERT_EQ(f1->size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_NE((*f1)[i].get(), (*f2)[i].get());
    EXPECT_TRUE(::fcntl((*f1)[i].get(), F_GETFD) & FD_CLOEXEC);
  }
  EXPECT_EQ((*vmm)->LegacyHandles().status().reason(), "gpu.wrong_export_mode");

  auto legacy = tier.Materialize(0, shards, ExportMode::kLegacy);
  ASSERT_TRUE(legacy.ok());
  auto handles = (*legacy)->LegacyHandles();
  ASSERT_TRUE(handles.ok());
  ASSERT_EQ(handles->size(), 2u);
  for (auto& h : *handles) EXPECT_EQ(h.size(), kIpcHandleSize);
  EXPECT_EQ((*legacy)->ExportFds().status().reason(), "gpu.wrong_export_mode");
}

TEST(GpuTier, CopyToHostChecksRanges) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake);
  HostBuffer a(100, 1);
  std::vector<HostShard> shards{a.shard()};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_TRUE(copy.ok());
  std::vector<std::byte> out(10);
  EXPECT_TRUE((*copy)->CopyToHost(0, 90, out).ok());
  EXPECT_EQ(std::memcmp(out.data(), a.mapping.data() + 90, 10), 0);
  EXPECT_EQ((*copy)->CopyToHost(0, 91, out).reason(), "gpu.bad_range");
  EXPECT_EQ((*copy)->CopyToHost(1, 0, out).reason(), "gpu.bad_shard");
}

// ---- peer copies -------------------------------------------------------------------------------

TEST(GpuTier, PeerCopyIsDeviceToDeviceBitExactAndTheSourceStaysItsOwners) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
  EXPECT_TRUE(tier.CanCopyPeer(0, 1));
  EXPECT_FALSE(tier.CanCopyPeer(0, 0));
  EXPECT_FALSE(tier.CanCopyPeer(0, 2));
  HostBuffer a(3 * kChunk + 5, 3), b(0, 4), c(kChunk - 1, 5);
  std::vector<HostShard> shards{a.shard(), b.shard(), c.shard()};
  auto first = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  fake.ClearLog();
  {
    auto second = tier.MaterializeFromPeer(1, **first);
    ASSERT_TRUE(second.ok()) << second.status().ToString();
    EXPECT_EQ((*second)->ordinal(), 1);
    EXPECT_EQ((*second)->copied_from(), 0);
    EXPECT_EQ((*first)->copied_from(), -1);
    EXPECT_TRUE(fake.h2d_log().empty()) << "nothing came from host memory";
    EXPECT_EQ(fake.counters().peer_bytes, static_cast<std::int64_t>(a.size + c.size));
    EXPECT_TRUE(SameBytes(ReadBack(**second, 0), a));
    EXPECT_TRUE(SameBytes(ReadBack(**second, 1), b));
    EXPECT_TRUE(SameBytes(ReadBack(**second, 2), c));
    EXPECT_EQ(fake.allocated_bytes(1), (*second)->allocated_bytes());
    auto st = tier.Stats();
    EXPECT_EQ(st.peer_copies, 1u);
    EXPECT_EQ(st.last_peer_bytes, a.size + c.size);
    EXPECT_EQ(st.materializations, 2u);
    // The source is still written by its own device: a copy into it on cuda:0 works.
    ASSERT_TRUE(fake.SetDevice(0).ok());
    auto stream = fake.StreamCreate();
    ASSERT_TRUE(stream.ok());
    const GpuShard& src = (*first)->shards()[0];
    EXPECT_TRUE(fake.CopyDeviceToDeviceAsync(src.ptr, src.ptr + kChunk, 16, *stream).ok());
    ASSERT_TRUE(fake.StreamDestroy(*stream).ok());
  }
  EXPECT_EQ(fake.allocated_bytes(1), 0u);
  first = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
  ExpectNothingLive(fake);
}

TEST(GpuTier, PeerCopyIsRefusedOrFailsWithNothingLeftAllocated) {
  HostBuffer a(2 * kChunk, 6);
  std::vector<HostShard> shards{a.shard()};
  {  // No peer access between the pair.
    FakeCudaApi fake(TwoDevices(), kGranularity);
    fake.SetPeerAccess(false);
    GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
    EXPECT_FALSE(tier.CanCopyPeer(0, 1));
    auto first = tier.Materialize(0, shards, ExportMode::kVmm);
    ASSERT_TRUE(first.ok());
    auto second = tier.MaterializeFromPeer(1, **first);
    ASSERT_FALSE(second.ok());
    EXPECT_EQ(second.status().code(), Code::kFailedPrecondition);
    EXPECT_EQ(second.status().reason(), "gpu.no_peer_copy");
    EXPECT_NE(second.status().message().find("cannot access cuda:0"), std::string::npos) << second.status().ToString();
    EXPECT_EQ(fake.allocated_bytes(1), 0u);
  }
  {  // A legacy source, and a copy that fails half way.
    FakeCudaApi fake(TwoDevices(), kGranularity);
    GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
    auto legacy = tier.Materialize(0, shards, ExportMode::kLegacy);
    ASSERT_TRUE(legacy.ok());
    auto refused = tier.MaterializeFromPeer(1, **legacy);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().reason(), "gpu.no_peer_copy");
    auto first = tier.Materialize(0, shards, ExportMode::kVmm);
    ASSERT_TRUE(first.ok());
    fake.SetPeerCopiesFail(true);
    auto failed = tier.MaterializeFromPeer(1, **first);
    ASSERT_FALSE(failed.ok());
    EXPECT_EQ(failed.status().reason(), "gpu.cuda_error") << failed.status().ToString();
    EXPECT_EQ(fake.allocated_bytes(1), 0u);
    EXPECT_EQ(tier.Stats().materialize_failures, 1u) << "the failed copy; a refusal allocates nothing and is not one";
    EXPECT_EQ(tier.Stats().peer_copies, 0u);
    legacy = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
    first = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));
    ExpectNothingLive(fake);
  }
}

// ---- importer ---------------------------------------------------------------------------------

TEST(GpuImport, VmmImportIsReadOnlyAndOutlivesTheDaemonsCopy) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
  HostBuffer a(3 * kChunk + 5, 9);
  std::vector<HostShard> shards{a.shard()};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_TRUE(copy.ok());
  auto fds = (*copy)->ExportFds();
  ASSERT_TRUE(fds.ok());
  const std::uint64_t alloc = (*copy)->shards()[0].alloc_size;

  auto im = GpuImport::ImportVmm(&fake, 0, (*fds)[0].get(), alloc);
  ASSERT_TRUE(im.ok()) << im.status().ToString();
  fds->clear();  // the import holds its own reference
  copy = Result<std::shared_ptr<GpuCopy>>(Internal("daemon dropped its copy"));

  std::vector<std::byte> got(a.size);
  ASSERT_TRUE(fake.CopyDeviceToHost(got.data(), im->ptr(), got.size()).ok());
  EXPECT_EQ(std::memcmp(got.data(), a.mapping.data(), a.size), 0);

  // Read-only: a device write into the import is refused.
  ASSERT_TRUE(fake.SetDevice(0).ok());
  auto stream = fake.StreamCreate();
  ASSERT_TRUE(stream.ok());
  auto scratch = fake.Malloc(16);
  ASSERT_TRUE(scratch.ok());
  EXPECT_FALSE(fake.CopyDeviceToDeviceAsync(im->ptr(), *scratch, 16, *stream).ok());
  ASSERT_TRUE(fake.Free(*scratch).ok());
  ASSERT_TRUE(fake.StreamDestroy(*stream).ok());

  GpuImport moved = std::move(*im);
  EXPECT_FALSE(im->valid());
  EXPECT_TRUE(moved.valid());
  moved = GpuImport();
  ExpectNothingLive(fake);
}

TEST(GpuImport, RejectsSizesAndHandlesFromTheWire) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake);
  HostBuffer a(10, 1);
  std::vector<HostShard> shards{a.shard()};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_TRUE(copy.ok());
  auto fds = (*copy)->ExportFds();
  ASSERT_TRUE(fds.ok());
  EXPECT_EQ(GpuImport::ImportVmm(&fake, 0, (*fds)[0].get(), kGranularity + 1).status().reason(), "gpu.bad_import");
  EXPECT_EQ(GpuImport::ImportVmm(&fake, 0, (*fds)[0].get(), 0).status().reason(), "gpu.bad_import");
  EXPECT_EQ(GpuImport::ImportVmm(&fake, 0, -1, kGranularity).status().reason(), "gpu.bad_import");
  EXPECT_EQ(GpuImport::ImportVmm(&fake, 5, (*fds)[0].get(), kGranularity).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(GpuImport::ImportLegacy(&fake, 0, std::string(63, 'x'), 10).status().reason(), "gpu.bad_ipc_handle");
  auto c = fake.counters();
  EXPECT_EQ(c.live_allocations, 1) << "only the daemon's own allocation";
  EXPECT_EQ(c.live_reservations, 1);
}

TEST(GpuImport, LegacyHandleOpensAndCloses) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 2});
  HostBuffer a(2 * kChunk + 3, 4);
  std::vector<HostShard> shards{a.shard()};
  auto copy = tier.Materialize(1, shards, ExportMode::kLegacy);
  ASSERT_TRUE(copy.ok()) << copy.status().ToString();
  auto handles = (*copy)->LegacyHandles();
  ASSERT_TRUE(handles.ok());
  {
    auto im = GpuImport::ImportLegacy(&fake, 1, (*handles)[0], a.size);
    ASSERT_TRUE(im.ok()) << im.status().ToString();
    std::vector<std::byte> got(a.size);
    ASSERT_TRUE(fake.CopyDeviceToHost(got.data(), im->ptr(), got.size()).ok());
    EXPECT_EQ(std::memcmp(got.data(), a.mapping.data(), a.size), 0);
    EXPECT_EQ(fake.counters().live_ipc_opens, 1);
  }
  EXPECT_EQ(fake.counters().live_ipc_opens, 0);
}

TEST(GpuImport, ChildProcessImportsExportedFd) {
  FakeCudaApi fake(TwoDevices(), kGranularity);
  GpuTier tier(&fake, MaterializeOptions{kChunk, 4});
  HostBuffer a(5 * kChunk + 99, 21);
  std::vector<HostShard> shards{a.shard()};
  auto copy = tier.Materialize(0, shards, ExportMode::kVmm);
  ASSERT_TRUE(copy.ok());
  auto fds = (*copy)->ExportFds();
  ASSERT_TRUE(fds.ok());
  const int fd = (*fds)[0].get();
  const std::uint64_t alloc = (*copy)->shards()[0].alloc_size;
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // A fresh "process-local CUDA" in the child, as a client would have.
    FakeCudaApi child(TwoDevices(), kGranularity);
    auto im = GpuImport::ImportVmm(&child, 0, fd, alloc);
    if (!im.ok()) ::_exit(2);
    std::vector<std::byte> got(a.size);
    if (!child.CopyDeviceToHost(got.data(), im->ptr(), got.size()).ok()) ::_exit(3);
    ::_exit(std::memcmp(got.data(), a.mapping.data(), a.size) == 0 ? 0 : 4);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(GpuImport, FindsLocalOrdinalByUuid) {
  FakeCudaApi fake(TwoDevices());
  EXPECT_EQ(*FindLocalOrdinal(&fake, testing::FakeUuid(1)), 1);
  auto r = FindLocalOrdinal(&fake, "GPU-00000000-0000-0000-0000-000000000000");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_EQ(r.status().reason(), "gpu.device_not_visible");
  EXPECT_NE(r.status().message().find(testing::FakeUuid(0)), std::string::npos);
}

TEST(GpuImport, ContextWarmupReturnsTheDevice) {
  FakeCudaApi fake(TwoDevices());
  auto w = ContextWarmup::Start(&fake, 1);
  EXPECT_TRUE(w.started());
  ASSERT_TRUE(w.Device().ok());
  EXPECT_EQ(w.Device()->uuid, testing::FakeUuid(1));
  const auto& r = w.Wait();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->uuid, testing::FakeUuid(1));
  EXPECT_TRUE(w.Wait().ok());  // idempotent

  auto bad = ContextWarmup::Start(&fake, 7);
  EXPECT_EQ(bad.Device().status().code(), Code::kInvalidArgument);
  EXPECT_EQ(bad.Wait().status().code(), Code::kInvalidArgument);
  ContextWarmup never;
  EXPECT_EQ(never.Wait().status().reason(), "gpu.no_warmup");
}

}  // namespace
}  // namespace weightd::gpu
