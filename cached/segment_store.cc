#include "segment_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <sstream>

#include <boost/interprocess/permissions.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <cereal/archives/binary.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>

namespace bip = boost::interprocess;

namespace weightd {
namespace {

constexpr std::string_view kRecordSuffix = ".record";
// 3: shards record their part size and checksum kind (2026-12-06). A record of another version is not adopted.
constexpr char kRecordMagic[8] = {'W', 'D', 'R', 'E', 'C', 'O', 'R', '3'};
// A record is KBs (the shards' headers); anything this large is not one of ours.
constexpr std::uint64_t kMaxRecordBytes = 256ull << 20;

// A record's frame: magic, payload length, XXH64 of the payload, payload (cereal binary).
struct Frame {
  char magic[8];
  std::uint64_t size;
  std::uint64_t hash;
};

template <class Archive>
void Serialize(Archive& ar, ModelRecord& r) {
  std::uint64_t n = r.shards.size();
  ar(r.model, r.dir, r.generation, n);
  if constexpr (Archive::is_loading::value) {
    if (n > 100'000) throw cereal::Exception("implausible shard count");
    r.shards.resize(n);
  }
  for (auto& s : r.shards)
    ar(s.file, s.segment, s.data_size, s.part_size, s.file_info.size, s.file_info.mtime_ns, s.file_info.ctime_ns, s.file_info.inode,
       s.file_info.dev, s.checksum.high64, s.checksum.low64, s.block_checksum, s.header_bytes);
}

// A record as it is written: its frame, then the payload.
std::string EncodeRecord(const ModelRecord& record) {
  std::ostringstream os;
  {
    cereal::BinaryOutputArchive ar(os);
    Serialize(ar, const_cast<ModelRecord&>(record));  // saving does not modify
  }
  const std::string payload = os.str();
  Frame f;
  std::memcpy(f.magic, kRecordMagic, sizeof kRecordMagic);
  f.size = payload.size();
  f.hash = XXH64(payload.data(), payload.size(), 0);
  std::string bytes(reinterpret_cast<const char*>(&f), sizeof f);
  bytes += payload;
  return bytes;
}

Status BadRecord(const std::string& name, const std::string& why) {
  return DataLoss("adoption record /" + name + ": " + why, "adopt.bad_record");
}

std::string RandomSalt() {
  std::uint64_t v = 0;
  if (!posix::RandomBytes(std::as_writable_bytes(std::span(&v, 1))).ok())
    v = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
        (static_cast<std::uint64_t>(::getpid()) << 32);
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

SegmentStore::SegmentStore(Options options) : options_(std::move(options)), salt_(RandomSalt()) {}

Status SegmentStore::Lock() {
  const std::string name = options_.prefix + ".lock";
  posix::Fd fd;
  try {
    bip::shared_memory_object shm(bip::open_or_create, name.c_str(), bip::read_write, bip::permissions(0600));
    ASSIGN_OR_RETURN(fd, DupOf(shm, "/dev/shm/" + name));
  } catch (const bip::interprocess_exception& e) {
    return Internal("opening the prefix lock /dev/shm/" + name + ": " + e.what(), "shm.open_failed");
  }
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK)
      return FailedPrecondition("another weightd instance uses the segment prefix '" + options_.prefix + "'",
                                "daemon.instance_locked");
    return posix::ErrnoStatus("flock(/dev/shm/" + name + ")");
  }
  lock_ = std::move(fd);
  return Status::Ok();
}

std::string SegmentStore::LoadTag(std::uint64_t generation) const { return std::to_string(generation) + "-" + salt_; }

std::string SegmentStore::SegmentName(const std::string& model, std::uint64_t generation, std::size_t shard) const {
  return options_.prefix + "." + model + "." + LoadTag(generation) + "." + std::to_string(shard);
}

std::string SegmentStore::RecordName(const std::string& model, std::uint64_t generation) const {
  return options_.prefix + "." + model + "." + LoadTag(generation) + std::string(kRecordSuffix);
}

bool SegmentStore::IsRecordName(const std::string& name) { return name.ends_with(kRecordSuffix); }

std::uint64_t SegmentStore::PartSize(std::uint64_t model_bytes) const {
  if (options_.max_parts <= 1) return 0;
  const std::uint64_t even = (model_bytes + options_.max_parts - 1) / options_.max_parts;
  return posix::RoundUp(std::max(even, options_.min_part_bytes), posix::kHugePageBytes);
}

Result<HostSegment> SegmentStore::Create(const std::string& name, std::uint64_t data_size, bool reserve,
                                         std::uint64_t part_size) const {
  for (const std::string& part : HostSegment::PartNames(name, data_size, part_size)) (void)HostSegment::Remove(part);
  return HostSegment::Create(name, data_size, options_.mode, options_.group, reserve, part_size);
}

Result<HostSegment> SegmentStore::Open(const std::string& name, std::uint64_t data_size, std::uint64_t part_size) const {
  return HostSegment::Open(name, data_size, options_.mode, options_.group, part_size);
}

Result<posix::Fd> SegmentStore::OpenReadOnly(const std::string& name) const {
  const std::string bare = name.starts_with('/') ? name.substr(1) : name;  // manifests carry "/name"
  try {
    bip::shared_memory_object shm(bip::open_only, bare.c_str(), bip::read_only);
    return DupOf(shm, "/dev/shm/" + bare);
  } catch (const bip::interprocess_exception& e) {
    if (e.get_error_code() == bip::not_found_error) return NotFound("segment /" + bare + " is gone", "shm.not_found");
    return Internal("opening segment /" + bare + " read-only: " + e.what(), "shm.open_failed");
  }
}

std::uint64_t SegmentStore::RecordBytes(const ModelRecord& record) { return EncodeRecord(record).size(); }

std::uint64_t SegmentStore::HostCharge(const ModelRecord& record) {
  const std::uint64_t page = posix::PageSize();
  std::uint64_t charge = posix::RoundUp(RecordBytes(record), page);
  for (const ModelRecord::Shard& s : record.shards) charge += posix::RoundUp(s.data_size, page);
  return charge;
}

Status SegmentStore::WriteRecord(const ModelRecord& record) const {
  const std::string bytes = EncodeRecord(record);

  const std::string what = "adoption record /" + record.name;
  (void)HostSegment::Remove(record.name);  // a leftover of a dead instance (we hold the prefix)
  posix::Fd fd;
  try {
    // Created with exactly 0600 (Boost sets the mode after shm_open, whatever the umask).
    bip::shared_memory_object shm(bip::create_only, record.name.c_str(), bip::read_write, bip::permissions(0600));
    ASSIGN_OR_RETURN(fd, DupOf(shm, what));
  } catch (const bip::interprocess_exception& e) {
    return Internal("creating " + what + ": " + e.what(), "shm.create_failed");
  }
  Status s = Status::Ok();
  if (int err = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(bytes.size())); err != 0) {
    s = posix::ErrnoStatus("reserving " + what, err);
    if (err == ENOSPC) s = ResourceExhausted(s.message() + " (/dev/shm is full)", "shm.no_space");
  }
  if (s.ok()) s = posix::WriteFull(fd.get(), std::as_bytes(std::span(bytes)), what);
  if (!s.ok()) (void)HostSegment::Remove(record.name);
  return s;
}

Result<ModelRecord> SegmentStore::ReadRecord(const std::string& name) const {
  const std::string path = "/" + name;
  // Plain shm_open, not Boost: only here can O_NONBLOCK be passed, so that a FIFO planted under
  // the name cannot hang the daemon's start.
  int fd = ::shm_open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0);
  if (fd < 0) return posix::ErrnoStatus("opening adoption record " + path);
  posix::Fd owned(fd);
  ASSIGN_OR_RETURN(posix::FileInfo st, posix::Stat(fd, path));
  if (!S_ISREG(st.mode) || st.uid != ::geteuid())
    return BadRecord(name, "not a file of this daemon's user (owner uid " + std::to_string(st.uid) + ")");
  if (st.size < sizeof(Frame) || st.size > kMaxRecordBytes)
    return BadRecord(name, "implausible size " + std::to_string(st.size));
  std::string bytes(st.size, '\0');
  RETURN_IF_ERROR(posix::PreadFull(fd, std::as_writable_bytes(std::span(bytes)), 0, path));
  Frame f;
  std::memcpy(&f, bytes.data(), sizeof f);
  if (std::memcmp(f.magic, kRecordMagic, sizeof kRecordMagic) != 0) return BadRecord(name, "no record magic");
  const std::string_view payload = std::string_view(bytes).substr(sizeof f);
  if (f.size != payload.size()) return BadRecord(name, "truncated (the daemon died while writing it)");
  if (XXH64(payload.data(), payload.size(), 0) != f.hash) return BadRecord(name, "its hash does not match");
  ModelRecord r;
  try {
    std::istringstream is{std::string(payload)};
    cereal::BinaryInputArchive ar(is);
    Serialize(ar, r);
  } catch (const std::exception& e) {
    return BadRecord(name, std::string("undecodable: ") + e.what());
  }
  r.name = name;
  return r;
}

