#include "posix.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
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
