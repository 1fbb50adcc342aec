#include "config.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <type_traits>
#include <fstream>
#include <sstream>

#define TOML_HEADER_ONLY 1
#include <toml++/toml.h>
#include <xxhash.h>

namespace weightd {

std::uint32_t DefaultLoaderThreads() {
  cpu_set_t set;
  CPU_ZERO(&set);
  long cpus = ::sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : ::sysconf(_SC_NPROCESSORS_ONLN);
  return static_cast<std::uint32_t>(std::clamp<long>(cpus, 4, 16));
}

namespace {

bool IsNameChar(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'; }

Status Invalid(const std::string& origin, const std::string& what) {
  return InvalidArgument(origin + ": " + what, "config.invalid");
}

// Reads a size from either an integer or a string with a unit.
Result<std::uint64_t> SizeNode(const toml::node& n, const std::string& key, const std::string& origin) {
  // as_integer() before any value<>(): toml++ converts a float to an integer without a range
  // check (undefined behaviour for 1e22).
  if (const auto* i = n.as_integer()) {
    if (i->get() < 0) return Invalid(origin, key + " must not be negative");
    return static_cast<std::uint64_t>(i->get());
  }
  if (auto s = n.value<std::string>()) {
    auto r = ParseSize(*s);
    if (!r.ok()) return Invalid(origin, key + ": " + r.status().message());
    return r;
  }
  return Invalid(origin, key + " must be an integer number of bytes or a string like \"16MiB\"");
}

Result<std::chrono::milliseconds> DurationNode(const toml::node& n, const std::string& key, const std::string& origin) {
  if (n.is_integer()) {
    auto i = *n.value<std::int64_t>();
    if (i < 0) return Invalid(origin, key + " must not be negative");
    return std::chrono::milliseconds(i);
  }
  if (auto s = n.value<std::string>()) {
    auto r = ParseDuration(*s);
    if (!r.ok()) return Invalid(origin, key + ": " + r.status().message());
    return r;
  }
  return Invalid(origin, key + " must be milliseconds or a string like \"10s\"");
}

// An integer in [min, max]. as_integer(), never value<>(): see SizeNode.
Result<std::int64_t> IntNode(const toml::node& n, const std::string& key, const std::string& origin, std::int64_t min,
                             std::int64_t max) {
  const auto* node = n.as_integer();
  if (node == nullptr || node->get() < min || node->get() > max)
    return Invalid(origin, key + " must be an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "]");
  return node->get();
}

Result<std::uint32_t> CountNode(const toml::node& n, const std::string& key, const std::string& origin,
                                std::uint32_t min, std::uint32_t max) {
  ASSIGN_OR_RETURN(std::int64_t i, IntNode(n, key, origin, min, max));
  return static_cast<std::uint32_t>(i);
}

Result<bool> BoolNode(const toml::node& n, const std::string& key, const std::string& origin) {
  if (!n.is_boolean()) return Invalid(origin, key + " must be true or false");
  return *n.value<bool>();
}

Result<double> FractionNode(const toml::node& n, const std::string& key, const std::string& origin) {
  if (n.is_floating_point() || n.is_integer()) {
    const double v = n.is_integer() ? static_cast<double>(n.as_integer()->get()) : n.as_floating_point()->get();
    if (!(v >= 0 && v <= 1)) return Invalid(origin, key + " must be a fraction in [0, 1] or a percentage like \"80%\"");
    return v;
  }
  if (auto s = n.value<std::string>()) {
    auto r = ParseFraction(*s);
    if (!r.ok()) return Invalid(origin, key + ": " + r.status().message());
    return r;
  }
  return Invalid(origin, key + " must be a fraction like 0.8 or a string like \"80%\"");
}

Result<Budget> BudgetNode(const toml::node& n, const std::string& key, const std::string& origin) {
  if (n.is_floating_point()) {
    ASSIGN_OR_RETURN(double f, FractionNode(n, key, origin));
    if (f <= 0) return Invalid(origin, key + ": a budget of 0 holds nothing");
    return Budget{0, f};
  }
  if (n.is_integer()) {
    ASSIGN_OR_RETURN(std::uint64_t b, SizeNode(n, key, origin));
    return Budget{b, 0};
  }
  if (auto s = n.value<std::string>()) {
    auto r = ParseBudget(*s);
    if (!r.ok()) return Invalid(origin, key + ": " + r.status().message());
    return r;
  }
  return Invalid(origin, key + " must be bytes (\"64GiB\") or a share of the total (\"50%\", 0.5)");
}

Result<std::string> StringNode(const toml::node& n, const std::string& key, const std::string& origin) {
  auto s = n.value<std::string>();
  if (!n.is_string() || !s) return Invalid(origin, key + " must be a string");
  return *s;
}

// A model's [models.NAME] table.
Status ModelTable(const toml::table& mt, const std::string& origin, ModelConfig* mc) {
  const std::string base = "models." + mc->name + ".";
  for (auto&& [mk, mv] : mt) {
    const std::string k(mk.str());
    const std::string qk = base + k;
    if (k == "path") {
      ASSIGN_OR_RETURN(mc->dir, StringNode(mv, qk, origin));
    } else if (k == "pin") {
      ASSIGN_OR_RETURN(mc->pin, BoolNode(mv, qk, origin));
    } else if (k == "priority") {
      ASSIGN_OR_RETURN(std::int64_t priority, IntNode(mv, qk, origin, -1000, 1000));
      mc->priority = static_cast<std::int32_t>(priority);
    } else if (k == "host_idle_ttl") {
      ASSIGN_OR_RETURN(mc->host_idle_ttl, DurationNode(mv, qk, origin));
    } else if (k == "gpu_idle_ttl") {
      ASSIGN_OR_RETURN(mc->gpu_idle_ttl, DurationNode(mv, qk, origin));
    } else if (k == "allow_users" || k == "allow_groups") {
      const toml::array* a = mv.as_array();
      if (a == nullptr) return Invalid(origin, qk + " must be an array of names or numeric ids");
      std::vector<std::string>& out = k == "allow_users" ? mc->allow_users : mc->allow_groups;
      out.clear();
      for (const toml::node& e : *a) {
        std::string name;
        if (e.is_integer()) {
          ASSIGN_OR_RETURN(std::int64_t id, IntNode(e, qk, origin, 0, 0xffffffffll));
          name = std::to_string(id);
        } else {
          ASSIGN_OR_RETURN(name, StringNode(e, qk, origin));
        }
        if (name.empty() || name.size() > 256) return Invalid(origin, qk + ": a name must be 1-256 characters");
        out.push_back(std::move(name));
      }
    } else if (k == "preload") {
      const toml::array* a = mv.as_array();
      if (a == nullptr) return Invalid(origin, qk + " must be an array like [\"host\", \"cuda:0\"]");
      mc->preload.clear();
      for (const toml::node& e : *a) {
        ASSIGN_OR_RETURN(std::string tier, StringNode(e, qk, origin));
        if (tier != "host" && tier != "cuda" && tier.rfind("cuda:", 0) != 0)
          return Invalid(origin, qk + ": unknown tier '" + tier + "' (use \"host\" or \"cuda:N\")");
        if (std::find(mc->preload.begin(), mc->preload.end(), tier) == mc->preload.end()) mc->preload.push_back(tier);
      }
    } else {
      return Invalid(origin, "unknown key '" + qk + "'");
    }
  }
  if (mc->dir.empty()) return Invalid(origin, "models." + mc->name + " has no 'path'");
  return Status::Ok();
}

static_assert(std::is_same_v<mode_t, std::uint32_t>, "ConfigKey::Field holds shm_mode as std::uint32_t");

#define WD_FIELD(f) [](DaemonConfig& c) -> ConfigKey::Field { return &c.f; }
using K = ConfigKey::Kind;
constexpr std::int64_t kMillion = 1'000'000;

// In the order of config.h and README.md's example file.
const ConfigKey kKeys[] = {
    {"daemon", "socket", K::kString, WD_FIELD(socket), "the ZeroMQ endpoint to serve, ipc://PATH", "-s,--socket",
     "ipc://PATH"},
    {"daemon", "shm_prefix", K::kString, WD_FIELD(shm_prefix),
     "prefix of shared-memory segment names; one daemon per prefix (default: weightd-<hash of the socket>)",
     "--shm-prefix", "PREFIX"},
    {"daemon", "shm_mode", K::kMode, WD_FIELD(shm_mode),
     "mode of the segments, octal, applied exactly; group and other write bits are refused"},
    {"daemon", "shm_group", K::kString, WD_FIELD(shm_group),
     "the group owning the segments, a name or a gid (default: the daemon's own group)"},
    {"daemon", "client_group", K::kString, WD_FIELD(client_group),
     "who may connect: the group of the socket and every model's default ACL (default: the daemon's own group)"},
    {"daemon", "admin_group", K::kString, WD_FIELD(admin_group),
     "who may load, evict, read stats and acquire any model (default: none; root and the daemon's user always may)"},
    {"daemon", "loader_threads", K::kCount, WD_FIELD(loader_threads),
     "threads reading shards from disk (default: one per core, 4 to 16)", "--loader-threads", "N", {}, 1, 256},
    {"daemon", "chunk_size", K::kSize, WD_FIELD(chunk_size), "bytes per read request, e.g. 16MiB (4 KiB to 1 GiB)",
     "--chunk-size", "SIZE"},
    {"daemon", "io", K::kString, WD_FIELD(io),
     "how shards are read: buffered, direct (O_DIRECT) or auto (O_DIRECT for files not in the page cache)", "--io",
     "MODE", "buffered|direct|auto"},
    {"daemon", "fill", K::kString, WD_FIELD(fill),
     "how fresh segments are filled: write (pread into a buffer, pwrite into the segment) or map (pread into the "
     "mapped segment)",
     "--fill", "METHOD", "write|map"},
    {"daemon", "fill_hash", K::kString, WD_FIELD(fill_hash),
     "how a write fill hashes chunks that finish out of order: mapping (through the daemon's mapping), read-back "
     "(pread back from the segment, one more copy) or auto (whichever a probe at start finds cheaper here)",
     "--fill-hash", "SOURCE", "auto|mapping|read-back"},
    {"daemon", "segment_parts", K::kCount, WD_FIELD(segment_parts),
     "the most tmpfs files a host copy is split into (parts of at least 16 MiB; a fill writes each file with one "
     "thread at a time); 1: one file per shard",
     "--segment-parts", "N", {}, 1, 4096},
    {"daemon", "prefault_threads", K::kCount, WD_FIELD(prefault_threads), "extra threads pre-faulting fresh segments",
     {}, {}, {}, 0, 256},
    {"daemon", "verify_checksums", K::kBool, WD_FIELD(verify_checksums),
     "check a model directory's checksums.xxh128 when it has one"},
    {"daemon", "heartbeat_interval", K::kDuration, WD_FIELD(heartbeat_interval), "how often clients send a heartbeat"},
    {"daemon", "heartbeat_timeout", K::kDuration, WD_FIELD(heartbeat_timeout),
     "end a silent client's session (and its leases) after this long, e.g. 10s", "--heartbeat-timeout", "DURATION"},
    {"daemon", "max_leases_per_client", K::kCount, WD_FIELD(max_leases_per_client), "leases one session may hold", {},
     {}, {}, 1, kMillion},
    {"daemon", "max_sessions", K::kCount, WD_FIELD(max_sessions), "open sessions", {}, {}, {}, 1, kMillion},
    {"daemon", "max_connections_per_user", K::kCount, WD_FIELD(max_connections_per_user),
     "open control connections per peer uid; more are closed at once, before their handshake", {}, {}, {}, 1,
     kMillion},
    {"daemon", "max_sessions_per_user", K::kCount, WD_FIELD(max_sessions_per_user), "sessions per peer uid", {}, {},
     {}, 1, kMillion},
    {"daemon", "keep_segments_on_stop", K::kBool, WD_FIELD(keep_segments_on_stop),
     "a clean stop leaves the resident host copies for the next start to adopt"},
    {"daemon", "max_message_size", K::kSize, WD_FIELD(max_message_size),
     "the largest request the control socket takes (ZMQ_MAXMSGSIZE)"},
    {"daemon", "log_level", K::kString, WD_FIELD(log_level), "trace, debug, info, warn, error, critical or off",
     "--log-level", "LEVEL"},
    {"daemon", "http_listen", K::kString, WD_FIELD(http_listen),
     "serve /healthz, /readyz and /metrics on this loopback HOST:PORT, e.g. 127.0.0.1:9464 (default: off)", "--http",
     "HOST:PORT"},
    {"gpu", "enabled", K::kBool, WD_FIELD(gpu_enabled), "serve GPU copies where CUDA devices are present", "--no-gpu",
     {}, {}, 0, 0, "serve the host tier only, even where CUDA devices are present"},
    {"gpu", "export", K::kString, WD_FIELD(gpu_export),
     "how GPU copies are shared: vmm (fds over a Unix socket, read-only imports) or legacy (cudaIpcMemHandle_t, a "
     "bearer token any local user may open)",
     "--gpu-export", "MODE", "vmm|legacy"},
    {"gpu", "fd_socket", K::kString, WD_FIELD(fd_socket),
     "the Unix socket that passes fds to clients (default: the socket's path + .fds)"},
    {"gpu", "pin_host", K::kBool, WD_FIELD(gpu_pin_host), "keep resident host copies page-locked for fast GPU copies"},
    {"gpu", "peer_copy", K::kBool, WD_FIELD(gpu_peer_copy),
     "make a model's copy on a second GPU from the first GPU's copy (NVLink/PCIe peer access) instead of host memory"},
    {"gpu", "pin_threads", K::kCount, WD_FIELD(gpu_pin_threads),
     "threads page-locking the chunks of a GPU copy that follows a fill, each chunk once it is in, ahead of the copy",
     "--gpu-pin-threads", "N", {}, 1, 64},
    {"gpu", "fd_store", K::kBool, WD_FIELD(gpu_fd_store),
     "under systemd, keep VMM copies' fds in its fd store, so that a restarted daemon takes them back"},
    {"gpu", "allow_legacy_multi_tenant", K::kBool, WD_FIELD(gpu_legacy_multi_tenant),
     "allow the legacy export with tenants (shm_group, client_group or an ACL set)"},
    {"cache", "host_budget", K::kBudget, WD_FIELD(cache.host_budget),
     "host memory model copies may hold: bytes (\"64GiB\") or a share of MemTotal (\"50%\")", "--host-budget",
     "BUDGET"},
    {"cache", "gpu_budget", K::kBudget, WD_FIELD(cache.gpu_budget),
     "memory model copies may hold on each GPU: bytes or a share of its memory", "--gpu-budget", "BUDGET"},
    {"cache", "host_idle_ttl", K::kDuration, WD_FIELD(cache.host_idle_ttl),
     "unleased host copies idle this long are evicted (0: never)"},
    {"cache", "gpu_idle_ttl", K::kDuration, WD_FIELD(cache.gpu_idle_ttl),
     "unleased GPU copies idle this long are evicted (0: never)"},
    {"cache", "host_pressure", K::kFraction, WD_FIELD(cache.host_pressure),
     "evict unleased copies while more than this share of host memory is in use (0: off)"},
    {"cache", "gpu_pressure", K::kFraction, WD_FIELD(cache.gpu_pressure),
     "evict unleased copies while more than this share of a GPU's memory is in use (0: off)"},
    {"cache", "max_host_models", K::kCount, WD_FIELD(cache.max_host_models), "host copies at most (0: no cap)", {}, {},
     {}, 0, kMillion},
    {"cache", "max_gpu_models", K::kCount, WD_FIELD(cache.max_gpu_models), "copies per GPU at most (0: no cap)", {}, {},
     {}, 0, kMillion},
    {"cache", "admission_timeout", K::kDuration, WD_FIELD(cache.admission_timeout),
     "how long a load waits for room before it fails with ResourceExhausted"},
    {"cache", "file_check_interval", K::kDuration, WD_FIELD(cache.file_check_interval),
     "how often resident models' files are checked for changes (0: never)"},
    {"cache", "pressure_interval", K::kDuration, WD_FIELD(cache.pressure_interval),
     "how often memory is sampled for the pressure rule"},
    {"cache", "max_loads", K::kCount, WD_FIELD(cache.max_loads),
     "loads that hold budget at once, per tier, and host copies read at once (at most loader_threads); more misses "
     "queue, oldest first (0: no bound)", {}, {}, {}, 0,
     kMillion},
    {"cache", "eviction", K::kString, WD_FIELD(cache.eviction),
     "which unleased copy goes first: lfu (least frequently used, counts that decay) or lru (least recently used)"},
};
#undef WD_FIELD

const ConfigKey* FindKey(std::string_view table, std::string_view name) {
  for (const ConfigKey& k : kKeys)
    if (k.table == table && k.name == name) return &k;
  return nullptr;
}

Result<std::uint32_t> ParseMode(const std::string& m) {
  unsigned long v = 0;
  auto [p, ec] = std::from_chars(m.data(), m.data() + m.size(), v, 8);
  if (m.empty() || ec != std::errc() || p != m.data() + m.size() || v > 0777)
    return InvalidArgument("must be an octal mode like \"0640\"", "config.invalid");
  return static_cast<std::uint32_t>(v);
}

// Sets a key from its TOML value.
Status ApplyKey(const ConfigKey& key, const toml::node& n, const std::string& origin, DaemonConfig* cfg) {
  const std::string qk = std::string(key.table) + "." + std::string(key.name);
  ConfigKey::Field f = key.field(*cfg);
  switch (key.kind) {
    case K::kString: {
      ASSIGN_OR_RETURN(*std::get<std::string*>(f), StringNode(n, qk, origin));
      break;
    }
    case K::kSize: {
      ASSIGN_OR_RETURN(*std::get<std::uint64_t*>(f), SizeNode(n, qk, origin));
      break;
    }
    case K::kCount: {
      ASSIGN_OR_RETURN(*std::get<std::uint32_t*>(f), CountNode(n, qk, origin, static_cast<std::uint32_t>(key.min),
                                                              static_cast<std::uint32_t>(key.max)));
      break;
    }
    case K::kBool: {
      ASSIGN_OR_RETURN(*std::get<bool*>(f), BoolNode(n, qk, origin));
      break;
    }
    case K::kDuration: {
      ASSIGN_OR_RETURN(*std::get<std::chrono::milliseconds*>(f), DurationNode(n, qk, origin));
      break;
    }
    case K::kFraction: {
      ASSIGN_OR_RETURN(*std::get<double*>(f), FractionNode(n, qk, origin));
      break;
    }
    case K::kBudget: {
      ASSIGN_OR_RETURN(*std::get<Budget*>(f), BudgetNode(n, qk, origin));
      break;
    }
    case K::kMode: {
      ASSIGN_OR_RETURN(std::string m, StringNode(n, qk, origin));
      auto mode = ParseMode(m);
      if (!mode.ok()) return Invalid(origin, qk + " " + mode.status().message());
      *std::get<std::uint32_t*>(f) = *mode;
      break;
    }
  }
  return Status::Ok();
}

// TOML text of values (ShowValue, ToToml).
std::string Quote(std::string_view v) {
  std::string out = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string ShowSize(std::uint64_t b) {
  static constexpr std::pair<std::uint64_t, const char*> kUnits[] = {
      {1ull << 40, "TiB"}, {1ull << 30, "GiB"}, {1ull << 20, "MiB"}, {1ull << 10, "KiB"}};
  for (auto [unit, name] : kUnits)
    if (b != 0 && b % unit == 0) return Quote(std::to_string(b / unit) + name);
  return std::to_string(b);
}

std::string ShowDuration(std::chrono::milliseconds d) {
  const std::int64_t ms = d.count();
  if (ms == 0) return "0";
  if (ms % 3'600'000 == 0) return Quote(std::to_string(ms / 3'600'000) + "h");
  if (ms % 60'000 == 0) return Quote(std::to_string(ms / 60'000) + "m");
  if (ms % 1000 == 0) return Quote(std::to_string(ms / 1000) + "s");
  return Quote(std::to_string(ms) + "ms");
}

// A TOML float (never an integer, which a budget would read as bytes): the shortest text that
// reads back as the same double.
std::string ShowFraction(double v) {
  char buf[32];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

}  // namespace

std::uint64_t Budget::Resolve(std::uint64_t total) const {
  if (fraction > 0) return static_cast<std::uint64_t>(static_cast<double>(total) * fraction);
  return bytes == 0 ? total : std::min(bytes, total);
}

std::string Budget::ToString() const {
  char buf[64];
  if (fraction > 0) std::snprintf(buf, sizeof buf, "%g%% of the total", fraction * 100);
  else if (bytes == 0) std::snprintf(buf, sizeof buf, "the whole total");
  else std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(bytes));
  return buf;
}

Result<double> ParseFraction(const std::string& text) {
  std::string s = text;
  double scale = 1;
  if (!s.empty() && s.back() == '%') {
    s.pop_back();
    scale = 100;
  }
  double v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size())
    return InvalidArgument("not a fraction: '" + text + "' (use 0.8 or \"80%\")", "config.bad_fraction");
  v /= scale;
  if (!(v >= 0 && v <= 1)) return InvalidArgument("fraction out of [0, 1]: '" + text + "'", "config.bad_fraction");
  return v;
}

Result<Budget> ParseBudget(const std::string& text) {
  if (!text.empty() && text.back() == '%') {
    ASSIGN_OR_RETURN(double f, ParseFraction(text));
    if (f <= 0) return InvalidArgument("a budget of 0% holds nothing: '" + text + "'", "config.bad_budget");
    return Budget{0, f};
  }
  ASSIGN_OR_RETURN(std::uint64_t b, ParseSize(text));
  return Budget{b, 0};
}

Result<HttpListen> ParseHttpListen(const std::string& listen) {
  const auto colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == listen.size())
    return InvalidArgument("http listen address must be HOST:PORT, got '" + listen + "'", "config.bad_listen");
  const std::string host = listen.substr(0, colon);
  const std::string port = listen.substr(colon + 1);
  unsigned v = 0;
  auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), v);
  if (ec != std::errc() || p != port.data() + port.size() || v == 0 || v > 65535)
    return InvalidArgument("bad port in http listen address '" + listen + "'", "config.bad_listen");
  // The listener has no authentication: it must never be reachable from another machine.
  if (host != "127.0.0.1" && host != "[::1]" && host != "localhost")
    return InvalidArgument("http listen address must be loopback (127.0.0.1, [::1] or localhost), got '" + host + "'",
                           "config.bad_listen");
  return HttpListen{host == "[::1]" ? "::1" : host, static_cast<int>(v)};
}

