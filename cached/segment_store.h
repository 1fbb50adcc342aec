// segment_store.h — the one owner of the daemon's POSIX shared memory (in the spirit of
// CacheLib's ShmManager): the prefix lock, the salted names, creating, opening and removing
// segments (HostSegment, on Boost.Interprocess), the read-only fds handed to clients, the
// adoption records, and the sweep of what an earlier instance left behind.
//
// Names, all under /dev/shm and without the leading '/':
//   <prefix>.lock                                the prefix lock (an flock held for the process's life)
//   <prefix>.<model>.<generation>-<salt>.<shard>  one segment per shard of a host copy (its part 0)
//   <prefix>.<model>.<generation>-<salt>.<shard>~<k>  part k >= 1 of it (HostSegment)
//   <prefix>.<model>.<generation>-<salt>.record   a completed copy's adoption record (adopt.h)
// The salt is random per SegmentStore (per daemon instance), so that no other user can plant a
// name that a later load will want (the sticky /dev/shm would keep the daemon from removing it).
//
// Thread safety: const methods may run on any thread (the loader creates segments on its
// readers' pool); Lock() runs once, at start, before any thread uses the store.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <xxhash.h>

#include "host_tier.h"
#include "posix.h"
#include "status_macros.h"

namespace weightd {

// What a completed host copy's record holds (adopt.h says how it is used).
struct ModelRecord {
  struct Shard {
    std::string file;     // name inside the model directory
    std::string segment;  // shm name, without '/'
    std::uint64_t data_size = 0;
    std::uint64_t part_size = 0;  // HostSegment::part_size()
    posix::FileInfo file_info;  // size, mtime_ns, ctime_ns, inode, dev when it was read
    XXH128_hash_t checksum{};   // ResidentShard::checksum
    bool block_checksum = false;  // ResidentShard::block_checksum
    std::string header_bytes;   // file bytes [0, data_offset)
  };
  std::string name;  // of the record itself, without '/'
  std::string model;
  std::string dir;
  std::uint64_t generation = 0;
  std::vector<Shard> shards;
};

class SegmentStore {
 public:
  struct Options {
    std::string prefix;
    mode_t mode = 0640;                        // of every segment, whatever the umask
    gid_t group = static_cast<gid_t>(-1);      // owner group of every segment; -1: the daemon's
    // The most files a host copy is split into ([daemon] segment_parts); 0 or 1: one per shard.
    std::uint32_t max_parts = 1;
    // The smallest part PartSize() gives (rounded up to 2 MiB): smaller ones would only cost
    // mappings and fds. Tests lower it.
    std::uint64_t min_part_bytes = 16ull << 20;
  };
  explicit SegmentStore(Options options);

  // Takes the prefix lock for the life of this object. FailedPrecondition
  // "daemon.instance_locked" when another process holds it.
  Status Lock();

  const std::string& prefix() const { return options_.prefix; }

  // "<generation>-<salt>": names one load's segments and its record.
  std::string LoadTag(std::uint64_t generation) const;
  std::string SegmentName(const std::string& model, std::uint64_t generation, std::size_t shard) const;
  std::string RecordName(const std::string& model, std::uint64_t generation) const;
  // True for a name RecordName() makes (segment names end in a shard index instead).
  static bool IsRecordName(const std::string& name);

  // The part size (HostSegment) of every segment of a host copy of `model_bytes` tensor bytes:
  // the copy's bytes over `max_parts`, at least `min_part_bytes`, rounded up to 2 MiB, so that a
  // copy has at most max_parts parts plus one per shard. 0 (one file per shard) when max_parts
  // is 0 or 1.
  std::uint64_t PartSize(std::uint64_t model_bytes) const;

  // Creates segment `name` of `data_size` data bytes with the store's mode and group, in parts
  // of `part_size` bytes. A segment of that name can only be a leftover of an earlier instance
  // (the prefix is locked), so it is replaced; its old mappings stay valid. `reserve` as
  // HostSegment::Create. Errors as HostSegment::Create.
  Result<HostSegment> Create(const std::string& name, std::uint64_t data_size, bool reserve = true,
                             std::uint64_t part_size = 0) const;
  // Opens an earlier instance's segment for adoption, with today's mode and group. Errors as
  // HostSegment::Open.
  Result<HostSegment> Open(const std::string& name, std::uint64_t data_size, std::uint64_t part_size = 0) const;
  // A fresh read-only open file description of the segment file `name` (a part's name, with or
  // without its leading '/'), for a client: no route through it (mmap, mprotect, a reopen of /proc/self/fd) can
  // make it writable. NotFound "shm.not_found" when the name is gone.
  Result<posix::Fd> OpenReadOnly(const std::string& name) const;

  // Writes record `record.name` (exclusive, mode 0600: the daemon's alone). ResourceExhausted
  // "shm.no_space" when /dev/shm is full.
  Status WriteRecord(const ModelRecord& record) const;
  // Reads a record this daemon's user wrote. DataLoss "adopt.bad_record" for a truncated,
  // corrupt or foreign one.
  Result<ModelRecord> ReadRecord(const std::string& name) const;

  // The bytes WriteRecord writes for `record`. They depend only on its names and header bytes
  // (every other field is fixed-width), so a record built from a load's plan, before any data is
  // read, has the size the written one will have.
  static std::uint64_t RecordBytes(const ModelRecord& record);
  // What a host copy described by `record` takes from /dev/shm, and so from the host budget:
  // each segment rounded up to whole pages (tmpfs allocates pages; HostSegment sizes them so),
  // plus its adoption record, also in whole pages.
  static std::uint64_t HostCharge(const ModelRecord& record);

  // The huge-page setting of the tmpfs that holds the segments: the `huge=` option of the
  // /dev/shm mount ("never" when the option is absent), or "unknown" when /dev/shm is not found.
  // With "within_size" a fill allocates 2 MiB pages, which is about twice as fast on many cores
  // (docs/loading.md), and the budget's page-rounded charge stays exact; with "always" the last
  // partial 2 MiB page of each segment is allocated whole, beyond what the budget counts.
  static std::string HugePages();

  // What is under the prefix now (the lock aside): the names that are this user's regular files
  // (ours, or an earlier instance's), and how many others there are, which are never opened.
  struct Listing {
    std::vector<std::string> own;
    std::size_t foreign = 0;
  };
  Listing List() const;
  // Removes every name of `own` that is not in `keep`; returns how many went.
  std::size_t RemoveLeftovers(const std::vector<std::string>& own, const std::set<std::string>& keep) const;

 private:
  const Options options_;
  const std::string salt_;  // 16 random hex digits
  posix::Fd lock_;
};

}  // namespace weightd
