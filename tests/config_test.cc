// The daemon's configuration: TOML, defaults, and the cross-field rules of Finalize().
#include "config.h"

#include <gtest/gtest.h>

#include <set>

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
  auto cfg = Load("[gpu]\nenabled = false\nexport = \"legacy\"\nfd_socket = \"/run/x.fds\"\npin_host = false\n"
                  "fd_store = false\n");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  EXPECT_FALSE(cfg->gpu_enabled);
  EXPECT_EQ(cfg->gpu_export, "legacy");
  EXPECT_EQ(cfg->fd_socket, "/run/x.fds");
  EXPECT_FALSE(cfg->gpu_pin_host);
  EXPECT_FALSE(cfg->gpu_fd_store);
  EXPECT_TRUE(Load("")->gpu_fd_store);
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

TEST(Config, ReadsTheCachePolicyAndModelPolicies) {
  auto cfg = Load(R"(
[daemon]
http_listen = "127.0.0.1:9464"
io = "buffered"
[cache]
host_budget = "64GiB"
gpu_budget = 0.7
host_idle_ttl = "1h"
gpu_idle_ttl = "45s"
host_pressure = "90%"
max_gpu_models = 3
admission_timeout = "2s"
[models.m]
path = "/srv/m"
pin = true
priority = -3
preload = ["host", "cuda:0"]
gpu_idle_ttl = "5m"
)");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  EXPECT_EQ(cfg->http_listen, "127.0.0.1:9464");
  EXPECT_EQ(cfg->io, "buffered");
  EXPECT_EQ(cfg->cache.host_budget, (Budget{64ull << 30, 0}));
  EXPECT_DOUBLE_EQ(cfg->cache.gpu_budget.fraction, 0.7);
  EXPECT_EQ(cfg->cache.host_idle_ttl, std::chrono::hours(1));
  EXPECT_EQ(cfg->cache.gpu_idle_ttl, std::chrono::seconds(45));
  EXPECT_DOUBLE_EQ(cfg->cache.host_pressure, 0.9);
  EXPECT_EQ(cfg->cache.max_gpu_models, 3u);
  ASSERT_EQ(cfg->models.size(), 1u);
  const ModelConfig& m = cfg->models[0];
  EXPECT_TRUE(m.pin);
  EXPECT_EQ(m.priority, -3);
  EXPECT_EQ(m.preload, (std::vector<std::string>{"host", "cuda:0"}));
  EXPECT_EQ(m.gpu_idle_ttl, std::chrono::minutes(5));
  EXPECT_FALSE(m.host_idle_ttl.has_value());
}

TEST(Config, RefusesBadPolicies) {
  EXPECT_EQ(Load("[cache]\nhost_budget = \"0%\"\n").status().reason(), "config.invalid");
  EXPECT_EQ(Load("[cache]\ngpu_pressure = 1.5\n").status().reason(), "config.invalid");
  EXPECT_EQ(Load("[cache]\nnope = 1\n").status().reason(), "config.invalid");
  EXPECT_EQ(Load("[models.m]\npath = \"/m\"\npreload = [\"disk\"]\n").status().reason(), "config.invalid");
  EXPECT_EQ(Load("[models.m]\npath = \"/m\"\npriority = 5000\n").status().reason(), "config.invalid");
  // The listener has no authentication: loopback only.
  EXPECT_EQ(Load("[daemon]\nhttp_listen = \"0.0.0.0:9464\"\n").status().reason(), "config.bad_listen");
  EXPECT_EQ(Load("[daemon]\nhttp_listen = \"127.0.0.1:0\"\n").status().reason(), "config.bad_listen");
  EXPECT_EQ(Load("[daemon]\nio = \"mmap\"\n").status().reason(), "config.invalid");
}

TEST(Config, LegacyExportWithTenantsNeedsAnExplicitOptIn) {
  EXPECT_EQ(Load("[daemon]\nshm_group = \"tenants\"\n[gpu]\nexport = \"legacy\"\n").status().reason(),
            "config.legacy_multi_tenant");
  EXPECT_TRUE(Load("[daemon]\nshm_group = \"tenants\"\n[gpu]\nexport = \"legacy\"\nallow_legacy_multi_tenant = true\n").ok());
  EXPECT_TRUE(Load("[gpu]\nexport = \"legacy\"\n").ok());  // one tenant: the daemon's own group
  EXPECT_TRUE(Load("[daemon]\nshm_group = \"tenants\"\n").ok());
}

