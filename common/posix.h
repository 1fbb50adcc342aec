// posix.h — thin RAII and Status wrappers over the few syscalls weightd uses (internal).
//
// Each syscall is wrapped once: EINTR is retried, and a failure becomes a Status whose
// message names the call and its arguments ("pread(/m/model.safetensors, 4096 @ 8192): EIO").
// Types are move-only; destructors release (close, munmap) and never delete anything by name.
#pragma once

#include <sys/mman.h>
#include <sys/types.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "status_macros.h"

// Linux 5.14 added MADV_POPULATE_READ and MADV_POPULATE_WRITE; older headers lack them (the
// kernel then answers EINVAL, which callers treat as "not available").
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace weightd::posix {

// Maps an errno to a Code: ENOENT->NotFound, EACCES/EPERM->PermissionDenied,
// ENOSPC/ENOMEM/EMFILE/ENFILE->ResourceExhausted, EIO->DataLoss, else Internal.
Code CodeForErrno(int err);
// "<what>: <strerror(err)>" with the mapped code and reason "errno.<NAME>".
Status ErrnoStatus(std::string_view what, int err = errno);

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) { reset(); fd_ = std::exchange(o.fd_, -1); }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

Result<Fd> Open(const std::string& path, int flags, mode_t mode = 0);

struct FileInfo {
  std::uint64_t size = 0;
  std::int64_t mtime_ns = 0;
  std::int64_t ctime_ns = 0;  // status change: set by the kernel on every write, never by users
  std::uint64_t inode = 0;
  std::uint64_t dev = 0;
  mode_t mode = 0;
  uid_t uid = 0;
};
Result<FileInfo> Stat(int fd, std::string_view what);
// stat() of a path (following symlinks, opening nothing). A missing file is NotFound.
Result<FileInfo> StatPath(const std::string& path);

// Reads exactly out.size() bytes at `offset`; a short file is DataLoss ("unexpected EOF").
Status PreadFull(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what);
// Reads up to out.size() bytes at `offset`, stopping early only at end of file; returns how
// many bytes it read. For O_DIRECT reads whose aligned length runs past the end of the file.
Result<std::size_t> PreadUpTo(int fd, std::span<std::byte> out, std::uint64_t offset, std::string_view what);
// Writes all of `in` at the current offset.
Status WriteFull(int fd, std::span<const std::byte> in, std::string_view what);
// Writes all of `in` at `offset` (pwrite, retried on EINTR and after a short write).
Status PwriteFull(int fd, std::span<const std::byte> in, std::uint64_t offset, std::string_view what);

// A private or shared memory mapping; munmap on destruction.
class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, std::size_t size) : addr_(addr), size_(size) {}
  Mapping(Mapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) { reset(); addr_ = std::exchange(o.addr_, nullptr); size_ = std::exchange(o.size_, 0); }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }

  std::byte* data() const { return static_cast<std::byte*>(addr_); }
  std::size_t size() const { return size_; }
  void reset();

 private:
  void* addr_ = nullptr;
  std::size_t size_ = 0;
};

// mmap(fd) of `size` bytes from offset 0. `size` may be 0 (an empty mapping, no syscall).
Result<Mapping> Map(int fd, std::size_t size, int prot, int flags, std::string_view what);

// How many files of `part_size` bytes hold `size` bytes: 0 for 0 bytes; 1 when `part_size` is 0
// (the whole in one file).
std::uint64_t PartCount(std::uint64_t size, std::uint64_t part_size);

// Maps `size` bytes held by the files `fds` one after another, each `part_size` bytes from its
// offset 0 (the last holds the rest), as one contiguous range: a reservation of the whole range,
// aligned to 2 MiB so that huge tmpfs pages can be mapped whole, then each file MAP_FIXED into
// its place. `part_size` must be a multiple of 2 MiB (0: one file), `fds.size()` must be
// PartCount(size, part_size) and `size` a multiple of the page size. `size` 0 gives an empty
// mapping. The fds may be closed afterwards.
Result<Mapping> MapParts(std::span<const int> fds, std::uint64_t size, std::uint64_t part_size, int prot, int flags,
                         std::string_view what);
inline constexpr std::uint64_t kHugePageBytes = 2ull << 20;

std::size_t PageSize();
inline std::uint64_t RoundUp(std::uint64_t v, std::uint64_t align) { return (v + align - 1) / align * align; }

// mkdir -p: creates `path` and its missing parents with `mode`; an existing directory is fine.
// (std::filesystem is avoided in code that runs inside LibTorch processes: the PyTorch 2.11
// wheels' libtorch.so exports std::filesystem symbols of its own, which interpose on
// libstdc++'s and crashed remove_all on the GPU machine.)
Status MakeDirs(const std::string& path, mode_t mode = 0755);
// rm -rf: removes `path` and everything below it, without following symlinks. A missing path
// is fine.
Status RemoveTree(const std::string& path);
// The names in directory `path` (without "." and "..").
Result<std::vector<std::string>> ListDir(const std::string& path);

// Fills `out` from the kernel's CSPRNG (getrandom).
Status RandomBytes(std::span<std::byte> out);

// Resident set size of this process in bytes, from /proc/self/statm (0 if unreadable).
std::uint64_t CurrentRssBytes();

}  // namespace weightd::posix
