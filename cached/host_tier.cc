#include "host_tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <boost/interprocess/permissions.hpp>
#include <boost/interprocess/shared_memory_object.hpp>

#include "posix.h"

namespace bip = boost::interprocess;

namespace weightd {

struct HostSegment::Impl {
  std::vector<posix::Fd> fds;  // one per part, until CloseFds()
  posix::Mapping mapping;
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

// Creates one file of a segment exclusively, with exactly `mode` and `group`, `size` bytes,
// committed when `reserve`.
Result<posix::Fd> CreatePart(const std::string& name, std::uint64_t size, mode_t mode, gid_t group, bool reserve) {
  posix::Fd fd;
  try {
    bip::permissions perm(static_cast<unsigned>(mode));
    bip::shared_memory_object shm(bip::create_only, name.c_str(), bip::read_write, perm);
    shm.truncate(static_cast<bip::offset_t>(size));
    ASSIGN_OR_RETURN(fd, DupOf(shm, "/" + name));
  } catch (const bip::interprocess_exception& e) {
    const bool exists = e.get_error_code() == bip::already_exists_error;
    const bool full = e.get_error_code() == bip::out_of_space_error || e.get_native_error() == ENOSPC ||
                      e.get_native_error() == ENOMEM;
    std::string msg = "creating shared-memory segment /" + name + " of " + std::to_string(size) + " bytes: " + e.what();
    if (exists) return FailedPrecondition(msg, "shm.exists");
    if (full) return ResourceExhausted(msg + " (is /dev/shm large enough?)", "shm.no_space");
    return Internal(msg, "shm.create_failed");
  }
  // The mode exactly as configured (shm_open applies the umask), and the readers' group: the
  // segment is never world-readable, never writable by clients.
  RETURN_IF_ERROR(SetModeAndGroup(fd.get(), name, mode, group));
  // The pages are not committed until touched; ftruncate on tmpfs does not reserve space, so
  // a full /dev/shm shows up as SIGBUS on first write. Reserve it now to fail cleanly instead.
  if (reserve && size > 0) {
    if (int err = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(size)); err != 0) {
      Status s = posix::ErrnoStatus("reserving " + std::to_string(size) + " bytes for segment /" + name, err);
      if (err == ENOSPC) s = ResourceExhausted(s.message() + " (is /dev/shm large enough?)", "shm.no_space");
      return s;
    }
  }
  return fd;
}

Status BadPartSize(const std::string& name, std::uint64_t part_size) {
  return InvalidArgument("segment /" + name + ": parts of " + std::to_string(part_size) +
                             " bytes (not a multiple of 2 MiB)",
                         "shm.bad_part_size");
}

}  // namespace

