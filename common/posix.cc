#include "posix.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace weightd::posix {

Code CodeForErrno(int err) {
  switch (err) {
    case ENOENT: case ENOTDIR: return Code::kNotFound;
    case EACCES: case EPERM: case EROFS: return Code::kPermissionDenied;
    case ENOSPC: case ENOMEM: case EMFILE: case ENFILE: case EDQUOT: case EFBIG: return Code::kResourceExhausted;
    case EIO: return Code::kDataLoss;
    case EINVAL: case ENAMETOOLONG: case ELOOP: case EISDIR: return Code::kInvalidArgument;
    case EEXIST: case EBUSY: return Code::kFailedPrecondition;
    case ETIMEDOUT: return Code::kDeadlineExceeded;
    default: return Code::kInternal;
  }
}

Status ErrnoStatus(std::string_view what, int err) {
  std::string m(what);
  m += ": ";
  m += std::strerror(err);
  const char* name = strerrorname_np(err);
  return Status(CodeForErrno(err), std::move(m), std::string("errno.") + (name ? name : std::to_string(err)));
}

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);  // close() is not retried on EINTR on Linux: the fd is gone
  fd_ = fd;
}

Result<Fd> Open(const std::string& path, int flags, mode_t mode) {
  int fd;
  do fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) return ErrnoStatus("open(" + path + ")");
  return Fd(fd);
}

namespace {
FileInfo ToFileInfo(const struct stat& st) {
  FileInfo fi;
  fi.size = static_cast<std::uint64_t>(st.st_size);
  fi.mtime_ns = static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
  fi.ctime_ns = static_cast<std::int64_t>(st.st_ctim.tv_sec) * 1'000'000'000 + st.st_ctim.tv_nsec;
  fi.inode = st.st_ino;
  fi.dev = st.st_dev;
  fi.mode = st.st_mode;
  fi.uid = st.st_uid;
  return fi;
}
}  // namespace

Result<FileInfo> Stat(int fd, std::string_view what) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return ErrnoStatus("fstat(" + std::string(what) + ")");
  return ToFileInfo(st);
}

Result<FileInfo> StatPath(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return ErrnoStatus("stat(" + path + ")");
  return ToFileInfo(st);
}

Result<std::size_t> PreadUpTo(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what) {
  std::size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("pread(" + std::string(what) + ", " + std::to_string(out.size() - done) + " @ " +
                         std::to_string(offset + done) + ")");
    }
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  return done;
}

Status PreadFull(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what) {
  ASSIGN_OR_RETURN(std::size_t done, PreadUpTo(fd, out, offset, what));
  if (done < out.size())
    return DataLoss("pread(" + std::string(what) + "): unexpected end of file at " + std::to_string(offset + done),
                    "io.short_read");
  return Status::Ok();
}

Status WriteFull(int fd, std::span<const std::byte> in, std::string_view what) {
  std::size_t done = 0;
  while (done < in.size()) {
    ssize_t n = ::write(fd, in.data() + done, in.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("write(" + std::string(what) + ", " + std::to_string(in.size() - done) + " bytes)");
    }
    done += static_cast<std::size_t>(n);
  }
  return Status::Ok();
}

Status PwriteFull(int fd, std::span<const std::byte> in, std::uint64_t offset, std::string_view what) {
  std::size_t done = 0;
  while (done < in.size()) {
    ssize_t n = ::pwrite(fd, in.data() + done, in.size() - done, static_cast<off_t>(offset + done));
    if (n == 0) errno = EIO;  // no progress and no error: retrying would spin
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      return ErrnoStatus("pwrite(" + std::string(what) + ", " + std::to_string(in.size() - done) + " @ " +
                         std::to_string(offset + done) + ")");
    }
    done += static_cast<std::size_t>(n);
  }
  return Status::Ok();
}

void Mapping::reset() {
  if (addr_ != nullptr && size_ > 0) ::munmap(addr_, size_);
  addr_ = nullptr;
  size_ = 0;
}

Result<Mapping> Map(int fd, std::size_t size, int prot, int flags, std::string_view what) {
  if (size == 0) return Mapping();
  void* p = ::mmap(nullptr, size, prot, flags, fd, 0);
  if (p == MAP_FAILED) return ErrnoStatus("mmap(" + std::string(what) + ", " + std::to_string(size) + " bytes)");
  return Mapping(p, size);
}

