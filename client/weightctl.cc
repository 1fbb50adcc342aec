// weightctl — inspect and steer a running weightd daemon, and check what it serves.
//
// Every subcommand is a thin call into libweightd; the output is either aligned tables for
// people or, with --json, exactly one JSON object on stdout for scripts.
//
// Exit status: 0 success, 1 an error from the daemon or the system, 2 a usage error,
// 3 `attach --verify` found tensors whose bytes differ from the files.

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "posix.h"
#include "weightd/client.h"

namespace {

using nlohmann::json;
using weightd::Status;

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitMismatch = 3;

// ---- formatting -----------------------------------------------------------------------------

std::string HumanBytes(std::uint64_t b) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (b < 1024) return std::to_string(b) + " B";
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[u]);
  return buf;
}

std::string HumanDuration(std::uint64_t ms) {
  char buf[32];
  if (ms < 1000) {
    std::snprintf(buf, sizeof buf, "%llums", static_cast<unsigned long long>(ms));
  } else if (ms < 60'000) {
    std::snprintf(buf, sizeof buf, "%.1fs", static_cast<double>(ms) / 1000);
  } else if (ms < 3'600'000) {
    std::snprintf(buf, sizeof buf, "%llum%02llus", static_cast<unsigned long long>(ms / 60'000),
                  static_cast<unsigned long long>(ms / 1000 % 60));
  } else {
    std::snprintf(buf, sizeof buf, "%lluh%02llum", static_cast<unsigned long long>(ms / 3'600'000),
                  static_cast<unsigned long long>(ms / 60'000 % 60));
  }
  return buf;
}

// A model that was never loaded has no meaningful idle time.
std::string Idle(const weightd::ModelInfo& m) { return m.loads == 0 && m.leases == 0 ? "-" : HumanDuration(m.idle_ms); }

// Prints rows as columns separated by two spaces; the last column is not padded.
void PrintTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width;
  for (const auto& r : rows)
    for (std::size_t i = 0; i < r.size(); ++i) {
      if (width.size() <= i) width.push_back(0);
      width[i] = std::max(width[i], r[i].size());
    }
  for (const auto& r : rows) {
    std::string line;
    for (std::size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(width[i] - r[i].size() + 2, ' ');
    }
    std::cout << line << '\n';
  }
}

json StatusJson(const Status& s) {
  if (s.ok()) return nullptr;
  return {{"code", std::string(weightd::CodeName(s.code()))}, {"reason", s.reason()}, {"message", s.message()}};
}

json ModelJson(const weightd::ModelInfo& m) {
  json gpus = json::array();
  for (const auto& g : m.gpus)
    gpus.push_back({{"device", g.device}, {"uuid", g.uuid}, {"state", g.state}, {"bytes", g.bytes},
                    {"leases", g.leases}, {"copy_ms", g.copy_ms}, {"h2d_us", g.h2d_us}, {"idle_ms", g.idle_ms},
                    {"last_error", StatusJson(g.last_error)}});
  return {{"name", m.name},         {"dir", m.dir},
          {"state", m.state},       {"shards", m.shards},
          {"tensors", m.tensors},   {"bytes", m.bytes},
          {"resident_bytes", m.resident_bytes},
          {"leases", m.leases},     {"loads", m.loads},
          {"last_load_ms", m.last_load_ms},
          {"idle_ms", m.idle_ms},   {"last_error", StatusJson(m.last_error)},
          {"gpus", gpus},           {"pinned", m.pinned},
          {"priority", m.priority}, {"loaded_bytes", m.loaded_bytes},
          {"waiting_for", m.waiting_for.empty() ? json(nullptr) : json(m.waiting_for)}};
}

// "cuda:0 resident 2 leases, cuda:1 loading" or "-".
std::string GpuSummary(const weightd::ModelInfo& m) {
  std::string out;
  for (const auto& g : m.gpus) {
    if (!out.empty()) out += ", ";
    out += g.device + " " + g.state;
    if (g.leases > 0) out += " " + std::to_string(g.leases) + (g.leases == 1 ? " lease" : " leases");
  }
  return out.empty() ? "-" : out;
}

void PrintModels(const std::vector<weightd::ModelInfo>& models) {
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "STATE", "SHARDS", "TENSORS", "SIZE", "RESIDENT", "LEASES", "LOADS", "IDLE", "GPU", "LAST ERROR"}};
  for (const auto& m : models) {
    rows.push_back({m.name, m.state, std::to_string(m.shards), std::to_string(m.tensors), HumanBytes(m.bytes),
                    HumanBytes(m.resident_bytes), std::to_string(m.leases), std::to_string(m.loads),
                    Idle(m), GpuSummary(m), m.last_error.ok() ? "-" : m.last_error.ToString()});
  }
  PrintTable(rows);
}

