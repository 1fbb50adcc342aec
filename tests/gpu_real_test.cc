// The GPU tier against real CUDA: materialize, export, import in a fresh process, compare.
// Every test skips (with the reason) where LoadCudaApi finds no device, as on CI.
//
// The importing side runs in a child started with posix_spawn of this same binary (CUDA cannot
// be used in a child forked after the parent initialized it). The child runs only
// GpuRealChild.ImportsAndCompares, which reads its instructions from WEIGHTD_GPU_CHILD_*
// environment variables and writes "ok" to WEIGHTD_GPU_CHILD_RESULT when every byte matched.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "cuda_api.h"
#include "fd_channel.h"
#include "gpu_import.h"
#include "gpu_tier.h"

extern char** environ;

namespace weightd::gpu {
namespace {

using namespace std::chrono_literals;

std::byte Pattern(std::uint32_t seed, std::size_t shard, std::uint64_t i) {
  return static_cast<std::byte>((seed * 31u + shard * 7u + i * 13u) ^ (i >> 9));
}

// A memfd-backed "shm segment" with the pattern, mapped read-only like the daemon's shards
// may be (this also exercises read-only host registration).
struct Segment {
  Segment(std::uint64_t size, std::uint32_t seed, std::size_t shard) : size(size) {
    fd = posix::Fd(::memfd_create("weightd-gpu-real", MFD_CLOEXEC));
    std::uint64_t map = std::max<std::uint64_t>(posix::RoundUp(size, posix::PageSize()), posix::PageSize());
    EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(map)), 0);
    {
      auto rw = posix::Map(fd.get(), map, PROT_READ | PROT_WRITE, MAP_SHARED, "segment");
      EXPECT_TRUE(rw.ok());
      for (std::uint64_t i = 0; i < size; ++i) rw->data()[i] = Pattern(seed, shard, i);
    }
    auto ro = posix::Map(fd.get(), map, PROT_READ, MAP_SHARED, "segment");
    EXPECT_TRUE(ro.ok());
    mapping = std::move(ro).value();
  }
  HostShard shard() const { return HostShard{mapping.data(), size}; }
  std::uint64_t size;
  posix::Fd fd;
  posix::Mapping mapping;
};

constexpr std::uint32_t kSeed = 5;
const std::vector<std::uint64_t> kSizes{(3u << 20) + 17, 1u << 20, 5};

std::string Join(const std::vector<std::uint64_t>& v) {
  std::string s;
  for (auto x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}
std::vector<std::uint64_t> Split(const char* s) {
  std::vector<std::uint64_t> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::stoull(item));
  return out;
}
std::string Hex(std::string_view b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (unsigned char c : b) {
    s.push_back(d[c >> 4]);
    s.push_back(d[c & 15]);
  }
  return s;
}
std::string Unhex(std::string_view h) {
  std::string s;
  for (std::size_t i = 0; i + 1 < h.size(); i += 2) s.push_back(static_cast<char>(std::stoi(std::string(h.substr(i, 2)), nullptr, 16)));
  return s;
}

class GpuReal : public ::testing::Test {
 protected:
  void SetUp() override {
    auto api = LoadCudaApi();
    if (!api.ok()) GTEST_SKIP() << "skipped, " << api.status().ToString();
    api_ = std::move(api).value();
    tier_ = std::make_unique<GpuTier>(api_.get());
    ASSERT_TRUE(tier_->available()) << tier_->unavailable_status().ToString();
    for (std::size_t i = 0; i < kSizes.size(); ++i) segments_.push_back(std::make_unique<Segment>(kSizes[i], kSeed, i));
    for (auto& s : segments_) shards_.push_back(s->shard());
  }