Result<posix::Fd> DupOf(const bip::shared_memory_object& shm, const std::string& what) {
  const int fd = ::fcntl(shm.get_mapping_handle().handle, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return posix::ErrnoStatus("dup(" + what + ")");
  return posix::Fd(fd);
}

HostSegment::HostSegment() = default;
HostSegment::HostSegment(HostSegment&&) noexcept = default;
HostSegment& HostSegment::operator=(HostSegment&&) noexcept = default;
HostSegment::~HostSegment() = default;

HostSegment HostSegment::Blank(const std::string& name, std::uint64_t data_size, std::uint64_t part_size) {
  HostSegment seg;
  seg.name_ = name;
  seg.data_size_ = data_size;
  seg.mapped_size_ = posix::RoundUp(data_size, posix::PageSize());
  // One part that holds everything is the plain one-file segment.
  seg.part_size_ = part_size < seg.mapped_size_ ? part_size : 0;
  seg.impl_ = std::make_unique<Impl>();
  return seg;
}

std::string HostSegment::PartName(const std::string& name, std::size_t k) {
  return k == 0 ? name : name + "~" + std::to_string(k);
}

std::vector<std::string> HostSegment::PartNames(const std::string& name, std::uint64_t data_size,
                                                std::uint64_t part_size) {
  const std::uint64_t n = std::max<std::uint64_t>(1, posix::PartCount(posix::RoundUp(data_size, posix::PageSize()), part_size));
  std::vector<std::string> out;
  out.reserve(n);
  for (std::uint64_t k = 0; k < n; ++k) out.push_back(PartName(name, k));
  return out;
}

std::size_t HostSegment::parts() const {
  return static_cast<std::size_t>(std::max<std::uint64_t>(1, posix::PartCount(mapped_size_, part_size_)));
}

int HostSegment::part_fd(std::size_t k) const {
  return impl_ && k < impl_->fds.size() ? impl_->fds[k].get() : -1;
}

void HostSegment::CloseFds() {
  if (impl_) impl_->fds.clear();
}

void HostSegment::Unlink() const {
  if (name_.empty()) return;
  for (const std::string& n : part_names()) (void)Remove(n);
}

Status HostSegment::MapAll() {
  if (mapped_size_ == 0) return Status::Ok();
  std::vector<int> fds;
  for (const posix::Fd& f : impl_->fds) fds.push_back(f.get());
  ASSIGN_OR_RETURN(impl_->mapping, posix::MapParts(fds, mapped_size_, part_size_, PROT_READ | PROT_WRITE, MAP_SHARED,
                                                   "segment /" + name_));
  data_ = impl_->mapping.data();
  return Status::Ok();
}

Result<HostSegment> HostSegment::Create(const std::string& name, std::uint64_t data_size, mode_t mode, gid_t group,
                                        bool reserve, std::uint64_t part_size) {
  if (part_size % posix::kHugePageBytes != 0) return BadPartSize(name, part_size);
  HostSegment seg = Blank(name, data_size, part_size);
  // A segment that cannot be set up as asked is unlinked, never left half-made; a name that
  // exists is left alone (it is not ours to remove).
  std::size_t made = 0;
  auto discard = [&](Status s) {
    seg.impl_.reset();
    for (std::size_t k = 0; k < made; ++k) (void)Remove(PartName(name, k));
    return s;
  };
  const std::size_t n = seg.parts();
  seg.impl_->fds.reserve(n);
  for (std::size_t k = 0; k < n; ++k) {
    const std::string part = PartName(name, k);
    const std::uint64_t off = k * seg.part_size_;
    const std::uint64_t size = seg.part_size_ == 0 ? seg.mapped_size_ : std::min(seg.part_size_, seg.mapped_size_ - off);
    auto fd = CreatePart(part, size, mode, group, reserve);
    if (!fd.ok()) {
      if (fd.status().reason() != "shm.exists") (void)Remove(part);
      return discard(fd.status());
    }
    ++made;
    seg.impl_->fds.push_back(std::move(fd).value());
  }
  if (Status s = seg.MapAll(); !s.ok()) return discard(s);
  return seg;
}

Result<HostSegment> HostSegment::Open(const std::string& name, std::uint64_t data_size, mode_t mode, gid_t group,
                                      std::uint64_t part_size) {
  if (part_size % posix::kHugePageBytes != 0) return BadPartSize(name, part_size);
  HostSegment seg = Blank(name, data_size, part_size);
  const std::size_t n = seg.parts();
  for (std::size_t k = 0; k < n; ++k) {
    const std::string part = PartName(name, k);
    const std::string what = "segment /" + part;
    const std::uint64_t off = k * seg.part_size_;
    const std::uint64_t size = seg.part_size_ == 0 ? seg.mapped_size_ : std::min(seg.part_size_, seg.mapped_size_ - off);
    posix::Fd fd;
    try {
      // shm_open (O_NOFOLLOW in glibc): a symlink planted in /dev/shm is not followed.
      bip::shared_memory_object shm(bip::open_only, part.c_str(), bip::read_write);
      ASSIGN_OR_RETURN(fd, DupOf(shm, "/" + part));
    } catch (const bip::interprocess_exception& e) {
      if (e.get_error_code() == bip::not_found_error) return NotFound(what + " does not exist", "shm.not_found");
      return Internal("opening " + what + ": " + e.what(), "shm.open_failed");
    }
    ASSIGN_OR_RETURN(posix::FileInfo st, posix::Stat(fd.get(), what));
    if (!S_ISREG(st.mode) || st.uid != ::geteuid() || st.size != size)
      return FailedPrecondition(what + " is not one this daemon made (owner uid " + std::to_string(st.uid) + ", " +
                                    std::to_string(st.size) + " bytes; expected uid " + std::to_string(::geteuid()) +
                                    ", " + std::to_string(size) + " bytes)",
                                "shm.not_adoptable");
    RETURN_IF_ERROR(SetModeAndGroup(fd.get(), part, mode, group));
    seg.impl_->fds.push_back(std::move(fd));
  }
  if (Status s = seg.MapAll(); !s.ok()) return Internal(s.message(), "shm.map_failed");
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
