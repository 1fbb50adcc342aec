// Crash safety across a daemon restart: the real weightd binary is killed with SIGKILL and
// started again on the same socket and segment prefix, while a client (this process) holds a
// model and keeps reading it.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>

#include "posix.h"
#include "support/daemon_process.h"
#include "weightd/client.h"

namespace weightd {
namespace {

using namespace std::chrono_literals;
using testing::DaemonOptions;
using testing::DaemonProcess;
using testing::TempDir;

// Short heartbeats, so that the client notices the new daemon quickly.
constexpr const char* kConfig = R"(
[daemon]
heartbeat_interval = "100ms"
heartbeat_timeout = "2s"
)";

Client Connect(const DaemonProcess& d) {
  ClientOptions o;
  o.endpoint = d.endpoint();
  o.client_name = "restart_test";
  auto c = Client::Connect(o);
  if (!c.ok()) throw Error(c.status());
  return std::move(c).value();
}

// XXH-free digest of every tensor byte: what an "inference" over the model computes.
std::uint64_t Digest(const Lease& lease) {
  std::uint64_t h = 1469598103934665603ull;
  for (const Tensor& t : lease.tensors())
    for (std::size_t i = 0; i < t.nbytes; ++i) h = (h ^ static_cast<std::uint8_t>(t.data[i])) * 1099511628211ull;
  return h;
}

const ModelInfo* Find(const DaemonStats& s, const std::string& model) {
  for (const auto& m : s.models)
    if (m.name == model) return &m;
  return nullptr;
}

class RestartTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::WriteShardedModel(models_.file("m"), testing::SmallTensors(40), 3, /*seed=*/11).ok());
    ASSERT_TRUE(testing::WriteModel(models_.file("other"), testing::SmallTensors(6), /*seed=*/12).ok());
    auto d = DaemonProcess::Start(
        {.models = {{"m", models_.file("m")}, {"other", models_.file("other")}}, .config_toml = kConfig});
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    daemon_ = std::move(d).value();
  }

  // Loads "m" (and "other") through a short-lived client, then kills the daemon.
  void LoadThenKill() {
    {
      Client c = Connect(*daemon_);
      ASSERT_TRUE(c.Load("m").ok());
      ASSERT_TRUE(c.Load("other").ok());
    }
    daemon_->Signal(SIGKILL);
  }

  // The inode of each of the model's names: the same names with other inodes would be a reload.
  std::vector<ino_t> InodesOf(const std::string& model) const {
    std::vector<ino_t> out;
    for (const auto& n : SegmentsOf(model)) {
      struct stat st {};
      out.push_back(::stat(("/dev/shm/" + n).c_str(), &st) == 0 ? st.st_ino : 0);
    }
    return out;
  }

  std::vector<std::string> SegmentsOf(const std::string& model) const {
    std::vector<std::string> out;
    for (const auto& n : daemon_->Segments())
      if (n.starts_with(daemon_->shm_prefix() + "." + model + ".")) out.push_back(n);
    std::sort(out.begin(), out.end());
    return out;
  }

  TempDir models_;
  std::unique_ptr<DaemonProcess> daemon_;
};

// The scenario of the issue: SIGKILL while a client is mid-inference on the model. The client
// keeps computing correct results, the new daemon adopts the segments without reading the disk,
// and the client's lease is re-established without the application doing anything.
TEST_F(RestartTest, ClientSurvivesSigkillAndItsLeaseComesBack) {
  Client c = Connect(*daemon_);
  auto acquired = c.Acquire("m");
  ASSERT_TRUE(acquired.ok()) << acquired.status().ToString();
  Lease lease = std::move(acquired).value();
  ASSERT_TRUE(testing::CompareWithFiles(lease).ok());
  const std::uint64_t expected = Digest(lease);
  const std::uint64_t old_id = lease.id();
  const auto segments = SegmentsOf("m");
  ASSERT_EQ(segments.size(), 4u);  // 3 shards and the record
  const auto inodes = InodesOf("m");

  std::atomic<bool> stop{false};
  std::atomic<int> passes{0}, wrong{0};
  std::thread inference([&] {
    while (!stop) {
      if (Digest(lease) != expected) ++wrong;
      ++passes;
    }
  });

  daemon_->Signal(SIGKILL);
  const int before = passes.load();
  ASSERT_TRUE(testing::WaitFor([&] { return passes.load() > before + 3; }));  // it computes with no daemon
  Status restarted = daemon_->Restart();
  ASSERT_TRUE(restarted.ok()) << restarted.ToString();
  EXPECT_TRUE(testing::WaitFor([&] { return c.reconnects() >= 1; })) << daemon_->Log();
  stop = true;
  inference.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(passes.load(), 0);

  // The same segments, adopted; nothing read from disk; the lease is back under a new id.
  EXPECT_EQ(SegmentsOf("m"), segments);
  EXPECT_EQ(InodesOf("m"), inodes);
  Client admin = Connect(*daemon_);
  auto stats = admin.Stats();
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_EQ(stats->bytes_read_from_disk, 0u);
  const ModelInfo* m = Find(*stats, "m");
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->state, "resident");
  EXPECT_EQ(m->leases, 1u);
  EXPECT_EQ(stats->leases, 1u);
  EXPECT_NE(stats->metrics.find("weightd_adopted_models 1\n"), std::string::npos) << stats->metrics;
  EXPECT_NE(lease.id(), 0u);
  EXPECT_NE(lease.id(), old_id);
  EXPECT_TRUE(testing::CompareWithFiles(lease).ok());

  // The client goes on as before: a new lease of the adopted copy, and the old one releases.
  auto again = c.Acquire("m");
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(Digest(*again), expected);
  lease.release();
  again->release();
  EXPECT_TRUE(testing::WaitFor([&] {
    auto s = admin.Stats();
    return s.ok() && s->leases == 0;
  }));
  auto after = admin.Stats();
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->bytes_read_from_disk, 0u);
}

