// Who may read a segment, and that nobody but the daemon may write it (issue 5, "Files"): the
// real Server on a thread, its segments given to a tenant group, probed from forked children
// that drop to other uids. Needs root (to change uids); skips otherwise.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include "posix.h"
#include "protocol.h"
#include "server.h"
#include "support/daemon_process.h"
#include "support/raw_client.h"

namespace weightd {
namespace {

using testing::RawClient;
using testing::TempDir;

constexpr gid_t kTenantGroup = 65534;  // Debian's "nogroup"
constexpr uid_t kTenant = 65534;       // "nobody", a member through its primary group below
constexpr uid_t kStranger = 65533;     // in no group of the segment

// What a child process found; each bit set means the operation SUCCEEDED.
enum Probe : int {
  kOpenRead = 1,
  kOpenWrite = 2,
  kMapRead = 4,
  kMprotectWrite = 8,
  kReopenWrite = 16,
  kSetupFailed = 64,
};

// Forks, drops to uid/gid (no supplementary groups), and tries every route to the segment.
int ProbeAs(uid_t uid, gid_t gid, const std::string& shm_name, std::size_t size) {
  pid_t pid = ::fork();
  if (pid == 0) {
    if (::setgroups(0, nullptr) != 0 || ::setgid(gid) != 0 || ::setuid(uid) != 0) ::_exit(kSetupFailed);
    int found = 0;
    const int ro = ::shm_open(shm_name.c_str(), O_RDONLY, 0);
    if (ro >= 0) found |= kOpenRead;
    const int rw = ::shm_open(shm_name.c_str(), O_RDWR, 0);
    if (rw >= 0) found |= kOpenWrite;
    if (ro >= 0) {
      void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, ro, 0);
      if (p != MAP_FAILED) {
        found |= kMapRead;
        if (::mprotect(p, size, PROT_READ | PROT_WRITE) == 0) found |= kMprotectWrite;
      }
      const std::string again = "/proc/self/fd/" + std::to_string(ro);
      if (::open(again.c_str(), O_RDWR | O_CLOEXEC) >= 0) found |= kReopenWrite;
    }
    ::_exit(found);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : kSetupFailed;
}

TEST(SegmentAccess, TenantsMapReadOnlyAndStrangersNotAtAll) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to probe as other uids";
  TempDir dir;
  // The models live where the tenants' uids may not read the files: only the daemon reads them.
  ASSERT_TRUE(testing::WriteModel(dir.file("m"), testing::SmallTensors(4), 1).ok());
  // The socket directory must stay the daemon's; TempDir is 0700, root's.
  DaemonConfig cfg;
  cfg.socket = "ipc://" + dir.file("wd.sock");
  cfg.shm_prefix = "wdacc-" + std::to_string(::getpid());
  cfg.shm_group = std::to_string(kTenantGroup);
  UpsertModel(&cfg, ModelConfig{"m", dir.file("m")});
  ASSERT_TRUE(Finalize(&cfg).ok());
  RealClock clock;
  auto server = Server::Create(cfg, &clock, nullptr);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  std::thread loop([&] { EXPECT_TRUE((*server)->Run().ok()); });

  {
    RawClient c(cfg.socket);
    proto::Reply r = c.Call(proto::Acquire{"m", "cpu", {}});
    auto* m = std::get_if<proto::Manifest>(&r.body);
    ASSERT_NE(m, nullptr);
    ASSERT_FALSE(m->segments.empty());
    const proto::SegmentInfo& seg = m->segments[0];

    struct stat st {};
    ASSERT_EQ(::stat(("/dev/shm" + seg.shm_name).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0640u);  // exactly, whatever the umask
    EXPECT_EQ(st.st_gid, kTenantGroup);

    const int tenant = ProbeAs(kTenant, kTenantGroup, seg.shm_name, seg.size);
    EXPECT_EQ(tenant & kSetupFailed, 0);
    EXPECT_TRUE(tenant & kOpenRead) << tenant;
    EXPECT_TRUE(tenant & kMapRead) << tenant;
    EXPECT_FALSE(tenant & kOpenWrite) << "a tenant opened the segment read-write";
    EXPECT_FALSE(tenant & kMprotectWrite) << "a tenant made its mapping writable";
    EXPECT_FALSE(tenant & kReopenWrite) << "a tenant reopened its fd read-write through /proc";

    const int stranger = ProbeAs(kStranger, kStranger, seg.shm_name, seg.size);
    EXPECT_EQ(stranger & kSetupFailed, 0);
    EXPECT_EQ(stranger & (kOpenRead | kOpenWrite), 0) << "a uid outside the group opened the segment";
  }
  (*server)->Stop();
  loop.join();
}

TEST(SegmentAccess, AnUnknownGroupIsAConfigError) {
  TempDir dir;
  DaemonConfig cfg;
  cfg.socket = "ipc://" + dir.file("wd.sock");
  cfg.shm_prefix = "wdacc2-" + std::to_string(::getpid());
  cfg.shm_group = "no-such-group-weightd";
  ASSERT_TRUE(Finalize(&cfg).ok());
  RealClock clock;
  auto server = Server::Create(cfg, &clock, nullptr);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().reason(), "config.unknown_group") << server.status().ToString();
}

}  // namespace
}  // namespace weightd