TEST(Config, TheFileIsAsciiWithEscapesForOtherCharacters) {
  // toml++ 3.3 has undefined behaviour on some non-ASCII characters (tomlplusplus#295).
  auto bad = Load("a = 1\xc3\xa9\n");
  EXPECT_EQ(bad.status().reason(), "config.invalid");
  EXPECT_NE(bad.status().message().find("line 1, column 6"), std::string::npos) << bad.status().message();
  EXPECT_EQ(Load("# mod\xc3\xa8le\n").status().reason(), "config.invalid");
  EXPECT_EQ(Load("[models.m]\npath = '/srv/mod\xc3\xa8les/m'\n").status().reason(), "config.invalid");
  auto ok = Load("[models.m]\npath = \"/srv/mod\\u00e8les/m\"\n");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->models[0].dir, "/srv/mod\xc3\xa8les/m");
}

TEST(Config, ReadsTheAccessKeys) {
  auto cfg = Load(
      "[daemon]\nclient_group = \"weightd-clients\"\nadmin_group = \"wheel\"\n"
      "[models.a]\npath = \"/m/a\"\nallow_users = [\"alice\", 1001]\nallow_groups = [\"ml\"]\n");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  EXPECT_EQ(cfg->client_group, "weightd-clients");
  EXPECT_EQ(cfg->admin_group, "wheel");
  ASSERT_EQ(cfg->models.size(), 1u);
  EXPECT_EQ(cfg->models[0].allow_users, (std::vector<std::string>{"alice", "1001"}));
  EXPECT_EQ(cfg->models[0].allow_groups, (std::vector<std::string>{"ml"}));
  for (const char* bad : {"allow_users = \"alice\"", "allow_users = [true]", "allow_groups = [\"\"]", "allow_users = [-1]"})
    EXPECT_EQ(Load(std::string("[models.a]\npath = \"/m/a\"\n") + bad + "\n").status().code(), Code::kInvalidArgument) << bad;
  // An ACL makes the config multi-tenant: the legacy GPU export then needs its opt-in.
  EXPECT_EQ(Load("[gpu]\nexport = \"legacy\"\n[models.a]\npath = \"/m/a\"\nallow_groups = [\"ml\"]\n").status().reason(),
            "config.legacy_multi_tenant");
}

TEST(Config, ReadsThePerUserLimitsAndKeepSegmentsOnStop) {
  auto defaults = Load("");
  ASSERT_TRUE(defaults.ok());
  EXPECT_EQ(defaults->max_connections_per_user, 1024u);
  EXPECT_EQ(defaults->max_sessions_per_user, 512u);
  EXPECT_FALSE(defaults->keep_segments_on_stop);
  auto cfg = Load("[daemon]\nmax_connections_per_user = 16\nmax_sessions_per_user = 4\nkeep_segments_on_stop = true\n");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  EXPECT_EQ(cfg->max_connections_per_user, 16u);
  EXPECT_EQ(cfg->max_sessions_per_user, 4u);
  EXPECT_TRUE(cfg->keep_segments_on_stop);
  for (const char* bad : {"max_connections_per_user = 0", "max_sessions_per_user = -1", "max_sessions_per_user = 1.5"})
    EXPECT_EQ(Load(std::string("[daemon]\n") + bad + "\n").status().code(), Code::kInvalidArgument) << bad;
}

// --check-config prints the configuration as TOML; that text is a configuration file that
// reads back as the same configuration, every key and every model.
TEST(Config, CheckConfigTomlReadsBackAsTheSameConfiguration) {
  auto cfg = Load(R"(
[daemon]
socket = "ipc:///tmp/w \"q\".sock"
shm_mode = "0600"
loader_threads = 7
chunk_size = "16MiB"
max_message_size = 5000
io = "auto"
fill = "map"
verify_checksums = false
heartbeat_interval = "250ms"
heartbeat_timeout = "2m"
http_listen = "127.0.0.1:9464"
[gpu]
enabled = false
export = "legacy"
allow_legacy_multi_tenant = true
[cache]
host_budget = "64GiB"
gpu_budget = 0.7
host_idle_ttl = "1h"
host_pressure = 0.9
gpu_pressure = 1
max_gpu_models = 3
[models.a]
path = "/m/a"
[models."b.v2"]
path = "/m/b"
pin = true
priority = -3
preload = ["host", "cuda:0"]
gpu_idle_ttl = "5m"
allow_users = ["alice", "1001"]
allow_groups = ["ml"]
)");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  const std::string text = ToToml(*cfg);
  auto again = Load(text);
  ASSERT_TRUE(again.ok()) << again.status().ToString() << "\n" << text;
  for (const ConfigKey& k : ConfigKeys())
    EXPECT_EQ(ShowValue(k, *again), ShowValue(k, *cfg)) << k.table << "." << k.name;
  EXPECT_EQ(again->models, cfg->models);
  EXPECT_EQ(ToToml(*again), text);
  EXPECT_NE(text.find("chunk_size = \"16MiB\"\n"), std::string::npos) << text;
  EXPECT_EQ(again->fill, "map");
  EXPECT_NE(text.find("fill = \"map\"\n"), std::string::npos) << text;
  EXPECT_NE(text.find("gpu_budget = 0.7\n"), std::string::npos) << text;
  EXPECT_NE(text.find("[models.\"b.v2\"]\n"), std::string::npos) << text;
}

