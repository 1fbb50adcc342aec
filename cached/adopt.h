// adopt.h — a restarted daemon takes back the host segments of its previous instance, verified,
// without reading the model files again.
//
// When a host load has completed and verified, the server writes the model's record next to its
// segments: "/<prefix>.<model>.<generation>-<salt>.record", mode 0600 (the daemon's alone). It
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

namespace weightd {

// "<prefix>.<model>.<load tag>.record" (Loader::LoadTag), without the leading '/'.
std::string RecordName(const std::string& prefix, const std::string& model, const std::string& load_tag);
// True for a name RecordName() makes (segment names end in a shard index instead).
bool IsRecordName(const std::string& name);

struct ModelRecord {
  struct Shard {
    std::string file;     // name inside the model directory
    std::string segment;  // shm name, without '/'
    std::uint64_t data_size = 0;
    posix::FileInfo file_info;  // size, mtime_ns, inode, dev when it was read
    XXH128_hash_t checksum{};   // of the whole file
    std::string header_bytes;   // file bytes [0, data_offset)
  };
  std::string name;  // of the record itself, without '/'
  std::string model;
  std::string dir;
  std::uint64_t generation = 0;
  std::vector<Shard> shards;
};

// Writes `model`'s record under `name` (exclusive, mode 0600) and sets nothing else: the caller
// stores the name in ResidentModel::record. ResourceExhausted "shm.no_space" when /dev/shm is
// full; the model stays usable without a record, it just cannot be adopted after a crash.
Status WriteRecord(const std::string& name, const ResidentModel& model, std::uint64_t generation);

// Reads a record this daemon's user wrote. DataLoss "adopt.bad_record" for a truncated,
// corrupt or foreign one.
Result<ModelRecord> ReadRecord(const std::string& name);

// Takes back the segments of `record` for the catalog entry `mc`, with today's segment mode and
// group. FailedPrecondition "adopt.model_changed" when the catalog entry or the files differ
// from the record (another directory, another shard set, a file with another size, mtime,
// change time or identity), or, with `verify_manifest`, when the directory's manifest now
// names another checksum or misses a shard; DataLoss "adopt.checksum_mismatch" when a segment's
// bytes do not hash to the file's checksum; the errors of HostSegment::Open otherwise. Hashes
// up to `threads` shards at once.
Result<std::shared_ptr<ResidentModel>> Adopt(const ModelRecord& record, const ModelConfig& mc, mode_t shm_mode,
                                             gid_t shm_group, bool verify_manifest, unsigned threads);

}  // namespace weightd
