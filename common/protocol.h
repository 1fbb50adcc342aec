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

#include "weightd/dtype.h"
#include "status_macros.h"

namespace weightd::proto {

inline constexpr std::uint16_t kVersionMajor = 3;
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
std::string_view ModelStateName(ModelState s);

// A model's copy on one GPU.
struct GpuCopyStatus {
  std::string device;                // "cuda:N" in the daemon's numbering
  std::string uuid;
  std::uint8_t state = 0;            // ModelState
  std::uint64_t bytes = 0;           // device memory allocated for the copy
  std::uint32_t leases = 0;          // live leases (imports) of this copy
  std::uint64_t copy_ms = 0;         // the last materialization: allocation and copy
  std::uint64_t h2d_us = 0;          // its host-to-device copies alone
  ErrorReply last_error;             // code 0 unless the last materialization failed
  std::uint64_t last_used_ms_ago = 0;
};

struct ModelStatus {
  std::string name;
  std::string dir;
  std::uint8_t state = 0;  // ModelState
  std::uint32_t shards = 0;
  std::uint32_t tensors = 0;
  std::uint64_t bytes = 0;           // total tensor data of the model (0 until its headers were read)
  std::uint64_t resident_bytes = 0;  // bytes in the host tier now
  std::uint32_t leases = 0;          // live leases
  std::uint64_t loads = 0;           // completed host loads since start
  std::uint64_t last_load_ms = 0;
  std::uint64_t last_used_ms_ago = 0;
  ErrorReply last_error;             // code 0 when the last load succeeded
  std::vector<GpuCopyStatus> gpus;   // one per GPU the model is (being) copied to
  // Policy and progress.
  std::uint8_t pinned = 0;
  std::int32_t priority = 0;
  std::uint64_t loaded_bytes = 0;    // while loading: bytes read so far (of `bytes`)
  std::string waiting_for;           // while a load waits for memory: which budget, and why
};

struct ModelList {
  std::vector<ModelStatus> models;
};

struct GpuDeviceStatus {
  std::string device;  // "cuda:N"
  std::string uuid;
  std::string name;
  std::uint64_t total_bytes = 0;
  std::uint64_t resident_bytes = 0;  // device memory held by model copies
  std::uint32_t copies = 0;
  std::uint32_t leases = 0;          // live GPU leases on this device
  std::uint64_t budget_bytes = 0;    // what model copies may hold on this device
};

struct DaemonStats {
  std::string daemon_version;
  std::uint64_t uptime_ms = 0;
  std::uint32_t sessions = 0;
  std::uint32_t leases = 0;
  std::uint64_t host_resident_bytes = 0;
  std::uint64_t bytes_read_from_disk = 0;
  std::uint64_t loads_ok = 0;
  std::uint64_t loads_failed = 0;
  std::uint64_t requests = 0;
  std::uint64_t malformed_requests = 0;
  std::vector<ModelStatus> models;
  std::vector<GpuDeviceStatus> gpus;  // empty when the daemon runs host-only
  std::string gpu_unavailable;        // why, when it does
  std::uint64_t host_budget_bytes = 0;
  std::uint64_t host_total_bytes = 0;  // MemTotal
  std::uint8_t ready = 0;              // every preload has finished
  std::uint64_t ready_ms = 0;          // start to ready
  // Every figure of /metrics, in the Prometheus text format, so that `weightctl stats` and a
  // scrape always agree.
  std::string metrics;
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