Status ValidateModelName(const std::string& name) {
  if (name.empty() || name.size() > 64 || !std::isalnum(static_cast<unsigned char>(name[0])) ||
      !std::all_of(name.begin(), name.end(), IsNameChar))
    return InvalidArgument("invalid model name '" + name + "': use 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit",
                           "config.bad_model_name");
  return Status::Ok();
}

Result<std::uint64_t> ParseSize(const std::string& text) {
  std::string s;
  for (char c : text)
    if (!std::isspace(static_cast<unsigned char>(c))) s += c;
  std::size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  if (i == 0) return InvalidArgument("not a size: '" + text + "'", "config.bad_size");
  double v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + i, v);
  if (ec != std::errc() || p != s.data() + i) return InvalidArgument("not a size: '" + text + "'", "config.bad_size");
  std::string unit = s.substr(i);
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::tolower(c); });
  double mult;
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "k" || unit == "kib" || unit == "kb") mult = 1024.0;
  else if (unit == "m" || unit == "mib" || unit == "mb") mult = 1024.0 * 1024;
  else if (unit == "g" || unit == "gib" || unit == "gb") mult = 1024.0 * 1024 * 1024;
  else if (unit == "t" || unit == "tib" || unit == "tb") mult = 1024.0 * 1024 * 1024 * 1024;
  else return InvalidArgument("unknown size unit '" + unit + "' in '" + text + "' (use B, KiB, MiB, GiB, TiB)", "config.bad_size");
  double bytes = v * mult;
  if (!std::isfinite(bytes) || bytes > 9.0e18) return InvalidArgument("size too large: '" + text + "'", "config.bad_size");
  return static_cast<std::uint64_t>(std::llround(bytes));
}