TEST_F(RestartTest, AdoptsEveryModelWithoutReadingTheDisk) {
  LoadThenKill();
  ASSERT_TRUE(daemon_->Restart().ok());
  Client c = Connect(*daemon_);
  auto stats = c.Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->bytes_read_from_disk, 0u);
  for (const char* name : {"m", "other"}) {
    const ModelInfo* m = Find(*stats, name);
    ASSERT_NE(m, nullptr);
    EXPECT_EQ(m->state, "resident") << name;
  }
  auto lease = c.Acquire("other");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  EXPECT_TRUE(testing::CompareWithFiles(*lease).ok());
  EXPECT_NE(daemon_->Log().find("adopted from the previous instance"), std::string::npos);
}

// A segment whose bytes changed after the load is not adopted: the model is read again from disk
// and served correctly; the other model is adopted as usual.
TEST_F(RestartTest, CorruptSegmentIsDiscardedAndReloaded) {
  LoadThenKill();
  const auto segs = SegmentsOf("m");
  ASSERT_EQ(segs.size(), 4u);
  {
    auto fd = posix::Open("/dev/shm/" + segs[1], O_RDWR);  // a shard (segs[3] is the record)
    ASSERT_TRUE(fd.ok()) << fd.status().ToString();
    std::byte b{};
    ASSERT_EQ(::pread(fd->get(), &b, 1, 5), 1);
    b ^= std::byte{0x40};
    ASSERT_EQ(::pwrite(fd->get(), &b, 1, 5), 1);
  }
  ASSERT_TRUE(daemon_->Restart().ok());
  EXPECT_NE(daemon_->Log().find("adopt.checksum_mismatch"), std::string::npos) << daemon_->Log();
  EXPECT_TRUE(SegmentsOf("m").empty());  // removed, not left behind
  Client c = Connect(*daemon_);
  auto lease = c.Acquire("m");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  EXPECT_TRUE(testing::CompareWithFiles(*lease).ok());
  auto stats = c.Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_GT(stats->bytes_read_from_disk, 0u);
  const ModelInfo* other = Find(*stats, "other");
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(other->state, "resident");
}

// A shard file replaced after the load: the old copy is not what the file says now.
TEST_F(RestartTest, ChangedFileIsNotAdopted) {
  LoadThenKill();
  ASSERT_TRUE(testing::WriteModel(models_.file("other"), testing::SmallTensors(6), /*seed=*/99).ok());
  ASSERT_TRUE(daemon_->Restart().ok());
  EXPECT_NE(daemon_->Log().find("adopt.model_changed"), std::string::npos) << daemon_->Log();
  EXPECT_TRUE(SegmentsOf("other").empty());
  Client c = Connect(*daemon_);
  auto lease = c.Acquire("other");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  EXPECT_TRUE(testing::CompareWithFiles(*lease).ok());
}

// A record cut short (the daemon died while writing it) or garbled: its segments go.
TEST_F(RestartTest, DamagedRecordIsDiscarded) {
  LoadThenKill();
  const auto segs = SegmentsOf("m");
  ASSERT_EQ(segs.size(), 4u);
  const std::string record = "/dev/shm/" + segs[3];
  ASSERT_TRUE(record.ends_with(".record")) << record;
  ASSERT_EQ(::truncate(record.c_str(), 40), 0);
  ASSERT_TRUE(daemon_->Restart().ok());
  EXPECT_NE(daemon_->Log().find("adopt.bad_record"), std::string::npos) << daemon_->Log();
  EXPECT_TRUE(SegmentsOf("m").empty());
  EXPECT_FALSE(SegmentsOf("other").empty());
}