  // Spawns the child importer with `env` added; returns its pid.
  pid_t SpawnChild(const std::vector<std::string>& extra_env) {
    std::vector<std::string> env_strings;
    for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
    for (auto& e : extra_env) env_strings.push_back(e);
    std::vector<char*> envp;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::string exe = "/proc/self/exe", filter = "--gtest_filter=GpuRealChild.ImportsAndCompares";
    char* argv[] = {exe.data(), filter.data(), nullptr};
    pid_t pid = -1;
    EXPECT_EQ(::posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv, envp.data()), 0);
    return pid;
  }

  void ExpectChildSucceeded(pid_t pid, const std::string& result_file) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0);
    std::ifstream in(result_file);
    std::string word;
    in >> word;
    EXPECT_EQ(word, "ok") << "the child did not confirm that every byte matched";
    ::unlink(result_file.c_str());
  }

  std::unique_ptr<CudaApi> api_;
  std::unique_ptr<GpuTier> tier_;
  std::vector<std::unique_ptr<Segment>> segments_;
  std::vector<HostShard> shards_;
};

TEST(GpuRealLoader, LoadsOrReportsNoDevice) {
  auto api = LoadCudaApi();
  if (api.ok()) {
    auto n = (*api)->DeviceCount();
    ASSERT_TRUE(n.ok());
    EXPECT_GT(*n, 0);
    auto info = (*api)->GetDeviceInfo(0);
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    EXPECT_EQ(info->uuid.size(), 40u) << info->uuid;
    EXPECT_EQ(info->uuid.rfind("GPU-", 0), 0u);
    std::cout << "cuda:0 " << info->name << " " << info->uuid << " vmm_fd=" << info->vmm_posix_fd
              << " register_ro=" << info->host_register_read_only << "\n";
  } else {
    EXPECT_EQ(api.status().code(), Code::kUnavailable) << api.status().ToString();
    EXPECT_TRUE(api.status().reason() == "gpu.no_device" || api.status().reason() == "gpu.no_cuda")
        << api.status().ToString();
    EXPECT_NE(api.status().message().find("no CUDA device"), std::string::npos);
    GpuTier tier(nullptr);
    EXPECT_EQ(tier.ResolveDevice("cuda:0").status().reason(), "gpu.no_device");
  }
}

TEST_F(GpuReal, MaterializesBothModesBitExact) {
  for (ExportMode mode : {ExportMode::kVmm, ExportMode::kLegacy}) {
    auto copy = tier_->Materialize(0, shards_, mode);
    ASSERT_TRUE(copy.ok()) << copy.status().ToString();
    for (std::size_t i = 0; i < kSizes.size(); ++i) {
      std::vector<std::byte> got(kSizes[i]);
      ASSERT_TRUE((*copy)->CopyToHost(i, 0, got).ok());
      EXPECT_EQ(std::memcmp(got.data(), segments_[i]->mapping.data(), got.size()), 0) << "shard " << i;
    }
    auto stats = tier_->Stats();
    EXPECT_EQ(stats.devices[0].resident_bytes, (*copy)->allocated_bytes());
    EXPECT_EQ(stats.staged_shards, 0u) << "host registration failed; the copy went through staging";
    std::cout << ExportModeName(mode) << ": " << stats.last_h2d_bytes << " bytes at " << stats.last_h2d_gbps
              << " GB/s\n";
  }
  EXPECT_EQ(tier_->Stats().devices[0].resident_bytes, 0u);
}