std::uint64_t PartCount(std::uint64_t size, std::uint64_t part_size) {
  if (size == 0) return 0;
  return part_size == 0 ? 1 : (size + part_size - 1) / part_size;
}

Result<Mapping> MapParts(std::span<const int> fds, std::uint64_t size, std::uint64_t part_size, int prot, int flags,
                         std::string_view what) {
  if (size == 0) return Mapping();
  if (part_size % kHugePageBytes != 0 || size % PageSize() != 0 || fds.size() != PartCount(size, part_size))
    return InvalidArgument("mapping " + std::string(what) + ": " + std::to_string(fds.size()) + " files of " +
                               std::to_string(part_size) + " bytes cannot hold " + std::to_string(size) + " bytes",
                           "posix.bad_parts");
  if (fds.size() == 1) return Map(fds[0], size, prot, flags, what);
  // Reserve one huge page more than needed, then give back what lies outside the aligned range.
  const std::uint64_t span = size + kHugePageBytes;
  void* p = ::mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return ErrnoStatus("reserving " + std::to_string(span) + " bytes of address space for " + std::string(what));
  const auto raw = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t base = RoundUp(raw, kHugePageBytes);
  if (base > raw) ::munmap(p, base - raw);
  if (const std::uintptr_t end = base + size; end < raw + span) ::munmap(reinterpret_cast<void*>(end), raw + span - end);
  Mapping whole(reinterpret_cast<void*>(base), size);  // unmaps the reservation and the parts on failure
  for (std::size_t k = 0; k < fds.size(); ++k) {
    const std::uint64_t off = k * part_size;
    const std::uint64_t len = std::min(part_size, size - off);
    void* at = reinterpret_cast<void*>(base + off);
    void* q = ::mmap(at, len, prot, flags | MAP_FIXED, fds[k], 0);
    if (q == MAP_FAILED)
      return ErrnoStatus("mmap(" + std::string(what) + " part " + std::to_string(k) + ", " + std::to_string(len) +
                         " bytes)");
  }
  return whole;
}

std::size_t PageSize() {
  static const std::size_t kPage = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return kPage;
}

std::uint64_t CurrentRssBytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  unsigned long long total = 0, resident = 0;
  int n = std::fscanf(f, "%llu %llu", &total, &resident);
  std::fclose(f);
  return n == 2 ? resident * PageSize() : 0;
}

Status MakeDirs(const std::string& path, mode_t mode) {
  if (path.empty()) return InvalidArgument("MakeDirs: empty path", "posix.bad_path");
  for (std::size_t i = 1; i <= path.size(); ++i) {
    if (i < path.size() && path[i] != '/') continue;
    const std::string prefix = path.substr(0, i);
    if (::mkdir(prefix.c_str(), mode) != 0 && errno != EEXIST) return ErrnoStatus("mkdir(" + prefix + ")");
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return ErrnoStatus("stat(" + path + ")");
  if (!S_ISDIR(st.st_mode)) return FailedPrecondition(path + " exists and is not a directory", "posix.not_a_directory");
  return Status::Ok();
}

Status RemoveTree(const std::string& path) {
  auto remove_one = [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p) == 0 || errno == ENOENT ? 0 : -1; };
  if (::nftw(path.c_str(), remove_one, 16, FTW_DEPTH | FTW_PHYS) != 0 && errno != ENOENT)
    return ErrnoStatus("removing " + path);
  return Status::Ok();
}

Result<std::vector<std::string>> ListDir(const std::string& path) {
  DIR* d = ::opendir(path.c_str());
  if (d == nullptr) return ErrnoStatus("opendir(" + path + ")");
  std::vector<std::string> out;
  errno = 0;
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  const int err = errno;
  ::closedir(d);
  if (err != 0) return ErrnoStatus("readdir(" + path + ")", err);
  return out;
}

Status RandomBytes(std::span<std::byte> out) {
  std::size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::getrandom(out.data() + done, out.size() - done, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("getrandom(" + std::to_string(out.size()) + " bytes)");
    }
    done += static_cast<std::size_t>(n);
  }
  return Status::Ok();
}

}  // namespace weightd::posix