Result<std::chrono::milliseconds> ParseDuration(const std::string& text) {
  std::size_t i = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  if (i == 0 || i > 12) return InvalidArgument("not a duration: '" + text + "'", "config.bad_duration");
  std::int64_t v = std::stoll(text.substr(0, i));
  std::string unit = text.substr(i);
  if (unit.empty() || unit == "ms") return std::chrono::milliseconds(v);
  if (unit == "s") return std::chrono::milliseconds(v * 1000);
  if (unit == "m" || unit == "min") return std::chrono::milliseconds(v * 60'000);
  if (unit == "h") return std::chrono::milliseconds(v * 3'600'000);
  return InvalidArgument("unknown duration unit '" + unit + "' in '" + text + "' (use ms, s, m, h)", "config.bad_duration");
}

Status ApplyToml(const std::string& toml_text, const std::string& origin, DaemonConfig* cfg) {
  // The file must be ASCII: toml++ 3.3 (Debian 12's) reaches undefined behaviour on some
  // non-ASCII characters (marzer/tomlplusplus#295, fixed after 3.4.0), and telling where a
  // string starts takes a TOML lexer. Other characters are written as \uXXXX escapes in
  // "..." strings.
  const auto at = std::find_if(toml_text.begin(), toml_text.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x80; });
  if (at != toml_text.end()) {
    const std::string_view before(toml_text.data(), static_cast<std::size_t>(at - toml_text.begin()));
    const auto line = 1 + std::count(before.begin(), before.end(), '\n');
    const auto nl = before.rfind('\n');
    const auto column = before.size() - (nl == std::string_view::npos ? 0 : nl + 1) + 1;
    return Invalid(origin, "non-ASCII byte at line " + std::to_string(line) + ", column " + std::to_string(column) +
                               ": the file must be ASCII; write other characters as \\uXXXX escapes in \"...\" strings");
  }
  toml::table root;
  try {
    root = toml::parse(toml_text, origin);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << e.description() << " at line " << e.source().begin.line << ", column " << e.source().begin.column;
    return Invalid(origin, os.str());
  }
  for (auto&& [key, node] : root) {
    const std::string k(key.str());
    if (k != "daemon" && k != "gpu" && k != "cache" && k != "models")
      return Invalid(origin, "unknown table or key '" + k + "' (expected [daemon], [gpu], [cache] and [models.NAME])");
  }
  for (const char* table : {"daemon", "gpu", "cache"}) {
    const toml::node* node = root.get(table);
    if (node == nullptr) continue;
    const toml::table* t = node->as_table();
    if (t == nullptr) return Invalid(origin, "'" + std::string(table) + "' must be a table");
    for (auto&& [key, value] : *t) {
      const ConfigKey* k = FindKey(table, key.str());
      if (k == nullptr) return Invalid(origin, "unknown key '" + std::string(table) + "." + std::string(key.str()) + "'");
      RETURN_IF_ERROR(ApplyKey(*k, value, origin, cfg));
    }
  }
  if (auto* m = root.get("models")) {
    const toml::table* t = m->as_table();
    if (t == nullptr) return Invalid(origin, "'models' must be a table of [models.NAME] tables");
    for (auto&& [key, node] : *t) {
      ModelConfig mc;
      mc.name = std::string(key.str());
      RETURN_IF_ERROR(ValidateModelName(mc.name).WithContext(origin));
      const toml::table* mt = node.as_table();
      if (mt == nullptr) return Invalid(origin, "models." + mc.name + " must be a table with a 'path'");
      RETURN_IF_ERROR(ModelTable(*mt, origin, &mc));
      UpsertModel(cfg, std::move(mc));
    }
  }
  return Status::Ok();
}