void PrintModel(const weightd::ModelInfo& m) {
  std::vector<std::vector<std::string>> rows = {
      {"name:", m.name},
      {"dir:", m.dir},
      {"state:", m.state},
      {"shards:", std::to_string(m.shards)},
      {"tensors:", std::to_string(m.tensors)},
      {"size:", HumanBytes(m.bytes) + " (" + std::to_string(m.bytes) + " bytes)"},
      {"resident:", HumanBytes(m.resident_bytes) + " (" + std::to_string(m.resident_bytes) + " bytes)"},
      {"leases:", std::to_string(m.leases)},
      {"loads:", std::to_string(m.loads)},
      {"last load:", m.loads == 0 ? "-" : HumanDuration(m.last_load_ms)},
      {"idle:", Idle(m)},
      {"last error:", m.last_error.ok() ? "-" : m.last_error.ToString()},
      {"policy:", std::string(m.pinned ? "pinned" : "evictable") + ", priority " + std::to_string(m.priority)},
  };
  if (!m.waiting_for.empty()) rows.push_back({"waiting:", m.waiting_for});
  for (const auto& g : m.gpus) {
    std::string line = g.state + ", " + HumanBytes(g.bytes) + ", " + std::to_string(g.leases) + " leases";
    if (g.copy_ms > 0) line += ", copied in " + HumanDuration(g.copy_ms);
    if (g.h2d_us > 0) line += " (host-to-device " + HumanDuration(g.h2d_us / 1000) + ")";
    if (g.state == "resident") line += ", idle " + HumanDuration(g.idle_ms);
    if (!g.last_error.ok()) line += ", last error: " + g.last_error.ToString();
    rows.push_back({g.device + ":", line + " (" + g.uuid + ")"});
  }
  PrintTable(rows);
}

// ---- verification ---------------------------------------------------------------------------

struct Mismatch {
  std::string tensor;
  std::uint64_t first_byte;  // offset inside the tensor of the first differing byte
};

// Compares every tensor of the lease, byte for byte, with its shard file, in file order, and
// hashes what the daemon serves (XXH3-128, tensors in file order) for the report. GPU tensors
// are copied to the host chunk by chunk.
weightd::Result<std::vector<Mismatch>> Verify(const weightd::Lease& lease, std::uint64_t* bytes_checked,
                                              std::string* digest) {
  constexpr std::size_t kChunk = 8 << 20;
  std::vector<std::byte> file_buf(kChunk), served_buf(kChunk);
  std::vector<const weightd::Tensor*> order;
  for (const auto& t : lease.tensors()) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) {
    return a->shard != b->shard ? a->shard < b->shard : a->offset < b->offset;
  });

  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> hash(XXH3_createState(), &XXH3_freeState);
  XXH3_128bits_reset(hash.get());
  std::vector<Mismatch> mismatches;
  std::uint32_t open_shard = UINT32_MAX;
  weightd::posix::Fd fd;
  std::string path;
  for (const auto* t : order) {
    const auto& shard = lease.shards().at(t->shard);
    if (t->shard != open_shard) {
      path = lease.model_dir() + "/" + shard.file;
      ASSIGN_OR_RETURN(fd, weightd::posix::Open(path, O_RDONLY));
      open_shard = t->shard;
    }
    bool differs = false;
    for (std::uint64_t done = 0; done < t->nbytes;) {
      std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, t->nbytes - done));
      RETURN_IF_ERROR(weightd::posix::PreadFull(fd.get(), std::span(file_buf.data(), n),
                                                shard.file_data_offset + t->offset + done, path));
      RETURN_IF_ERROR(lease.copy_to_host(*t, done, n, served_buf.data()));
      XXH3_128bits_update(hash.get(), served_buf.data(), n);
      if (!differs && std::memcmp(file_buf.data(), served_buf.data(), n) != 0) {
        std::uint64_t i = 0;
        while (file_buf[i] == served_buf[i]) ++i;
        mismatches.push_back({t->name, done + i});
        differs = true;
      }
      done += n;
    }
    *bytes_checked += t->nbytes;
  }
  const XXH128_hash_t h = XXH3_128bits_digest(hash.get());
  char hex[33];
  std::snprintf(hex, sizeof hex, "%016llx%016llx", static_cast<unsigned long long>(h.high64),
                static_cast<unsigned long long>(h.low64));
  *digest = hex;
  return mismatches;
}

