// host_tier.h — POSIX shared-memory segments (Boost.Interprocess) that hold shard data.
//
// A segment holds one shard's data section at offset 0, so a tensor's offset in the segment
// equals its safetensors data_offsets[0]. Segments are created exclusively, with an explicit
// mode (never Boost's 0644 default) and a page-rounded size; clients open them O_RDONLY.
//
// A segment may be split into parts: tmpfs files of `part_size` bytes each (a multiple of
// 2 MiB; the last holds the rest), named PartName(name, k), mapped back to back into one
// contiguous range (posix::MapParts) by the daemon and by every client. A write into a tmpfs
// file holds that file's inode lock, so one file admits one writer at a time; parts let a fill
// write one shard with many threads (docs/loading.md). part_size 0 is one file, named `name`.
//
// HostSegment is move-only. Its destructor unmaps the daemon's view only; deleting the name
// is an explicit Remove() by the owner of the policy, so a segment a client still maps stays
// valid until that client unmaps it. Not thread-safe per object; distinct objects are
// independent.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "posix.h"
#include "status_macros.h"

namespace boost::interprocess {
class shared_memory_object;
}

namespace weightd {

// A close-on-exec duplicate of a Boost shm object's descriptor, which outlives the object.
// `what` names it in the error ("dup(<what>): ...").
Result<posix::Fd> DupOf(const boost::interprocess::shared_memory_object& shm, const std::string& what);

class HostSegment {
 public:
  HostSegment();
  HostSegment(HostSegment&&) noexcept;
  HostSegment& operator=(HostSegment&&) noexcept;
  ~HostSegment();

  // Creates "/<name>" exclusively with exactly `mode` (whatever the umask) and, unless `group`
  // is (gid_t)-1, owned by that group, sized RoundUp(data_size, page), mapped read-write into
  // the daemon; with a `part_size` (a multiple of 2 MiB) smaller than that, as parts (above),
  // each created the same way. FailedPrecondition if the name exists; PermissionDenied "shm.chgrp_failed" if
  // the daemon may not give the segment to `group` (it must be a member, or have CAP_CHOWN).
  // `reserve` commits every page now (posix_fallocate), so that a full /dev/shm is
  // ResourceExhausted "shm.no_space" here rather than a SIGBUS on a later store through the
  // mapping. A caller that fills the segment with write() through fd() may pass false: tmpfs
  // allocates each page in the write, and a full /dev/shm is then ENOSPC from that write.
  static Result<HostSegment> Create(const std::string& name, std::uint64_t data_size, mode_t mode,
                                    gid_t group = static_cast<gid_t>(-1), bool reserve = true,
                                    std::uint64_t part_size = 0);

  // Opens an existing segment "/<name>" that an earlier instance of this daemon created, for
  // re-adoption after a restart: it must be a regular object owned by this process's user and
  // exactly RoundUp(data_size, page) bytes long, in the parts that `part_size` gives (each part
  // exactly its size). Its mode and group are set to `mode` and `group` (today's config), and it
  // is mapped read-write into the daemon. NotFound if a part is absent; FailedPrecondition
  // "shm.not_adoptable" if one is not what this daemon would have made.
  static Result<HostSegment> Open(const std::string& name, std::uint64_t data_size, mode_t mode,
                                  gid_t group = static_cast<gid_t>(-1), std::uint64_t part_size = 0);

  // Unlinks one name; NotFound is not an error. Existing mappings stay valid.
  static Status Remove(const std::string& name);
  // The name of part `k` of segment `name`: `name` itself for part 0, "<name>~<k>" after.
  static std::string PartName(const std::string& name, std::size_t k);
  // The names of every part of a segment of `data_size` bytes split by `part_size`, in order.
  static std::vector<std::string> PartNames(const std::string& name, std::uint64_t data_size, std::uint64_t part_size);

  const std::string& name() const { return name_; }    // without the leading '/'
  std::string shm_path() const { return "/" + name_; }  // what shm_open() takes
  std::byte* data() const { return data_; }
  std::uint64_t data_size() const { return data_size_; }
  std::uint64_t mapped_size() const { return mapped_size_; }
  // Bytes per part (0: the segment is one file).
  std::uint64_t part_size() const { return part_size_; }
  std::size_t parts() const;
  std::vector<std::string> part_names() const { return PartNames(name_, data_size_, part_size_); }
  // The daemon's read-write fd of part `k`, owned by this object; -1 once CloseFds() ran (or for
  // a default segment). The fill writes through them.
  int part_fd(std::size_t k) const;
  // Closes the part fds: the mapping keeps the pages, and a resident copy of many parts would
  // otherwise hold as many descriptors.
  void CloseFds();
  // Unlinks every part name (NotFound is not an error). Mappings stay valid.
  void Unlink() const;

 private:
  struct Impl;
  // Named and sized, nothing opened or mapped yet.
  static HostSegment Blank(const std::string& name, std::uint64_t data_size, std::uint64_t part_size);
  // Maps the opened parts read-write.
  Status MapAll();
  std::unique_ptr<Impl> impl_;
  std::string name_;
  std::byte* data_ = nullptr;
  std::uint64_t data_size_ = 0;
  std::uint64_t mapped_size_ = 0;
  std::uint64_t part_size_ = 0;
};

// Names (without '/') of the segments in /dev/shm that start with "<prefix>.".
std::vector<std::string> ListSegments(const std::string& prefix);

// True if /dev/shm/<name> is a regular file (not a link, FIFO, ...) owned by this process's
// effective uid: one this daemon may have made. Opens nothing.
bool IsOwnSegment(const std::string& name);

}  // namespace weightd
