// config.h — the daemon's configuration: defaults, the TOML file, and command-line overrides.
//
// Precedence: built-in defaults < the TOML file < command-line flags. Models come from the
// file's [models.NAME] tables plus every --model NAME=DIR; a name given on the command line
// replaces the file's entry. Parsing is pure (no I/O besides reading the file) and
// thread-safe; the result is a plain value.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "status_macros.h"

namespace weightd {

inline constexpr const char* kDefaultConfigPath = "/etc/weightd/weightd.toml";

// The default of [daemon] loader_threads: one per CPU this process may run on
// (sched_getaffinity), at least 4 and at most 16 (docs/loading.md).
std::uint32_t DefaultLoaderThreads();

// A memory budget: a number of bytes, or a fraction of the tier's total (the host's MemTotal, a
// GPU's memory), resolved when the total is known. Zero bytes with no fraction: no limit.
struct Budget {
  std::uint64_t bytes = 0;
  double fraction = 0;  // in (0, 1]; wins over `bytes` when set

  std::uint64_t Resolve(std::uint64_t total) const;
  std::string ToString() const;  // "64.0 GiB" or "80% of the total"
  bool operator==(const Budget&) const = default;
};

struct ModelConfig {
  std::string name;
  std::string dir;
  // Cache policy of this model (README, "Cache policy").
  bool pin = false;                  // never evicted, by any reason but an admin's evict
  std::vector<std::string> preload;  // tiers loaded at start: "host", "cuda:N"
  std::int32_t priority = 0;         // lower priorities are evicted first
  std::optional<std::chrono::milliseconds> host_idle_ttl;  // overrides [cache].host_idle_ttl
  std::optional<std::chrono::milliseconds> gpu_idle_ttl;   // overrides [cache].gpu_idle_ttl
  // Who may acquire it (names or numeric ids); both empty: the members of daemon.client_group.
  std::vector<std::string> allow_users;
  std::vector<std::string> allow_groups;

