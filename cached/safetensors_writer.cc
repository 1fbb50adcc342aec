#include "safetensors_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <string_view>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "posix.h"
#include "safetensors.h"

namespace weightd::st {
namespace {

constexpr std::size_t kChunkBytes = std::size_t{8} << 20;  // 8 MiB: large sequential writes
constexpr char kReasonBadSpec[] = "safetensors.bad_spec";

Status BadSpec(std::string msg) { return InvalidArgument(std::move(msg), kReasonBadSpec); }

Status ValidateSpecs(const std::vector<TensorSpec>& tensors, const std::map<std::string, std::string>& metadata,
                     std::uint64_t* data_size) {
  std::unordered_set<std::string_view> names;
  names.reserve(tensors.size());
  std::uint64_t total = 0;
  for (const TensorSpec& t : tensors) {
    if (t.name.empty()) return BadSpec("tensor with an empty name");
    if (t.name == "__metadata__") return BadSpec("a tensor may not be named '__metadata__'");
    if (!IsValidUtf8(t.name)) return BadSpec("tensor name is not valid UTF-8");
    if (!IsValidDType(static_cast<std::uint8_t>(t.dtype)))
      return BadSpec("tensor '" + t.name + "' has an invalid dtype value " +
                     std::to_string(static_cast<unsigned>(t.dtype)));
    if (!names.insert(t.name).second) return BadSpec("duplicate tensor name '" + t.name + "'");
    for (std::int64_t d : t.shape)
      if (d < 0) return BadSpec("tensor '" + t.name + "' has negative dimension " + std::to_string(d));
    if (DTypeBytes(t.dtype, t.shape).error == DTypeBytesResult::Error::kPartialByte)
      return BadSpec("tensor '" + t.name + "' of " + std::string(DTypeName(t.dtype)) +
                     " holds values that do not fill whole bytes");
    const std::uint64_t n = t.nbytes();
    if (n == std::numeric_limits<std::uint64_t>::max() || __builtin_add_overflow(total, n, &total))
      return BadSpec("size of tensor '" + t.name + "' overflows 64 bits");
  }
  for (const auto& [k, v] : metadata)
    if (!IsValidUtf8(k) || !IsValidUtf8(v)) return BadSpec("metadata key or value is not valid UTF-8");
  *data_size = total;
  return Status::Ok();
}

// Removes the temporary file unless the write completed; the destination is never touched.
class TempFile {
 public:
  explicit TempFile(std::string path) : path_(std::move(path)) {}
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    fd_.reset();
    if (!committed_) ::unlink(path_.c_str());
  }
  const std::string& path() const { return path_; }
  posix::Fd& fd() { return fd_; }
  void Commit() { committed_ = true; }

 private:
  std::string path_;
  posix::Fd fd_;
  bool committed_ = false;
};

Status FsyncFd(int fd, const std::string& what) {
  int rc;
  do rc = ::fsync(fd);
  while (rc != 0 && errno == EINTR);
  if (rc != 0) return posix::ErrnoStatus("fsync(" + what + ")");
  return Status::Ok();
}

std::string DirName(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Appends bytes to one reusable buffer and writes it out when full.
class ChunkWriter {
 public:
  ChunkWriter(int fd, const std::string& what, std::size_t capacity)
      : fd_(fd), what_(what), buf_(std::make_unique_for_overwrite<std::byte[]>(capacity)), cap_(capacity) {}

  std::span<std::byte> Free() { return {buf_.get() + used_, cap_ - used_}; }
  void Commit(std::size_t n) { used_ += n; }

  Status FlushIfFull() { return used_ == cap_ ? Flush() : Status::Ok(); }
  Status Flush() {
    if (used_ == 0) return Status::Ok();
    RETURN_IF_ERROR(posix::WriteFull(fd_, {buf_.get(), used_}, what_));
    used_ = 0;
    return Status::Ok();
  }

 private:
  int fd_;
  const std::string& what_;
  std::unique_ptr<std::byte[]> buf_;
  std::size_t cap_;
  std::size_t used_ = 0;
};

}  // namespace

std::uint64_t TensorSpec::nbytes() const {
  const DTypeBytesResult r = DTypeBytes(dtype, shape);
  return r.ok() ? r.bytes : std::numeric_limits<std::uint64_t>::max();
}

std::string BuildHeaderJson(const std::vector<TensorSpec>& tensors,
                            const std::map<std::string, std::string>& metadata) {
  // ordered_json keeps tensors in file order, which makes headers easy to read by eye.
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    j["__metadata__"] = std::move(m);
  }
  std::uint64_t offset = 0;
  for (const TensorSpec& t : tensors) {
    const std::uint64_t end = offset + t.nbytes();  // wraps only for invalid specs
    nlohmann::ordered_json e = nlohmann::ordered_json::object();
    e["dtype"] = std::string(DTypeName(t.dtype));
    e["shape"] = t.shape;
    e["data_offsets"] = {offset, end};
    j[t.name] = std::move(e);
    offset = end;
  }
  return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

Result<std::uint64_t> WriteFile(const std::string& path, const std::vector<TensorSpec>& tensors, const FillFn& fill,
                                const std::map<std::string, std::string>& metadata) {
  std::uint64_t data_size = 0;
  RETURN_IF_ERROR(ValidateSpecs(tensors, metadata, &data_size).WithContext("writing " + path));

  std::string header = BuildHeaderJson(tensors, metadata);
  // Pad with spaces so 8 + N is a multiple of 8 and the data section is 8-byte aligned.
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > kMaxHeaderSize)
    return BadSpec("writing " + path + ": header of " + std::to_string(header.size()) + " bytes exceeds the " +
                   std::to_string(kMaxHeaderSize) + "-byte limit");
  const std::uint64_t header_bytes = 8 + header.size();
  std::uint64_t total = 0;
  if (__builtin_add_overflow(header_bytes, data_size, &total))
    return BadSpec("writing " + path + ": file size overflows 64 bits");