SegmentStore::Listing SegmentStore::List() const {
  Listing out;
  const std::string lock = options_.prefix + ".lock";
  for (std::string& name : ListSegments(options_.prefix)) {
    if (name == lock) continue;
    if (IsOwnSegment(name)) out.own.push_back(std::move(name));
    else ++out.foreign;
  }
  return out;
}

std::size_t SegmentStore::RemoveLeftovers(const std::vector<std::string>& own, const std::set<std::string>& keep) const {
  std::size_t removed = 0;
  for (const std::string& name : own)
    if (keep.count(name) == 0 && HostSegment::Remove(name).ok()) ++removed;
  return removed;
}

std::string SegmentStore::HugePages() {
  std::FILE* f = std::fopen("/proc/self/mounts", "re");
  if (f == nullptr) return "unknown";
  char dev[256], dir[256], type[64], opts[1024];
  std::string found = "unknown";
  // The last mount at /dev/shm is the one in use.
  while (std::fscanf(f, "%255s %255s %63s %1023s %*d %*d", dev, dir, type, opts) == 4) {
    if (std::strcmp(dir, "/dev/shm") != 0) continue;
    found = "never";
    std::istringstream in(opts);
    for (std::string opt; std::getline(in, opt, ',');)
      if (opt.rfind("huge=", 0) == 0) found = opt.substr(5);
  }
  std::fclose(f);
  return found;
}

}  // namespace weightd
