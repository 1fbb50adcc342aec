// weightd — the resident weight cache daemon. See README.md ("weightd(8)").
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <tuple>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

#include "config.h"
#include "cuda_api.h"
#include "gpu_tier.h"
#include "server.h"

namespace {

constexpr int kExitRuntime = 1;
constexpr int kExitConfig = 2;

int Fail(int code, const weightd::Status& s) {
  spdlog::critical("{}", s.ToString());
  sd_notifyf(0, "STATUS=failed: %s", s.ToString().c_str());
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  weightd::BlockSignals();  // before any thread exists

  CLI::App app{
      "weightd: keeps model weights (safetensors) resident in shared memory and hands them to\n"
      "inference processes, which map them read-only without reading any file.\n"
      "Clients attach over a ZeroMQ socket with libweightd; weightctl(1) administers the daemon.\n"
      "Signals: SIGHUP re-reads the config file's catalog; SIGTERM/SIGINT stop cleanly."};
  app.set_version_flag("--version", std::string("weightd ") + WEIGHTD_VERSION);

  std::string config_path;
  std::string socket, prefix, log_level, chunk, heartbeat_timeout;
  std::vector<std::string> model_flags;
  std::uint32_t loader_threads = 0;
  bool check_only = false, no_gpu = false;
  std::string gpu_export, http_listen, host_budget, gpu_budget, io;
  app.add_option("-c,--config", config_path,
                 std::string("TOML config file (default: ") + weightd::kDefaultConfigPath + " if it exists)");
  app.add_option("-s,--socket", socket, "ZeroMQ endpoint to serve, ipc://PATH (default: ipc:///run/weightd/weightd.sock)");
  app.add_option("--shm-prefix", prefix,
                 "prefix of shared-memory segment names (default: weightd-<hash of the socket>); one daemon per prefix");
  app.add_option("-m,--model", model_flags, "add a model: NAME=DIR (a directory of safetensors shards); repeatable")
      ->type_name("NAME=DIR");
  app.add_option("--loader-threads", loader_threads, "threads reading shards from disk (default 4)")->check(CLI::Range(1, 256));
  app.add_option("--chunk-size", chunk, "bytes per read request, e.g. 16MiB (default 64MiB)");
  app.add_option("--heartbeat-timeout", heartbeat_timeout,
                 "end a silent client's session (and its leases) after this long, e.g. 10s (default 10s)");
  app.add_flag("--no-gpu", no_gpu, "serve the host tier only, even where CUDA devices are present");
  app.add_option("--gpu-export", gpu_export,
                 "how GPU copies are shared: vmm (fds over a Unix socket, read-only imports; default) or legacy "
                 "(cudaIpcMemHandle_t, a bearer token any local user may open)")
      ->check(CLI::IsMember({"vmm", "legacy"}));
  app.add_option("--io", io, "how shards are read: buffered (default), direct (O_DIRECT) or auto (O_DIRECT for files not in the page cache)")
      ->check(CLI::IsMember({"auto", "direct", "buffered"}));
  app.add_option("--host-budget", host_budget, "host memory models may hold: bytes (\"64GiB\") or a share of RAM (\"50%\", the default)");
  app.add_option("--gpu-budget", gpu_budget, "memory models may hold on each GPU: bytes or a share (\"80%\", the default)");
  app.add_option("--http", http_listen, "serve /healthz, /readyz and /metrics on this loopback HOST:PORT, e.g. 127.0.0.1:9464");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or critical (default info)");
  app.add_flag("--check-config", check_only, "validate the configuration, print the catalog, and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  auto logger = spdlog::stderr_color_mt("weightd");
  spdlog::set_default_logger(logger);
  // journald adds its own timestamps.
  spdlog::set_pattern(std::getenv("JOURNAL_STREAM") ? "%l: %v" : "[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");

  weightd::DaemonConfig cfg;
  if (!config_path.empty()) {
    if (auto s = weightd::ApplyTomlFile(config_path, &cfg); !s.ok()) return Fail(kExitConfig, s);
  } else if (::access(weightd::kDefaultConfigPath, F_OK) == 0) {
    if (auto s = weightd::ApplyTomlFile(weightd::kDefaultConfigPath, &cfg); !s.ok()) return Fail(kExitConfig, s);
  }
  if (!socket.empty()) cfg.socket = socket;
  if (!prefix.empty()) cfg.shm_prefix = prefix;
  if (loader_threads) cfg.loader_threads = loader_threads;
  if (!log_level.empty()) cfg.log_level = log_level;
  if (no_gpu) cfg.gpu_enabled = false;
  if (!gpu_export.empty()) cfg.gpu_export = gpu_export;
  if (!http_listen.empty()) cfg.http_listen = http_listen;
  if (!io.empty()) cfg.io = io;
  for (auto [text, budget, flag] : {std::tuple{&host_budget, &cfg.cache.host_budget, "--host-budget"},
                                    std::tuple{&gpu_budget, &cfg.cache.gpu_budget, "--gpu-budget"}}) {
    if (text->empty()) continue;
    auto b = weightd::ParseBudget(*text);
    if (!b.ok()) return Fail(kExitConfig, b.status().WithContext(flag));
    *budget = *b;
  }
  if (!chunk.empty()) {
    auto v = weightd::ParseSize(chunk);
    if (!v.ok()) return Fail(kExitConfig, v.status().WithContext("--chunk-size"));
    cfg.chunk_size = *v;
  }
  if (!heartbeat_timeout.empty()) {
    auto v = weightd::ParseDuration(heartbeat_timeout);
    if (!v.ok()) return Fail(kExitConfig, v.status().WithContext("--heartbeat-timeout"));
    cfg.heartbeat_timeout = *v;
  }
  for (const auto& f : model_flags) {
    auto m = weightd::ParseModelFlag(f);
    if (!m.ok()) return Fail(kExitConfig, m.status());
    cfg.cli_models.push_back(*m);
    weightd::UpsertModel(&cfg, *m);
  }
  if (auto s = weightd::Finalize(&cfg); !s.ok()) return Fail(kExitConfig, s);
  // Every client connection takes a socket and a pidfd. Raise the soft fd limit to the hard one,
  // and keep the session cap well inside it: libzmq aborts the process when accept() runs out
  // of descriptors.
  rlimit nofile{};
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0) {
    if (nofile.rlim_cur < nofile.rlim_max) {
      nofile.rlim_cur = nofile.rlim_max;
      (void)::setrlimit(RLIMIT_NOFILE, &nofile);
      (void)::getrlimit(RLIMIT_NOFILE, &nofile);
    }
    const auto budget = static_cast<std::uint64_t>(nofile.rlim_cur);
    const std::uint64_t reserve = 256;  // segments being loaded, the fd channel, logs
    const std::uint64_t fit = budget > 3 * reserve ? (budget - reserve) / 3 : 64;
    if (cfg.max_sessions > fit) {
      spdlog::warn("max_sessions {} lowered to {}: the fd limit is {} (raise LimitNOFILE)", cfg.max_sessions, fit, budget);
      cfg.max_sessions = static_cast<std::uint32_t>(fit);
    }
  }
  auto level = spdlog::level::from_str(cfg.log_level);
  if (level == spdlog::level::off && cfg.log_level != "off")
    return Fail(kExitConfig, weightd::InvalidArgument("unknown log level '" + cfg.log_level + "'", "config.invalid"));
  spdlog::set_level(level);

  if (check_only) {
    std::cout << "socket      " << cfg.socket << "\nshm prefix  " << cfg.shm_prefix << "\nmodels      "
              << cfg.models.size() << "\n";
    for (const auto& m : cfg.models) std::cout << "  " << m.name << " = " << m.dir << "\n";
    return 0;
  }
  if (cfg.models.empty()) spdlog::warn("the catalog is empty: add models with --model NAME=DIR or a config file");

  // The GPU tier: every binary starts without a driver; then the daemon is host-only.
  std::unique_ptr<weightd::gpu::CudaApi> cuda;
  if (cfg.gpu_enabled) {
    auto api = weightd::gpu::LoadCudaApi();
    if (api.ok()) cuda = std::move(api).value();
    else spdlog::info("no GPU tier: {}", api.status().ToString());
  }
  weightd::gpu::GpuTier gpu(cuda.get());

  weightd::RealClock clock;
  auto server = weightd::Server::Create(cfg, &clock, cfg.gpu_enabled ? &gpu : nullptr);
  if (!server.ok()) return Fail(kExitRuntime, server.status());
  if (auto s = (*server)->Run(); !s.ok()) return Fail(kExitRuntime, s);
  return 0;
}