  TempFile tmp(path + ".tmp." + std::to_string(::getpid()));
  // A stale temporary of ours (same pid, earlier crash) would make O_EXCL fail forever.
  ::unlink(tmp.path().c_str());
  ASSIGN_OR_RETURN(tmp.fd(), posix::Open(tmp.path(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0644));
  const int fd = tmp.fd().get();

  const std::size_t cap = static_cast<std::size_t>(std::min<std::uint64_t>(kChunkBytes, std::max<std::uint64_t>(total, 8)));
  ChunkWriter out(fd, tmp.path(), cap);

  auto put = [&](const void* src, std::size_t n) -> Status {
    const auto* p = static_cast<const std::byte*>(src);
    while (n > 0) {
      auto free = out.Free();
      const std::size_t k = std::min(n, free.size());
      std::memcpy(free.data(), p, k);
      out.Commit(k);
      p += k;
      n -= k;
      RETURN_IF_ERROR(out.FlushIfFull());
    }
    return Status::Ok();
  };

  unsigned char len_le[8];
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) len_le[i] = static_cast<unsigned char>(n >> (8 * i));
  RETURN_IF_ERROR(put(len_le, sizeof len_le));
  RETURN_IF_ERROR(put(header.data(), header.size()));

  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const std::uint64_t bytes = tensors[i].nbytes();
    std::uint64_t off = 0;
    while (off < bytes) {
      auto free = out.Free();
      const std::size_t k = static_cast<std::size_t>(std::min<std::uint64_t>(bytes - off, free.size()));
      try {
        fill(i, off, free.first(k));
      } catch (const std::exception& e) {
        return Internal("writing " + path + ": fill callback threw for tensor '" + tensors[i].name + "' at byte " +
                            std::to_string(off) + ": " + e.what(),
                        "safetensors.fill_failed");
      } catch (...) {
        return Internal("writing " + path + ": fill callback threw for tensor '" + tensors[i].name + "'",
                        "safetensors.fill_failed");
      }
      out.Commit(k);
      off += k;
      RETURN_IF_ERROR(out.FlushIfFull());
    }
  }
  RETURN_IF_ERROR(out.Flush());

  RETURN_IF_ERROR(FsyncFd(fd, tmp.path()));
  if (::close(tmp.fd().release()) != 0) return posix::ErrnoStatus("close(" + tmp.path() + ")");
  if (::rename(tmp.path().c_str(), path.c_str()) != 0)
    return posix::ErrnoStatus("rename(" + tmp.path() + ", " + path + ")");
  tmp.Commit();

  // Make the rename itself durable; the file is complete either way, so a failure here is
  // reported rather than undone.
  const std::string dir = DirName(path);
  ASSIGN_OR_RETURN(posix::Fd dfd, posix::Open(dir, O_RDONLY | O_DIRECTORY));
  RETURN_IF_ERROR(FsyncFd(dfd.get(), dir));
  return total;
}

}  // namespace weightd::st
