#include "control_socket.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include <spdlog/spdlog.h>

namespace weightd {
namespace {

// A control connection must finish its ZMTP handshake within this (ZMQ_HANDSHAKE_IVL).
constexpr std::chrono::milliseconds kHandshakeTimeout{5'000};
#ifdef ZMQ_ZAP_ENFORCE_DOMAIN
constexpr int kZmqZapEnforceDomain = ZMQ_ZAP_ENFORCE_DOMAIN;
#else
constexpr int kZmqZapEnforceDomain = 93;  // zmq.h's value, hidden behind ZMQ_BUILD_DRAFT_API
#endif

// An exclusive, non-blocking flock on a file; released when the process exits.
Result<posix::Fd> LockFile(const std::string& path, const std::string& what) {
  ASSIGN_OR_RETURN(posix::Fd fd, posix::Open(path, O_RDWR | O_CREAT | O_NOFOLLOW, 0600));
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK)
      return FailedPrecondition("another weightd instance holds " + what + " (" + path + ")", "daemon.instance_locked");
    return posix::ErrnoStatus("flock(" + path + ")");
  }
  return fd;
}

}  // namespace

Status GiveToGroup(const std::string& path, gid_t gid) {
  if (::chown(path.c_str(), static_cast<uid_t>(-1), gid) == 0) return Status::Ok();
  return FailedPrecondition("giving " + path + " to the client group (gid " + std::to_string(gid) + "): " +
                                std::strerror(errno) + "; the daemon's user must be a member of daemon.client_group",
                            "daemon.client_group");
}

Status ControlSocket::Lock(const DaemonConfig& config, gid_t client_gid) {
  const std::string socket_path = config.socket.substr(std::string("ipc://").size());
  // The socket directory: created private to the daemon's group if missing.
  std::filesystem::path dir = std::filesystem::path(socket_path).parent_path();
  if (!dir.empty()) {
    std::error_code ec;
    if (!std::filesystem::exists(dir, ec)) {
      std::filesystem::create_directories(dir, ec);
      if (ec) return posix::ErrnoStatus("creating socket directory " + dir.string(), ec.value());
      ::chmod(dir.c_str(), 0750);
      RETURN_IF_ERROR(GiveToGroup(dir.string(), client_gid));
    }
  }
  RETURN_IF_ERROR(auth::CheckSocketPaths(dir.empty() ? std::string(".") : dir.string(),
                                         {socket_path, socket_path + ".lock", config.fd_socket}));
  ASSIGN_OR_RETURN(lock_, LockFile(socket_path + ".lock", "the socket " + socket_path));
  return Status::Ok();
}

Status ControlSocket::Bind(const DaemonConfig& config, gid_t client_gid) {
  const std::string socket_path = config.socket.substr(std::string("ipc://").size());
  try {
    router_ = zmq::socket_t(ctx_, zmq::socket_type::router);
    // Every connection passes the ZAP handler, which stamps it with the peer's credentials; with
    // enforcement, no handler means no connection (fail closed).
    router_.set(zmq::sockopt::zap_domain, "weightd");
    // ZMQ_ZAP_ENFORCE_DOMAIN is a draft option in libzmq 4.3 (93 there). Where the library lacks
    // it, a missing handler would let connections through unstamped, and the server refuses
    // every message without the handler's User-Id: closed either way.
    const int enforce = 1;
    if (zmq_setsockopt(router_.handle(), kZmqZapEnforceDomain, &enforce, sizeof enforce) != 0)
      spdlog::info("libzmq lacks ZMQ_ZAP_ENFORCE_DOMAIN ({}); unstamped messages are refused instead",
                   zmq_strerror(zmq_errno()));
    router_.set(zmq::sockopt::linger, 0);
    router_.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(config.max_message_size));
    router_.set(zmq::sockopt::router_mandatory, 1);
    router_.set(zmq::sockopt::sndhwm, 1000);
    router_.set(zmq::sockopt::rcvhwm, 1000);
    // A connection that does not finish its ZMTP handshake (a half-open one) is dropped after
    // this long (libzmq's default is 30 s).
    router_.set(zmq::sockopt::handshake_ivl, static_cast<int>(kHandshakeTimeout.count()));
  } catch (const zmq::error_t& e) {
    return Internal("setting up the socket " + config.socket + ": " + e.what(), "daemon.bind_failed");
  }
  // The handler, and its count of each user's connections, must be up before the first one.
  ASSIGN_OR_RETURN(zap_, auth::ZapHandler::Start(ctx_, router_, socket_path, config.max_connections_per_user));
  try {
    ::unlink(socket_path.c_str());  // stale socket of a dead instance: we hold its lock
    router_.bind(config.socket);
  } catch (const zmq::error_t& e) {
    return Unavailable("binding " + config.socket + ": " + e.what(), "daemon.bind_failed");
  }
  ::chmod(socket_path.c_str(), 0660);
  return GiveToGroup(socket_path, client_gid);
}

void ControlSocket::Receive(unsigned max,
                            const std::function<void(const std::string& routing_id, zmq::message_t& payload)>& handle,
                            const std::function<void(const std::string& routing_id)>& refuse) {
  for (unsigned n = 0; n < max; ++n) {
    zmq::message_t id, payload;
    try {
      if (!router_.recv(id, zmq::recv_flags::dontwait)) return;
      bool more = id.more();
      if (!more) continue;  // a bare routing id cannot happen; ignore
      (void)router_.recv(payload, zmq::recv_flags::none);
      if (payload.more()) {
        // Extra frames: drain them and refuse the whole message.
        zmq::message_t extra;
        do (void)router_.recv(extra, zmq::recv_flags::none);
        while (extra.more());
        refuse(id.to_string());
        continue;
      }
    } catch (const zmq::error_t& e) {
      spdlog::warn("receive failed: {}", e.what());
      return;
    }
    handle(id.to_string(), payload);
  }
}

bool ControlSocket::Send(const std::string& rid, const std::string& frame) {
  try {
    if (router_.send(zmq::buffer(rid), zmq::send_flags::sndmore | zmq::send_flags::dontwait))
      return router_.send(zmq::buffer(frame), zmq::send_flags::dontwait).has_value();
  } catch (const zmq::error_t& e) {
    // EHOSTUNREACH: the peer disconnected. Its session ends by pidfd or heartbeat.
    spdlog::debug("reply to a departed peer dropped: {}", e.what());
  }
  return false;
}

}  // namespace weightd