// Fill defaults to write; "map" keeps the old path; anything else is refused. The reader pool
// defaults to one thread per core, 4 to 16.
TEST(Config, FillMethodAndLoaderThreadsDefaults) {
  auto cfg = Load("");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  EXPECT_EQ(cfg->fill, "write");
  EXPECT_EQ(cfg->loader_threads, DefaultLoaderThreads());
  EXPECT_GE(cfg->loader_threads, 4u);
  EXPECT_LE(cfg->loader_threads, 16u);
  auto map = Load("[daemon]\nfill = \"map\"\n");
  ASSERT_TRUE(map.ok()) << map.status().ToString();
  EXPECT_EQ(map->fill, "map");
  EXPECT_EQ(Load("[daemon]\nfill = \"mmap\"\n").status().reason(), "config.invalid");
  DaemonConfig c;
  const ConfigKey* key = nullptr;
  for (const ConfigKey& k : ConfigKeys())
    if (k.name == "fill") key = &k;
  ASSERT_NE(key, nullptr);
  ASSERT_TRUE(ApplyOption(*key, "map", &c).ok());
  EXPECT_EQ(c.fill, "map");
  // How a write fill hashes late chunks: as a probe at start finds cheaper by default, or as set.
  EXPECT_EQ(DaemonConfig{}.fill_hash, "auto");
  auto back = Load("[daemon]\nfill_hash = \"read-back\"\n");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->fill_hash, "read-back");
  EXPECT_EQ(Load("[daemon]\nfill_hash = \"readback\"\n").status().reason(), "config.invalid");
}

// The table is the one list of keys: each is read from the file by its table and name, and
// from its option (if any), with the file's checks.
TEST(Config, EveryKeyIsDeclaredOnceAndItsOptionChecksItsValue) {
  std::set<std::string> names, options;
  for (const ConfigKey& k : ConfigKeys()) {
    EXPECT_TRUE(names.insert(std::string(k.table) + "." + std::string(k.name)).second) << k.name;
    EXPECT_FALSE(k.help.empty()) << k.name;
    if (!k.option.empty()) {
      EXPECT_TRUE(options.insert(std::string(k.option)).second) << k.option;
    }
  }
  // A key is known in its own table only.
  for (const ConfigKey& k : ConfigKeys()) {
    const std::string other = k.table == "cache" ? "daemon" : "cache";
    if (names.count(other + "." + std::string(k.name)) == 0) {
      EXPECT_EQ(Load("[" + other + "]\n" + std::string(k.name) + " = 1\n").status().reason(), "config.invalid") << k.name;
    }
  }
  auto find = [](std::string_view option) -> const ConfigKey& {
    for (const ConfigKey& k : ConfigKeys())
      if (k.option.find(option) != std::string_view::npos) return k;
    ADD_FAILURE() << "no key has the option " << option;
    return ConfigKeys().front();
  };
  DaemonConfig cfg;
  ASSERT_TRUE(ApplyOption(find("--chunk-size"), "16MiB", &cfg).ok());
  EXPECT_EQ(cfg.chunk_size, 16ull << 20);
  Status bad = ApplyOption(find("--chunk-size"), "12 parsecs", &cfg);
  EXPECT_EQ(bad.reason(), "config.bad_size");
  EXPECT_NE(bad.message().find("--chunk-size"), std::string::npos) << bad.ToString();
  EXPECT_EQ(ApplyOption(find("--loader-threads"), "0", &cfg).code(), Code::kInvalidArgument);
  ASSERT_TRUE(ApplyOption(find("--loader-threads"), "12", &cfg).ok());
  EXPECT_EQ(cfg.loader_threads, 12u);
  ASSERT_TRUE(ApplyOption(find("--host-budget"), "25%", &cfg).ok());
  EXPECT_DOUBLE_EQ(cfg.cache.host_budget.fraction, 0.25);
  ASSERT_TRUE(ApplyOption(find("--heartbeat-timeout"), "3s", &cfg).ok());
  EXPECT_EQ(cfg.heartbeat_timeout, std::chrono::seconds(3));
  ASSERT_TRUE(ApplyOption(find("--no-gpu"), "false", &cfg).ok());
  EXPECT_FALSE(cfg.gpu_enabled);
  ASSERT_TRUE(ApplyOption(find("--socket"), "ipc:///tmp/x.sock", &cfg).ok());
  EXPECT_EQ(cfg.socket, "ipc:///tmp/x.sock");
}

}  // namespace
}  // namespace weightd