Status ApplyTomlFile(const std::string& path, DaemonConfig* cfg) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot read config file " + path, "config.not_found");
  std::ostringstream ss;
  ss << in.rdbuf();
  RETURN_IF_ERROR(ApplyToml(ss.str(), path, cfg));
  cfg->config_path = path;
  return Status::Ok();
}

Result<ModelConfig> ParseModelFlag(const std::string& flag) {
  auto eq = flag.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == flag.size())
    return InvalidArgument("--model expects NAME=DIR, got '" + flag + "'", "config.bad_model_flag");
  ModelConfig m{flag.substr(0, eq), flag.substr(eq + 1)};
  RETURN_IF_ERROR(ValidateModelName(m.name));
  return m;
}

void UpsertModel(DaemonConfig* cfg, ModelConfig m) {
  auto it = std::lower_bound(cfg->models.begin(), cfg->models.end(), m.name,
                             [](const ModelConfig& a, const std::string& n) { return a.name < n; });
  if (it != cfg->models.end() && it->name == m.name) *it = std::move(m);
  else cfg->models.insert(it, std::move(m));
}

Status Finalize(DaemonConfig* cfg) {
  if (cfg->socket.rfind("ipc://", 0) != 0 || cfg->socket.size() <= 6)
    return InvalidArgument("socket must be an ipc:// endpoint (peer credentials identify clients), got '" + cfg->socket + "'",
                           "config.bad_socket");
  if (cfg->shm_prefix.empty()) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "weightd-%08x", static_cast<unsigned>(XXH64(cfg->socket.data(), cfg->socket.size(), 0)));
    cfg->shm_prefix = buf;
  }
  // No '.': segment names are "<prefix>.<model>...", and a prefix with a dot could be the start
  // of another daemon's names ("a" and "a.b"), whose segments the stale-segment sweep would take.
  if (cfg->shm_prefix.size() > 64 || cfg->shm_prefix.find('.') != std::string::npos ||
      !std::all_of(cfg->shm_prefix.begin(), cfg->shm_prefix.end(), IsNameChar))
    return InvalidArgument("shm_prefix must be 1-64 of A-Z a-z 0-9 _ -, got '" + cfg->shm_prefix + "'", "config.bad_prefix");
  if (cfg->shm_mode & 0002) return InvalidArgument("shm_mode must not be world-writable", "config.bad_mode");
  if (cfg->shm_mode & 0022) return InvalidArgument("shm_mode must not let group or others write segments", "config.bad_mode");
  if (cfg->chunk_size < 4096 || cfg->chunk_size > (1ull << 30))
    return InvalidArgument("chunk_size must be between 4 KiB and 1 GiB", "config.bad_chunk");
  if (cfg->heartbeat_interval.count() <= 0 || cfg->heartbeat_timeout <= cfg->heartbeat_interval)
    return InvalidArgument("heartbeat_timeout must be larger than heartbeat_interval (> 0)", "config.bad_heartbeat");
  if (cfg->max_message_size < 4096) return InvalidArgument("max_message_size must be at least 4 KiB", "config.bad_size");
  if (cfg->gpu_export != "vmm" && cfg->gpu_export != "legacy")
    return InvalidArgument("gpu.export must be \"vmm\" or \"legacy\", not \"" + cfg->gpu_export + "\"",
                           "config.bad_gpu_export");
  if (!cfg->http_listen.empty()) RETURN_IF_ERROR(ParseHttpListen(cfg->http_listen).status());
  const bool tenants = !cfg->shm_group.empty() || !cfg->client_group.empty() ||
                       std::any_of(cfg->models.begin(), cfg->models.end(), [](const ModelConfig& m) {
                         return !m.allow_users.empty() || !m.allow_groups.empty();
                       });
  if (cfg->gpu_export == "legacy" && tenants && !cfg->gpu_legacy_multi_tenant)
    return InvalidArgument("gpu.export = \"legacy\" with tenants (daemon.shm_group or daemon.client_group is set, or a "
                           "model has an ACL): a legacy CUDA IPC handle is a "
                           "bearer token that any local process of any uid may open read-write, so one tenant could read "
                           "or change another's GPU copies; use \"vmm\", or set gpu.allow_legacy_multi_tenant = true to "
                           "accept that",
                           "config.legacy_multi_tenant");
  if (cfg->io != "auto" && cfg->io != "direct" && cfg->io != "buffered")
    return InvalidArgument("daemon.io must be \"auto\", \"direct\" or \"buffered\", not \"" + cfg->io + "\"", "config.invalid");
  if (cfg->fill != "write" && cfg->fill != "map")
    return InvalidArgument("daemon.fill must be \"write\" or \"map\", not \"" + cfg->fill + "\"", "config.invalid");
  if (cfg->fill_hash != "auto" && cfg->fill_hash != "mapping" && cfg->fill_hash != "read-back")
    return InvalidArgument("daemon.fill_hash must be \"auto\", \"mapping\" or \"read-back\", not \"" + cfg->fill_hash + "\"",
                           "config.invalid");
  for (const Budget* b : {&cfg->cache.host_budget, &cfg->cache.gpu_budget})
    if (b->fraction < 0 || b->fraction > 1) return InvalidArgument("a budget's fraction must be in (0, 1]", "config.bad_budget");
  if (cfg->cache.eviction != "lfu" && cfg->cache.eviction != "lru")
    return InvalidArgument("cache.eviction must be \"lfu\" or \"lru\", not \"" + cfg->cache.eviction + "\"",
                           "config.invalid");
  if (cfg->cache.pressure_interval.count() <= 0)
    return InvalidArgument("cache.pressure_interval must be positive", "config.invalid");
  if (cfg->fd_socket.empty()) {
    // Clients receive this path in manifests, so it must not depend on the daemon's cwd.
    std::error_code ec;
    auto p = std::filesystem::absolute(cfg->socket.substr(std::string("ipc://").size()) + ".fds", ec);
    cfg->fd_socket = ec ? std::string() : p.lexically_normal().string();
  }
  // sockaddr_un holds 107 characters and a NUL.
  if (cfg->fd_socket.empty() || cfg->fd_socket.size() > 107 || cfg->fd_socket[0] != '/')
    return InvalidArgument("gpu.fd_socket must be an absolute path of at most 107 characters, got '" + cfg->fd_socket + "'",
                           "config.bad_socket");
  return Status::Ok();
}

