#include "posix.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

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

Result<FileInfo> Stat(int fd, std::string_view what) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return ErrnoStatus("fstat(" + std::string(what) + ")");
  FileInfo fi;
  fi.size = static_cast<std::uint64_t>(st.st_size);
  fi.mtime_ns = static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
  fi.inode = st.st_ino;
  fi.dev = st.st_dev;
  fi.mode = st.st_mode;
  fi.uid = st.st_uid;
  return fi;
}

Status PreadFull(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what) {
  std::size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("pread(" + std::string(what) + ", " + std::to_string(out.size() - done) + " @ " +
                         std::to_string(offset + done) + ")");
    }
    if (n == 0)
      return DataLoss("pread(" + std::string(what) + "): unexpected end of file at " + std::to_string(offset + done),
                      "io.short_read");
    done += static_cast<std::size_t>(n);
  }
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
