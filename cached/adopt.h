// adopt.h — a restarted daemon takes back what its previous instance left, verified: the host
// copies in /dev/shm, without reading the model files again, and (under systemd) the GPU copies
// whose fds the service manager kept.
//
// Host copies. When a host load has completed and verified, the daemon writes the model's record
// next to its segments (SegmentStore::WriteRecord, mode 0600: the daemon's alone). It holds, per
// shard, the segment's name and size, the file's identity when it was read (size, mtime, change
// time, inode, device), the file's header bytes and the XXH3-128 of the whole file. The record
// is written after every byte is in, and unlinked before the segments are (ResidentModel::
// RemoveSegments), so a record never describes a segment that is incomplete or gone.
//
// At start, the daemon holds the prefix lock, so whatever is under the prefix is its own dead
// instance's (as PostgreSQL reasons about its shared memory). For every record whose model is
// still in the catalog with the same directory, Adopt() checks that the shard files are those
// that were read (the loader's plan step: the files opened and their headers read, no data),
// opens the segments, and hashes the header bytes plus each segment's data on the loader's
// reader pool: only a segment whose XXH3-128 equals the file's is taken back. The
// daemon then removes every name under the prefix it did not adopt.
//
// GPU copies. Under systemd, each resident VMM copy's shard fds are handed to the service
// manager's file-descriptor store (FDSTORE=1), one name per shard; a restarted daemon gets them
// back (LISTEN_FDS) and takes a copy back if its model's host copy of the same generation was
// adopted and every byte equals the host copy's.
//
// Thread safety: Adopt() may run on any thread; the rest runs on the control loop.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cache.h"
#include "config.h"
#include "loader.h"
#include "loads.h"
#include "model_table.h"
#include "segment_store.h"

namespace weightd {

// The record of a completed host copy, to be written as `name` (SegmentStore::RecordName).
ModelRecord RecordOf(const ResidentModel& model, const std::string& name, std::uint64_t generation);
// The record a load of `plan` (generation `generation`) will write once filled, without the
// checksums and file identities (fixed-width): what SegmentStore::HostCharge needs before the
// fill.
ModelRecord PlannedRecord(const LoadPlan& plan, const SegmentStore& store, const std::string& model,
                          std::uint64_t generation);

// Takes back the segments of `record` for the catalog entry `mc`, with the store's segment mode
// and group (today's). The loader's plan step finds the files as a load would (their set,
// identity, headers and today's manifest), and its reader pool hashes the segments.
// FailedPrecondition "adopt.model_changed" when the catalog entry or the files differ from the
// record (another directory, another shard set, a file that is not SameFile, one the plan
// refuses), or when the directory's manifest (the loader verifying) names another checksum or
// misses a shard; DataLoss "adopt.bad_record" when the record disagrees with the file's header;
// DataLoss "adopt.checksum_mismatch" when a segment's bytes do not hash to the file's checksum;
// the errors of SegmentStore::Open otherwise.
Result<std::shared_ptr<ResidentModel>> Adopt(const ModelRecord& record, const ModelConfig& mc, Loader& loader,
                                             const SegmentStore& store);

// At start, holding the prefix lock: adopts the host copies whose records, files and checksums
// check out, within the host budget and model cap, by priority and then newest first, into the
// model table (page-locking them through `loads`), and removes every other name of this user
// under the prefix. Names that are not ours (another user's, or not a regular file) are never
// opened. Returns how many models were adopted.
std::size_t AdoptHostCopies(const DaemonConfig& config, const SegmentStore& store, Loader& loader, ModelTable& table,
                            Cache& cache, Loads& loads);

// A GPU copy's shard fds in systemd's fd store, under one name per shard:
// "gpu.<device uuid>.<host generation>.<shard>.<model>". Dropping it removes them from the
// store, or the memory would outlive the copy.
struct StoredCopy {
  std::vector<std::string> names;
  StoredCopy() = default;
  StoredCopy(const StoredCopy&) = delete;
  StoredCopy& operator=(const StoredCopy&) = delete;
  ~StoredCopy();
};

class GpuFdStore {
 public:
  // `wanted`: gpu.fd_store. The store is used for VMM copies, under a service manager.
  GpuFdStore(bool wanted, gpu::GpuTier* gpu, gpu::ExportMode mode, const Clock* clock)
      : wanted_(wanted), gpu_(gpu), mode_(mode), clock_(clock) {}

  // Hands `g`'s copy's fds to the service manager, one message (and name) per shard, and keeps
  // the names in g.stored while the copy lives.
  void Store(const ModelEntry& m, GpuEntry& g);
  // The copies a crashed predecessor left in the store (LISTEN_FDS, named): each is taken back
  // if its model's host copy of the same generation was adopted, its device is here, and every
  // byte equals the host copy's (read back and compared). The rest are closed and removed from
  // the store.
  void AdoptStored(ModelTable& table);

 private:
  bool Enabled() const;

  const bool wanted_;
  gpu::GpuTier* const gpu_;
  const gpu::ExportMode mode_;
  const Clock* const clock_;
};

}  // namespace weightd
