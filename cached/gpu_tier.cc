#include "gpu_tier.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <utility>
#include <cctype>
#include <chrono>
#include <cstring>
#include <optional>

#include "host_pins.h"
#include "thread_annotations.h"

namespace weightd::gpu {

namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string Cuda(int ordinal) { return "cuda:" + std::to_string(ordinal); }

bool IsHex(char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; }

// "GPU-" + 8-4-4-4-12 hex digits.
bool WellFormedUuid(std::string_view s) {
  static constexpr std::string_view kPattern = "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";
  if (s.size() != kPattern.size()) return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (kPattern[i] == 'x') {
      if (!IsHex(s[i])) return false;
    } else if (i < 4 ? std::toupper(static_cast<unsigned char>(s[i])) != kPattern[i] : s[i] != kPattern[i]) {
      return false;
    }
  }
  return true;
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

enum VmmProgress : std::uint8_t { kNothing = 0, kCreated = 1, kReserved = 2, kMapped = 3 };

}  // namespace

// Shared by the tier and its copies, so a copy that outlives a Materialize call (or the tier)
// can still settle its bookkeeping.
struct GpuCopy::State {
  explicit State(CudaApi* a) : api(a), pins(a) {}
  CudaApi* const api;
  HostPins pins;  // page-locked host memory, shared by concurrent copies of a shard

  Mutex mu;
  std::map<int, GpuDeviceStats> devices GUARDED_BY(mu);
  std::map<int, std::uint64_t> granularity GUARDED_BY(mu);  // queried lazily: it may need a context
  GpuTierStats totals GUARDED_BY(mu);                        // .devices unused
};

std::string_view ExportModeName(ExportMode m) { return m == ExportMode::kVmm ? "vmm" : "legacy"; }

Result<ExportMode> ParseExportMode(std::string_view s) {
  if (s == "vmm") return ExportMode::kVmm;
  if (s == "legacy") return ExportMode::kLegacy;
  return InvalidArgument("gpu.export must be \"vmm\" or \"legacy\", not \"" + std::string(s) + "\"",
                         "config.bad_gpu_export");
}

// ---- GpuCopy ----------------------------------------------------------------------------------

GpuCopy::~GpuCopy() {
  CudaApi* api = state_->api;
  std::uint64_t errors = 0;
  auto note = [&](const Status& s) {
    if (s.ok()) return;
    ++errors;
    spdlog::warn("gpu tier: releasing a copy on {}: {}", Cuda(ordinal_), s.ToString());
  };
  if (!progress_.empty()) note(api->SetDevice(ordinal_));
  for (std::size_t i = 0; i < progress_.size(); ++i) {
    const GpuShard& sh = shards_[i];
    if (mode_ == ExportMode::kVmm) {
      if (progress_[i] >= kMapped) note(api->MemUnmap(sh.ptr, sh.alloc_size));
      if (progress_[i] >= kReserved) note(api->AddressFree(sh.ptr, sh.alloc_size));
      if (progress_[i] >= kCreated) note(api->MemRelease(sh.handle));
    } else if (progress_[i] >= kCreated) {
      note(api->Free(sh.ptr));
    }
  }
  MutexLock lock(state_->mu);
  state_->totals.release_errors += errors;
  if (accounted_) {
    GpuDeviceStats& d = state_->devices[ordinal_];
    d.resident_bytes -= allocated_bytes();
    --d.copies;
  }
}

std::uint64_t GpuCopy::allocated_bytes() const {
  std::uint64_t n = 0;
  for (const GpuShard& s : shards_) n += s.alloc_size;
  return n;
}

Result<std::vector<posix::Fd>> GpuCopy::ExportFds() const {
  if (mode_ != ExportMode::kVmm)
    return FailedPrecondition("the copy on " + Cuda(ordinal_) + " was exported as legacy CUDA IPC, not VMM fds",
                              "gpu.wrong_export_mode");
  RETURN_IF_ERROR(state_->api->SetDevice(ordinal_));
  std::vector<posix::Fd> fds;
  fds.reserve(shards_.size());
  for (std::size_t i = 0; i < shards_.size(); ++i) {
    auto fd = state_->api->ExportFd(shards_[i].handle);
    if (!fd.ok()) return fd.status().WithContext("exporting shard " + std::to_string(i) + " on " + Cuda(ordinal_));
    fds.push_back(std::move(fd).value());
  }
  return fds;
}

