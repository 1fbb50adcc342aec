// weightd/client.h — the client library (libweightd): attach to models that the weightd
// daemon keeps resident, and map their tensors without reading any file.
//
// Contract
//  - Errors: every fallible call returns a Status or a Result<T> (weightd/status.h). The
//    library never throws, except Result<T>::value() on an error result, and never exits.
//  - Thread safety: a Client may be used from many threads at once; calls are serialized on
//    its one connection. A Lease is an immutable handle: copies share one lease, and copies
//    may be used and destroyed on any thread.
//  - Ownership and lifetimes: a Lease owns its mappings and its lease on the daemon. The
//    daemon's lease ends, and the mappings are unmapped, when the last copy of the Lease is
//    destroyed (or release() is called on the last copy). Tensor pointers are valid exactly
//    as long as some copy of their Lease is alive. A Lease keeps its Client's connection alive,
//    so a Client may be destroyed before its leases.
//  - Memory is mapped read-only. Host leases map shared memory PROT_READ: writing through a
//    tensor pointer ends the process with SIGSEGV (ExplainWriteFaults() makes it say why first).
//    GPU leases (VMM export, the default) map the daemon's device memory with
//    CU_MEM_ACCESS_FLAGS_PROT_READ: a kernel that writes to it faults, which poisons this
//    process's CUDA context. The legacy export cannot enforce this; writing there corrupts every
//    process's copy. Never write to lease memory, unless the lease was acquired with
//    AcquireOptions::writable (host leases: a private copy-on-write mapping of the same segments).
//  - fork(): a child inherits its parent's mappings (tensors stay readable there) but not its
//    connection. In the child, every call of an inherited Client fails with FailedPrecondition
//    "client.forked", dropping an inherited Lease unmaps it without telling the daemon (the
//    parent still holds it), and an inherited Client is abandoned, not torn down: its threads and
//    sockets belong to the parent. Connect() again in the child to talk to the daemon.
//  - A daemon that goes away never leaves a call hanging: a request in flight when the
//    connection drops is sent once more when it comes back (the daemon restarted) and fails with
//    Unavailable "client.no_daemon" if it does not come back within connect_timeout; so does a
//    call made while no daemon is connected.
//  - GPU leases: Tensor::data is a device pointer on lease.cuda_device(), valid in this process
//    while the Lease lives. The first GPU Acquire loads the CUDA driver; the client creates the
//    device's primary context on a background thread while it talks to the daemon (or from
//    Connect() on, with ClientOptions::prepare_cuda_device), so a fresh process is ready in
//    about the time the context takes. The context is the device's primary context, the one
//    the CUDA runtime and LibTorch use.
//  - Liveness: the client sends heartbeats from a background thread while the Client or any
//    of its leases lives; a call that waits long (an Acquire that loads from disk) sends them
//    from its wait loop. If the process dies, the daemon notices through a pidfd and frees its
//    leases at once.
//  - Daemon restarts: mappings and GPU imports stay valid when the daemon dies. ZeroMQ
//    reconnects on its own; the first request that the new daemon answers with
//    protocol.no_session (a heartbeat, usually within one interval) makes the client open a new
//    session and acquire every live lease again, then send that request again. Lease::id()
//    changes; tensors and pointers do not. A restarted daemon adopts its host copies and, under
//    systemd, its GPU copies (the same memory); when it could not, the new lease holds a second
//    copy until this one is dropped.
//    A lease whose re-acquire fails keeps its mappings, uncounted by the daemon (id() 0).
//    An Acquire whose fds could not be fetched because the daemon died between its answer and
//    the fetch is asked of the new daemon. With connect_timeout above the restart's duration
//    (systemd's RestartSec= plus the start), a restart costs a caller time, not an error
//    (scripts/systemd-check.sh kills the daemon under a looping client).
//  - Dropping the last copy of a Lease unmaps it, sends Release and waits up to 2 s for the
//    daemon's answer. If another thread's call holds the connection that long, the Release is
//    queued and sent by that call, so a tensor deleter never blocks behind a model load.
//  - No type of Boost, ZeroMQ or cereal appears here, so that programs built with another
//    compiler or C++ library configuration can link libweightd.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "weightd/dtype.h"
#include "weightd/export.h"
#include "weightd/status.h"

