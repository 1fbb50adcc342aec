// daemon_process.h — test support: temporary directories, tiny models, and the real weightd
// binary started on a private socket and segment prefix (which include the test's pid).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "posix.h"
#include "safetensors_writer.h"
#include "weightd/client.h"
#include "status_macros.h"

namespace weightd::testing {

// A fresh directory under $TMPDIR (or /tmp), removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Deterministic byte pattern of tensor `index` (a function of seed, index and offset), so that
// tests can check any byte without keeping the model in memory.
std::byte PatternByte(std::uint64_t seed, std::size_t index, std::uint64_t offset);
st::FillFn PatternFill(std::uint64_t seed);

// Writes `tensors` as a single model.safetensors into `dir` (created if needed).
Status WriteModel(const std::string& dir, const std::vector<st::TensorSpec>& tensors, std::uint64_t seed);
// Writes the tensors split across `shards` files in Hugging Face layout
// (model-0000N-of-0000M.safetensors plus model.safetensors.index.json).
Status WriteShardedModel(const std::string& dir, const std::vector<st::TensorSpec>& tensors, int shards,
                         std::uint64_t seed);
// `count` F32/BF16/I64 tensors of varied small shapes, names "layer.<i>.weight" etc.
std::vector<st::TensorSpec> SmallTensors(int count);

// Compares every tensor of a host lease with the bytes in the model's files: OK, or DataLoss
// naming the first tensor that differs (or the read error).
Status CompareWithFiles(const Lease& lease);

// The value of an unlabelled sample `name` in Prometheus text (the daemon's /metrics), -1 if
// absent.
double MetricValue(const std::string& text, const std::string& name);

// Open file descriptors of process `pid` (/proc/<pid>/fd).
std::size_t OpenFdCount(pid_t pid);

// Polls `pred` every `step` until it holds or `limit` passed; the last answer.
template <class Pred>
bool WaitFor(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(10),
             std::chrono::milliseconds step = std::chrono::milliseconds(20)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(step);
  }
  return pred();
}

struct DaemonOptions {
  std::map<std::string, std::string> models;  // name -> dir, passed as --model NAME=DIR
  std::string config_toml;                    // if not empty, written to a file and passed as --config
  std::vector<std::string> extra_args;
  std::chrono::milliseconds ready_timeout{std::chrono::seconds(20)};
  // Play journald: announce the daemon's stderr (its log file) as a journal stream, as systemd
  // does (JOURNAL_STREAM=<dev>:<inode> of that file).
  bool journal_stream = false;
};

// The real weightd binary, on ipc://<tmp>/weightd.sock with segment prefix "wdtest-<pid>-<n>".
// It plays the daemon's service manager on a private NOTIFY_SOCKET, read by a background
// thread: Start() waits for READY=1, and the fds the daemon stores (FDSTORE=1, FDNAME=;
// FDSTOREREMOVE=1) are kept and passed to the next Restart() as systemd does (LISTEN_FDS,
// LISTEN_FDNAMES, LISTEN_PID). The destructor SIGKILLs the daemon if it still runs and unlinks
// any segment left under its prefix.
class DaemonProcess {
 public:
  static Result<std::unique_ptr<DaemonProcess>> Start(const DaemonOptions& options);
  ~DaemonProcess();

  const std::string& endpoint() const { return endpoint_; }
  const std::string& shm_prefix() const { return prefix_; }
  const std::string& runtime_dir() const { return dir_.path(); }
  pid_t pid() const { return pid_; }
  bool running();
  // Starts the daemon again, with the same socket, prefix and arguments, after it exited (or
  // was killed with Signal). Waits for READY=1 as Start does.
  Status Restart();
  // Sends `sig` and, for SIGTERM/SIGKILL/SIGINT, waits for exit. Returns the wait status.
  int Signal(int sig);
  // A client of this daemon, named `client_name` in its logs.
  Result<Client> Connect(const std::string& client_name = "test") const;
  // Runs `weightctl` against this daemon with the given arguments; returns its stdout and sets
  // *exit_code.
  std::string Weightctl(const std::vector<std::string>& args, int* exit_code) const;
  // The daemon's stderr so far.
  std::string Log() const;
  // Names of the /dev/shm entries under this daemon's prefix.
  std::vector<std::string> Segments() const;
  // The FDNAMEs of the fds in the fd store now, one per fd.
  std::vector<std::string> StoredFdNames();
  // Puts an fd into the store, as if the daemon had stored it.
  void StoreFd(const std::string& name, posix::Fd fd);

 private:
  DaemonProcess() = default;
  Status Launch();
  void ReadNotifications();  // the notify thread
  TempDir dir_;
  std::vector<std::string> args_;
  std::chrono::milliseconds ready_timeout_{0};
  bool journal_stream_ = false;
  posix::Fd notify_;
  std::thread notify_thread_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  bool ready_ = false;                                   // guarded by mu_: READY=1 since the launch
  std::vector<std::pair<std::string, posix::Fd>> store_;  // guarded by mu_
  std::string endpoint_;
  std::string prefix_;
  std::string log_path_;
  pid_t pid_ = -1;
};

}  // namespace weightd::testing