Result<std::vector<std::string>> GpuCopy::LegacyHandles() const {
  if (mode_ != ExportMode::kLegacy)
    return FailedPrecondition("the copy on " + Cuda(ordinal_) + " was exported as VMM fds, not legacy CUDA IPC",
                              "gpu.wrong_export_mode");
  std::vector<std::string> out;
  out.reserve(shards_.size());
  for (const GpuShard& s : shards_) out.push_back(s.ipc_handle);
  return out;
}

Status GpuCopy::CopyToHost(std::size_t shard, std::uint64_t offset, std::span<std::byte> out) const {
  if (shard >= shards_.size())
    return InvalidArgument("shard " + std::to_string(shard) + " out of range (" + std::to_string(shards_.size()) + ")",
                           "gpu.bad_shard");
  const GpuShard& s = shards_[shard];
  if (offset > s.data_size || out.size() > s.data_size - offset)
    return InvalidArgument("read of " + std::to_string(out.size()) + " bytes at " + std::to_string(offset) +
                               " past the end of shard " + std::to_string(shard) + " (" + std::to_string(s.data_size) +
                               " bytes)",
                           "gpu.bad_range");
  if (out.empty()) return Status::Ok();
  RETURN_IF_ERROR(state_->api->SetDevice(ordinal_));
  return state_->api->CopyDeviceToHost(out.data(), s.ptr + offset, out.size());
}

// ---- GpuTier ----------------------------------------------------------------------------------

GpuTier::GpuTier(CudaApi* api, MaterializeOptions options)
    : api_(api), options_(options), state_(std::make_shared<GpuCopy::State>(api)) {
  options_.streams = std::max(1, options_.streams);
  options_.chunk_bytes = std::max<std::uint64_t>(options_.chunk_bytes, posix::PageSize());
  if (api_ == nullptr) {
    unavailable_ = Unavailable("no CUDA device: the daemon runs host-only", "gpu.no_device");
    return;
  }
  auto count = api_->DeviceCount();
  if (!count.ok()) {
    unavailable_ = count.status();
    return;
  }
  std::vector<DeviceInfo> found;
  for (int i = 0; i < *count; ++i) {
    auto info = api_->GetDeviceInfo(i);
    if (!info.ok()) {
      unavailable_ = info.status();
      return;
    }
    found.push_back(std::move(info).value());
  }
  if (found.empty()) {
    unavailable_ = Unavailable("no CUDA device: none found", "gpu.no_device");
    return;
  }
  devices_ = std::move(found);
  // Which device can read which (row: the reader). A failed query reads as "no": the copy then
  // goes through host memory, as it would without the peer.
  const std::size_t n = devices_.size();
  peer_.assign(n * n, false);
  for (std::size_t to = 0; to < n; ++to)
    for (std::size_t from = 0; from < n; ++from) {
      if (to == from) continue;
      auto can = api_->CanAccessPeer(static_cast<int>(to), static_cast<int>(from));
      if (!can.ok()) spdlog::warn("gpu tier: {}", can.status().ToString());
      peer_[to * n + from] = can.ok() && *can;
      if (peer_[to * n + from]) spdlog::info("gpu tier: {} reads {}'s memory directly (peer copies)", Cuda(static_cast<int>(to)), Cuda(static_cast<int>(from)));
    }
  MutexLock lock(state_->mu);
  for (const DeviceInfo& d : devices_) state_->devices[d.ordinal] = GpuDeviceStats{d.ordinal, d.uuid, 0, 0};
}

GpuTier::~GpuTier() = default;

Status GpuTier::CheckOrdinal(int ordinal) const {
  if (!available()) {
    if (unavailable_.reason() == "gpu.no_device" || unavailable_.reason() == "gpu.no_cuda") return unavailable_;
    return Unavailable("no CUDA device: " + unavailable_.ToString(), "gpu.no_device");
  }
  if (ordinal < 0 || static_cast<std::size_t>(ordinal) >= devices_.size())
    return NotFound("no CUDA device " + Cuda(ordinal) + " (" + std::to_string(devices_.size()) + " visible)",
                    "gpu.unknown_device");
  return Status::Ok();
}

Result<MemInfo> GpuTier::Memory(int ordinal) const {
  RETURN_IF_ERROR(CheckOrdinal(ordinal));
  return api_->GetMemInfo(ordinal);
}

