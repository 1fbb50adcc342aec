#include "daemon_process.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "host_tier.h"
#include "posix.h"

namespace weightd::testing {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/wdtest-XXXXXX";
  char* p = ::mkdtemp(tmpl.data());
  if (p == nullptr) std::abort();
  path_ = p;
}

TempDir::~TempDir() { (void)posix::RemoveTree(path_); }

std::byte PatternByte(std::uint64_t seed, std::size_t index, std::uint64_t offset) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull ^ (index + 1) * 0xBF58476D1CE4E5B9ull ^ (offset / 8) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  x *= 0xD6E8FEB86659FD93ull;
  x ^= x >> 32;
  return static_cast<std::byte>(x >> ((offset % 8) * 8));
}

st::FillFn PatternFill(std::uint64_t seed) {
  return [seed](std::size_t index, std::uint64_t offset, std::span<std::byte> out) {
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = PatternByte(seed, index, offset + i);
  };
}

Status WriteModel(const std::string& dir, const std::vector<st::TensorSpec>& tensors, std::uint64_t seed) {
  RETURN_IF_ERROR(posix::MakeDirs(dir));
  auto r = st::WriteFile(dir + "/model.safetensors", tensors, PatternFill(seed));
  return r.ok() ? Status::Ok() : r.status();
}

Status WriteShardedModel(const std::string& dir, const std::vector<st::TensorSpec>& tensors, int shards,
                         std::uint64_t seed) {
  RETURN_IF_ERROR(posix::MakeDirs(dir));
  nlohmann::json index;
  std::uint64_t total = 0;
  const std::size_t per = (tensors.size() + static_cast<std::size_t>(shards) - 1) / static_cast<std::size_t>(shards);
  for (int s = 0; s < shards; ++s) {
    std::vector<st::TensorSpec> part;
    const std::size_t first = static_cast<std::size_t>(s) * per;
    for (std::size_t i = first; i < std::min(tensors.size(), first + per); ++i) part.push_back(tensors[i]);
    char name[64];
    std::snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", s + 1, shards);
    // Tensor i of the whole model keeps its pattern whichever shard it lands in.
    auto fill = [seed, first](std::size_t index, std::uint64_t offset, std::span<std::byte> out) {
      PatternFill(seed)(first + index, offset, out);
    };
    auto r = st::WriteFile(dir + "/" + name, part, fill);
    if (!r.ok()) return r.status();
    for (const auto& t : part) {
      index["weight_map"][t.name] = name;
      total += t.nbytes();
    }
  }
  index["metadata"]["total_size"] = total;
  std::ofstream(dir + "/model.safetensors.index.json") << index.dump(2);
  return Status::Ok();
}

std::vector<st::TensorSpec> SmallTensors(int count) {
  std::vector<st::TensorSpec> out;
  for (int i = 0; i < count; ++i) {
    switch (i % 3) {
      case 0: out.push_back({"layer." + std::to_string(i) + ".weight", DType::kF32, {4 + i % 5, 8}}); break;
      case 1: out.push_back({"layer." + std::to_string(i) + ".bias", DType::kBF16, {16 + i % 7}}); break;
      default: out.push_back({"layer." + std::to_string(i) + ".index", DType::kI64, {3, 1 + i % 4}}); break;
    }
  }
  return out;
}

