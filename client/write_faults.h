// write_faults.h — says why a process dies when it writes to a lease's read-only memory.
//
// Host leases map the daemon's segments PROT_READ, so an in-place write through a tensor ends
// the process with SIGSEGV, usually deep inside a numerical library, with nothing on stderr.
// This module keeps a table of the live read-only mappings and, once Install() has run, a
// SIGSEGV/SIGBUS handler that looks the fault address up and writes one line naming the model,
// tensor and shard before the signal goes on to whatever handled it before (by default: the
// process ends with SIGSEGV, as it would have).
//
// Thread and signal safety: Register/Unregister may be called from any thread; the handler
// reads the table with atomics only and writes with write(2). Unregister waits for a handler
// that is reading the entry, so the entry's info outlives every read of it.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "weightd/client.h"

namespace weightd::write_faults {

// What the message names. Owned by the lease; must stay valid until Unregister returns.
struct RangeInfo {
  std::string model;
  std::string shard_file;
  const std::vector<Tensor>* tensors = nullptr;  // the lease's tensors (immutable once set)
};

// Adds [begin, begin + size) to the table. Returns an id for Unregister, or 0 when the table is
// full (the range then goes unexplained; nothing else changes).
std::size_t Register(const std::byte* begin, std::size_t size, const RangeInfo* info) noexcept;
void Unregister(std::size_t id) noexcept;

// Installs the handler once per process (later calls do nothing). See weightd::ExplainWriteFaults.
void Install() noexcept;

}  // namespace weightd::write_faults
