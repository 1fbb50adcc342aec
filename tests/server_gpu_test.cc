// The daemon's GPU bookkeeping without a GPU: the real Server, run on a thread of this test
// with a GpuTier over the memfd-backed FakeCudaApi, driven over its real ZeroMQ socket and fd
// side channel. Device memory is host memory here, so imports can be compared with the files.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include <zmq.hpp>

#include "fd_channel.h"
#include "gpu_import.h"
#include "posix.h"
#include "protocol.h"
#include "server.h"
#include "support/daemon_process.h"
#include "support/fake_cuda.h"
#include "support/raw_client.h"

namespace weightd {
namespace {

using namespace std::chrono_literals;
using testing::FakeCudaApi;
using testing::FakeUuid;
using testing::TempDir;
using testing::RawClient;

constexpr std::uint64_t kGranularity = 64 * 1024;
std::atomic<int> g_instance{0};


Status ErrorOf(const proto::Reply& r) {
  if (auto* e = std::get_if<proto::ErrorReply>(&r.body)) return proto::FromErrorReply(*e);
  return Status::Ok();
}

class ServerGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    // 3 shards of mixed dtypes, a few hundred KiB: several granules, several copy chunks.
    std::vector<st::TensorSpec> tensors;
    for (int i = 0; i < 9; ++i)
      tensors.push_back({"w." + std::to_string(i), i % 2 ? DType::kBF16 : DType::kF32, {64 + 16 * i, 96}});
    ASSERT_TRUE(testing::WriteShardedModel(dir_.file("m"), tensors, 3, /*seed=*/3).ok());
  }
  void TearDown() override { StopServer(); }

  void StartServer(const std::string& mode = "vmm", gpu::GpuTier* tier_override = nullptr,
                   std::chrono::milliseconds heartbeat_timeout = 60s) {
    DaemonConfig cfg;
    cfg.socket = "ipc://" + dir_.file("wd.sock");
    cfg.shm_prefix = "wdgpu-" + std::to_string(::getpid()) + "-" + std::to_string(g_instance++);
    cfg.gpu_export = mode;
    cfg.heartbeat_interval = 100ms;
    cfg.heartbeat_timeout = heartbeat_timeout;
    UpsertModel(&cfg, ModelConfig{"m", dir_.file("m")});
    ASSERT_TRUE(Finalize(&cfg).ok());
    fd_socket_ = cfg.fd_socket;
    tier_ = std::make_unique<gpu::GpuTier>(&fake_, gpu::MaterializeOptions{16 * 1024, 2});
    gpu::GpuTier* tier = tier_override ? tier_override : tier_.get();
    auto s = Server::Create(cfg, &clock_, tier);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    server_ = std::move(s).value();
    thread_ = std::thread([this] { EXPECT_TRUE(server_->Run().ok()); });
    endpoint_ = cfg.socket;
  }
  void StopServer() {
    if (!server_) return;
    server_->Stop();
    thread_.join();
    server_.reset();
  }

  proto::Acquire GpuAcquire(int ordinal = 0) const { return proto::Acquire{"m", FakeUuid(ordinal), {}}; }

  proto::Manifest AcquireManifest(RawClient& c, const proto::Acquire& req) {
    proto::Reply r = c.Call(req);
    auto* m = std::get_if<proto::Manifest>(&r.body);
    EXPECT_NE(m, nullptr) << ErrorOf(r).ToString();
    return m ? *m : proto::Manifest{};
  }

  proto::ModelStatus StatusOfModel(RawClient& c) {
    proto::Reply r = c.Call(proto::StatusRequest{"m"});
    auto* st = std::get_if<proto::ModelStatus>(&r.body);
    EXPECT_NE(st, nullptr);
    return st ? *st : proto::ModelStatus{};
  }

  // Imports every fd on device 0 and compares each tensor with the file.
  void ExpectImportsMatchFiles(const proto::Manifest& m, std::vector<posix::Fd>& fds) {
    ASSERT_EQ(fds.size(), m.segments.size());
    std::vector<gpu::GpuImport> imports;
    for (std::size_t i = 0; i < fds.size(); ++i) {
      auto im = gpu::GpuImport::ImportVmm(&fake_, 0, fds[i].get(), m.segments[i].gpu_alloc_size);
      ASSERT_TRUE(im.ok()) << im.status().ToString();
      imports.push_back(std::move(im).value());
    }
    ExpectMatchesFiles(m, [&](std::uint32_t seg) { return imports[seg].ptr(); });
  }