namespace weightd {

inline constexpr const char* kDefaultEndpoint = "ipc:///run/weightd/weightd.sock";

struct ClientOptions {
  // ZeroMQ endpoint of the daemon. Empty: $WEIGHTD_SOCKET, else kDefaultEndpoint.
  std::string endpoint;
  // Shown in the daemon's logs.
  std::string client_name = "libweightd";
  // How long one request may wait for its reply (an Acquire includes the load from disk).
  std::chrono::milliseconds request_timeout{std::chrono::minutes(10)};
  // How long Connect() waits for the Hello reply.
  std::chrono::milliseconds connect_timeout{std::chrono::seconds(5)};
  // If >= 0, Connect() starts creating this CUDA device's context (this process's numbering)
  // in the background, to overlap it with the handshake. Errors surface at Acquire.
  int prepare_cuda_device = -1;
};

struct AcquireOptions {
  // "cpu" maps the host tier. "cuda:N" (this process's device numbering, as CUDA and LibTorch
  // use it) or "GPU-<uuid>" imports the daemon's copy on that GPU.
  std::string device = "cpu";
  std::vector<std::string> tensor_filter;  // empty: every tensor of the model
  // Host leases only: map the segments copy-on-write (MAP_PRIVATE, PROT_READ | PROT_WRITE)
  // instead of read-only. Writes go to pages private to this process; no other process (and not
  // the daemon) ever sees them, and pages never written stay shared. For engines that
  // post-process weights in place. InvalidArgument "client.writable_gpu" for a GPU device (take
  // a device-to-device copy instead, as the shim's Options::private_copy does).
  bool writable = false;
};

struct Tensor {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  // Read-only (unless Lease::writable()); valid while the Lease lives. A host pointer, or for GPU
  // leases a device pointer on Lease::cuda_device().
  const std::byte* data = nullptr;
  std::size_t nbytes = 0;
  std::uint32_t shard = 0;          // index into Lease::shards()
  std::uint64_t offset = 0;         // of the tensor in its shard's data section
};

struct ShardInfo {
  std::string file;                 // file name inside the model directory
  std::uint64_t file_data_offset = 0;  // where its data section starts in the file
  std::uint64_t data_size = 0;
};

class WEIGHTD_API Lease {
 public:
  Lease() = default;  // an empty lease: valid() is false

  bool valid() const { return impl_ != nullptr; }
  std::uint64_t id() const;
  const std::string& model() const;
  const std::string& device() const;     // "cpu" or "cuda:N" (this process's numbering)
  int cuda_device() const;               // N for GPU leases, -1 for host leases
  const std::string& gpu_uuid() const;   // the GPU that holds the memory; empty for host leases
  const std::string& model_dir() const;  // the daemon's directory of the model (for verification)
  bool writable() const;                 // acquired with AcquireOptions::writable
  const std::vector<Tensor>& tensors() const;
  const std::vector<ShardInfo>& shards() const;
  const Tensor* find(std::string_view name) const;  // nullptr if absent
  std::size_t total_bytes() const;
  // Time from the Acquire request to the mapped tensors, as measured by this library.
  std::chrono::microseconds attach_time() const;
  // Copies bytes [offset, offset + size) of `t` (a tensor of this lease) into `dst`: a memcpy
  // for host leases, a synchronous device-to-host copy for GPU leases.
  weightd::Status copy_to_host(const Tensor& t, std::uint64_t offset, std::uint64_t size, void* dst) const;

  // Drops this handle. The lease itself ends when the last handle is dropped.
  void release() { impl_.reset(); }