// Rewritten in place with the same size and mtime (rsync --inplace -t, touch -r): the change
// time still moves, and the stale copy is not adopted.
TEST_F(RestartTest, RewriteKeepingSizeAndMtimeIsNotAdopted) {
  LoadThenKill();
  const std::string file = models_.file("other") + "/model.safetensors";
  struct stat before {};
  ASSERT_EQ(::stat(file.c_str(), &before), 0);
  std::this_thread::sleep_for(20ms);  // a change time the filesystem can tell apart
  ASSERT_TRUE(testing::WriteModel(models_.file("other"), testing::SmallTensors(6), /*seed=*/77).ok());
  const timespec times[2] = {before.st_atim, before.st_mtim};
  ASSERT_EQ(::utimensat(AT_FDCWD, file.c_str(), times, 0), 0);
  struct stat after {};
  ASSERT_EQ(::stat(file.c_str(), &after), 0);
  ASSERT_EQ(after.st_size, before.st_size);
  ASSERT_TRUE(daemon_->Restart().ok());
  EXPECT_NE(daemon_->Log().find("adopt.model_changed"), std::string::npos) << daemon_->Log();
  Client c = Connect(*daemon_);
  auto lease = c.Acquire("other");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  EXPECT_TRUE(testing::CompareWithFiles(*lease).ok());
}

// With keep_segments_on_stop, a clean stop leaves the copies, and the next start adopts them.
TEST_F(RestartTest, KeepSegmentsOnStopLetsACleanRestartAdopt) {
  daemon_.reset();
  auto d = DaemonProcess::Start({.models = {{"m", models_.file("m")}},
                                 .config_toml = std::string(kConfig) + "keep_segments_on_stop = true\n"});
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  daemon_ = std::move(d).value();
  {
    Client c = Connect(*daemon_);
    ASSERT_TRUE(c.Load("m").ok());
  }
  daemon_->Signal(SIGTERM);
  EXPECT_EQ(SegmentsOf("m").size(), 4u);
  ASSERT_TRUE(daemon_->Restart().ok());
  Client c = Connect(*daemon_);
  auto stats = c.Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->bytes_read_from_disk, 0u);
  EXPECT_EQ(Find(*stats, "m")->state, "resident");
}

// Names under the prefix that are not the daemon's own regular files are never opened: a FIFO
// (whose open would block) and a record of another user.
TEST_F(RestartTest, PlantedNamesAreLeftAloneAndDoNotHangTheStart) {
  LoadThenKill();
  const std::string fifo = "/dev/shm/" + daemon_->shm_prefix() + ".x.1.record";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0666), 0);
  const std::string foreign = "/dev/shm/" + daemon_->shm_prefix() + ".y.1.record";
  {
    int fd = ::open(foreign.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0644);
    ASSERT_GE(fd, 0);
    ::close(fd);
    ASSERT_EQ(::chown(foreign.c_str(), 65534, 65534), 0);
  }
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(daemon_->Restart().ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_NE(daemon_->Log().find("are not this daemon's own files"), std::string::npos) << daemon_->Log();
  EXPECT_EQ(::access(fifo.c_str(), F_OK), 0);  // not removed either: not ours
  EXPECT_EQ(SegmentsOf("m").size(), 4u);       // ours adopted as usual
  ::unlink(fifo.c_str());
  ::unlink(foreign.c_str());
}

// The fds systemd passes from its store that are not a GPU copy this instance can take back
// are closed and removed from the store (or their memory would stay pinned there).
TEST_F(RestartTest, StoredFdsItCannotAdoptAreRemovedFromTheStore) {
  LoadThenKill();
  auto a = posix::Open("/dev/null", O_RDONLY | O_CLOEXEC);
  auto b = posix::Open("/dev/null", O_RDONLY | O_CLOEXEC);
  ASSERT_TRUE(a.ok() && b.ok());
  daemon_->StoreFd("not-ours", std::move(a).value());
  daemon_->StoreFd("gpu.GPU-00000000-0000-0000-0000-000000000000.1.0.m", std::move(b).value());
  ASSERT_TRUE(daemon_->Restart().ok());
  EXPECT_TRUE(testing::WaitFor([&] { return daemon_->StoredFdNames().empty(); }, 5s))
      << daemon_->StoredFdNames().size() << " left\n" << daemon_->Log();
  EXPECT_NE(daemon_->Log().find("not a GPU copy of weightd's"), std::string::npos);
  EXPECT_NE(daemon_->Log().find("not adopting its stored copy"), std::string::npos);
  EXPECT_EQ(SegmentsOf("m").size(), 4u);  // the host copies are adopted as usual
}