namespace {

std::atomic<int> g_instances{0};

// A datagram socket standing in for systemd's notification socket.
int BindNotifySocket(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return -1;
  return fd;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

double MetricValue(const std::string& text, const std::string& name) {
  const std::string key = name + " ";
  std::size_t at = 0;
  if (text.compare(0, key.size(), key) != 0) {
    at = text.find("\n" + key);
    if (at == std::string::npos) return -1;
    ++at;
  }
  return std::strtod(text.c_str() + at + key.size(), nullptr);
}

std::size_t OpenFdCount(pid_t pid) {
  std::size_t n = 0;
  if (DIR* d = ::opendir(("/proc/" + std::to_string(pid) + "/fd").c_str())) {
    while (dirent* e = ::readdir(d))
      if (e->d_name[0] != '.') ++n;
    ::closedir(d);
  }
  return n;
}

Status CompareWithFiles(const Lease& lease) {
  for (const Tensor& t : lease.tensors()) {
    const ShardInfo& shard = lease.shards().at(t.shard);
    ASSIGN_OR_RETURN(posix::Fd fd, posix::Open(lease.model_dir() + "/" + shard.file, O_RDONLY));
    std::vector<std::byte> buf(t.nbytes);
    RETURN_IF_ERROR(posix::PreadFull(fd.get(), buf, shard.file_data_offset + t.offset, shard.file));
    if (t.nbytes > 0 && std::memcmp(buf.data(), t.data, t.nbytes) != 0)
      return DataLoss("tensor " + t.name + " differs from " + shard.file);
  }
  return Status::Ok();
}

Result<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(const DaemonOptions& options) {
  std::unique_ptr<DaemonProcess> d(new DaemonProcess());
  d->endpoint_ = "ipc://" + d->dir_.path() + "/weightd.sock";
  d->prefix_ = "wdtest-" + std::to_string(::getpid()) + "-" + std::to_string(g_instances++);
  d->log_path_ = d->dir_.file("weightd.log");

  std::vector<std::string> args = {WEIGHTD_DAEMON_PATH, "--socket", d->endpoint_, "--shm-prefix", d->prefix_};
  if (!options.config_toml.empty()) {
    std::ofstream(d->dir_.file("weightd.toml")) << options.config_toml;
    args.push_back("--config");
    args.push_back(d->dir_.file("weightd.toml"));
  } else if (std::find(options.extra_args.begin(), options.extra_args.end(), "--config") == options.extra_args.end()) {
    // Never pick up a system config in tests.
    std::ofstream(d->dir_.file("empty.toml")) << "";
    args.push_back("--config");
    args.push_back(d->dir_.file("empty.toml"));
  }
  for (const auto& [name, dir] : options.models) {
    args.push_back("--model");
    args.push_back(name + "=" + dir);
  }
  for (const auto& a : options.extra_args) args.push_back(a);
  d->args_ = std::move(args);
  d->ready_timeout_ = options.ready_timeout;
  d->journal_stream_ = options.journal_stream;
  const std::string notify_path = d->dir_.file("notify.sock");
  int nfd = BindNotifySocket(notify_path);
  if (nfd < 0) return Internal("cannot bind the notify socket " + notify_path);
  d->notify_.reset(nfd);
  DaemonProcess* raw = d.get();
  d->notify_thread_ = std::thread([raw] { raw->ReadNotifications(); });
  RETURN_IF_ERROR(d->Launch());
  return d;
}

Status DaemonProcess::Restart() {
  if (pid_ > 0) return FailedPrecondition("the daemon still runs (pid " + std::to_string(pid_) + ")");
  return Launch();
}

// One datagram at a time: its text (KEY=VALUE lines) and any fds it carries.
void DaemonProcess::ReadNotifications() {
  while (!stop_) {
    pollfd p{notify_.get(), POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    char buf[4096];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 64)];
    iovec iov{buf, sizeof buf - 1};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(notify_.get(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) continue;
    std::vector<posix::Fd> fds;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c))
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
          fds.emplace_back(fd);
        }
      }
    std::map<std::string, std::string> kv;
    std::istringstream lines(std::string(buf, static_cast<std::size_t>(n)));
    for (std::string line; std::getline(lines, line);)
      if (auto eq = line.find('='); eq != std::string::npos) kv[line.substr(0, eq)] = line.substr(eq + 1);
    std::lock_guard lock(mu_);
    if (kv["READY"] == "1") {
      ready_ = true;
      cv_.notify_all();
    }
    const std::string name = kv.count("FDNAME") != 0 ? kv["FDNAME"] : "stored";
    if (kv["FDSTORE"] == "1")
      for (auto& fd : fds) store_.emplace_back(name, std::move(fd));
    if (kv["FDSTOREREMOVE"] == "1") std::erase_if(store_, [&](const auto& e) { return e.first == name; });
  }
}

std::vector<std::string> DaemonProcess::StoredFdNames() {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (const auto& [name, fd] : store_) out.push_back(name);
  return out;
}

void DaemonProcess::StoreFd(const std::string& name, posix::Fd fd) {
  std::lock_guard lock(mu_);
  store_.emplace_back(name, std::move(fd));
}