// ---- subcommands ----------------------------------------------------------------------------

struct Globals {
  std::string socket;
  double timeout_s = 600;
  bool json = false;
};

weightd::Result<weightd::Client> Connect(const Globals& g) {
  weightd::ClientOptions o;
  o.endpoint = g.socket;
  o.client_name = "weightctl";
  o.request_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(std::llround(g.timeout_s * 1000)));
  o.connect_timeout = std::min(o.connect_timeout, o.request_timeout);
  return weightd::Client::Connect(o);
}

int Fail(const Globals& g, const Status& s) {
  if (g.json) std::cout << json{{"error", StatusJson(s)}}.dump(2) << '\n';
  std::cerr << "weightctl: " << s.ToString() << '\n';
  return kExitError;
}

#define TRY_ASSIGN(lhs, rexpr, g)                         \
  auto lhs##_result = (rexpr);                            \
  if (!lhs##_result.ok()) return Fail(g, lhs##_result.status()); \
  auto& lhs = *lhs##_result

int CmdList(const Globals& g) {
  TRY_ASSIGN(client, Connect(g), g);
  TRY_ASSIGN(models, client.List(), g);
  if (g.json) {
    json arr = json::array();
    for (const auto& m : models) arr.push_back(ModelJson(m));
    std::cout << json{{"models", arr}}.dump(2) << '\n';
  } else if (models.empty()) {
    std::cout << "no models in the catalog\n";
  } else {
    PrintModels(models);
  }
  return 0;
}

int CmdStatus(const Globals& g, const std::string& name) {
  TRY_ASSIGN(client, Connect(g), g);
  TRY_ASSIGN(model, client.Status(name), g);
  if (g.json) std::cout << ModelJson(model).dump(2) << '\n';
  else PrintModel(model);
  return 0;
}

// "[##########----------]  3.20 GiB / 10.2 GiB  1.45 GB/s  ETA 5s" on a terminal (redrawn in
// place), a plain line every few seconds otherwise.
class LoadProgressPrinter {
 public:
  explicit LoadProgressPrinter(std::string name) : name_(std::move(name)), tty_(::isatty(STDERR_FILENO) == 1) {}

  void Update(const weightd::ModelInfo& m) {
    const auto now = std::chrono::steady_clock::now();
    if (!m.waiting_for.empty()) {
      Print("waiting for room: " + m.waiting_for, now);
      return;
    }
    if (m.bytes == 0) {
      Print("reading headers", now);
      return;
    }
    if (!started_) {
      started_ = true;
      t0_ = now;
      b0_ = m.loaded_bytes;
    }
    const double secs = std::chrono::duration<double>(now - t0_).count();
    const double rate = secs > 0.2 ? static_cast<double>(m.loaded_bytes - b0_) / secs : 0;
    const double frac = static_cast<double>(m.loaded_bytes) / static_cast<double>(m.bytes);
    std::string line;
    if (tty_) {
      const int width = 24;
      const int done = static_cast<int>(frac * width);
      line = "[" + std::string(static_cast<std::size_t>(done), '#') + std::string(static_cast<std::size_t>(width - done), '-') + "] ";
    }
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s / %s (%.0f%%)", HumanBytes(m.loaded_bytes).c_str(), HumanBytes(m.bytes).c_str(),
                  frac * 100);
    line += buf;
    if (rate > 0) {
      std::snprintf(buf, sizeof buf, "  %.2f GB/s  ETA %s", rate / 1e9,
                    HumanDuration(static_cast<std::uint64_t>(static_cast<double>(m.bytes - m.loaded_bytes) / rate * 1000)).c_str());
      line += buf;
    }
    Print(line, now);
  }

  void Done() {
    if (tty_ && printed_) std::cerr << "\r\033[K" << std::flush;
  }

 private:
  void Print(const std::string& line, std::chrono::steady_clock::time_point now) {
    if (tty_) {
      std::cerr << "\r\033[K" << name_ << ": " << line << std::flush;
      printed_ = true;
    } else if (!printed_ || now - last_line_ >= std::chrono::seconds(2)) {
      std::cerr << "loading " << name_ << ": " << line << '\n';
      last_line_ = now;
      printed_ = true;
    }
  }

  std::string name_;
  bool tty_;
  bool started_ = false, printed_ = false;
  std::chrono::steady_clock::time_point t0_, last_line_;
  std::uint64_t b0_ = 0;
};