std::span<const ConfigKey> ConfigKeys() { return kKeys; }

Status ApplyOption(const ConfigKey& key, const std::string& text, DaemonConfig* cfg) {
  const std::string_view opt = key.option.substr(key.option.find("--") == std::string_view::npos ? 0 : key.option.find("--"));
  const std::string context(opt);
  ConfigKey::Field f = key.field(*cfg);
  // Parses `text` with `parse` into the field, of type T; errors name the option.
  auto set = [&]<class T>(std::type_identity<T>, auto parse) -> Status {
    auto v = parse(text);
    if (!v.ok()) return v.status().WithContext(context);
    *std::get<T*>(f) = *v;
    return Status::Ok();
  };
  switch (key.kind) {
    case K::kString: *std::get<std::string*>(f) = text; return Status::Ok();
    case K::kSize: return set(std::type_identity<std::uint64_t>{}, ParseSize);
    case K::kCount: {
      std::int64_t v = 0;
      auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
      if (text.empty() || ec != std::errc() || p != text.data() + text.size() || v < key.min || v > key.max)
        return InvalidArgument(context + ": must be an integer in [" + std::to_string(key.min) + ", " +
                                   std::to_string(key.max) + "], got '" + text + "'",
                               "config.invalid");
      *std::get<std::uint32_t*>(f) = static_cast<std::uint32_t>(v);
      return Status::Ok();
    }
    case K::kBool:
      if (text != "true" && text != "false")
        return InvalidArgument(context + ": must be true or false, got '" + text + "'", "config.invalid");
      *std::get<bool*>(f) = text == "true";
      return Status::Ok();
    case K::kDuration: return set(std::type_identity<std::chrono::milliseconds>{}, ParseDuration);
    case K::kFraction: return set(std::type_identity<double>{}, ParseFraction);
    case K::kBudget: return set(std::type_identity<Budget>{}, ParseBudget);
    case K::kMode: return set(std::type_identity<std::uint32_t>{}, ParseMode);
  }
  return Status::Ok();
}