  struct Impl;  // opaque
  explicit Lease(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  // For wrappers (the shim) that tie other objects' lifetimes to the lease.
  const std::shared_ptr<const Impl>& handle() const { return impl_; }

 private:
  std::shared_ptr<const Impl> impl_;
};

struct GpuCopyInfo {
  std::string device;  // "cuda:N" in the daemon's numbering
  std::string uuid;
  std::string state;   // "loading", "resident", "failed"
  std::uint64_t bytes = 0;
  std::uint32_t leases = 0;
  std::uint64_t copy_ms = 0;  // the last copy to this GPU: allocation and transfer
  std::uint64_t h2d_us = 0;   // its host-to-device transfer alone
  Status last_error;
  std::uint64_t idle_ms = 0;  // since this copy was last leased or released
};

struct ModelInfo {
  std::string name;
  std::string dir;
  std::string state;  // "absent", "loading", "resident", "failed"
  std::uint32_t shards = 0;
  std::uint32_t tensors = 0;
  std::uint64_t bytes = 0;
  std::uint64_t resident_bytes = 0;
  std::uint32_t leases = 0;
  std::uint64_t loads = 0;
  std::uint64_t last_load_ms = 0;
  std::uint64_t idle_ms = 0;
  Status last_error;  // OK unless the last load failed
  std::vector<GpuCopyInfo> gpus;
  bool pinned = false;
  std::int32_t priority = 0;
  std::uint64_t loaded_bytes = 0;  // while loading: bytes read so far, of `bytes`
  std::string waiting_for;         // while a load waits for memory: which budget, and why
};

struct GpuInfo {
  std::string device;  // "cuda:N" in the daemon's numbering
  std::string uuid;
  std::string name;
  std::uint64_t total_bytes = 0;
  std::uint64_t resident_bytes = 0;
  std::uint32_t copies = 0;
  std::uint32_t leases = 0;
  std::uint64_t budget_bytes = 0;  // what model copies may hold on this device
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
  std::vector<ModelInfo> models;
  std::vector<GpuInfo> gpus;     // empty when the daemon is host-only
  std::string gpu_unavailable;   // and why
  std::uint64_t host_budget_bytes = 0;
  std::uint64_t host_total_bytes = 0;
  bool ready = false;            // every configured preload has finished
  std::uint64_t ready_ms = 0;    // from start to ready
  std::string metrics;           // the daemon's /metrics, Prometheus text format
};

// Installs, once per process, a SIGSEGV/SIGBUS handler that explains a write to a lease's
// read-only memory: when the fault's address lies in a read-only host mapping of a live lease,
// it writes one line to stderr naming the tensor, model and shard, then hands the signal on to
// the handler installed before it (by default the process still ends with SIGSEGV). Faults
// elsewhere pass through untouched. Optional for C++ programs; the Python package calls it on
// import.
WEIGHTD_API void ExplainWriteFaults();

class WEIGHTD_API Client {
 public:
  // Connects and performs the versioned handshake. Unavailable if no daemon answers within
  // connect_timeout; InvalidArgument "protocol.version_mismatch" if it speaks another major.
  static Result<Client> Connect(ClientOptions options = {});

  Client(Client&&) noexcept;
  Client& operator=(Client&&) noexcept;
  ~Client();

  // Leases the model, loading it first if it is not resident (concurrent callers share one
  // load), then maps it read-only. For a GPU device the daemon first makes the model resident
  // on that GPU (from its host copy), then this process imports the device memory.
  // Unavailable "gpu.no_device" when this process or the daemon has no usable GPU.
  Result<Lease> Acquire(std::string_view model, const AcquireOptions& options = {});

  Result<std::vector<ModelInfo>> List();
  Result<ModelInfo> Status(std::string_view model);
  // Loads into the host tier without leasing; returns when resident (or failed).
  Result<ModelInfo> Load(std::string_view model);
  // Drops the model from every tier (device ""), from the host tier only ("cpu"), or from one
  // GPU ("cuda:N"). FailedPrecondition while leases on what would be dropped exist.
  weightd::Status Evict(std::string_view model, std::string_view device = {});
  Result<DaemonStats> Stats();

  // How many times this Client opened a new session after the daemon restarted (see
  // "Daemon restarts" above).
  std::uint64_t reconnects() const;

  struct Impl;

 private:
  explicit Client(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace weightd