Status DaemonProcess::Launch() {
  // What the fd store passes on, collected before fork(): the child may take no lock.
  std::vector<int> pass;
  std::string names;
  {
    std::lock_guard lock(mu_);
    ready_ = false;
    for (const auto& [name, fd] : store_) {
      pass.push_back(fd.get());
      names += (names.empty() ? "" : ":") + name;
    }
  }
  // Everything the child needs is allocated here: between fork() and exec the child of a
  // threaded process may not allocate (another thread may have held the allocator's lock; under
  // ASan that hung the child).
  // Appends, so that a restarted daemon's log follows its predecessor's.
  posix::Fd log(::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string_view v(*e);
    if (!v.starts_with("NOTIFY_SOCKET=") && !v.starts_with("LISTEN_") && !v.starts_with("JOURNAL_STREAM="))
      env.emplace_back(v);
  }
  env.push_back("NOTIFY_SOCKET=" + dir_.file("notify.sock"));
  struct stat log_stat;
  if (journal_stream_ && log.valid() && ::fstat(log.get(), &log_stat) == 0)
    env.push_back("JOURNAL_STREAM=" + std::to_string(log_stat.st_dev) + ":" + std::to_string(log_stat.st_ino));
  std::string listen_pid = "LISTEN_PID=";
  const std::size_t pid_at = listen_pid.size();
  if (!pass.empty()) {
    env.push_back("LISTEN_FDS=" + std::to_string(pass.size()));
    env.push_back("LISTEN_FDNAMES=" + names);
    listen_pid.append(24, '\0');  // the child writes its pid here
  }
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  if (!pass.empty()) envp.push_back(listen_pid.data());
  envp.push_back(nullptr);
  std::vector<char*> argv;
  for (auto& a : args_) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<int> high(pass.size(), -1);

  pid_t pid = ::fork();
  if (pid < 0) return Internal("fork failed");
  if (pid == 0) {
    if (log.valid()) {
      ::dup2(log.get(), STDERR_FILENO);
      ::dup2(log.get(), STDOUT_FILENO);
    }
    // The stored fds at 3, 4, ... (first out of the way of those numbers).
    for (std::size_t i = 0; i < pass.size(); ++i) high[i] = ::fcntl(pass[i], F_DUPFD_CLOEXEC, 1000);
    for (std::size_t i = 0; i < high.size(); ++i) ::dup2(high[i], 3 + static_cast<int>(i));
    if (!pass.empty()) {
      char digits[24];
      int n = 0;
      for (pid_t v = ::getpid(); v > 0; v /= 10) digits[n++] = static_cast<char>('0' + v % 10);
      for (int i = 0; i < n; ++i) listen_pid[pid_at + static_cast<std::size_t>(i)] = digits[n - 1 - i];
    }
    ::execve(argv[0], argv.data(), envp.data());
    std::_Exit(127);
  }
  pid_ = pid;

  const auto deadline = std::chrono::steady_clock::now() + ready_timeout_;
  while (std::chrono::steady_clock::now() < deadline) {
    {
      std::unique_lock lock(mu_);
      if (cv_.wait_for(lock, std::chrono::milliseconds(100), [&] { return ready_; })) return Status::Ok();
    }
    int status;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      pid_ = -1;
      return Unavailable("weightd exited before it was ready (status " + std::to_string(status) + "):\n" + Log());
    }
  }
  return DeadlineExceeded("weightd did not report READY=1 in time:\n" + Log());
}

DaemonProcess::~DaemonProcess() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  stop_ = true;
  if (notify_thread_.joinable()) notify_thread_.join();
  for (const auto& name : Segments()) ::shm_unlink(("/" + name).c_str());
  ::shm_unlink(("/" + prefix_ + ".lock").c_str());
}

bool DaemonProcess::running() {
  if (pid_ <= 0) return false;
  int status;
  if (::waitpid(pid_, &status, WNOHANG) == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

int DaemonProcess::Signal(int sig) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, sig);
  if (sig != SIGTERM && sig != SIGKILL && sig != SIGINT) return 0;
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  return status;
}

Result<Client> DaemonProcess::Connect(const std::string& client_name) const {
  ClientOptions o;
  o.endpoint = endpoint_;
  o.client_name = client_name;
  return Client::Connect(o);
}

std::string DaemonProcess::Weightctl(const std::vector<std::string>& args, int* exit_code) const {
  std::string cmd = std::string(WEIGHTD_WEIGHTCTL_PATH) + " --socket '" + endpoint_ + "'";
  for (const auto& a : args) cmd += " '" + a + "'";
  cmd += " 2>&1";
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) {
    *exit_code = -1;
    return out;
  }
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = ::pclose(p);
  *exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

std::string DaemonProcess::Log() const { return ReadAll(log_path_); }

std::vector<std::string> DaemonProcess::Segments() const {
  std::vector<std::string> out;
  for (const auto& n : ListSegments(prefix_))
    if (n != prefix_ + ".lock") out.push_back(n);
  return out;
}

}  // namespace weightd::testing
