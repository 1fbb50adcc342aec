// server.h — the control loop: one ZeroMQ ROUTER socket, the lease table, the catalog, and
// the host tier, wired together.
//
// Threading: Run() is the only thread that touches the socket, the catalog, the lease table
// and the model table. Loads run on loader threads and come back through a completion queue
// (an eventfd the loop polls), so the loop never blocks on disk. Signals arrive through a
// signalfd: SIGHUP reloads the catalog, SIGTERM/SIGINT stop the loop.
//
// The caller must block SIGHUP, SIGTERM and SIGINT in every thread (BlockSignals()) before
// Create() starts any thread.
#pragma once

#include <memory>

#include "clock.h"
#include "config.h"
#include "weightd/status.h"

namespace weightd {

// Blocks the signals the server reads through its signalfd. Call first thing in main().
void BlockSignals();

class Server {
 public:
  // Takes the instance locks, binds the socket and loads the catalog (no model is read yet).
  static Result<std::unique_ptr<Server>> Create(DaemonConfig config, const Clock* clock);
  ~Server();

  // Serves until SIGTERM/SIGINT. Returns the reason the loop stopped if it was an error.
  Status Run();

  struct Impl;

 private:
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace weightd