int CmdLoad(const Globals& g, const std::string& name) {
  TRY_ASSIGN(client, Connect(g), g);
  // The Load call blocks until the model is resident; a second connection watches its progress.
  std::optional<weightd::Result<weightd::ModelInfo>> result;
  std::mutex mu;
  std::condition_variable cv;
  std::thread loader([&] {
    auto r = client.Load(name);
    std::lock_guard lock(mu);
    result = std::move(r);
    cv.notify_all();
  });
  if (!g.json) {
    auto watcher = Connect(g);
    LoadProgressPrinter progress(name);
    std::unique_lock lock(mu);
    while (!result && watcher.ok()) {
      lock.unlock();
      auto st = watcher->Status(name);
      if (st.ok() && st->state == "loading") progress.Update(*st);
      lock.lock();
      cv.wait_for(lock, std::chrono::milliseconds(250), [&] { return result.has_value(); });
    }
    progress.Done();
  }
  loader.join();
  if (!result->ok()) return Fail(g, result->status());
  const weightd::ModelInfo& model = result->value();
  if (g.json) {
    std::cout << ModelJson(model).dump(2) << '\n';
  } else {
    PrintModel(model);
  }
  // A finished load that failed comes back as the model's status, not as an error reply.
  if (model.state == "failed") {
    std::cerr << "weightctl: load of '" << name << "' failed: " << model.last_error.ToString() << '\n';
    return kExitError;
  }
  return 0;
}

int CmdEvict(const Globals& g, const std::string& name, const std::string& tier) {
  TRY_ASSIGN(client, Connect(g), g);
  Status s = client.Evict(name, tier);
  if (!s.ok()) return Fail(g, s);
  if (g.json) std::cout << json{{"evicted", name}, {"device", tier.empty() ? "all" : tier}}.dump(2) << '\n';
  else std::cout << "evicted " << name << (tier.empty() ? "" : " from " + tier) << '\n';
  return 0;
}

// The samples of a Prometheus text exposition, without comments and histogram buckets.
std::vector<std::vector<std::string>> MetricRows(const std::string& text) {
  std::vector<std::vector<std::string>> rows;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#' || line.find("_bucket{") != std::string::npos) continue;
    const auto sp = line.rfind(' ');
    if (sp == std::string::npos) continue;
    rows.push_back({line.substr(0, sp), line.substr(sp + 1)});
  }
  return rows;
}

