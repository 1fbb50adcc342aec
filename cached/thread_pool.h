// thread_pool.h — a fixed set of worker threads draining a closable queue.
//
// Submit() is thread-safe. Close() (also run by the destructor) stops accepting work, lets
// the queued tasks finish and joins the workers; tasks must therefore not wait for work that
// is queued behind them on the same pool.
#pragma once

#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "thread_annotations.h"

namespace weightd {

// Hands a task to the control loop from any thread; the loop runs it on its own thread. Workers
// post the next step of their job this way, so that the loop never waits for them.
using LoopPost = std::function<void(std::function<void()>)>;

class ThreadPool {
 public:
  explicit ThreadPool(unsigned threads, std::string name = "worker");
  ~ThreadPool() { Close(); }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // False if the pool is closed (the task is dropped).
  bool Submit(std::function<void()> task);
  void Close();
  unsigned size() const { return static_cast<unsigned>(threads_.size()); }

 private:
  void Run();

  Mutex mu_;
  CondVar cv_{&mu_};
  std::deque<std::function<void()>> queue_ GUARDED_BY(mu_);
  bool closed_ GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;  // the constructor's and Close()'s
};

}  // namespace weightd