// Two GPUs: a copy made from the copy on cuda:0, device to device where the pair has peer
// access, is the host's bytes; without peer access the tier refuses with gpu.no_peer_copy.
TEST_F(GpuReal, PeerCopyToASecondGpuIsBitExact) {
  if (tier_->Devices().size() < 2) GTEST_SKIP() << "skipped, needs two GPUs (" << tier_->Devices().size() << " visible)";
  auto first = tier_->Materialize(0, shards_, ExportMode::kVmm);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  auto second = tier_->MaterializeFromPeer(1, **first);
  if (!tier_->CanCopyPeer(0, 1)) {
    ASSERT_FALSE(second.ok());
    EXPECT_EQ(second.status().reason(), "gpu.no_peer_copy") << second.status().ToString();
    GTEST_SKIP() << "skipped, cuda:1 has no peer access to cuda:0";
  }
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  first = Result<std::shared_ptr<GpuCopy>>(Internal("dropped"));  // the copy stands alone
  for (std::size_t i = 0; i < kSizes.size(); ++i) {
    std::vector<std::byte> got(kSizes[i]);
    ASSERT_TRUE((*second)->CopyToHost(i, 0, got).ok());
    EXPECT_EQ(std::memcmp(got.data(), segments_[i]->mapping.data(), got.size()), 0) << "shard " << i;
  }
  auto stats = tier_->Stats();
  EXPECT_EQ(stats.peer_copies, 1u);
  std::cout << "peer copy cuda:0 -> cuda:1: " << stats.last_peer_bytes << " bytes at " << stats.last_peer_gbps << " GB/s\n";
}

TEST_F(GpuReal, VmmFdsImportInAnotherProcessOverTheFdChannel) {
  auto copy = tier_->Materialize(0, shards_, ExportMode::kVmm);
  ASSERT_TRUE(copy.ok()) << copy.status().ToString();
  const std::string sock = "/tmp/weightd-gpu-real-" + std::to_string(::getpid()) + ".sock";
  const std::string result = "/tmp/weightd-gpu-real-" + std::to_string(::getpid()) + ".result";
  auto listener = fdchan::FdListener::Bind(sock);
  ASSERT_TRUE(listener.ok()) << listener.status().ToString();
  std::vector<std::uint64_t> allocs;
  for (auto& s : (*copy)->shards()) allocs.push_back(s.alloc_size);
  const std::string token = "token-" + std::to_string(::getpid());
  pid_t pid = SpawnChild({"WEIGHTD_GPU_CHILD_MODE=vmm", "WEIGHTD_GPU_CHILD_SOCKET=" + sock,
                          "WEIGHTD_GPU_CHILD_TOKEN=" + token, "WEIGHTD_GPU_CHILD_UUID=" + (*copy)->device_uuid(),
                          "WEIGHTD_GPU_CHILD_SIZES=" + Join(kSizes), "WEIGHTD_GPU_CHILD_ALLOCS=" + Join(allocs),
                          "WEIGHTD_GPU_CHILD_RESULT=" + result});
  ASSERT_GT(pid, 0);

  // Serve the child: the token and its pid must match.
  auto deadline = std::chrono::steady_clock::now() + 60s;
  std::optional<fdchan::FdConnection> conn;
  bool served = false;
  while (!served && std::chrono::steady_clock::now() < deadline) {
    int early = 0;
    if (::waitpid(pid, &early, WNOHANG) == pid) {
      ADD_FAILURE() << "the child exited before it was served (status " << early << ")";
      (void)listener->Unlink();
      return;
    }
    pollfd p{conn ? conn->fd() : listener->fd(), POLLIN, 0};
    ::poll(&p, 1, 100);
    if (!conn) {
      auto a = listener->Accept();
      ASSERT_TRUE(a.ok()) << a.status().ToString();
      if (a->has_value()) conn = std::move(**a);
      continue;
    }
    auto t = conn->TryReadToken();
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    if (!t->has_value()) continue;
    EXPECT_EQ(**t, token);
    EXPECT_EQ(conn->peer().pid, pid);
    auto fds = (*copy)->ExportFds();
    ASSERT_TRUE(fds.ok()) << fds.status().ToString();
    std::vector<int> raw;
    for (auto& f : *fds) raw.push_back(f.get());
    ASSERT_TRUE(conn->SendReply(Status::Ok(), "", raw).ok());
    served = true;
  }
  EXPECT_TRUE(served);
  ExpectChildSucceeded(pid, result);
  (void)listener->Unlink();
}

