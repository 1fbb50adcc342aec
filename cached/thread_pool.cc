#include "thread_pool.h"

#include <pthread.h>

namespace weightd {

ThreadPool::ThreadPool(unsigned threads, std::string name) {
  if (threads == 0) threads = 1;
  threads_.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) {
    threads_.emplace_back([this] { Run(); });
    std::string n = (name + "-" + std::to_string(i)).substr(0, 15);  // the kernel's limit
    pthread_setname_np(threads_.back().native_handle(), n.c_str());
  }
}

bool ThreadPool::Submit(std::function<void()> task) {
  {
    MutexLock lock(mu_);
    if (closed_) return false;
    queue_.push_back(std::move(task));
  }
  cv_.Signal();
  return true;
}

void ThreadPool::Close() {
  {
    MutexLock lock(mu_);
    if (closed_ && threads_.empty()) return;
    closed_ = true;
  }
  cv_.SignalAll();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
}

void ThreadPool::Run() {
  for (;;) {
    std::function<void()> task;
    {
      MutexLock lock(mu_);
      cv_.Wait([&] {
        mu_.AssertHeld();
        return closed_ || !queue_.empty();
      });
      if (queue_.empty()) return;  // closed and drained
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
}

}  // namespace weightd
