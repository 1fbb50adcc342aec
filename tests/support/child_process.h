// child_process.h — test support: this program re-executed as a child process, talked to over
// a pipe on its stdin and one from its stdout. Tests use it for clients that must live in
// processes of their own (CUDA state cannot cross fork; a killed process must be a real one).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "posix.h"

namespace weightd::testing {

class ChildProcess {
 public:
  // Runs /proc/self/exe with `args` (argv[1..]) and the environment plus `extra_env`
  // ("NAME=value"). started() is false if the spawn failed.
  ChildProcess(const std::vector<std::string>& args, const std::vector<std::string>& extra_env = {});
  // Closes the child's stdin (its cue to exit), waits up to 5 s, then kills it.
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  // The child's next line on stdout, without the newline; "" at EOF or after `timeout`.
  std::string ReadLine(std::chrono::milliseconds timeout);
  // Writes `line` and a newline to the child's stdin.
  void Say(const std::string& line);
  // SIGKILL, and reap.
  void Kill();

 private:
  pid_t pid_ = -1;
  posix::Fd to_, from_;
  std::string pending_;
};

}  // namespace weightd::testing
