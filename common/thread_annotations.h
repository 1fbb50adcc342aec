// thread_annotations.h — Clang's thread-safety attributes (internal), and the mutex, lock and
// condition variable they can check. libstdc++'s std::mutex carries no annotations, so state
// shared across threads is guarded by weightd::Mutex and annotated GUARDED_BY(mu_);
// scripts/thread-safety.sh compiles the daemon with clang's -Wthread-safety to check every
// access. GCC ignores the attributes. (LevelDB's port/thread_annotations.h and port::Mutex.)
//
// Thread safety: Mutex and CondVar are what the name says; MutexLock is a scoped lock owned by
// one thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

#if defined(__clang__)
#define WEIGHTD_THREAD_ANNOTATION_(x) __attribute__((x))
#else
#define WEIGHTD_THREAD_ANNOTATION_(x)
#endif

#define CAPABILITY(x) WEIGHTD_THREAD_ANNOTATION_(capability(x))
#define SCOPED_CAPABILITY WEIGHTD_THREAD_ANNOTATION_(scoped_lockable)
#define GUARDED_BY(x) WEIGHTD_THREAD_ANNOTATION_(guarded_by(x))
#define PT_GUARDED_BY(x) WEIGHTD_THREAD_ANNOTATION_(pt_guarded_by(x))
#define REQUIRES(...) WEIGHTD_THREAD_ANNOTATION_(requires_capability(__VA_ARGS__))
#define ACQUIRE(...) WEIGHTD_THREAD_ANNOTATION_(acquire_capability(__VA_ARGS__))
#define RELEASE(...) WEIGHTD_THREAD_ANNOTATION_(release_capability(__VA_ARGS__))
#define EXCLUDES(...) WEIGHTD_THREAD_ANNOTATION_(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(x) WEIGHTD_THREAD_ANNOTATION_(assert_capability(x))
#define NO_THREAD_SAFETY_ANALYSIS WEIGHTD_THREAD_ANNOTATION_(no_thread_safety_analysis)

namespace weightd {

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ACQUIRE() { mu_.lock(); }
  void Unlock() RELEASE() { mu_.unlock(); }
  // Tells the analysis that the caller holds the lock (in a condition's predicate, say).
  void AssertHeld() const ASSERT_CAPABILITY(this) {}

 private:
  friend class CondVar;
  std::mutex mu_;
};

// Holds a Mutex for its scope.
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.Lock(); }
  ~MutexLock() RELEASE() { mu_.Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

// A condition variable bound to one Mutex, which the waiter holds before and after a wait.
// (Its methods carry no REQUIRES: the analysis cannot tell that the CondVar's mutex is the
// caller's. A predicate that reads guarded state starts with mu.AssertHeld().)
class CondVar {
 public:
  explicit CondVar(Mutex* mu) : mu_(mu) {}
  CondVar(const CondVar&) = delete;
  CondVar& operator=(const CondVar&) = delete;

  void Wait() {
    std::unique_lock<std::mutex> lock(mu_->mu_, std::adopt_lock);
    cv_.wait(lock);
    lock.release();  // still held: the caller's
  }
  // Waits until `done()` (called with the mutex held) is true.
  template <class Pred>
  void Wait(Pred done) {
    while (!done()) Wait();
  }
  // False if `deadline` passed first.
  template <class Pred>
  bool WaitUntil(std::chrono::steady_clock::time_point deadline, Pred done) {
    std::unique_lock<std::mutex> lock(mu_->mu_, std::adopt_lock);
    const bool ok = cv_.wait_until(lock, deadline, done);
    lock.release();
    return ok;
  }
  void Signal() { cv_.notify_one(); }
  void SignalAll() { cv_.notify_all(); }

 private:
  Mutex* const mu_;
  std::condition_variable cv_;
};

}  // namespace weightd
