// protocol.h — the control protocol between weightd and its clients (internal; see
// docs/protocol.md for the normative description).
//
// Every ZeroMQ message is one frame:
//   bytes 0..3  magic "WTD\0"
//   bytes 4..5  protocol major, little-endian
//   bytes 6..7  protocol minor, little-endian
//   bytes 8..   a cereal binary archive (cereal::BinaryOutputArchive: little-endian, u64 size
//               tags, i32 variant index) of a Request or a Reply
// The frame header is decoded before cereal, so a peer of another major version is told so
// in a reply it can still read (ErrorReply is variant index 0 forever).
//
// Decoding never trusts a length: the archive refuses any size tag larger than the bytes left
// in the frame and grows containers only as their elements decode, so a hostile message cannot
// make the decoder allocate more than a small multiple of its own size.
// All functions here are pure and thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "weightd/client.h"
#include "weightd/dtype.h"
#include "status_macros.h"

namespace weightd::proto {

inline constexpr std::uint16_t kVersionMajor = 4;
inline constexpr std::uint16_t kVersionMinor = 0;
inline constexpr std::size_t kFrameHeaderSize = 8;
// The largest reply a client accepts (its ZMQ_MAXMSGSIZE); the daemon never sends more.
inline constexpr std::size_t kMaxReplyBytes = std::size_t{64} << 20;

// ---- requests -------------------------------------------------------------------------------

struct Hello {
  std::string client_name;  // free text for logs ("weightctl", "resnet-server")
};

struct Acquire {
  std::string model;
  std::string device = "cpu";              // "cpu"; "cuda:N" and "GPU-<uuid>" are the GPU tier
  std::vector<std::string> tensor_filter;  // empty: every tensor
};

struct Release {
  std::uint64_t lease_id = 0;
};

struct Heartbeat {};
struct List {};

struct StatusRequest {
  std::string model;
};

struct Load {
  std::string model;
};

struct Evict {
  std::string model;
  std::string device;  // "": every tier; "cpu": the host copy only; "cuda:N": that GPU's copy only
};

struct Stats {};

// Ends the session and its leases now, rather than at the heartbeat timeout. Sent by a client
// that closes; the daemon does not answer it.
struct Goodbye {};

using RequestBody =
    std::variant<Hello, Acquire, Release, Heartbeat, List, StatusRequest, Load, Evict, Stats, Goodbye>;

struct Request {
  std::uint64_t id = 0;  // echoed in the reply
  RequestBody body;
};

// ---- replies --------------------------------------------------------------------------------

struct ErrorReply {
  std::uint8_t code = 0;  // weightd::Code
  std::string message;
  std::string reason;
};

struct OkReply {};

struct HelloReply {
  std::string daemon_version;
  std::uint64_t session_id = 0;
  std::uint32_t heartbeat_interval_ms = 0;  // the client should send a Heartbeat this often
  std::uint32_t heartbeat_timeout_ms = 0;   // silence longer than this ends the session
  std::uint32_t max_leases = 0;             // per session
  std::uint32_t peer_uid = 0;               // as the daemon saw the peer (for diagnostics)
  std::uint32_t peer_pid = 0;
};

// One shard. Host leases map `shm_name`; GPU leases import the shard's device allocation
// instead and leave `shm_name` empty and `size` 0.
struct SegmentInfo {
  std::string shm_name;     // POSIX shm name, "/..." ; open O_RDONLY and mmap PROT_READ
  std::uint64_t size = 0;   // bytes to map (page-rounded data size)
  std::uint64_t data_size = 0;  // bytes of tensor data at the start of the segment
  std::string file;         // shard file name inside the model directory
  std::uint64_t file_data_offset = 0;  // where the data section starts in that file (8 + header)
  std::uint64_t gpu_alloc_size = 0;    // GPU leases: bytes of the device allocation (>= data_size)
  std::string ipc_handle;              // GPU leases, legacy export: the 64-byte cudaIpcMemHandle_t
  // Host leases: the segment is split over several files (one fd each, in order), each
  // `part_size` bytes (a multiple of 2 MiB) but the last; 0: one file. posix::MapParts maps them.
  std::uint64_t part_size = 0;
};

enum class GpuExport : std::uint8_t { kVmm = 0, kLegacy = 1 };

struct TensorRecord {
  std::string name;
  std::uint8_t dtype = 0;  // weightd::DType
  std::vector<std::int64_t> shape;
  std::uint32_t segment = 0;  // index into Manifest::segments
  std::uint64_t offset = 0;   // from the start of the segment == safetensors data_offsets[0]
  std::uint64_t nbytes = 0;
};

struct Manifest {
  std::uint64_t lease_id = 0;
  std::string model;
  std::string device;     // "cpu", or the UUID ("GPU-...") of the GPU that holds the copy
  std::string model_dir;  // for --verify against the files; clients never need to read it
  std::vector<SegmentInfo> segments;
  std::vector<TensorRecord> tensors;
  // GPU leases only.
  std::uint8_t gpu_export = 0;  // GpuExport
  std::string fd_socket;        // VMM: path of the fd side channel (fd_channel.h)
  std::string fd_token;         // VMM: one-time token that fetches this lease's fds there
};

enum class ModelState : std::uint8_t { kAbsent = 0, kLoading = 1, kResident = 2, kFailed = 3 };
// "absent", "loading", "resident", "failed" (the `state` of the status structs).
std::string_view ModelStateName(ModelState s);
// The state of a name ModelStateName gives; nullopt for any other.
std::optional<ModelState> ParseModelState(std::string_view name);

// The status replies carry the public structs of weightd/client.h, so that each field is
// declared once; protocol.cc writes them in this layout (cereal binary, in this order):
//   GpuCopyInfo:  device, uuid, state (u8, ModelState), bytes, leases, copy_ms, h2d_us,
//                 last_error (an ErrorReply; code 0 when OK), idle_ms (u64, "last_used_ms_ago")
//   ModelInfo:    name, dir, state (u8), shards, tensors, bytes, resident_bytes, leases, loads,
//                 last_load_ms, idle_ms, last_error, gpus, pinned (u8 0/1), priority,
//                 loaded_bytes, waiting_for
//   GpuInfo:      device, uuid, name, total_bytes, resident_bytes, copies, leases, budget_bytes
//   DaemonStats:  daemon_version, uptime_ms, sessions, leases, host_resident_bytes,
//                 bytes_read_from_disk, loads_ok, loads_failed, requests, malformed_requests,
//                 models, gpus, gpu_unavailable, host_budget_bytes, host_total_bytes,
//                 ready (u8 0/1), ready_ms, metrics
// A state byte outside ModelState, or a flag byte other than 0 and 1, is malformed: the wire
// format stays canonical (every accepted message re-encodes to the same bytes).
using GpuCopyStatus = weightd::GpuCopyInfo;
using ModelStatus = weightd::ModelInfo;
using GpuDeviceStatus = weightd::GpuInfo;
using DaemonStats = weightd::DaemonStats;

struct ModelList {
  std::vector<ModelStatus> models;
};

using ReplyBody =
    std::variant<ErrorReply, OkReply, HelloReply, Manifest, ModelList, ModelStatus, DaemonStats>;

struct Reply {
  std::uint64_t id = 0;
  ReplyBody body;
};

// ---- framing --------------------------------------------------------------------------------

struct FrameVersion {
  std::uint16_t major = 0;
  std::uint16_t minor = 0;
};

std::string EncodeRequest(const Request& r, FrameVersion v = {kVersionMajor, kVersionMinor});
std::string EncodeReply(const Reply& r);

// Reads the 8-byte frame header. Fails with InvalidArgument "protocol.bad_frame" when the
// frame is too short or the magic is wrong.
Result<FrameVersion> PeekVersion(std::string_view frame);

// Decode a whole frame. Fails with InvalidArgument, reason "protocol.version_mismatch" when
// the major differs from ours, "protocol.malformed" when the payload does not decode or has
// trailing bytes.
Result<Request> DecodeRequest(std::string_view frame);
Result<Reply> DecodeReply(std::string_view frame);

ErrorReply ToErrorReply(const Status& s);
Status FromErrorReply(const ErrorReply& e);

// The first frame of a ZeroMQ socket-monitor event (libzmq 4.x): u16 event, u32 value (a
// connection's fd, an errno, or a ZAP status code). nullopt for a shorter frame.
struct MonitorEvent {
  std::uint16_t event = 0;
  std::uint32_t value = 0;
};
std::optional<MonitorEvent> DecodeMonitorEvent(std::string_view frame);

}  // namespace weightd::proto
