// adopt.h — a restarted daemon takes back the host segments of its previous instance, verified,
// without reading the model files again.
//
// When a host load has completed and verified, the server writes the model's record next to its
// segments (SegmentStore::WriteRecord: "/<prefix>.<model>.<generation>-<salt>.record", mode
// 0600, the daemon's alone). It
// holds, per shard, the segment's name and size, the file's identity when it was read (size,
// mtime, change time, inode, device), the file's header bytes and the XXH3-128 of the whole
// file. The record is written after every byte is in, and unlinked before the segments are (ResidentModel::
// RemoveSegments), so a record never describes a segment that is incomplete or gone.
//
// At start, the daemon holds the prefix lock, so whatever is under the prefix is its own dead
// instance's (as PostgreSQL reasons about its shared memory). For every record whose model is
// still in the catalog with the same directory, Adopt() checks that the shard files are those
// that were read (stat() only, no data read), opens the segments, and hashes the header bytes
// plus each segment's data: only a segment whose XXH3-128 equals the file's is taken back. The
// server then removes every name under the prefix it did not adopt.
//
// Thread safety: the functions are independent of each other and may run on any thread.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <xxhash.h>

#include "config.h"
#include "loader.h"
#include "posix.h"
#include "segment_store.h"

namespace weightd {

// The record of a completed host copy, to be written as `name` (SegmentStore::RecordName).
ModelRecord RecordOf(const ResidentModel& model, const std::string& name, std::uint64_t generation);

// Takes back the segments of `record` for the catalog entry `mc`, with the store's segment mode
// and group (today's). FailedPrecondition "adopt.model_changed" when the catalog entry or the files differ
// from the record (another directory, another shard set, a file with another size, mtime,
// change time or identity), or, with `verify_manifest`, when the directory's manifest now
// names another checksum or misses a shard; DataLoss "adopt.checksum_mismatch" when a segment's
// bytes do not hash to the file's checksum; the errors of SegmentStore::Open otherwise. Hashes
// up to `threads` shards at once.
Result<std::shared_ptr<ResidentModel>> Adopt(const ModelRecord& record, const ModelConfig& mc, const SegmentStore& store,
                                             bool verify_manifest, unsigned threads);

}  // namespace weightd
