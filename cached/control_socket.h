// control_socket.h — the daemon's control socket: a ZeroMQ ROUTER on an ipc:// path, owned by
// the client group (mode 0660, in a 0750 directory the daemon makes if it is missing), behind
// the ZAP handler that stamps every connection with its peer's credentials (auth.h), and locked
// so that one daemon serves one path. It moves frames; what they mean is the server's business.
//
// Threading: the control loop's, except the ZAP handler, which runs its own thread.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <zmq.hpp>

#include "auth.h"
#include "config.h"
#include "posix.h"

namespace weightd {

class ControlSocket {
 public:
  ControlSocket() = default;
  ControlSocket(const ControlSocket&) = delete;
  ControlSocket& operator=(const ControlSocket&) = delete;

  // Checks the path (auth::CheckSocketPaths, with the fd socket, which the daemon binds beside)
  // and takes the socket's lock: FailedPrecondition "daemon.instance_locked" when another
  // daemon holds it. `client_gid` gets a directory made for the socket.
  Status Lock(const DaemonConfig& config, gid_t client_gid);
  // Then binds the socket, behind its ZAP handler, and gives it to `client_gid`.
  Status Bind(const DaemonConfig& config, gid_t client_gid);

  // The socket to poll for ZMQ_POLLIN.
  void* handle() { return router_.handle(); }
  const auth::ZapHandler& zap() const { return *zap_; }
  const std::unique_ptr<auth::ZapHandler>& zap_handler() const { return zap_; }

  // Receives the waiting requests, at most `max` (timers and completions stay responsive), and
  // hands each to `handle` with its routing id. A message of more than one frame is drained and
  // answered with InvalidArgument "protocol.malformed" through `refuse`.
  void Receive(unsigned max, const std::function<void(const std::string& routing_id, zmq::message_t& payload)>& handle,
               const std::function<void(const std::string& routing_id)>& refuse);
  // Sends one frame to `routing_id` without waiting; false if it could not go (the peer left,
  // or its queue is full).
  bool Send(const std::string& routing_id, const std::string& frame);

 private:
  zmq::context_t ctx_{1};
  std::unique_ptr<auth::ZapHandler> zap_;  // before router_: it must outlive the socket it guards
  zmq::socket_t router_;
  posix::Fd lock_;
};

// Gives `path` to group `gid` (the client group): PermissionDenied-like FailedPrecondition
// "daemon.client_group" when the daemon's user is not a member.
Status GiveToGroup(const std::string& path, gid_t gid);

}  // namespace weightd