// A segment under the prefix that no record describes (a load cut short by the crash) is removed.
TEST_F(RestartTest, SegmentsWithoutARecordAreRemoved) {
  LoadThenKill();
  const std::string stray = "/" + daemon_->shm_prefix() + ".m.999.0";
  int fd = ::shm_open(stray.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  ::close(fd);
  ASSERT_TRUE(daemon_->Restart().ok());
  EXPECT_NE(::access(("/dev/shm" + stray).c_str(), F_OK), 0);
  EXPECT_EQ(SegmentsOf("m").size(), 4u);
}

// A shard larger than a part (16 MiB) lives in several tmpfs files. A client maps them as one
// range (shared and copy-on-write), a restarted daemon adopts every part, and a copy that lost a
// part is read again, with none of the old parts left behind.
TEST(RestartParts, ACopyInPartsIsMappedWholeAndAdoptedPartByPart) {
  TempDir models;
  const std::uint64_t bytes = (36ull << 20) + 5;  // parts of 16, 16 and 4 MiB
  ASSERT_TRUE(testing::WriteModel(models.file("big"), {{"w", DType::kU8, {static_cast<std::int64_t>(bytes)}}}, 21).ok());
  auto started = DaemonProcess::Start({.models = {{"big", models.file("big")}}, .config_toml = kConfig});
  ASSERT_TRUE(started.ok()) << started.status().ToString();
  DaemonProcess& d = **started;
  auto names = [&] {
    std::vector<std::string> out;
    for (const auto& n : d.Segments())
      if (n.starts_with(d.shm_prefix() + ".big.")) out.push_back(n);
    std::sort(out.begin(), out.end());
    return out;
  };
  auto inodes = [&] {
    std::vector<ino_t> out;
    for (const auto& n : names()) {
      struct stat st {};
      out.push_back(::stat(("/dev/shm/" + n).c_str(), &st) == 0 ? st.st_ino : 0);
    }
    return out;
  };
  std::uint64_t digest = 0;
  {
    Client c = Connect(d);
    auto lease = c.Acquire("big");
    ASSERT_TRUE(lease.ok()) << lease.status().ToString();
    ASSERT_TRUE(testing::CompareWithFiles(*lease).ok());
    digest = Digest(*lease);
    // A writable lease maps the same parts copy-on-write: its writes stay its own.
    AcquireOptions w;
    w.writable = true;
    auto mine = c.Acquire("big", w);
    ASSERT_TRUE(mine.ok()) << mine.status().ToString();
    std::byte* p = const_cast<std::byte*>(mine->tensors()[0].data);
    p[0] = ~p[0];
    p[bytes - 1] = ~p[bytes - 1];
    EXPECT_NE(Digest(*mine), digest);
    EXPECT_EQ(Digest(*lease), digest);
  }
  const std::vector<std::string> before = names();
  ASSERT_EQ(before.size(), 4u) << "3 parts and the record";
  for (const auto& n : before) EXPECT_TRUE(n.ends_with(".0") || n.ends_with(".0~1") || n.ends_with(".0~2") ||
                                           n.ends_with(".record")) << n;
  const std::vector<ino_t> inodes_before = inodes();

  d.Signal(SIGKILL);
  ASSERT_TRUE(d.Restart().ok()) << d.Log();
  {
    Client c = Connect(d);
    auto stats = c.Stats();
    ASSERT_TRUE(stats.ok()) << stats.status().ToString();
    EXPECT_EQ(stats->bytes_read_from_disk, 0u) << d.Log();
    EXPECT_EQ(names(), before);
    EXPECT_EQ(inodes(), inodes_before);
    auto lease = c.Acquire("big");
    ASSERT_TRUE(lease.ok()) << lease.status().ToString();
    EXPECT_EQ(Digest(*lease), digest);
  }

  // A copy missing its middle part cannot be adopted: it is read again, under new names.
  d.Signal(SIGKILL);
  std::string middle;
  for (const auto& n : before)
    if (n.ends_with(".0~1")) middle = n;
  ASSERT_EQ(::unlink(("/dev/shm/" + middle).c_str()), 0);
  ASSERT_TRUE(d.Restart().ok()) << d.Log();
  Client c = Connect(d);
  auto lease = c.Acquire("big");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  EXPECT_EQ(Digest(*lease), digest);
  auto stats = c.Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->bytes_read_from_disk, bytes);
  const std::vector<std::string> after = names();
  EXPECT_EQ(after.size(), 4u);
  for (const auto& n : before) EXPECT_EQ(std::count(after.begin(), after.end(), n), 0) << n << " was left behind";
}

}  // namespace
}  // namespace weightd
