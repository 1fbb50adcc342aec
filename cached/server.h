// server.h — the control loop: one ZeroMQ ROUTER socket, the lease table, the catalog, the
// host tier and the GPU tier (with its fd side channel), wired together.
//
// Threading: Run() is the only thread that touches the sockets, the catalog, the lease table
// and the model table. Host loads and GPU materializations run on worker threads and come back
// through a completion queue (an eventfd the loop polls), so the loop never blocks on the disk
// or the GPU. Signals arrive through a signalfd: SIGHUP reloads the catalog, SIGTERM/SIGINT
// stop the loop.
//
// The caller must block SIGHUP, SIGTERM and SIGINT in every thread (BlockSignals()) before
// Create() starts any thread.
#pragma once

#include <cstdint>
#include <memory>

#include "cache.h"
#include "clock.h"
#include "config.h"
#include "gpu_tier.h"
#include "status_macros.h"

namespace weightd {

// Blocks the signals the server reads through its signalfd. Call first thing in main().
void BlockSignals();

class Server {
 public:
  // Takes the instance locks, binds the sockets and loads the catalog (no model is read yet).
  // `gpu` (borrowed; it must outlive the Server) serves cuda:N requests; null or a tier
  // without devices makes the daemon host-only.
  // `memory` (borrowed; may be null: SystemMemoryProbe) feeds the pressure rule.
  static Result<std::unique_ptr<Server>> Create(DaemonConfig config, const Clock* clock, gpu::GpuTier* gpu,
                                                MemoryProbe* memory = nullptr);
  ~Server();

  // Serves until SIGTERM/SIGINT or Stop(). Returns the reason the loop stopped if it was an
  // error.
  Status Run();
  // Asks Run() to return; callable from any thread (tests run the server on a thread).
  void Stop();

  struct Impl;

 private:
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace weightd