int CmdStats(const Globals& g, bool raw_metrics) {
  TRY_ASSIGN(client, Connect(g), g);
  TRY_ASSIGN(st, client.Stats(), g);
  if (raw_metrics) {
    if (g.json) std::cout << json{{"metrics", st.metrics}}.dump(2) << '\n';
    else std::cout << st.metrics;
    return 0;
  }
  if (g.json) {
    json models = json::array();
    for (const auto& m : st.models) models.push_back(ModelJson(m));
    json gpus = json::array();
    for (const auto& d : st.gpus)
      gpus.push_back({{"device", d.device}, {"uuid", d.uuid}, {"name", d.name}, {"total_bytes", d.total_bytes},
                      {"resident_bytes", d.resident_bytes}, {"budget_bytes", d.budget_bytes}, {"copies", d.copies},
                      {"leases", d.leases}});
    json samples = json::object();
    for (const auto& r : MetricRows(st.metrics)) samples[r[0]] = std::stod(r[1]);
    std::cout << json{{"daemon_version", st.daemon_version},
                      {"uptime_ms", st.uptime_ms},
                      {"sessions", st.sessions},
                      {"leases", st.leases},
                      {"host_resident_bytes", st.host_resident_bytes},
                      {"bytes_read_from_disk", st.bytes_read_from_disk},
                      {"loads_ok", st.loads_ok},
                      {"loads_failed", st.loads_failed},
                      {"requests", st.requests},
                      {"malformed_requests", st.malformed_requests},
                      {"models", models},
                      {"gpus", gpus},
                      {"gpu_unavailable", st.gpu_unavailable.empty() ? json(nullptr) : json(st.gpu_unavailable)},
                      {"host_budget_bytes", st.host_budget_bytes},
                      {"host_total_bytes", st.host_total_bytes},
                      {"ready", st.ready},
                      {"ready_ms", st.ready_ms},
                      {"metrics", samples}}
                     .dump(2)
              << '\n';
    return 0;
  }
  PrintTable({
      {"daemon version:", st.daemon_version},
      {"uptime:", HumanDuration(st.uptime_ms)},
      {"sessions:", std::to_string(st.sessions)},
      {"leases:", std::to_string(st.leases)},
      {"ready:", st.ready ? "yes, after " + HumanDuration(st.ready_ms) : "no (preloading)"},
      {"host resident:", HumanBytes(st.host_resident_bytes) + " of a " + HumanBytes(st.host_budget_bytes) + " budget (" +
                             HumanBytes(st.host_total_bytes) + " RAM)"},
      {"read from disk:", HumanBytes(st.bytes_read_from_disk)},
      {"loads:", std::to_string(st.loads_ok) + " ok, " + std::to_string(st.loads_failed) + " failed"},
      {"requests:", std::to_string(st.requests) + " (" + std::to_string(st.malformed_requests) + " malformed)"},
      {"gpus:", st.gpus.empty() ? "none (" + st.gpu_unavailable + ")" : std::to_string(st.gpus.size())},
  });
  if (!st.gpus.empty()) {
    std::cout << '\n';
    std::vector<std::vector<std::string>> rows = {
        {"GPU", "UUID", "NAME", "MEMORY", "BUDGET", "RESIDENT", "COPIES", "LEASES"}};
    for (const auto& d : st.gpus)
      rows.push_back({d.device, d.uuid, d.name, HumanBytes(d.total_bytes), HumanBytes(d.budget_bytes),
                      HumanBytes(d.resident_bytes), std::to_string(d.copies), std::to_string(d.leases)});
    PrintTable(rows);
  }
  if (!st.models.empty()) {
    std::cout << '\n';
    PrintModels(st.models);
  }
  // The same figures as /metrics (histograms as their sum and count).
  std::cout << '\n';
  auto rows = MetricRows(st.metrics);
  rows.insert(rows.begin(), {"METRIC", "VALUE"});
  PrintTable(rows);
  return 0;
}