std::string ShowValue(const ConfigKey& key, const DaemonConfig& cfg) {
  ConfigKey::Field f = key.field(const_cast<DaemonConfig&>(cfg));  // read only
  switch (key.kind) {
    case K::kString: return Quote(*std::get<std::string*>(f));
    case K::kSize: return ShowSize(*std::get<std::uint64_t*>(f));
    case K::kCount: return std::to_string(*std::get<std::uint32_t*>(f));
    case K::kBool: return *std::get<bool*>(f) ? "true" : "false";
    case K::kDuration: return ShowDuration(*std::get<std::chrono::milliseconds*>(f));
    case K::kFraction: return ShowFraction(*std::get<double*>(f));
    case K::kBudget: {
      const Budget& b = *std::get<Budget*>(f);
      return b.fraction > 0 ? ShowFraction(b.fraction) : ShowSize(b.bytes);
    }
    case K::kMode: {
      char buf[8];
      std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(*std::get<std::uint32_t*>(f)));
      return Quote(buf);
    }
  }
  return {};
}

std::string ToToml(const DaemonConfig& cfg) {
  std::string out;
  std::string_view table;
  for (const ConfigKey& k : kKeys) {
    if (k.table != table) {
      table = k.table;
      out += (out.empty() ? "[" : "\n[") + std::string(table) + "]\n";
    }
    out += std::string(k.name) + " = " + ShowValue(k, cfg) + "\n";
  }
  auto list = [](const std::vector<std::string>& v) {
    std::string s = "[";
    for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + Quote(v[i]);
    return s + "]";
  };
  for (const ModelConfig& m : cfg.models) {
    out += "\n[models." + Quote(m.name) + "]\npath = " + Quote(m.dir) + "\n";
    if (m.pin) out += "pin = true\n";
    if (m.priority != 0) out += "priority = " + std::to_string(m.priority) + "\n";
    if (!m.preload.empty()) out += "preload = " + list(m.preload) + "\n";
    if (m.host_idle_ttl) out += "host_idle_ttl = " + ShowDuration(*m.host_idle_ttl) + "\n";
    if (m.gpu_idle_ttl) out += "gpu_idle_ttl = " + ShowDuration(*m.gpu_idle_ttl) + "\n";
    if (!m.allow_users.empty()) out += "allow_users = " + list(m.allow_users) + "\n";
    if (!m.allow_groups.empty()) out += "allow_groups = " + list(m.allow_groups) + "\n";
  }
  return out;
}

}  // namespace weightd
