#include "protocol.h"

#include <bit>
#include <cstring>
#include <sstream>

#include <cereal/archives/binary.hpp>
#include <cereal/cereal.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/variant.hpp>
#include <cereal/types/vector.hpp>

static_assert(std::endian::native == std::endian::little,
              "the wire format is little-endian; a big-endian port needs a byte-swapping archive");

namespace weightd::proto {
namespace {

// A cereal input archive over one received frame that refuses every size tag larger than the
// bytes still unread, and decodes vectors without trusting their counts (below). A hostile
// length can therefore never make the decoder allocate more than a small multiple of the frame
// size (ZMQ_MAXMSGSIZE bounds the frame).
class BoundedInputArchive
    : public cereal::InputArchive<BoundedInputArchive, cereal::AllowEmptyClassElision> {
 public:
  BoundedInputArchive(const char* data, std::size_t size)
      : InputArchive(this), p_(data), left_(size) {}

  void loadBinary(void* out, std::size_t size) {
    if (size > left_) throw cereal::Exception("message truncated");
    // An empty vector or string has no storage: out may be null, and memcpy(nullptr, p, 0) is
    // undefined behaviour (found by tests/fuzz/protocol_fuzz: a scalar tensor's empty shape).
    if (size == 0) return;
    std::memcpy(out, p_, size);
    p_ += size;
    left_ -= size;
  }
  std::size_t left() const { return left_; }

 private:
  const char* p_;
  std::size_t left_;
};

template <class T>
std::enable_if_t<std::is_arithmetic_v<T>> CEREAL_LOAD_FUNCTION_NAME(BoundedInputArchive& ar, T& t) {
  ar.loadBinary(std::addressof(t), sizeof(t));
}
template <class T>
void CEREAL_LOAD_FUNCTION_NAME(BoundedInputArchive& ar, cereal::NameValuePair<T>& t) {
  ar(t.value);
}
template <class T>
void CEREAL_LOAD_FUNCTION_NAME(BoundedInputArchive& ar, cereal::SizeTag<T>& t) {
  ar(t.size);
  if (static_cast<std::uint64_t>(t.size) > ar.left())
    throw cereal::Exception("length field exceeds the bytes left in the message");
}
template <class T>
void CEREAL_LOAD_FUNCTION_NAME(BoundedInputArchive& ar, cereal::BinaryData<T>& t) {
  ar.loadBinary(t.data, static_cast<std::size_t>(t.size));
}

// Vectors. cereal's own loader resizes to the claimed count before reading an element, which
// would let a short message make the decoder allocate count * sizeof(T) (200+ bytes per
// element for ModelStatus). Here arithmetic elements must all be present in the frame before
// anything is allocated, and other elements are appended one at a time as they decode, so
// memory grows only with bytes actually consumed (every element takes at least one byte).
template <class T, class Alloc>
void CEREAL_LOAD_FUNCTION_NAME(BoundedInputArchive& ar, std::vector<T, Alloc>& v) {
  cereal::size_type n = 0;
  ar(cereal::make_size_tag(n));
  v.clear();
  if constexpr (std::is_arithmetic_v<T>) {
    if (n > ar.left() / sizeof(T)) throw cereal::Exception("vector length exceeds the bytes left in the message");
    v.resize(static_cast<std::size_t>(n));
    ar.loadBinary(v.data(), static_cast<std::size_t>(n) * sizeof(T));
  } else {
    for (cereal::size_type i = 0; i < n; ++i) {
      v.emplace_back();
      ar(v.back());
    }
  }
}

}  // namespace
}  // namespace weightd::proto

CEREAL_REGISTER_ARCHIVE(weightd::proto::BoundedInputArchive)

