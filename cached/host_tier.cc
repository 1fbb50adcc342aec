#include "host_tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/permissions.hpp>
#include <boost/interprocess/shared_memory_object.hpp>

#include "posix.h"

namespace bip = boost::interprocess;

namespace weightd {

struct HostSegment::Impl {
  bip::shared_memory_object shm;
  bip::mapped_region region;
};

namespace {

Status SetModeAndGroup(int fd, const std::string& name, mode_t mode, gid_t group) {
  if (::fchmod(fd, mode) != 0) return posix::ErrnoStatus("fchmod(/" + name + ")");
  if (group != static_cast<gid_t>(-1) && ::fchown(fd, static_cast<uid_t>(-1), group) != 0)
    return PermissionDenied("giving segment /" + name + " to group " + std::to_string(group) + ": " +
                                std::strerror(errno) + " (the daemon must be a member of the group)",
                            "shm.chgrp_failed");
  return Status::Ok();
}

}  // namespace

HostSegment::HostSegment() = default;
HostSegment::HostSegment(HostSegment&&) noexcept = default;
HostSegment& HostSegment::operator=(HostSegment&&) noexcept = default;
HostSegment::~HostSegment() = default;

HostSegment HostSegment::Blank(const std::string& name, std::uint64_t data_size) {
  HostSegment seg;
  seg.name_ = name;
  seg.data_size_ = data_size;
  seg.mapped_size_ = posix::RoundUp(data_size, posix::PageSize());
  seg.impl_ = std::make_unique<Impl>();
  return seg;
}

int HostSegment::fd() const { return impl_ ? impl_->shm.get_mapping_handle().handle : -1; }

Result<HostSegment> HostSegment::Create(const std::string& name, std::uint64_t data_size, mode_t mode, gid_t group,
                                        bool reserve) {
  HostSegment seg = Blank(name, data_size);
  try {
    bip::permissions perm(static_cast<unsigned>(mode));
    seg.impl_->shm = bip::shared_memory_object(bip::create_only, name.c_str(), bip::read_write, perm);
    seg.impl_->shm.truncate(static_cast<bip::offset_t>(seg.mapped_size_));
    if (seg.mapped_size_ > 0) {
      seg.impl_->region = bip::mapped_region(seg.impl_->shm, bip::read_write, 0, seg.mapped_size_);
      seg.data_ = static_cast<std::byte*>(seg.impl_->region.get_address());
    }
  } catch (const bip::interprocess_exception& e) {
    const bool exists = e.get_error_code() == bip::already_exists_error;
    const bool full = e.get_error_code() == bip::out_of_space_error || e.get_native_error() == ENOSPC ||
                      e.get_native_error() == ENOMEM;
    std::string msg = "creating shared-memory segment /" + name + " of " + std::to_string(seg.mapped_size_) +
                      " bytes: " + e.what();
    // A half-made segment must not outlive the failure.
    if (!exists) bip::shared_memory_object::remove(name.c_str());
    if (exists) return FailedPrecondition(msg, "shm.exists");
    if (full) return ResourceExhausted(msg + " (is /dev/shm large enough?)", "shm.no_space");
    return Internal(msg, "shm.create_failed");
  }
  // A segment that cannot be set up as asked is unlinked, never left half-made.
  auto discard = [&](Status s) {
    seg.impl_.reset();
    bip::shared_memory_object::remove(name.c_str());
    return s;
  };
  // The mode exactly as configured (shm_open applies the umask), and the readers' group: the
  // segment is never world-readable, never writable by clients.
  if (Status bad = SetModeAndGroup(seg.impl_->shm.get_mapping_handle().handle, name, mode, group); !bad.ok())
    return discard(bad);
  // The pages are not committed until touched; ftruncate on tmpfs does not reserve space, so
  // a full /dev/shm shows up as SIGBUS on first write. Reserve it now to fail cleanly instead.
  if (reserve && seg.mapped_size_ > 0) {
    int fd = seg.impl_->shm.get_mapping_handle().handle;
    int err = ::posix_fallocate(fd, 0, static_cast<off_t>(seg.mapped_size_));
    if (err != 0) {
      Status s = posix::ErrnoStatus("reserving " + std::to_string(seg.mapped_size_) + " bytes for segment /" + name, err);
      if (err == ENOSPC) s = ResourceExhausted(s.message() + " (is /dev/shm large enough?)", "shm.no_space");
      return discard(s);
    }
  }
  return seg;
}

Result<HostSegment> HostSegment::Open(const std::string& name, std::uint64_t data_size, mode_t mode, gid_t group) {
  HostSegment seg = Blank(name, data_size);
  const std::string what = "segment /" + name;
  try {
    // shm_open (O_NOFOLLOW in glibc): a symlink planted in /dev/shm is not followed.
    seg.impl_->shm = bip::shared_memory_object(bip::open_only, name.c_str(), bip::read_write);
  } catch (const bip::interprocess_exception& e) {
    if (e.get_error_code() == bip::not_found_error) return NotFound(what + " does not exist", "shm.not_found");
    return Internal("opening " + what + ": " + e.what(), "shm.open_failed");
  }
  const int fd = seg.impl_->shm.get_mapping_handle().handle;
  ASSIGN_OR_RETURN(posix::FileInfo st, posix::Stat(fd, what));
  if (!S_ISREG(st.mode) || st.uid != ::geteuid() || st.size != seg.mapped_size_)
    return FailedPrecondition(what + " is not one this daemon made (owner uid " + std::to_string(st.uid) + ", " +
                                  std::to_string(st.size) + " bytes; expected uid " + std::to_string(::geteuid()) +
                                  ", " + std::to_string(seg.mapped_size_) + " bytes)",
                              "shm.not_adoptable");
  RETURN_IF_ERROR(SetModeAndGroup(fd, name, mode, group));
  if (seg.mapped_size_ > 0) {
    try {
      seg.impl_->region = bip::mapped_region(seg.impl_->shm, bip::read_write, 0, seg.mapped_size_);
    } catch (const bip::interprocess_exception& e) {
      return Internal("mapping " + what + ": " + e.what(), "shm.map_failed");
    }
    seg.data_ = static_cast<std::byte*>(seg.impl_->region.get_address());
  }
  return seg;
}

Status HostSegment::Remove(const std::string& name) {
  if (::shm_unlink(("/" + name).c_str()) != 0 && errno != ENOENT)
    return posix::ErrnoStatus("shm_unlink(/" + name + ")");
  return Status::Ok();
}

std::vector<std::string> ListSegments(const std::string& prefix) {
  std::vector<std::string> out;
  DIR* d = ::opendir("/dev/shm");
  if (d == nullptr) return out;
  const std::string p = prefix + ".";
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.rfind(p, 0) == 0) out.push_back(n);
  }
  ::closedir(d);
  return out;
}

bool IsOwnSegment(const std::string& name) {
  struct stat st {};
  if (::fstatat(AT_FDCWD, ("/dev/shm/" + name).c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return false;
  return S_ISREG(st.st_mode) && st.st_uid == ::geteuid();
}

}  // namespace weightd