int CmdAttach(const Globals& g, const std::string& name, const std::string& device, bool verify) {
  TRY_ASSIGN(client, Connect(g), g);
  weightd::AcquireOptions opts;
  opts.device = device;
  TRY_ASSIGN(lease, client.Acquire(name, opts), g);
  const double attach_ms = static_cast<double>(lease.attach_time().count()) / 1000;
  json out = {{"model", lease.model()},
              {"device", lease.device()},
              // A string: ids are random 64-bit numbers, which jq and JavaScript would round
              // as JSON numbers (exact only up to 2^53).
              {"lease_id", std::to_string(lease.id())},
              {"attach_ms", attach_ms},
              {"tensors", lease.tensors().size()},
              {"shards", lease.shards().size()},
              {"bytes", lease.total_bytes()}};
  if (!g.json) {
    char ms[32];
    std::snprintf(ms, sizeof ms, "%.3f", attach_ms);
    std::cout << "attached " << lease.model() << " on " << lease.device() << " (lease " << lease.id() << ") in "
              << ms << " ms: " << lease.tensors().size() << " tensors, " << HumanBytes(lease.total_bytes())
              << " (" << lease.total_bytes() << " bytes) in " << lease.shards().size()
              << (lease.shards().size() == 1 ? " shard\n" : " shards\n");
  }
  if (!verify) {
    if (g.json) std::cout << out.dump(2) << '\n';
    return 0;
  }
  std::uint64_t checked = 0;
  std::string digest;
  TRY_ASSIGN(mismatches, Verify(lease, &checked, &digest), g);
  json bad = json::array();
  for (const auto& m : mismatches) bad.push_back({{"tensor", m.tensor}, {"first_differing_byte", m.first_byte}});
  out["verify"] = {{"tensors", lease.tensors().size()}, {"bytes", checked}, {"ok", mismatches.empty()},
                   {"xxh3_128", digest}, {"mismatches", bad}};
  if (g.json) {
    std::cout << out.dump(2) << '\n';
  } else if (mismatches.empty()) {
    std::cout << "verified " << lease.tensors().size() << " tensors, " << checked << " bytes against the files, OK"
              << " (xxh3-128 " << digest << ")\n";
  } else {
    for (const auto& m : mismatches)
      std::cout << "MISMATCH " << m.tensor << ": first differing byte at offset " << m.first_byte << '\n';
    std::cout << "verified " << lease.tensors().size() << " tensors, " << checked << " bytes, "
              << mismatches.size() << " differ from the files in " << lease.model_dir() << '\n';
  }
  return mismatches.empty() ? 0 : kExitMismatch;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "weightctl - inspect and control the weightd model weight cache.\n\n"
      "weightd keeps safetensors model weights resident in shared memory so that inference\n"
      "processes attach to them without reading any file. weightctl asks the daemon about its\n"
      "catalog, loads and evicts models, and can attach to a model itself to measure the attach\n"
      "time and check the served bytes against the files on disk.",
      "weightctl"};
  Globals g;
  app.add_option("--socket", g.socket,
                 "ZeroMQ endpoint of the daemon, e.g. ipc:///run/weightd/weightd.sock.\n"
                 "Default: $WEIGHTD_SOCKET, else ipc:///run/weightd/weightd.sock")
      ->envname("WEIGHTD_SOCKET")
      ->type_name("ENDPOINT");
  app.add_option("--timeout", g.timeout_s,
                 "Seconds to wait for each reply. A load or attach of a model that is not resident\n"
                 "waits for the load from disk. The connection handshake waits at most 5 s.")
      ->check(CLI::PositiveNumber)
      ->type_name("SECONDS")
      ->capture_default_str();
  app.add_flag("--json", g.json, "Print exactly one JSON object on stdout instead of tables (errors too)");
  app.fallthrough();
  app.require_subcommand(1);

  std::string name, device = "cpu";
  bool verify = false;
  auto* list = app.add_subcommand("list", "List the models in the daemon's catalog with their state and memory use");
  auto* status = app.add_subcommand("status", "Show one model: state, size, resident bytes, leases, last error");
  status->add_option("NAME", name, "Model name as configured in the daemon's catalog")->required();
  auto* load = app.add_subcommand(
      "load",
      "Load a model into the host tier without leasing it, and wait until it is resident (or failed).\n"
      "Shows bytes, rate and ETA on stderr: a progress bar on a terminal, a line every 2 s otherwise");
  load->add_option("NAME", name, "Model name")->required();
  auto* evict = app.add_subcommand(
      "evict",
      "Drop a model from every tier, or from one with --device. Fails with FailedPrecondition while a\n"
      "process holds a lease on what would be dropped");
  evict->add_option("NAME", name, "Model name")->required();
  std::string evict_device;
  evict->add_option("--device", evict_device,
                    "cpu (the host copy only) or cuda:N (that GPU's copy only; the host copy stays, so the next\n"
                    "GPU acquire copies from memory instead of reading the disk)");
  auto* stats = app.add_subcommand(
      "stats", "Show the daemon's counters, budgets, GPUs and models, and every figure of its /metrics");
  bool raw_metrics = false;
  stats->add_flag("--metrics", raw_metrics, "Print the metrics in the Prometheus text format instead");
  auto* attach = app.add_subcommand(
      "attach",
      "Lease a model and map it into this process (loading it first if needed), print the attach\n"
      "time, tensor count and bytes, then release it. With --verify, compare every tensor byte for\n"
      "byte with its shard file in the model directory; exit status 3 if any tensor differs.");
  attach->add_option("NAME", name, "Model name")->required();
  attach->add_option("--device", device,
                     "cpu (host shared memory), cuda:N (this process's numbering) or GPU-<uuid> (the daemon's "
                     "shared copy on that GPU)")
      ->capture_default_str();
  attach->add_flag("--verify", verify, "Read the shard files and compare every tensor with the mapped bytes");

  app.footer(
      "Exit status: 0 success; 1 error (message on stderr as 'weightctl: <code>: <message> [<reason>]');\n"
      "2 usage error; 3 attach --verify found tensors that differ from the files.\n\n"
      "Environment: WEIGHTD_SOCKET sets the default endpoint.\n"
      "Run 'weightctl <command> --help' for the options of one command.");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : kExitUsage;
  }

  if (*list) return CmdList(g);
  if (*status) return CmdStatus(g, name);
  if (*load) return CmdLoad(g, name);
  if (*evict) return CmdEvict(g, name, evict_device);
  if (*stats) return CmdStats(g, raw_metrics);
  if (*attach) return CmdAttach(g, name, device, verify);
  return kExitUsage;
}