namespace weightd::proto {

template <class A> void serialize(A& ar, Hello& m) { ar(m.client_name); }
template <class A> void serialize(A& ar, Acquire& m) { ar(m.model, m.device, m.tensor_filter); }
template <class A> void serialize(A& ar, Release& m) { ar(m.lease_id); }
template <class A> void serialize(A&, Heartbeat&) {}
template <class A> void serialize(A&, List&) {}
template <class A> void serialize(A& ar, StatusRequest& m) { ar(m.model); }
template <class A> void serialize(A& ar, Load& m) { ar(m.model); }
template <class A> void serialize(A& ar, Evict& m) { ar(m.model, m.device); }
template <class A> void serialize(A&, Stats&) {}
template <class A> void serialize(A&, Goodbye&) {}
template <class A> void serialize(A& ar, Request& m) { ar(m.id, m.body); }

template <class A> void serialize(A& ar, ErrorReply& m) { ar(m.code, m.message, m.reason); }
template <class A> void serialize(A&, OkReply&) {}
template <class A> void serialize(A& ar, HelloReply& m) {
  ar(m.daemon_version, m.session_id, m.heartbeat_interval_ms, m.heartbeat_timeout_ms, m.max_leases,
     m.peer_uid, m.peer_pid);
}
template <class A> void serialize(A& ar, SegmentInfo& m) {
  ar(m.shm_name, m.size, m.data_size, m.file, m.file_data_offset, m.gpu_alloc_size, m.ipc_handle, m.part_size);
}
template <class A> void serialize(A& ar, TensorRecord& m) {
  ar(m.name, m.dtype, m.shape, m.segment, m.offset, m.nbytes);
}
template <class A> void serialize(A& ar, Manifest& m) {
  ar(m.lease_id, m.model, m.device, m.model_dir, m.segments, m.tensors, m.gpu_export, m.fd_socket, m.fd_token);
}
template <class A> void serialize(A& ar, ModelList& m) { ar(m.models); }
template <class A> void serialize(A& ar, Reply& m) { ar(m.id, m.body); }

}  // namespace weightd::proto

namespace weightd {
namespace {

std::uint8_t StateByte(const std::string& name) {
  if (name.empty()) return static_cast<std::uint8_t>(proto::ModelState::kAbsent);  // a default-made struct
  auto s = proto::ParseModelState(name);
  if (!s) throw cereal::Exception("no model state is called '" + name + "'");
  return static_cast<std::uint8_t>(*s);
}

std::string StateName(std::uint8_t b) {
  if (b > static_cast<std::uint8_t>(proto::ModelState::kFailed)) throw cereal::Exception("unknown model state");
  return std::string(proto::ModelStateName(static_cast<proto::ModelState>(b)));
}

std::uint8_t FlagByte(bool b) { return b ? 1 : 0; }

bool Flag(std::uint8_t b) {
  if (b > 1) throw cereal::Exception("a flag byte other than 0 or 1");
  return b == 1;
}

// Every code byte and both strings as they came (an unknown code stays unknown, not Internal),
// so that the status re-encodes to the same bytes.
Status StatusOf(const proto::ErrorReply& e) { return Status(static_cast<Code>(e.code), e.message, e.reason); }

}  // namespace

template <class A> void save(A& ar, const GpuCopyInfo& m) {
  const std::uint8_t state = StateByte(m.state);
  const proto::ErrorReply error = proto::ToErrorReply(m.last_error);
  ar(m.device, m.uuid, state, m.bytes, m.leases, m.copy_ms, m.h2d_us, error, m.idle_ms);
}
template <class A> void load(A& ar, GpuCopyInfo& m) {
  std::uint8_t state = 0;
  proto::ErrorReply error;
  ar(m.device, m.uuid, state, m.bytes, m.leases, m.copy_ms, m.h2d_us, error, m.idle_ms);
  m.state = StateName(state);
  m.last_error = StatusOf(error);
}
template <class A> void save(A& ar, const ModelInfo& m) {
  const std::uint8_t state = StateByte(m.state), pinned = FlagByte(m.pinned);
  const proto::ErrorReply error = proto::ToErrorReply(m.last_error);
  ar(m.name, m.dir, state, m.shards, m.tensors, m.bytes, m.resident_bytes, m.leases, m.loads, m.last_load_ms, m.idle_ms,
     error, m.gpus, pinned, m.priority, m.loaded_bytes, m.waiting_for);
}
template <class A> void load(A& ar, ModelInfo& m) {
  std::uint8_t state = 0, pinned = 0;
  proto::ErrorReply error;
  ar(m.name, m.dir, state, m.shards, m.tensors, m.bytes, m.resident_bytes, m.leases, m.loads, m.last_load_ms, m.idle_ms,
     error, m.gpus, pinned, m.priority, m.loaded_bytes, m.waiting_for);
  m.state = StateName(state);
  m.last_error = StatusOf(error);
  m.pinned = Flag(pinned);
}
template <class A> void serialize(A& ar, GpuInfo& m) {
  ar(m.device, m.uuid, m.name, m.total_bytes, m.resident_bytes, m.copies, m.leases, m.budget_bytes);
}
template <class A> void save(A& ar, const DaemonStats& m) {
  const std::uint8_t ready = FlagByte(m.ready);
  ar(m.daemon_version, m.uptime_ms, m.sessions, m.leases, m.host_resident_bytes, m.bytes_read_from_disk, m.loads_ok,
     m.loads_failed, m.requests, m.malformed_requests, m.models, m.gpus, m.gpu_unavailable, m.host_budget_bytes,
     m.host_total_bytes, ready, m.ready_ms, m.metrics);
}
template <class A> void load(A& ar, DaemonStats& m) {
  std::uint8_t ready = 0;
  ar(m.daemon_version, m.uptime_ms, m.sessions, m.leases, m.host_resident_bytes, m.bytes_read_from_disk, m.loads_ok,
     m.loads_failed, m.requests, m.malformed_requests, m.models, m.gpus, m.gpu_unavailable, m.host_budget_bytes,
     m.host_total_bytes, ready, m.ready_ms, m.metrics);
  m.ready = Flag(ready);
}

}  // namespace weightd

