// gpu_import.h — the client's side of the GPU tier: importing a daemon's device copy into this
// process (read-only), finding the local ordinal of the daemon's GPU, and creating the CUDA
// context in the background while the handshake runs.
//
// Contract:
//  - GpuImport is a move-only RAII owner of one imported shard. Its destructor unmaps it and
//    drops the import (VMM: unmap, free the address range, release the handle; legacy:
//    cudaIpcCloseMemHandle). The daemon's copy is unaffected.
//  - The CudaApi must outlive every GpuImport made with it. A GpuImport may be destroyed on any
//    thread. Creating one makes `ordinal` the calling thread's current device.
//  - Nothing from the wire is trusted: sizes are checked against the local granularity and
//    handles against their exact size.
#pragma once

#include <cstdint>
#include <future>
#include <optional>
#include <string>
#include <string_view>

#include "cuda_api.h"
#include "status_macros.h"

namespace weightd::gpu {

class GpuImport {
 public:
  GpuImport() = default;
  GpuImport(GpuImport&& o) noexcept;
  GpuImport& operator=(GpuImport&& o) noexcept;
  GpuImport(const GpuImport&) = delete;
  GpuImport& operator=(const GpuImport&) = delete;
  ~GpuImport();

  // Imports a VMM allocation of `alloc_size` bytes from `fd` (not consumed; close it after)
  // and maps it read-only on `ordinal` (CU_MEM_ACCESS_FLAGS_PROT_READ).
  static Result<GpuImport> ImportVmm(CudaApi* api, int ordinal, int fd, std::uint64_t alloc_size);
  // Opens a legacy 64-byte cudaIpcMemHandle_t on `ordinal`. CUDA maps it read-write: the
  // legacy path cannot enforce read-only.
  static Result<GpuImport> ImportLegacy(CudaApi* api, int ordinal, std::string_view handle, std::uint64_t size);

  // Forgets the import without calling CUDA: for a forked child, where the parent's CUDA state
  // must not be touched (the kernel drops the child's copy of the mapping at exit).
  void Abandon() { kind_ = Kind::kNone; ptr_ = 0; handle_ = 0; size_ = 0; }

  bool valid() const { return ptr_ != 0; }
  DevicePtr ptr() const { return ptr_; }
  std::uint64_t size() const { return size_; }
  int ordinal() const { return ordinal_; }

 private:
  enum class Kind : std::uint8_t { kNone, kVmm, kLegacy };
  void Reset();

  CudaApi* api_ = nullptr;
  Kind kind_ = Kind::kNone;
  int ordinal_ = -1;
  DevicePtr ptr_ = 0;
  std::uint64_t size_ = 0;
  MemHandle handle_ = 0;
};

// The local ordinal of the GPU with `uuid` ("GPU-...", case-insensitive). NotFound
// "gpu.device_not_visible" when this process cannot see it (CUDA_VISIBLE_DEVICES).
Result<int> FindLocalOrdinal(CudaApi* api, std::string_view uuid);

// Starts creating the primary context of `ordinal` on a background thread, so that a client
// overlaps the 130-150 ms it takes with the handshake and fd transfer. The thread first reads
// the device's identity (UUID: what the client sends in Acquire, since ordinals differ between
// processes), which Device() returns as soon as it is known, then creates the context, which
// Wait() waits for. The destructor joins the thread. The context is process-wide, so SetDevice
// on another thread afterwards is cheap. Move-only; not thread-safe (one owner thread).
class ContextWarmup {
 public:
  ContextWarmup() = default;
  static ContextWarmup Start(CudaApi* api, int ordinal);
  ContextWarmup(ContextWarmup&&) noexcept = default;
  ContextWarmup& operator=(ContextWarmup&&) noexcept = default;
  ~ContextWarmup();

  bool started() const { return ready_.valid() || done_.has_value(); }
  // Blocks until the device's identity is known (before the context exists).
  const Result<DeviceInfo>& Device();
  // Blocks until the context is ready; returns the device (later calls return the same result).
  const Result<DeviceInfo>& Wait();

 private:
  std::future<Result<DeviceInfo>> info_;
  std::future<Result<DeviceInfo>> ready_;
  std::optional<Result<DeviceInfo>> info_done_;
  std::optional<Result<DeviceInfo>> done_;
};

}  // namespace weightd::gpu