  template <class PtrOf>
  void ExpectMatchesFiles(const proto::Manifest& m, PtrOf ptr_of) {
    for (const auto& t : m.tensors) {
      const auto& seg = m.segments.at(t.segment);
      auto fd = posix::Open(dir_.file("m") + "/" + seg.file, O_RDONLY);
      ASSERT_TRUE(fd.ok());
      std::vector<std::byte> want(t.nbytes);
      ASSERT_TRUE(posix::PreadFull(fd->get(), want, seg.file_data_offset + t.offset, seg.file).ok());
      const auto* got = reinterpret_cast<const std::byte*>(ptr_of(t.segment) + t.offset);
      EXPECT_EQ(std::memcmp(want.data(), got, t.nbytes), 0) << t.name;
    }
  }

  TempDir dir_;
  FakeCudaApi fake_{{FakeCudaApi::Device{}, FakeCudaApi::Device{}}, kGranularity};
  std::unique_ptr<gpu::GpuTier> tier_;
  RealClock clock_;
  std::unique_ptr<Server> server_;
  std::thread thread_;
  std::string endpoint_, fd_socket_;
};

TEST_F(ServerGpu, AcquireLoadsHostTierThenCopiesAndFdsImportBitExact) {
  StartServer();
  RawClient c(endpoint_);
  proto::Manifest m = AcquireManifest(c, GpuAcquire());
  ASSERT_NE(m.lease_id, 0u);
  EXPECT_EQ(m.device, FakeUuid(0));
  EXPECT_EQ(m.gpu_export, static_cast<std::uint8_t>(proto::GpuExport::kVmm));
  EXPECT_EQ(m.fd_socket, fd_socket_);
  ASSERT_EQ(m.segments.size(), 3u);
  for (const auto& s : m.segments) {
    EXPECT_TRUE(s.shm_name.empty());
    EXPECT_EQ(s.size, 0u);
    EXPECT_EQ(s.gpu_alloc_size % kGranularity, 0u);
    EXPECT_GE(s.gpu_alloc_size, s.data_size);
  }
  auto fds = fdchan::FetchFds(m.fd_socket, m.fd_token, 5s);
  ASSERT_TRUE(fds.ok()) << fds.status().ToString();
  EXPECT_EQ(fds->payload, std::to_string(m.lease_id));
  ExpectImportsMatchFiles(m, fds->fds);

  proto::ModelStatus st = StatusOfModel(c);
  EXPECT_EQ(st.state, "resident");
  EXPECT_EQ(st.loads, 1u);
  ASSERT_EQ(st.gpus.size(), 1u);
  EXPECT_EQ(st.gpus[0].device, "cuda:0");
  EXPECT_EQ(st.gpus[0].state, "resident");
  EXPECT_EQ(st.gpus[0].leases, 1u);
  EXPECT_EQ(st.gpus[0].bytes, fake_.allocated_bytes(0));

  proto::Reply stats = c.Call(proto::Stats{});
  auto* ds = std::get_if<proto::DaemonStats>(&stats.body);
  ASSERT_NE(ds, nullptr);
  ASSERT_EQ(ds->gpus.size(), 2u);
  EXPECT_EQ(ds->gpus[0].uuid, FakeUuid(0));
  EXPECT_EQ(ds->gpus[0].copies, 1u);
  EXPECT_EQ(ds->gpus[0].leases, 1u);
  EXPECT_EQ(ds->gpus[0].resident_bytes, fake_.allocated_bytes(0));
  EXPECT_EQ(ds->gpus[1].copies, 0u);
}

TEST_F(ServerGpu, ATokenServesOnceAndOnlyItsLiveLease) {
  StartServer();
  RawClient c(endpoint_);
  proto::Manifest m = AcquireManifest(c, GpuAcquire());
  ASSERT_TRUE(fdchan::FetchFds(m.fd_socket, m.fd_token, 5s).ok());
  auto again = fdchan::FetchFds(m.fd_socket, m.fd_token, 5s);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), Code::kPermissionDenied);
  EXPECT_EQ(again.status().reason(), "fdchan.denied");

  auto made_up = fdchan::FetchFds(m.fd_socket, std::string(32, 'x'), 5s);
  EXPECT_EQ(made_up.status().code(), Code::kPermissionDenied);

  // A lease released before its fds were fetched has none to give.
  proto::Manifest m2 = AcquireManifest(c, GpuAcquire());
  EXPECT_TRUE(std::holds_alternative<proto::OkReply>(c.Call(proto::Release{m2.lease_id}).body));
  auto released = fdchan::FetchFds(m2.fd_socket, m2.fd_token, 5s);
  EXPECT_EQ(released.status().code(), Code::kPermissionDenied);
}