  bool operator==(const ModelConfig&) const = default;
};

// The cache policy ([cache]). A duration of 0 turns its rule off.
struct CacheConfig {
  Budget host_budget{0, 0.5};  // of MemTotal
  Budget gpu_budget{0, 0.8};   // of each GPU's memory
  std::chrono::milliseconds host_idle_ttl{0};
  std::chrono::milliseconds gpu_idle_ttl{30'000};
  // Evict unleased models while the used share of host memory (1 - MemAvailable/MemTotal) or of
  // a GPU's memory is above this; 0 turns the rule off.
  double host_pressure = 0.8;
  double gpu_pressure = 0.8;
  std::uint32_t max_host_models = 0;  // warm-pool caps; 0: no cap
  std::uint32_t max_gpu_models = 0;   // per GPU
  // How long a load that needs memory waits for leases to end before ResourceExhausted.
  std::chrono::milliseconds admission_timeout{10'000};
  // How often resident models' files are checked for changes on disk (0: never).
  std::chrono::milliseconds file_check_interval{5'000};
  // How often the pressure rule samples memory.
  std::chrono::milliseconds pressure_interval{1'000};
  // Loads that hold budget at once, per tier (the host; each GPU); further misses queue, oldest
  // first, and reserve only when they start. 0: no bound.
  std::uint32_t max_loads = 2;
  // Which unleased copy admission evicts first (after priority): "lfu", the least frequently
  // used (access counts that decay, TinyLFU-style; least recently used among equals), or "lru".
  std::string eviction = "lfu";
};

struct DaemonConfig {
  std::string socket = "ipc:///run/weightd/weightd.sock";
  // Segment names are "/<shm_prefix>.<model>.<generation>.<shard>". Empty: "weightd-<hash of socket>", so
  // two daemons on different sockets never collide; a lock makes the prefix exclusive.
  std::string shm_prefix;
  mode_t shm_mode = 0640;
  // The group that owns the segments: a group name or a numeric gid. Empty: the daemon's own
  // group. Clients receive their segments as read-only fds after the ACL check and need not be
  // in it; with per-model ACLs it must be none of the ACLs' groups (docs/security.md).
  std::string shm_group;
  // Who may connect (group name or gid), the owner group of the socket and of its directory,
  // and the ACL of every model that sets none. Empty: the daemon's own group.
  std::string client_group;
  // Members may load, evict and read stats, and acquire any model (root and the daemon's own
  // uid always may). Empty: none.
  std::string admin_group;
  std::uint32_t loader_threads = DefaultLoaderThreads();
  std::uint64_t chunk_size = 64ull << 20;
  std::string io = "buffered";           // "buffered", "direct" (O_DIRECT) or "auto" (docs/loading.md)
  std::string fill = "write";            // "write" (pwrite into the segment's fd) or "map" (docs/loading.md)
  std::string fill_hash = "auto";        // a write fill hashes late chunks through the "mapping", "read-back" or "auto"
  // The most tmpfs files a host copy's segments are split into (SegmentStore::PartSize): a fill
  // writes each file with one thread at a time (its inode lock), so more files let more readers
  // write at once (docs/loading.md). 1: one file per shard.
  std::uint32_t segment_parts = 256;
  std::uint32_t prefault_threads = 0;    // extra threads pre-faulting fresh segments (docs/loading.md)
  bool verify_checksums = true;          // against a model directory's checksums.xxh128
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds heartbeat_timeout{10000};
  std::uint32_t max_leases_per_client = 256;
  std::uint32_t max_sessions = 4096;
  // Per peer uid: open control connections (more are closed at once, before their handshake)
  // and sessions (a Hello beyond is refused with limits.sessions_per_user).
  std::uint32_t max_connections_per_user = 1024;
  std::uint32_t max_sessions_per_user = 512;
  // A clean stop (SIGTERM) leaves the resident host copies and their adoption records in
  // /dev/shm, so that the next start (`systemctl restart`, an upgrade) adopts them. A crash
  // always leaves them.
  bool keep_segments_on_stop = false;
  std::uint64_t max_message_size = 1ull << 20;
  std::string log_level = "info";
  // "HOST:PORT" of the loopback HTTP listener (/healthz, /readyz, /metrics); empty: none.
  std::string http_listen;

  CacheConfig cache;

  // GPU tier. Off (host-only) when no CUDA device is found, or when gpu_enabled is false.
  bool gpu_enabled = true;
  std::string gpu_export = "vmm";  // "vmm" (fds over fd_socket) or "legacy" (cudaIpcMemHandle_t)
  // A legacy handle is a bearer token any local process may open read-write: with tenants
  // (shm_group set) it needs this explicit opt-in.
  bool gpu_legacy_multi_tenant = false;
  // Keep resident host copies page-locked, so that host-to-GPU copies run at PCIe speed.
  bool gpu_pin_host = true;
  // Copy a model to a GPU from its copy on another GPU, where the pair has peer access (VMM
  // copies only); the host copy is the source otherwise, and when a peer copy fails.
  bool gpu_peer_copy = true;
  // Threads page-locking (cudaHostRegister) the chunks of a GPU copy that follows a fill, ahead
  // of the copy.
  std::uint32_t gpu_pin_threads = 4;
  // Under systemd, hand each resident VMM copy's fds to its file-descriptor store (FDSTORE=1),
  // so that the next instance after a crash takes the copy back (README.md, "Crash safety").
  bool gpu_fd_store = true;
  // The Unix socket that passes VMM fds to clients. Empty: "<socket path>.fds", beside the
  // ZeroMQ socket.
  std::string fd_socket;

  std::vector<ModelConfig> models;      // sorted by name, names unique: file and command line
  std::vector<ModelConfig> cli_models;  // the --model flags alone, which survive a reload

  // The file these settings came from, if any (re-read on SIGHUP).
  std::optional<std::string> config_path;
};

// One key of the [daemon], [gpu] and [cache] tables, declared once: the TOML reader
// (ApplyToml), weightd's command line (the keys that have an option), its --help and
// --check-config (ToToml) all read ConfigKeys(). [models.NAME] tables have keys of their own.
struct ConfigKey {
  enum class Kind : std::uint8_t {
    kString,    // a TOML string
    kSize,      // bytes: an integer, or a string with a unit ("64MiB")
    kCount,     // an integer in [min, max]
    kBool,      // true or false
    kDuration,  // milliseconds, or a string with a unit ("10s")
    kFraction,  // in [0, 1]: 0.8 or "80%"
    kBudget,    // bytes ("64GiB") or a share of the total ("50%", 0.5)
    kMode,      // an octal string ("0640")
  };
  // The field the key sets, of the type `kind` says (kCount and kMode: std::uint32_t, which is
  // what mode_t is).
  using Field = std::variant<std::string*, std::uint64_t*, std::uint32_t*, bool*, std::chrono::milliseconds*, double*,
                             Budget*>;

  std::string_view table;  // "daemon", "gpu" or "cache"
  std::string_view name;
  Kind kind;
  Field (*field)(DaemonConfig&);
  std::string_view help;
  std::string_view option = {};       // weightd's option ("-s,--socket"); empty: the file only
  std::string_view value_name = {};   // the option's value in --help ("N", "SIZE")
  std::string_view choices = {};      // "vmm|legacy": what the option takes (Finalize checks the file's)
  std::int64_t min = 0, max = 0;      // kCount
  std::string_view option_help = {};  // a kBool option: it sets false ("--no-gpu"), and says so
};
std::span<const ConfigKey> ConfigKeys();
// Sets `key` from the text of its command-line option (a kBool option: "false"); errors name
// the option and are those of the file's values.
Status ApplyOption(const ConfigKey& key, const std::string& text, DaemonConfig* cfg);
// The key's value in `cfg` as TOML ("\"buffered\"", "\"64MiB\"", 4, true, "\"10s\"").
std::string ShowValue(const ConfigKey& key, const DaemonConfig& cfg);
// The whole configuration as a TOML file that reads back as the same: every key of
// ConfigKeys(), then the models (weightd --check-config).
std::string ToToml(const DaemonConfig& cfg);

// Validates a model name: 1-64 of [A-Za-z0-9._-], starting with a letter or digit.
Status ValidateModelName(const std::string& name);
// "4096", "16MiB", "1.5GiB", "512k" -> bytes. InvalidArgument on anything else.
Result<std::uint64_t> ParseSize(const std::string& text);
// "250ms", "10s", "2m", or a bare number of milliseconds.
Result<std::chrono::milliseconds> ParseDuration(const std::string& text);

// "64GiB" (bytes), "80%" or a TOML float 0.8 (a fraction of the total).
Result<Budget> ParseBudget(const std::string& text);
// "80%" or 0.8 -> 0.8; InvalidArgument outside [0, 1].
Result<double> ParseFraction(const std::string& text);
// "HOST:PORT" with a loopback host (127.0.0.1, ::1 in brackets, localhost) and a port in
// 1-65535. The host comes back without brackets.
struct HttpListen {
  std::string host;
  int port = 0;
};
Result<HttpListen> ParseHttpListen(const std::string& listen);

// Parses TOML text into `base` (overriding what the file sets). `origin` names the file in
// messages.
Status ApplyToml(const std::string& toml_text, const std::string& origin, DaemonConfig* base);
// Reads and applies a file. NotFound if it does not exist.
Status ApplyTomlFile(const std::string& path, DaemonConfig* base);
// "NAME=DIR"
Result<ModelConfig> ParseModelFlag(const std::string& flag);
// Adds or replaces a model; keeps `models` sorted and unique.
void UpsertModel(DaemonConfig* cfg, ModelConfig m);
// Cross-field checks and the derived defaults (shm_prefix, fd_socket).
Status Finalize(DaemonConfig* cfg);

}  // namespace weightd
