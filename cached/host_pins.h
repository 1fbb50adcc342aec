// host_pins.h — page-locked host memory for the GPU tier's copies: the process's CUDA host
// registrations (cudaHostRegister), refcounted and shared, and the threads that page-lock a
// copy's chunks as a fill brings them in.
//
// Contract:
//  - HostPins borrows a CudaApi, which must outlive it. All methods are thread-safe.
//  - Registrations are process-wide and may be shared by concurrent copies of one shard to
//    several GPUs, so they are refcounted. CUDA refuses overlapping registrations: a range that
//    registrations cover whole, one or several side by side, shares them (so the resident copy's
//    pin after a pipelined copy takes over the copy's chunks instead of registering the shard
//    again); one they cover only in part is refused, or, with `wait`, waits up to a minute for
//    them to cover it or to go. A range being registered or given back is waited for.
//  - Registering runs outside the lock: threads waiting on it never wait for the driver (which
//    serializes registrations anyway: ~30 ms/GiB once the pages are mapped; docs/loading.md).
//  - Every key Register() hands out is given back once, with Unregister(), after the last copy
//    that reads the range is synchronized.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "cuda_api.h"
#include "thread_annotations.h"

namespace weightd::gpu {

// The whole pages around [ptr, ptr + size). Every registration of a range goes through this, so
// that pins and copies agree on its key.
std::pair<const void*, std::uint64_t> PageSpan(const void* ptr, std::uint64_t size);

// The registrations a range is held by: one, or several side by side.
using HostKeys = std::vector<const void*>;

class HostPins {
 public:
  explicit HostPins(CudaApi* api) : api_(api) {}
  HostPins(const HostPins&) = delete;
  HostPins& operator=(const HostPins&) = delete;

  // Page-locks the whole pages [base, base + size) for the GPUs, or shares the registrations
  // that cover them. The keys to give back (one each), or none when the range cannot be
  // registered (RLIMIT_MEMLOCK, or registrations that cover it in part). `read_only_supported`:
  // try a read-only registration first (what a PROT_READ mapping needs).
  HostKeys Register(const void* base, std::uint64_t size, bool read_only_supported, bool wait = false);
  void Unregister(const HostKeys& keys);

  // CUDA errors while unregistering so far (the range stays locked).
  std::uint64_t release_errors() const;

 private:
  enum ClaimResult : std::uint8_t { kShared, kRefused, kClaimed };
  ClaimResult Claim(const void* base, std::uint64_t size, bool wait, HostKeys* shared);
  void Unregister(const void* key);

  struct Registration {
    std::uint64_t size = 0;
    int refs = 0;
    bool ready = false;  // registered; false while cudaHostRegister or cudaHostUnregister runs
  };
  CudaApi* const api_;
  mutable Mutex mu_;
  CondVar cv_{&mu_};
  std::map<const void*, Registration> registrations_ GUARDED_BY(mu_);
  std::uint64_t changes_ GUARDED_BY(mu_) = 0;  // registrations made, failed or given back so far
  std::uint64_t release_errors_ GUARDED_BY(mu_) = 0;
};

// Page-locks the chunks of a GPU copy that follows a fill, each once its bytes are in, on a few
// threads ahead of the copy. cudaHostRegister of pages that a fill wrote with pwrite first
// faults each page into the daemon's mapping, one at a time, serialized in the driver (~10
// GB/s during a fill, slower than the fill); each thread here maps its chunk in first
// (MADV_POPULATE_READ), in parallel, so that the driver only page-locks. The threads take the
// chunks in order; the copy waits for each one's turn with Wait(). On destruction (every path)
// the threads stop taking chunks, finish the one they hold (a wait for the fill returns once the
// load ends either way) and append every registration to `*registered`, for the caller to give
// back once its copies are synchronized.
class ChunkPinner {
 public:
  struct Chunk {
    std::size_t shard = 0;
    std::uint64_t end = 0;        // ready once bytes [0, end) of the shard are in
    const void* base = nullptr;   // the pages to register
    std::uint64_t size = 0;
  };
  // Blocks until bytes [0, end) of shard `shard` are in, or returns why they never will.
  using WaitFn = std::function<Status(std::size_t shard, std::uint64_t end)>;

  // `chunks`, `wait` and `registered` must outlive the pinner.
  ChunkPinner(HostPins& pins, std::span<const Chunk> chunks, bool read_only, const WaitFn& wait, int threads,
              HostKeys* registered);
  ChunkPinner(const ChunkPinner&) = delete;
  ChunkPinner& operator=(const ChunkPinner&) = delete;
  ~ChunkPinner();

  // Waits until chunk `k`'s bytes are in, or returns why they never will. `*pinned`: whether
  // they are page-locked (if not, the copy stages them).
  Status Wait(std::size_t k, bool* pinned);

 private:
  void Run();

  struct Slot {
    bool done = false;
    Status status;
    HostKeys keys;
  };
  HostPins& pins_;
  const std::span<const Chunk> chunks_;
  const bool read_only_;
  const WaitFn& wait_;
  HostKeys* const registered_;
  Mutex mu_;
  CondVar cv_{&mu_};
  std::vector<Slot> slots_ GUARDED_BY(mu_);
  std::size_t next_ GUARDED_BY(mu_) = 0;
  bool stop_ GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;  // last: started once the rest is built
};

}  // namespace weightd::gpu
