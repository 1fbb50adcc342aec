// host_tier.h — POSIX shared-memory segments (Boost.Interprocess) that hold shard data.
//
// A segment holds one shard's data section at offset 0, so a tensor's offset in the segment
// equals its safetensors data_offsets[0]. Segments are created exclusively, with an explicit
// mode (never Boost's 0644 default) and a page-rounded size; clients open them O_RDONLY.
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

#include "status_macros.h"

namespace weightd {

class HostSegment {
 public:
  HostSegment();
  HostSegment(HostSegment&&) noexcept;
  HostSegment& operator=(HostSegment&&) noexcept;
  ~HostSegment();

  // Creates "/<name>" exclusively with exactly `mode` (whatever the umask) and, unless `group`
  // is (gid_t)-1, owned by that group, sized RoundUp(data_size, page), mapped read-write into
  // the daemon. FailedPrecondition if the name exists; PermissionDenied "shm.chgrp_failed" if
  // the daemon may not give the segment to `group` (it must be a member, or have CAP_CHOWN).
  // `reserve` commits every page now (posix_fallocate), so that a full /dev/shm is
  // ResourceExhausted "shm.no_space" here rather than a SIGBUS on a later store through the
  // mapping. A caller that fills the segment with write() through fd() may pass false: tmpfs
  // allocates each page in the write, and a full /dev/shm is then ENOSPC from that write.
  static Result<HostSegment> Create(const std::string& name, std::uint64_t data_size, mode_t mode,
                                    gid_t group = static_cast<gid_t>(-1), bool reserve = true);

  // Opens an existing segment "/<name>" that an earlier instance of this daemon created, for
  // re-adoption after a restart: it must be a regular object owned by this process's user and
  // exactly RoundUp(data_size, page) bytes long. Its mode and group are set to `mode` and
  // `group` (today's config), and it is mapped read-write into the daemon. NotFound if absent;
  // FailedPrecondition "shm.not_adoptable" if it is not what this daemon would have made.
  static Result<HostSegment> Open(const std::string& name, std::uint64_t data_size, mode_t mode,
                                  gid_t group = static_cast<gid_t>(-1));

  // Unlinks a segment name; NotFound is not an error. Existing mappings stay valid.
  static Status Remove(const std::string& name);

  const std::string& name() const { return name_; }    // without the leading '/'
  std::string shm_path() const { return "/" + name_; }  // what shm_open() takes
  std::byte* data() const { return data_; }
  // The daemon's read-write fd of the segment, owned by this object (-1 for a default one).
  int fd() const;
  std::uint64_t data_size() const { return data_size_; }
  std::uint64_t mapped_size() const { return mapped_size_; }

 private:
  struct Impl;
  // Named and sized, nothing opened or mapped yet.
  static HostSegment Blank(const std::string& name, std::uint64_t data_size);
  std::unique_ptr<Impl> impl_;
  std::string name_;
  std::byte* data_ = nullptr;
  std::uint64_t data_size_ = 0;
  std::uint64_t mapped_size_ = 0;
};

// Names (without '/') of the segments in /dev/shm that start with "<prefix>.".
std::vector<std::string> ListSegments(const std::string& prefix);

// True if /dev/shm/<name> is a regular file (not a link, FIFO, ...) owned by this process's
// effective uid: one this daemon may have made. Opens nothing.
bool IsOwnSegment(const std::string& name);

}  // namespace weightd
