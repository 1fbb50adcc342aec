// clock.h — the daemon's notion of time, behind an interface so that tests of timeouts, TTLs
// and LRU order can run on a fake clock. Implementations must be thread-safe.
#pragma once

#include <atomic>
#include <chrono>

namespace weightd {

class Clock {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  virtual ~Clock() = default;
  virtual TimePoint Now() const = 0;
};

class RealClock final : public Clock {
 public:
  TimePoint Now() const override { return std::chrono::steady_clock::now(); }
};

// A clock that moves only when told to.
class FakeClock final : public Clock {
 public:
  TimePoint Now() const override { return TimePoint(std::chrono::nanoseconds(ns_.load())); }
  void Advance(std::chrono::nanoseconds d) { ns_ += d.count(); }

 private:
  std::atomic<std::int64_t> ns_{1'000'000'000};
};

}  // namespace weightd
