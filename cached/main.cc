// weightd — the resident weight cache daemon. See README.md ("weightd(8)").
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string_view>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

#include "config.h"
#include "cuda_api.h"
#include "gpu_tier.h"
#include "log.h"
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
  std::vector<std::string> model_flags;
  bool check_only = false;
  app.add_option("-c,--config", config_path,
                 std::string("TOML config file (default: ") + weightd::kDefaultConfigPath + " if it exists)");
  app.add_option("-m,--model", model_flags, "add a model: NAME=DIR (a directory of safetensors shards); repeatable")
      ->type_name("NAME=DIR");
  // Every other option is a key of the file (config.h's ConfigKeys(), which --help lists too).
  const auto keys = weightd::ConfigKeys();
  const weightd::DaemonConfig defaults;
  std::vector<std::string> option_text(keys.size());
  std::unique_ptr<bool[]> option_set(new bool[keys.size()]());
  std::string file_keys = "Keys of the configuration file, with their defaults (options override the file):\n";
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const weightd::ConfigKey& k = keys[i];
    const std::string shown = weightd::ShowValue(k, defaults);
    file_keys += "  [" + std::string(k.table) + "] " + std::string(k.name) + " = " + shown + "\n      " +
                 std::string(k.help) + "\n";
    if (k.option.empty()) continue;
    const std::string name(k.option);
    if (!k.option_help.empty()) {
      app.add_flag(name, option_set[i], std::string(k.option_help));
      continue;
    }
    std::string help(k.help);
    if (shown != "\"\"" && help.find("(default") == std::string::npos) help += " (default: " + shown + ")";
    CLI::Option* opt = app.add_option(name, option_text[i], help);
    if (!k.value_name.empty()) opt->type_name(std::string(k.value_name));
    if (k.kind == weightd::ConfigKey::Kind::kCount) opt->check(CLI::Range(k.min, k.max));
    if (!k.choices.empty()) {
      std::vector<std::string> choices;
      for (std::string_view rest = k.choices; !rest.empty();) {
        const std::size_t bar = rest.find('|');
        choices.emplace_back(rest.substr(0, bar));
        rest = bar == std::string_view::npos ? std::string_view() : rest.substr(bar + 1);
      }
      opt->check(CLI::IsMember(choices));
    }
  }
  app.add_flag("--check-config", check_only,
               "validate the configuration, print it (the file's keys as TOML, then the models), and exit");
  app.footer(file_keys);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  weightd::SetUpLogging();

  weightd::DaemonConfig cfg;
  if (!config_path.empty()) {
    if (auto s = weightd::ApplyTomlFile(config_path, &cfg); !s.ok()) return Fail(kExitConfig, s);
  } else if (::access(weightd::kDefaultConfigPath, F_OK) == 0) {
    if (auto s = weightd::ApplyTomlFile(weightd::kDefaultConfigPath, &cfg); !s.ok()) return Fail(kExitConfig, s);
  }
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (!option_set[i] && option_text[i].empty()) continue;
    const std::string text = option_set[i] ? "false" : option_text[i];
    if (auto st = weightd::ApplyOption(keys[i], text, &cfg); !st.ok()) return Fail(kExitConfig, st);
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
    // The fd channel, logs, and the files of the segments being filled: a fill holds an fd per
    // part (at most segment_parts, plus one per shard), and max_loads fills run at once.
    const std::uint64_t fills = std::max<std::uint64_t>(2, cfg.cache.max_loads);
    const std::uint64_t reserve = 256 + fills * cfg.segment_parts;
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
    std::cout << weightd::ToToml(cfg);
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
  weightd::gpu::MaterializeOptions copy_options;
  copy_options.pin_threads = static_cast<int>(cfg.gpu_pin_threads);
  weightd::gpu::GpuTier gpu(cuda.get(), copy_options);

  weightd::RealClock clock;
  auto server = weightd::Server::Create(cfg, &clock, cfg.gpu_enabled ? &gpu : nullptr);
  if (!server.ok()) return Fail(kExitRuntime, server.status());
  if (auto s = (*server)->Run(); !s.ok()) return Fail(kExitRuntime, s);
  return 0;
}