TEST_F(ServerGpu, AnotherProcessCannotUseTheToken) {
  StartServer();
  RawClient c(endpoint_);
  proto::Manifest m = AcquireManifest(c, GpuAcquire());
  pid_t child = ::fork();
  if (child == 0) {
    // Another pid presents the token the session received.
    auto r = fdchan::FetchFds(m.fd_socket, m.fd_token, 5s);
    ::_exit(!r.ok() && r.status().code() == Code::kPermissionDenied ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child got fds";
  // The token was burnt by the refused attempt.
  EXPECT_FALSE(fdchan::FetchFds(m.fd_socket, m.fd_token, 5s).ok());
}

TEST_F(ServerGpu, EvictIsRefusedWhileGpuLeasedAndFreesTheDeviceAfter) {
  StartServer();
  RawClient c(endpoint_);
  proto::Manifest m = AcquireManifest(c, GpuAcquire());
  EXPECT_GT(fake_.allocated_bytes(0), 0u);
  Status refused = ErrorOf(c.Call(proto::Evict{"m"}));
  EXPECT_EQ(refused.reason(), "evict.leased") << refused.ToString();
  EXPECT_NE(refused.message().find("1 live lease"), std::string::npos);
  EXPECT_TRUE(std::holds_alternative<proto::OkReply>(c.Call(proto::Release{m.lease_id}).body));
  EXPECT_TRUE(std::holds_alternative<proto::OkReply>(c.Call(proto::Evict{"m"}).body));
  // The daemon's reaper thread frees the copy right after the reply.
  for (int i = 0; i < 200 && fake_.allocated_bytes(0) != 0; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(fake_.allocated_bytes(0), 0u);
  EXPECT_EQ(fake_.counters().live_allocations, 0);
  EXPECT_TRUE(StatusOfModel(c).gpus.empty());
  // The host copy was page-locked while resident; a worker unregisters it after the eviction.
  for (int i = 0; i < 200 && fake_.counters().live_host_registrations != 0; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(fake_.counters().live_host_registrations, 0);
  EXPECT_EQ(fake_.counters().unsafe_host_releases, 0);
}

TEST_F(ServerGpu, ResidentHostCopiesStayPageLockedForFastCopies) {
  StartServer();
  RawClient c(endpoint_);
  ASSERT_TRUE(std::holds_alternative<proto::ModelStatus>(c.Call(proto::Load{"m"}).body));
  // Page-locking follows the load's answer, on a worker.
  for (int i = 0; i < 200 && fake_.counters().live_host_registrations < 3; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(fake_.counters().live_host_registrations, 3);  // one per shard
  (void)AcquireManifest(c, GpuAcquire());
  EXPECT_EQ(fake_.counters().host_registrations_total, 3) << "the copy registered the shards again";
  EXPECT_EQ(fake_.counters().pageable_copies, 0);
}

TEST_F(ServerGpu, ConcurrentAcquiresShareOneHostLoadAndOneCopy) {
  StartServer();
  RawClient a(endpoint_), b(endpoint_);
  const std::uint64_t ia = a.NextId(), ib = b.NextId(), ic = a.NextId();
  a.Send(GpuAcquire(), ia);
  b.Send(GpuAcquire(), ib);
  a.Send(proto::Acquire{"m", "cpu", {}}, ic);
  int manifests = 0;
  for (RawClient* c : {&a, &b, &a}) {
    auto r = c->Receive();
    ASSERT_TRUE(r.has_value()) << "no reply within 20 s";
    manifests += std::holds_alternative<proto::Manifest>(r->body);
  }
  EXPECT_EQ(manifests, 3);
  proto::ModelStatus st = StatusOfModel(a);
  EXPECT_EQ(st.loads, 1u);
  EXPECT_EQ(st.leases, 3u);
  ASSERT_EQ(st.gpus.size(), 1u);
  EXPECT_EQ(st.gpus[0].leases, 2u);
  EXPECT_EQ(fake_.counters().allocations_total, 3);  // one allocation per shard, once
}

TEST_F(ServerGpu, EachGpuGetsItsOwnCopy) {
  StartServer();
  RawClient c(endpoint_);
  proto::Manifest m0 = AcquireManifest(c, GpuAcquire(0));
  proto::Manifest m1 = AcquireManifest(c, proto::Acquire{"m", "cuda:1", {}});
  EXPECT_EQ(m1.device, FakeUuid(1));
  EXPECT_GT(fake_.allocated_bytes(0), 0u);
  EXPECT_EQ(fake_.allocated_bytes(1), fake_.allocated_bytes(0));
  EXPECT_EQ(StatusOfModel(c).gpus.size(), 2u);
}

TEST_F(ServerGpu, TensorFilterSendsOnlyTheNeededShards) {
  StartServer();
  RawClient c(endpoint_);
  proto::Manifest m = AcquireManifest(c, proto::Acquire{"m", FakeUuid(0), {"w.8"}});
  ASSERT_EQ(m.tensors.size(), 1u);
  ASSERT_EQ(m.segments.size(), 1u);
  auto fds = fdchan::FetchFds(m.fd_socket, m.fd_token, 5s);
  ASSERT_TRUE(fds.ok()) << fds.status().ToString();
  ExpectImportsMatchFiles(m, fds->fds);
}

TEST_F(ServerGpu, LegacyExportSendsIpcHandlesAndNoToken) {
  StartServer("legacy");
  RawClient c(endpoint_);
  proto::Manifest m = AcquireManifest(c, GpuAcquire());
  EXPECT_EQ(m.gpu_export, static_cast<std::uint8_t>(proto::GpuExport::kLegacy));
  EXPECT_TRUE(m.fd_token.empty());
  std::vector<gpu::GpuImport> opened;
  for (const auto& s : m.segments) {
    ASSERT_EQ(s.ipc_handle.size(), gpu::kIpcHandleSize);
    auto im = gpu::GpuImport::ImportLegacy(&fake_, 0, s.ipc_handle, s.data_size);
    ASSERT_TRUE(im.ok()) << im.status().ToString();
    opened.push_back(std::move(im).value());
  }
  ExpectMatchesFiles(m, [&](std::uint32_t seg) { return opened[seg].ptr(); });
}

TEST_F(ServerGpu, DeviceOutOfMemoryFailsTheAcquireAndKeepsTheHostCopy) {
  StartServer();
  RawClient c(endpoint_);
  fake_.FailAllocationAt(2);
  Status s = ErrorOf(c.Call(GpuAcquire()));
  EXPECT_EQ(s.code(), Code::kResourceExhausted) << s.ToString();
  EXPECT_EQ(s.reason(), "gpu.out_of_memory");
  EXPECT_EQ(fake_.counters().live_allocations, 0);  // nothing of the failed copy stays
  // The copy followed the disk reads, so its failure may be answered before the host load ends.
  proto::ModelStatus st = StatusOfModel(c);
  for (int i = 0; i < 200 && st.state == "loading"; ++i) {
    std::this_thread::sleep_for(10ms);
    st = StatusOfModel(c);
  }
  EXPECT_EQ(st.state, "resident");
  ASSERT_EQ(st.gpus.size(), 1u);
  EXPECT_EQ(st.gpus[0].state, "failed");
  EXPECT_EQ(st.gpus[0].last_error.reason(), "gpu.out_of_memory");
  // The next request tries again, from the host copy: no second disk load.
  fake_.FailAllocationAt(0);
  proto::Manifest m = AcquireManifest(c, GpuAcquire());
  EXPECT_NE(m.lease_id, 0u);
  EXPECT_EQ(StatusOfModel(c).loads, 1u);
}

TEST_F(ServerGpu, BadDevicesAreTypedErrors) {
  StartServer();
  RawClient c(endpoint_);
  EXPECT_EQ(ErrorOf(c.Call(proto::Acquire{"m", "cuda:7", {}})).reason(), "gpu.unknown_device");
  EXPECT_EQ(ErrorOf(c.Call(proto::Acquire{"m", "GPU-00000000-0000-0000-0000-000000000000", {}})).reason(),
            "gpu.unknown_device");
  EXPECT_EQ(ErrorOf(c.Call(proto::Acquire{"m", "tpu:0", {}})).reason(), "gpu.bad_device");
  EXPECT_EQ(StatusOfModel(c).state, "absent");  // nothing loaded
}

TEST_F(ServerGpu, HostOnlyDaemonSaysNoDevice) {
  gpu::GpuTier none(nullptr);
  StartServer("vmm", &none);
  RawClient c(endpoint_);
  Status s = ErrorOf(c.Call(GpuAcquire()));
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_EQ(s.reason(), "gpu.no_device");
  proto::Reply stats = c.Call(proto::Stats{});
  auto* ds = std::get_if<proto::DaemonStats>(&stats.body);
  ASSERT_NE(ds, nullptr);
  EXPECT_TRUE(ds->gpus.empty());
  EXPECT_FALSE(ds->gpu_unavailable.empty());
}

TEST_F(ServerGpu, ASilentSessionLosesItsGpuLeasesAndTheCopyCanBeEvicted) {
  StartServer("vmm", nullptr, /*heartbeat_timeout=*/400ms);
  RawClient c(endpoint_);
  (void)AcquireManifest(c, GpuAcquire());
  // This raw client sends no heartbeats: its session ends after the timeout.
  std::this_thread::sleep_for(900ms);
  RawClient d(endpoint_);
  proto::ModelStatus st = StatusOfModel(d);
  ASSERT_EQ(st.gpus.size(), 1u);
  EXPECT_EQ(st.gpus[0].leases, 0u);
  EXPECT_TRUE(std::holds_alternative<proto::OkReply>(d.Call(proto::Evict{"m"}).body));
  for (int i = 0; i < 200 && fake_.allocated_bytes(0) != 0; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(fake_.allocated_bytes(0), 0u);
}

}  // namespace
}  // namespace weightd