TEST_F(GpuReal, LegacyHandlesOpenInAnotherProcess) {
  auto copy = tier_->Materialize(0, shards_, ExportMode::kLegacy);
  ASSERT_TRUE(copy.ok()) << copy.status().ToString();
  auto handles = (*copy)->LegacyHandles();
  ASSERT_TRUE(handles.ok());
  std::string hex;
  for (auto& h : *handles) hex += (hex.empty() ? "" : ",") + Hex(h);
  const std::string result = "/tmp/weightd-gpu-real-" + std::to_string(::getpid()) + ".legacy";
  pid_t pid = SpawnChild({"WEIGHTD_GPU_CHILD_MODE=legacy", "WEIGHTD_GPU_CHILD_HANDLES=" + hex,
                          "WEIGHTD_GPU_CHILD_UUID=" + (*copy)->device_uuid(), "WEIGHTD_GPU_CHILD_SIZES=" + Join(kSizes),
                          "WEIGHTD_GPU_CHILD_RESULT=" + result});
  ASSERT_GT(pid, 0);
  ExpectChildSucceeded(pid, result);
}

// The importer half; does nothing unless started by the tests above.
TEST(GpuRealChild, ImportsAndCompares) {
  const char* mode = std::getenv("WEIGHTD_GPU_CHILD_MODE");
  if (mode == nullptr) GTEST_SKIP() << "runs only as the child of a GpuReal test";
  auto api = LoadCudaApi();
  ASSERT_TRUE(api.ok()) << api.status().ToString();
  auto ordinal = FindLocalOrdinal(api->get(), std::getenv("WEIGHTD_GPU_CHILD_UUID"));
  ASSERT_TRUE(ordinal.ok()) << ordinal.status().ToString();
  // Overlap context creation with fetching the fds, as the client library will.
  auto warm = ContextWarmup::Start(api->get(), *ordinal);
  const auto sizes = Split(std::getenv("WEIGHTD_GPU_CHILD_SIZES"));
  std::vector<GpuImport> imports;
  if (std::string(mode) == "vmm") {
    auto reply = fdchan::FetchFds(std::getenv("WEIGHTD_GPU_CHILD_SOCKET"), std::getenv("WEIGHTD_GPU_CHILD_TOKEN"), 30s);
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    const auto allocs = Split(std::getenv("WEIGHTD_GPU_CHILD_ALLOCS"));
    ASSERT_EQ(reply->fds.size(), sizes.size());
    ASSERT_TRUE(warm.Wait().ok()) << warm.Wait().status().ToString();
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      auto im = GpuImport::ImportVmm(api->get(), *ordinal, reply->fds[i].get(), allocs[i]);
      ASSERT_TRUE(im.ok()) << im.status().ToString();
      imports.push_back(std::move(im).value());
    }
  } else {
    ASSERT_TRUE(warm.Wait().ok()) << warm.Wait().status().ToString();
    std::stringstream in(std::getenv("WEIGHTD_GPU_CHILD_HANDLES"));
    std::string h;
    for (std::size_t i = 0; std::getline(in, h, ','); ++i) {
      auto im = GpuImport::ImportLegacy(api->get(), *ordinal, Unhex(h), sizes.at(i));
      ASSERT_TRUE(im.ok()) << im.status().ToString();
      imports.push_back(std::move(im).value());
    }
  }
  ASSERT_EQ(imports.size(), sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    std::vector<std::byte> got(sizes[i]);
    ASSERT_TRUE(api.value()->CopyDeviceToHost(got.data(), imports[i].ptr(), got.size()).ok());
    for (std::uint64_t k = 0; k < sizes[i]; ++k)
      ASSERT_EQ(got[k], Pattern(kSeed, i, k)) << "shard " << i << " byte " << k;
  }
  imports.clear();
  std::ofstream(std::getenv("WEIGHTD_GPU_CHILD_RESULT")) << "ok\n";
}

}  // namespace
}  // namespace weightd::gpu
