#include "host_pins.h"

#include <spdlog/spdlog.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <iterator>

#include "posix.h"

namespace weightd::gpu {

namespace {

// Maps a range's pages into this process's page tables ahead of cudaHostRegister, which would
// otherwise fault each page in itself: a fill writes segments with pwrite, never through the
// daemon's mapping, and the driver faults one page at a time, serialized across threads.
// Best effort: where the kernel lacks the advice, the registration faults them in.
void MapIn(const void* base, std::uint64_t size, bool read_only) {
  (void)::madvise(const_cast<void*>(base), size, read_only ? MADV_POPULATE_READ : MADV_POPULATE_WRITE);
}

}  // namespace

std::pair<const void*, std::uint64_t> PageSpan(const void* ptr, std::uint64_t size) {
  const std::uint64_t page = posix::PageSize();
  auto begin = reinterpret_cast<std::uintptr_t>(ptr) / page * page;
  auto end = posix::RoundUp(reinterpret_cast<std::uintptr_t>(ptr) + size, page);
  return {reinterpret_cast<const void*>(begin), end - begin};
}

HostKeys HostPins::Register(const void* base, std::uint64_t size, bool read_only_supported, bool wait) {
  HostKeys shared;
  switch (Claim(base, size, wait, &shared)) {
    case kShared:
      return shared;
    case kRefused:
      return {};
    case kClaimed:
      break;
  }
  // Read-only registration is what lets us pin a PROT_READ mapping; a writable mapping also
  // registers without it on devices that lack the attribute.
  const bool ok =
      (read_only_supported && api_->HostRegister(base, size, true).ok()) || api_->HostRegister(base, size, false).ok();
  MutexLock lock(mu_);
  if (ok) {
    registrations_[base].ready = true;
  } else {
    registrations_.erase(base);
  }
  ++changes_;
  cv_.SignalAll();
  return ok ? HostKeys{base} : HostKeys{};
}

// Shares the registrations that cover [base, base + size), or claims the range for the caller
// to register, or refuses it (registrations cover part of it).
HostPins::ClaimResult HostPins::Claim(const void* base, std::uint64_t size, bool wait, HostKeys* shared) {
  MutexLock lock(mu_);
  const auto* b = static_cast<const std::byte*>(base);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(1);
  auto start = [](const auto& it) { return static_cast<const std::byte*>(it->first); };
  for (;;) {
    // The registrations that overlap the range, in address order (they never overlap each other).
    auto it = registrations_.upper_bound(base);
    if (it != registrations_.begin() && start(std::prev(it)) + std::prev(it)->second.size > b) --it;
    HostKeys keys;
    bool pending = false;
    const std::byte* reach = b;  // covered without a gap up to here
    for (; it != registrations_.end() && start(it) < b + size; ++it) {
      keys.push_back(it->first);
      pending = pending || !it->second.ready;
      if (start(it) <= reach) reach = std::max(reach, start(it) + it->second.size);
    }
    if (keys.empty()) break;
    if (!pending && reach >= b + size) {
      for (const void* k : keys) ++registrations_[k].refs;
      *shared = std::move(keys);
      return kShared;
    }
    if (!pending && !wait) return kRefused;
    const std::uint64_t seen = changes_;
    if (!cv_.WaitUntil(deadline, [&] {
          mu_.AssertHeld();
          return changes_ != seen;
        }))
      return kRefused;
  }
  registrations_[base] = Registration{size, 1, false};
  return kClaimed;
}

void HostPins::Unregister(const void* key) {
  {
    MutexLock lock(mu_);
    auto it = registrations_.find(key);
    if (it == registrations_.end() || --it->second.refs > 0) return;
    it->second.ready = false;  // claimed until it is given back
  }
  Status s = api_->HostUnregister(key);
  {
    MutexLock lock(mu_);
    registrations_.erase(key);
    ++changes_;
    release_errors_ += s.ok() ? 0 : 1;
    cv_.SignalAll();
  }
  if (!s.ok()) spdlog::warn("gpu tier: {}", s.ToString());
}

void HostPins::Unregister(const HostKeys& keys) {
  for (const void* k : keys) Unregister(k);
}

std::uint64_t HostPins::release_errors() const {
  MutexLock lock(mu_);
  return release_errors_;
}

ChunkPinner::ChunkPinner(HostPins& pins, std::span<const Chunk> chunks, bool read_only, const WaitFn& wait,
                         int threads, HostKeys* registered)
    : pins_(pins), chunks_(chunks), read_only_(read_only), wait_(wait), registered_(registered),
      slots_(chunks.size()) {
  const int n = std::clamp<int>(threads, 1, static_cast<int>(std::max<std::size_t>(chunks.size(), 1)));
  for (int i = 0; i < n; ++i) threads_.emplace_back([this] { Run(); });
}

ChunkPinner::~ChunkPinner() {
  {
    MutexLock lock(mu_);
    stop_ = true;
  }
  for (std::thread& t : threads_) t.join();
  MutexLock lock(mu_);
  for (const Slot& s : slots_) registered_->insert(registered_->end(), s.keys.begin(), s.keys.end());
}

Status ChunkPinner::Wait(std::size_t k, bool* pinned) {
  MutexLock lock(mu_);
  cv_.Wait([&] {
    mu_.AssertHeld();
    return slots_[k].done;
  });
  *pinned = !slots_[k].keys.empty();
  return slots_[k].status;
}

void ChunkPinner::Run() {
  for (;;) {
    std::size_t k;
    {
      MutexLock lock(mu_);
      if (stop_ || next_ == chunks_.size()) return;
      k = next_++;
    }
    const Chunk& c = chunks_[k];
    Status s = wait_(c.shard, c.end);
    HostKeys keys;
    if (s.ok()) {
      MapIn(c.base, c.size, read_only_);  // on this thread, beside the other pinners
      keys = pins_.Register(c.base, c.size, read_only_);
    }
    MutexLock lock(mu_);
    slots_[k] = Slot{true, std::move(s), std::move(keys)};
    cv_.SignalAll();
  }
}

}  // namespace weightd::gpu
