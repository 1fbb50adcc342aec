#include "config.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#define TOML_HEADER_ONLY 1
#include <toml++/toml.h>
#include <xxhash.h>

namespace weightd {
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

Status CacheTable(const toml::table& t, const std::string& origin, CacheConfig* c) {
  for (auto&& [key, node] : t) {
    const std::string k(key.str());
    const std::string qk = "cache." + k;
    if (k == "host_budget") {
      ASSIGN_OR_RETURN(c->host_budget, BudgetNode(node, qk, origin));
    } else if (k == "gpu_budget") {
      ASSIGN_OR_RETURN(c->gpu_budget, BudgetNode(node, qk, origin));
    } else if (k == "host_idle_ttl") {
      ASSIGN_OR_RETURN(c->host_idle_ttl, DurationNode(node, qk, origin));
    } else if (k == "gpu_idle_ttl") {
      ASSIGN_OR_RETURN(c->gpu_idle_ttl, DurationNode(node, qk, origin));
    } else if (k == "host_pressure") {
      ASSIGN_OR_RETURN(c->host_pressure, FractionNode(node, qk, origin));
    } else if (k == "gpu_pressure") {
      ASSIGN_OR_RETURN(c->gpu_pressure, FractionNode(node, qk, origin));
    } else if (k == "max_host_models") {
      ASSIGN_OR_RETURN(c->max_host_models, CountNode(node, qk, origin, 0, 1'000'000));
    } else if (k == "max_gpu_models") {
      ASSIGN_OR_RETURN(c->max_gpu_models, CountNode(node, qk, origin, 0, 1'000'000));
    } else if (k == "admission_timeout") {
      ASSIGN_OR_RETURN(c->admission_timeout, DurationNode(node, qk, origin));
    } else if (k == "file_check_interval") {
      ASSIGN_OR_RETURN(c->file_check_interval, DurationNode(node, qk, origin));
    } else if (k == "pressure_interval") {
      ASSIGN_OR_RETURN(c->pressure_interval, DurationNode(node, qk, origin));
    } else {
      return Invalid(origin, "unknown key '" + qk + "'");
    }
  }
  return Status::Ok();
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
  if (auto* d = root.get("daemon")) {
    const toml::table* t = d->as_table();
    if (t == nullptr) return Invalid(origin, "'daemon' must be a table");
    for (auto&& [key, node] : *t) {
      const std::string k(key.str());
      const std::string qk = "daemon." + k;
      if (k == "socket") {
        ASSIGN_OR_RETURN(cfg->socket, StringNode(node, qk, origin));
      } else if (k == "shm_prefix") {
        ASSIGN_OR_RETURN(cfg->shm_prefix, StringNode(node, qk, origin));
      } else if (k == "shm_mode") {
        ASSIGN_OR_RETURN(std::string m, StringNode(node, qk, origin));
        unsigned long v = 0;
        auto [p, ec] = std::from_chars(m.data(), m.data() + m.size(), v, 8);
        if (ec != std::errc() || p != m.data() + m.size() || v > 0777) return Invalid(origin, qk + " must be an octal mode like \"0640\"");
        cfg->shm_mode = static_cast<mode_t>(v);
      } else if (k == "shm_group") {
        ASSIGN_OR_RETURN(cfg->shm_group, StringNode(node, qk, origin));
      } else if (k == "client_group") {
        ASSIGN_OR_RETURN(cfg->client_group, StringNode(node, qk, origin));
      } else if (k == "admin_group") {
        ASSIGN_OR_RETURN(cfg->admin_group, StringNode(node, qk, origin));
      } else if (k == "loader_threads") {
        ASSIGN_OR_RETURN(cfg->loader_threads, CountNode(node, qk, origin, 1, 256));
      } else if (k == "chunk_size") {
        ASSIGN_OR_RETURN(cfg->chunk_size, SizeNode(node, qk, origin));
      } else if (k == "io") {
        ASSIGN_OR_RETURN(cfg->io, StringNode(node, qk, origin));
      } else if (k == "prefault_threads") {
        ASSIGN_OR_RETURN(cfg->prefault_threads, CountNode(node, qk, origin, 0, 256));
      } else if (k == "verify_checksums") {
        ASSIGN_OR_RETURN(cfg->verify_checksums, BoolNode(node, qk, origin));
      } else if (k == "heartbeat_interval") {
        ASSIGN_OR_RETURN(cfg->heartbeat_interval, DurationNode(node, qk, origin));
      } else if (k == "heartbeat_timeout") {
        ASSIGN_OR_RETURN(cfg->heartbeat_timeout, DurationNode(node, qk, origin));
      } else if (k == "max_leases_per_client") {
        ASSIGN_OR_RETURN(cfg->max_leases_per_client, CountNode(node, qk, origin, 1, 1'000'000));
      } else if (k == "max_sessions") {
        ASSIGN_OR_RETURN(cfg->max_sessions, CountNode(node, qk, origin, 1, 1'000'000));
      } else if (k == "max_connections_per_user") {
        ASSIGN_OR_RETURN(cfg->max_connections_per_user, CountNode(node, qk, origin, 1, 1'000'000));
      } else if (k == "max_sessions_per_user") {
        ASSIGN_OR_RETURN(cfg->max_sessions_per_user, CountNode(node, qk, origin, 1, 1'000'000));
      } else if (k == "keep_segments_on_stop") {
        ASSIGN_OR_RETURN(cfg->keep_segments_on_stop, BoolNode(node, qk, origin));
      } else if (k == "max_message_size") {
        ASSIGN_OR_RETURN(cfg->max_message_size, SizeNode(node, qk, origin));
      } else if (k == "log_level") {
        ASSIGN_OR_RETURN(cfg->log_level, StringNode(node, qk, origin));
      } else if (k == "http_listen") {
        ASSIGN_OR_RETURN(cfg->http_listen, StringNode(node, qk, origin));
      } else {
        return Invalid(origin, "unknown key '" + qk + "'");
      }
    }
  }
  if (auto* g = root.get("gpu")) {
    const toml::table* t = g->as_table();
    if (t == nullptr) return Invalid(origin, "'gpu' must be a table");
    for (auto&& [key, node] : *t) {
      const std::string k(key.str());
      const std::string qk = "gpu." + k;
      if (k == "enabled") {
        ASSIGN_OR_RETURN(cfg->gpu_enabled, BoolNode(node, qk, origin));
      } else if (k == "pin_host") {
        ASSIGN_OR_RETURN(cfg->gpu_pin_host, BoolNode(node, qk, origin));
      } else if (k == "fd_store") {
        ASSIGN_OR_RETURN(cfg->gpu_fd_store, BoolNode(node, qk, origin));
      } else if (k == "export") {
        ASSIGN_OR_RETURN(cfg->gpu_export, StringNode(node, qk, origin));
      } else if (k == "fd_socket") {
        ASSIGN_OR_RETURN(cfg->fd_socket, StringNode(node, qk, origin));
      } else if (k == "allow_legacy_multi_tenant") {
        ASSIGN_OR_RETURN(cfg->gpu_legacy_multi_tenant, BoolNode(node, qk, origin));
      } else {
        return Invalid(origin, "unknown key '" + qk + "'");
      }
    }
  }
  if (auto* c = root.get("cache")) {
    const toml::table* t = c->as_table();
    if (t == nullptr) return Invalid(origin, "'cache' must be a table");
    RETURN_IF_ERROR(CacheTable(*t, origin, &cfg->cache));
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
  for (const Budget* b : {&cfg->cache.host_budget, &cfg->cache.gpu_budget})
    if (b->fraction < 0 || b->fraction > 1) return InvalidArgument("a budget's fraction must be in (0, 1]", "config.bad_budget");
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

}  // namespace weightd
