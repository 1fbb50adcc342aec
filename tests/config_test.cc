// The daemon's configuration: TOML, defaults, and the cross-field rules of Finalize().
#include "config.h"

#include <gtest/gtest.h>

namespace weightd {
namespace {

Result<DaemonConfig> Load(const std::string& toml) {
  DaemonConfig cfg;
  RETURN_IF_ERROR(ApplyToml(toml, "test.toml", &cfg));
  RETURN_IF_ERROR(Finalize(&cfg));
  return cfg;
}

TEST(Config, DefaultsDeriveThePrefixAndTheFdSocketFromTheSocket) {
  auto cfg = Load("");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  EXPECT_EQ(cfg->socket, "ipc:///run/weightd/weightd.sock");
  EXPECT_EQ(cfg->fd_socket, "/run/weightd/weightd.sock.fds");
  EXPECT_EQ(cfg->shm_prefix.rfind("weightd-", 0), 0u);
  EXPECT_EQ(cfg->gpu_export, "vmm");
  EXPECT_TRUE(cfg->gpu_enabled);
  EXPECT_TRUE(cfg->gpu_pin_host);
  EXPECT_NE(Load("[daemon]\nsocket = \"ipc:///tmp/other.sock\"\n")->shm_prefix, cfg->shm_prefix);
}

TEST(Config, ReadsTheGpuTable) {
  auto cfg = Load("[gpu]\nenabled = false\nexport = \"legacy\"\nfd_socket = \"/run/x.fds\"\npin_host = false\n");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  EXPECT_FALSE(cfg->gpu_enabled);
  EXPECT_EQ(cfg->gpu_export, "legacy");
  EXPECT_EQ(cfg->fd_socket, "/run/x.fds");
  EXPECT_FALSE(cfg->gpu_pin_host);
}

TEST(Config, RefusesBadGpuSettings) {
  EXPECT_EQ(Load("[gpu]\nexport = \"nvlink\"\n").status().reason(), "config.bad_gpu_export");
  EXPECT_EQ(Load("[gpu]\nenabled = \"yes\"\n").status().reason(), "config.invalid");
  EXPECT_EQ(Load("[gpu]\nfd_socket = \"relative.fds\"\n").status().reason(), "config.bad_socket");
  EXPECT_EQ(Load("[gpu]\nfd_socket = \"/" + std::string(120, 'x') + "\"\n").status().reason(), "config.bad_socket");
  EXPECT_EQ(Load("[gpu]\nexprot = \"vmm\"\n").status().reason(), "config.invalid");
}

TEST(Config, RefusesPrefixesThatCouldOverlapAnotherDaemons) {
  // "a" would sweep "a.b"'s segments ("a.b.model.1.0" starts with "a.") as stale.
  EXPECT_EQ(Load("[daemon]\nshm_prefix = \"a.b\"\n").status().reason(), "config.bad_prefix");
  EXPECT_EQ(Load("[daemon]\nshm_prefix = \"a/b\"\n").status().reason(), "config.bad_prefix");
  EXPECT_TRUE(Load("[daemon]\nshm_prefix = \"team-a_1\"\n").ok());
}

TEST(Config, RefusesWritableSegmentsAndUnknownKeys) {
  EXPECT_EQ(Load("[daemon]\nshm_mode = \"0660\"\n").status().reason(), "config.bad_mode");
  EXPECT_EQ(Load("[daemon]\nshm_mode = \"0646\"\n").status().reason(), "config.bad_mode");
  EXPECT_TRUE(Load("[daemon]\nshm_mode = \"0600\"\n").ok());
  EXPECT_EQ(Load("[deamon]\n").status().reason(), "config.invalid");
  EXPECT_EQ(Load("[models.m]\npath = \"/x\"\nsize = 1\n").status().reason(), "config.invalid");
}

TEST(Config, ParsesSizesAndDurations) {
  EXPECT_EQ(*ParseSize("16MiB"), 16ull << 20);
  EXPECT_EQ(*ParseSize("1.5GiB"), 3ull << 29);
  EXPECT_EQ(*ParseSize("4096"), 4096u);
  EXPECT_FALSE(ParseSize("12 parsecs").ok());
  EXPECT_EQ(ParseDuration("250ms")->count(), 250);
  EXPECT_EQ(ParseDuration("10s")->count(), 10'000);
  EXPECT_FALSE(ParseDuration("soon").ok());
}

}  // namespace
}  // namespace weightd