Result<int> GpuTier::ResolveDevice(std::string_view device) const {
  const std::string quoted = "\"" + std::string(device) + "\"";
  if (device == "cuda") device = "cuda:0";
  if (device.starts_with("cuda:")) {
    std::string_view digits = device.substr(5);
    if (digits.empty() || digits.size() > 4 || !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return InvalidArgument("bad device " + quoted + ": expected cuda:N or GPU-<uuid>", "gpu.bad_device");
    int n = 0;
    for (char c : digits) n = n * 10 + (c - '0');
    RETURN_IF_ERROR(CheckOrdinal(n));
    return n;
  }
  if (device.size() >= 4 && Lower(device.substr(0, 4)) == "gpu-") {
    if (!WellFormedUuid(device))
      return InvalidArgument("bad device " + quoted + ": a GPU UUID reads GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
                             "gpu.bad_device");
    RETURN_IF_ERROR(CheckOrdinal(0));
    std::string want = Lower(device);
    for (const DeviceInfo& d : devices_)
      if (Lower(d.uuid) == want) return d.ordinal;
    return NotFound("no visible CUDA device has UUID " + std::string(device), "gpu.unknown_device");
  }
  return InvalidArgument("bad device " + quoted + ": expected cuda:N or GPU-<uuid>", "gpu.bad_device");
}

Result<std::uint64_t> GpuTier::Granularity(int ordinal) {
  {
    MutexLock lock(state_->mu);
    auto it = state_->granularity.find(ordinal);
    if (it != state_->granularity.end()) return it->second;
  }
  ASSIGN_OR_RETURN(std::uint64_t granularity, api_->AllocationGranularity(ordinal));
  MutexLock lock(state_->mu);
  state_->granularity[ordinal] = granularity;
  return granularity;
}

Status GpuTier::MapVmmShard(GpuShard& s, std::uint8_t& progress, int ordinal, std::uint64_t granularity) {
  auto va = api_->AddressReserve(s.alloc_size, granularity);
  if (!va.ok()) return va.status();
  s.ptr = *va;
  progress = kReserved;
  RETURN_IF_ERROR(api_->MemMap(s.ptr, s.alloc_size, s.handle));
  progress = kMapped;
  return api_->SetAccess(s.ptr, s.alloc_size, ordinal, Access::kReadWrite);
}

Status GpuTier::Allocate(GpuCopy& copy, std::span<const std::uint64_t> sizes) {
  const int ordinal = copy.ordinal_;
  std::uint64_t granularity = 0;
  if (copy.mode_ == ExportMode::kVmm) {
    ASSIGN_OR_RETURN(granularity, Granularity(ordinal));
  }
  copy.shards_.reserve(sizes.size());
  copy.progress_.reserve(sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    copy.shards_.push_back(GpuShard{});
    copy.progress_.push_back(kNothing);
    GpuShard& s = copy.shards_.back();
    std::uint8_t& progress = copy.progress_.back();
    s.data_size = sizes[i];
    const std::string what = "shard " + std::to_string(i) + " (" + std::to_string(s.data_size) + " bytes)";
    if (copy.mode_ == ExportMode::kVmm) {
      // An empty shard still gets one granule so that every shard exports as one fd.
      s.alloc_size = std::max(granularity, posix::RoundUp(s.data_size, granularity));
      auto h = api_->MemCreate(ordinal, s.alloc_size);
      if (!h.ok()) return h.status().WithContext(what);
      s.handle = *h;
      progress = kCreated;
      RETURN_IF_ERROR(MapVmmShard(s, progress, ordinal, granularity).WithContext(what));
    } else {
      s.alloc_size = std::max<std::uint64_t>(s.data_size, 1);
      auto p = api_->Malloc(s.alloc_size);
      if (!p.ok()) return p.status().WithContext(what);
      s.ptr = *p;
      progress = kCreated;
      auto h = api_->IpcGetMemHandle(s.ptr);
      if (!h.ok()) return h.status().WithContext(what);
      if (h->size() != kIpcHandleSize) return Internal("CUDA IPC handle of unexpected size", "gpu.bad_ipc_handle");
      s.ipc_handle = std::move(h).value();
    }
  }
  return Status::Ok();
}

// Everything a copy borrows while queued work may still read it. The destructor waits for
// the streams before it frees staging buffers or unregisters host memory, on success and on
// every error path alike.
struct GpuTier::CopySession {
  CudaApi* api;
  GpuCopy::State* state;
  std::vector<Stream> streams;
  std::vector<void*> staging;
  std::vector<bool> staging_busy;
  HostKeys registered;
  std::uint64_t errors = 0;

  void Note(const Status& s) {
    if (!s.ok()) {
      ++errors;
      spdlog::warn("gpu tier: cleaning up a copy: {}", s.ToString());
    }
  }
  // `n` streams on the current device.
  Status OpenStreams(int n) {
    for (int i = 0; i < n; ++i) {
      auto s = api->StreamCreate();
      if (!s.ok()) return s.status();
      streams.push_back(*s);
    }
    return Status::Ok();
  }
  ~CopySession() {
    for (Stream s : streams) Note(api->StreamSynchronize(s));
    for (void* p : staging)
      if (p != nullptr) Note(api->HostFreePinned(p));
    state->pins.Unregister(registered);
    for (Stream s : streams) Note(api->StreamDestroy(s));
    MutexLock lock(state->mu);
    state->totals.release_errors += errors;
  }
};

namespace {

struct ChunkRef {
  std::size_t shard = 0;
  std::uint64_t off = 0;
  std::uint64_t len = 0;
};

// Chunks go round-robin over the shards (the first of each shard, then the second, ...), the
// order in which the loader fills them (Loader::Fill), so that a copy pipelined behind a load
// follows the fill rather than waiting for the whole of shard 0 first.
std::vector<ChunkRef> ChunkOrder(std::span<const HostShard> shards, std::uint64_t chunk_bytes) {
  std::uint64_t longest = 0;
  for (const HostShard& s : shards) longest = std::max(longest, s.size);
  std::vector<ChunkRef> out;
  for (std::uint64_t off = 0; off < longest; off += chunk_bytes)
    for (std::size_t i = 0; i < shards.size(); ++i)
      if (off < shards[i].size) out.push_back(ChunkRef{i, off, std::min(chunk_bytes, shards[i].size - off)});
  return out;
}

}  // namespace

Status GpuTier::CopyIn(GpuCopy& copy, std::span<const HostShard> shards, std::uint64_t* staged,
                       const WaitReadyFn& wait_ready) {
  CopySession session{api_, state_.get(), {}, {}, {}, {}};

  const bool ro = devices_[static_cast<std::size_t>(copy.ordinal_)].host_register_read_only;
  const std::vector<ChunkRef> chunks = ChunkOrder(shards, options_.chunk_bytes);
  std::vector<bool> direct(shards.size(), false);
  // A copy behind a fill registers each chunk once it has landed (ChunkPinner): registering a
  // whole fresh shard first would page-lock (and allocate) every page of it before the first
  // chunk could go, single-threaded, which held the copy back until the fill's end
  // (docs/loading.md). Only where chunks are whole pages, so that no two chunks' registrations
  // share one.
  const std::uint64_t page = posix::PageSize();
  bool per_chunk = static_cast<bool>(wait_ready) && options_.chunk_bytes % page == 0;
  for (const HostShard& s : shards) per_chunk = per_chunk && reinterpret_cast<std::uintptr_t>(s.data) % page == 0;
  for (std::size_t i = 0; i < shards.size() && !per_chunk; ++i) {
    if (shards[i].size == 0) continue;
    // Free when PinHost already holds the range; otherwise registered for this copy only.
    auto [base, len] = PageSpan(shards[i].data, shards[i].size);
    if (HostKeys keys = state_->pins.Register(base, len, ro); !keys.empty()) {
      session.registered.insert(session.registered.end(), keys.begin(), keys.end());
      direct[i] = true;
    } else {
      ++*staged;
    }
  }
  std::vector<bool> staged_shard(shards.size(), false);

  RETURN_IF_ERROR(session.OpenStreams(options_.streams));
  const std::size_t n_streams = session.streams.size();
  session.staging.assign(n_streams, nullptr);
  session.staging_busy.assign(n_streams, false);
  // Declared after the session: destroyed first, it hands its registrations to the session.
  std::vector<ChunkPinner::Chunk> pin_chunks;
  std::optional<ChunkPinner> pinner;
  if (per_chunk) {
    for (const auto& [i, off, len] : chunks) {
      auto [base, span] = PageSpan(shards[i].data + off, len);
      pin_chunks.push_back(ChunkPinner::Chunk{i, off + len, base, span});
    }
    pinner.emplace(state_->pins, pin_chunks, ro, wait_ready, options_.pin_threads, &session.registered);
  }

  auto t0 = Clock::now();
  std::uint64_t bytes = 0;
  for (std::size_t k = 0; k < chunks.size(); ++k) {
    const auto [i, off, len] = chunks[k];
    const HostShard& src = shards[i];
    const GpuShard& dst = copy.shards_[i];
    const std::size_t j = k % n_streams;
    Stream stream = session.streams[j];
    bool chunk_direct = direct[i];
    if (pinner) {
      RETURN_IF_ERROR(pinner->Wait(k, &chunk_direct));
      if (!chunk_direct && !staged_shard[i]) {
        staged_shard[i] = true;
        ++*staged;
      }
    } else if (wait_ready) {
      RETURN_IF_ERROR(wait_ready(i, off + len));
    }
    Status st;
    if (chunk_direct) {
      st = api_->CopyHostToDeviceAsync(dst.ptr + off, src.data + off, len, stream);
    } else {
      // TODO(perf): double-buffer per stream and fill staging buffers from several threads;
      // this path only runs when registration fails.
      if (session.staging[j] == nullptr) {
        auto buf = api_->HostAllocPinned(options_.chunk_bytes);
        if (!buf.ok()) return buf.status().WithContext("staging buffer");
        session.staging[j] = *buf;
      } else if (session.staging_busy[j]) {
        RETURN_IF_ERROR(api_->StreamSynchronize(stream));
      }
      std::memcpy(session.staging[j], src.data + off, len);
      st = api_->CopyHostToDeviceAsync(dst.ptr + off, session.staging[j], len, stream);
      session.staging_busy[j] = true;
    }
    RETURN_IF_ERROR(st.WithContext("shard " + std::to_string(i) + " at offset " + std::to_string(off)));
    bytes += len;
  }
  for (Stream s : session.streams) RETURN_IF_ERROR(api_->StreamSynchronize(s));
  copy.copy_seconds_ = SecondsSince(t0);

  MutexLock lock(state_->mu);
  state_->totals.last_h2d_bytes = bytes;
  state_->totals.last_h2d_seconds = copy.copy_seconds_;
  state_->totals.last_h2d_gbps = copy.copy_seconds_ > 0 ? static_cast<double>(bytes) / copy.copy_seconds_ / 1e9 : 0;
  return Status::Ok();
}

std::uint64_t GpuTier::AllocationBytes(int ordinal, std::span<const std::uint64_t> shard_sizes) const {
  // The device's VMM granularity once a copy has asked for it (Granularity() may need a context,
  // which the control loop must not wait for); before that, and for legacy cudaMalloc, 2 MiB,
  // a fair estimate.
  std::uint64_t g = 2ull << 20;
  {
    MutexLock lock(state_->mu);
    if (auto it = state_->granularity.find(ordinal); it != state_->granularity.end() && it->second > 0) g = it->second;
  }
  std::uint64_t total = 0;
  for (std::uint64_t n : shard_sizes) total += std::max<std::uint64_t>(posix::RoundUp(n, g), g);
  return total;
}

Result<std::shared_ptr<GpuCopy>> GpuTier::Materialize(int ordinal, std::span<const HostShard> shards, ExportMode mode,
                                                      const WaitReadyFn& wait_ready) {
  RETURN_IF_ERROR(CheckOrdinal(ordinal));
  const DeviceInfo& dev = devices_[static_cast<std::size_t>(ordinal)];
  if (mode == ExportMode::kVmm && !dev.vmm_posix_fd)
    return FailedPrecondition(Cuda(ordinal) + " (" + dev.uuid + ") cannot export VMM memory as POSIX fds; set gpu.export = \"legacy\"",
                              "gpu.vmm_unsupported");
  if (shards.empty()) return InvalidArgument("nothing to materialize: no shards", "gpu.no_shards");
  std::uint64_t total = 0;
  for (const HostShard& s : shards) {
    if (s.data == nullptr && s.size > 0) return InvalidArgument("host shard without data", "gpu.bad_shard");
    total += s.size;
  }

  std::shared_ptr<GpuCopy> copy(new GpuCopy(state_, ordinal, dev.uuid, mode));
  std::vector<std::uint64_t> sizes;
  for (const HostShard& sh : shards) sizes.push_back(sh.size);
  std::uint64_t staged = 0;
  Status s = api_->SetDevice(ordinal);
  if (s.ok()) s = Allocate(*copy, sizes);
  if (s.ok()) s = CopyIn(*copy, shards, &staged, wait_ready);
  {
    MutexLock lock(state_->mu);
    state_->totals.staged_shards += staged;
  }
  return Settle(std::move(copy), s,
                "materializing " + std::to_string(shards.size()) + " shards (" + std::to_string(total) + " bytes) on " +
                    Cuda(ordinal) + " (" + dev.uuid + ", " + std::string(ExportModeName(mode)) + ")");
}

Result<std::shared_ptr<GpuCopy>> GpuTier::Settle(std::shared_ptr<GpuCopy> copy, const Status& s, const std::string& what) {
  if (!s.ok()) copy.reset();  // frees what was allocated; takes state_->mu itself
  MutexLock lock(state_->mu);
  if (!s.ok()) {
    ++state_->totals.materialize_failures;
    return s.WithContext(what);
  }
  ++state_->totals.materializations;
  if (copy->source_ >= 0) {
    ++state_->totals.peer_copies;
    state_->totals.last_peer_bytes = 0;
    for (const GpuShard& sh : copy->shards_) state_->totals.last_peer_bytes += sh.data_size;
    state_->totals.last_peer_seconds = copy->copy_seconds_;
    state_->totals.last_peer_gbps = copy->copy_seconds_ > 0
                                        ? static_cast<double>(state_->totals.last_peer_bytes) / copy->copy_seconds_ / 1e9
                                        : 0;
  }
  GpuDeviceStats& d = state_->devices[copy->ordinal_];
  d.resident_bytes += copy->allocated_bytes();
  ++d.copies;
  copy->accounted_ = true;
  return copy;
}

bool GpuTier::CanCopyPeer(int from, int to) const {
  const auto n = static_cast<int>(devices_.size());
  if (from < 0 || to < 0 || from >= n || to >= n || from == to) return false;
  return peer_[static_cast<std::size_t>(to) * devices_.size() + static_cast<std::size_t>(from)];
}

Result<std::shared_ptr<GpuCopy>> GpuTier::MaterializeFromPeer(int ordinal, const GpuCopy& source) {
  RETURN_IF_ERROR(CheckOrdinal(ordinal));
  const DeviceInfo& dev = devices_[static_cast<std::size_t>(ordinal)];
  const std::string what = "copying " + std::to_string(source.shards_.size()) + " shards from " +
                           Cuda(source.ordinal_) + " to " + Cuda(ordinal) + " (" + dev.uuid + ")";
  if (source.mode_ != ExportMode::kVmm || !dev.vmm_posix_fd)
    return FailedPrecondition(what + ": a peer copy needs VMM memory on both GPUs", "gpu.no_peer_copy");
  if (!CanCopyPeer(source.ordinal_, ordinal))
    return FailedPrecondition(what + ": " + Cuda(ordinal) + " cannot access " + Cuda(source.ordinal_) + "'s memory",
                              "gpu.no_peer_copy");
  std::shared_ptr<GpuCopy> copy(new GpuCopy(state_, ordinal, dev.uuid, ExportMode::kVmm));
  copy->source_ = source.ordinal_;
  std::vector<std::uint64_t> sizes;
  for (const GpuShard& sh : source.shards_) sizes.push_back(sh.data_size);
  Status s = api_->SetDevice(ordinal);
  if (s.ok()) s = Allocate(*copy, sizes);
  if (s.ok()) s = CopyFromPeer(*copy, source);
  return Settle(std::move(copy), s, what);
}

// The source's shards are made readable by the copy's device (a grant that stays with the
// source's mapping, for later copies), then copied chunk by chunk over the streams of the
// copy's device, which pulls them over NVLink or PCIe.
Status GpuTier::CopyFromPeer(GpuCopy& copy, const GpuCopy& source) {
  for (const GpuShard& sh : source.shards_)
    RETURN_IF_ERROR(api_->SetAccess(sh.ptr, sh.alloc_size, copy.ordinal_, Access::kRead).WithContext("peer access"));
  CopySession session{api_, state_.get(), {}, {}, {}, {}};
  RETURN_IF_ERROR(session.OpenStreams(options_.streams));
  const auto t0 = Clock::now();
  std::size_t k = 0;
  for (std::size_t i = 0; i < source.shards_.size(); ++i) {
    const GpuShard& src = source.shards_[i];
    for (std::uint64_t off = 0; off < src.data_size; off += options_.chunk_bytes) {
      const std::uint64_t len = std::min(options_.chunk_bytes, src.data_size - off);
      Stream stream = session.streams[k++ % session.streams.size()];
      RETURN_IF_ERROR(api_->CopyDeviceToDeviceAsync(copy.shards_[i].ptr + off, src.ptr + off, len, stream)
                          .WithContext("shard " + std::to_string(i) + " at offset " + std::to_string(off)));
    }
  }
  for (Stream st : session.streams) RETURN_IF_ERROR(api_->StreamSynchronize(st));
  copy.copy_seconds_ = SecondsSince(t0);
  return Status::Ok();
}

Result<std::shared_ptr<GpuCopy>> GpuTier::Adopt(int ordinal, std::span<const int> fds,
                                                std::span<const std::uint64_t> data_sizes) {
  RETURN_IF_ERROR(CheckOrdinal(ordinal));
  const DeviceInfo& dev = devices_[static_cast<std::size_t>(ordinal)];
  if (!dev.vmm_posix_fd)
    return FailedPrecondition(Cuda(ordinal) + " cannot import VMM memory from POSIX fds", "gpu.vmm_unsupported");
  if (fds.empty() || fds.size() != data_sizes.size())
    return InvalidArgument("adopting a copy: " + std::to_string(fds.size()) + " fds for " +
                               std::to_string(data_sizes.size()) + " shards",
                           "gpu.bad_shard");
  std::shared_ptr<GpuCopy> copy(new GpuCopy(state_, ordinal, dev.uuid, ExportMode::kVmm));
  Status s = api_->SetDevice(ordinal);
  std::uint64_t granularity = 0;
  if (s.ok()) {
    auto g = Granularity(ordinal);
    if (g.ok()) granularity = *g;
    else s = g.status();
  }
  for (std::size_t i = 0; s.ok() && i < fds.size(); ++i) {
    copy->shards_.push_back(GpuShard{});
    copy->progress_.push_back(kNothing);
    GpuShard& sh = copy->shards_.back();
    sh.data_size = data_sizes[i];
    sh.alloc_size = std::max(granularity, posix::RoundUp(sh.data_size, granularity));
    auto h = api_->ImportFd(fds[i]);
    if (!h.ok()) {
      s = h.status();
      break;
    }
    sh.handle = *h;
    copy->progress_.back() = kCreated;
    s = MapVmmShard(sh, copy->progress_.back(), ordinal, granularity);
    if (!s.ok()) s = s.WithContext("shard " + std::to_string(i) + " (" + std::to_string(sh.alloc_size) + " bytes)");
  }
  if (!s.ok()) {
    copy.reset();  // unmaps and releases what was imported
    return s.WithContext("adopting a copy of " + std::to_string(fds.size()) + " shards on " + Cuda(ordinal));
  }
  MutexLock lock(state_->mu);
  GpuDeviceStats& d = state_->devices[ordinal];
  d.resident_bytes += copy->allocated_bytes();
  ++d.copies;
  copy->accounted_ = true;
  return copy;
}

Result<std::shared_ptr<const void>> GpuTier::PinHost(const void* ptr, std::uint64_t size) {
  RETURN_IF_ERROR(CheckOrdinal(0));
  if (ptr == nullptr || size == 0) return InvalidArgument("nothing to pin", "gpu.bad_pin");
  const bool ro = std::all_of(devices_.begin(), devices_.end(), [](const DeviceInfo& d) { return d.host_register_read_only; });
  auto [base, len] = PageSpan(ptr, size);
  HostKeys keys = state_->pins.Register(base, len, ro, /*wait=*/true);
  if (keys.empty())
    return FailedPrecondition("cannot page-lock " + std::to_string(len) + " bytes of host memory for the GPU (RLIMIT_MEMLOCK?)",
                              "gpu.register_failed");
  std::shared_ptr<GpuCopy::State> state = state_;
  const void* first = keys.front();
  return std::shared_ptr<const void>(first, [state, keys = std::move(keys)](const void*) { state->pins.Unregister(keys); });
}

GpuTierStats GpuTier::Stats() const {
  const std::uint64_t pin_errors = state_->pins.release_errors();
  MutexLock lock(state_->mu);
  GpuTierStats out = state_->totals;
  out.release_errors += pin_errors;
  out.devices.clear();
  for (const DeviceInfo& d : devices_) out.devices.push_back(state_->devices[d.ordinal]);
  return out;
}

}  // namespace weightd::gpu