namespace weightd::proto {

namespace {

constexpr char kMagic[4] = {'W', 'T', 'D', '\0'};

void PutU16(std::string& s, std::uint16_t v) {
  s.push_back(static_cast<char>(v & 0xff));
  s.push_back(static_cast<char>(v >> 8));
}

template <class T>
std::string Encode(const T& msg, FrameVersion v) {
  std::ostringstream os;
  os.write(kMagic, 4);
  std::string hdr;
  PutU16(hdr, v.major);
  PutU16(hdr, v.minor);
  os.write(hdr.data(), static_cast<std::streamsize>(hdr.size()));
  {
    cereal::BinaryOutputArchive ar(os);
    ar(msg);
  }
  return std::move(os).str();
}

template <class T>
Result<T> Decode(std::string_view frame) {
  ASSIGN_OR_RETURN(FrameVersion v, PeekVersion(frame));
  if (v.major != kVersionMajor) {
    return InvalidArgument("protocol version mismatch: peer speaks " + std::to_string(v.major) + "." +
                               std::to_string(v.minor) + ", this side speaks " +
                               std::to_string(kVersionMajor) + "." + std::to_string(kVersionMinor),
                           "protocol.version_mismatch");
  }
  T out;
  try {
    BoundedInputArchive ar(frame.data() + kFrameHeaderSize, frame.size() - kFrameHeaderSize);
    ar(out);
    if (ar.left() != 0)
      return InvalidArgument(std::to_string(ar.left()) + " trailing bytes after the message",
                             "protocol.malformed");
  } catch (const std::exception& e) {
    return InvalidArgument(std::string("malformed message: ") + e.what(), "protocol.malformed");
  }
  return out;
}

}  // namespace

std::string_view ModelStateName(ModelState s) {
  switch (s) {
    case ModelState::kAbsent: return "absent";
    case ModelState::kLoading: return "loading";
    case ModelState::kResident: return "resident";
    case ModelState::kFailed: return "failed";
  }
  return "unknown";
}

std::optional<ModelState> ParseModelState(std::string_view name) {
  for (ModelState s : {ModelState::kAbsent, ModelState::kLoading, ModelState::kResident, ModelState::kFailed})
    if (ModelStateName(s) == name) return s;
  return std::nullopt;
}

std::string EncodeRequest(const Request& r, FrameVersion v) { return Encode(r, v); }
std::string EncodeReply(const Reply& r) { return Encode(r, {kVersionMajor, kVersionMinor}); }

Result<FrameVersion> PeekVersion(std::string_view frame) {
  if (frame.size() < kFrameHeaderSize || std::memcmp(frame.data(), kMagic, 4) != 0)
    return InvalidArgument("not a weightd protocol frame (" + std::to_string(frame.size()) + " bytes)",
                           "protocol.bad_frame");
  auto u16 = [&](std::size_t i) {
    return static_cast<std::uint16_t>(static_cast<unsigned char>(frame[i]) |
                                      (static_cast<unsigned char>(frame[i + 1]) << 8));
  };
  return FrameVersion{u16(4), u16(6)};
}

Result<Request> DecodeRequest(std::string_view frame) { return Decode<Request>(frame); }
Result<Reply> DecodeReply(std::string_view frame) { return Decode<Reply>(frame); }

ErrorReply ToErrorReply(const Status& s) {
  return ErrorReply{static_cast<std::uint8_t>(s.code()), s.message(), s.reason()};
}

Status FromErrorReply(const ErrorReply& e) {
  Code c = e.code <= static_cast<std::uint8_t>(Code::kDeadlineExceeded) && e.code != 0
               ? static_cast<Code>(e.code)
               : Code::kInternal;
  return Status(c, e.message, e.reason);
}

std::optional<MonitorEvent> DecodeMonitorEvent(std::string_view frame) {
  if (frame.size() < 6) return std::nullopt;
  MonitorEvent e;
  std::memcpy(&e.event, frame.data(), 2);
  std::memcpy(&e.value, frame.data() + 2, 4);
  return e;
}

}  // namespace weightd::proto
