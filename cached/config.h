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
#include <string>
#include <vector>

#include "weightd/status.h"

namespace weightd {

inline constexpr const char* kDefaultConfigPath = "/etc/weightd/weightd.toml";

struct ModelConfig {
  std::string name;
  std::string dir;
};

struct DaemonConfig {
  std::string socket = "ipc:///run/weightd/weightd.sock";
  // Segment names are "/<shm_prefix>.<model>.<generation>.<shard>". Empty: "weightd-<hash of socket>", so
  // two daemons on different sockets never collide; a lock makes the prefix exclusive.
  std::string shm_prefix;
  mode_t shm_mode = 0640;
  std::uint32_t loader_threads = 4;
  std::uint64_t chunk_size = 16ull << 20;
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds heartbeat_timeout{10000};
  std::uint32_t max_leases_per_client = 256;
  std::uint32_t max_sessions = 4096;
  std::uint64_t max_message_size = 1ull << 20;
  std::string log_level = "info";

  // GPU tier. Off (host-only) when no CUDA device is found, or when gpu_enabled is false.
  bool gpu_enabled = true;
  std::string gpu_export = "vmm";  // "vmm" (fds over fd_socket) or "legacy" (cudaIpcMemHandle_t)
  // Keep resident host copies page-locked, so that host-to-GPU copies run at PCIe speed.
  bool gpu_pin_host = true;
  // The Unix socket that passes VMM fds to clients. Empty: "<socket path>.fds", beside the
  // ZeroMQ socket.
  std::string fd_socket;

  std::vector<ModelConfig> models;      // sorted by name, names unique: file and command line
  std::vector<ModelConfig> cli_models;  // the --model flags alone, which survive a reload

  // The file these settings came from, if any (re-read on SIGHUP).
  std::optional<std::string> config_path;
};

// Validates a model name: 1-64 of [A-Za-z0-9._-], starting with a letter or digit.
Status ValidateModelName(const std::string& name);
// "4096", "16MiB", "1.5GiB", "512k" -> bytes. InvalidArgument on anything else.
Result<std::uint64_t> ParseSize(const std::string& text);
// "250ms", "10s", "2m", or a bare number of milliseconds.
Result<std::chrono::milliseconds> ParseDuration(const std::string& text);

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
