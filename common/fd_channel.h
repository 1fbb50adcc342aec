// fd_channel.h — the side channel that carries file descriptors (CUDA VMM exports) from the
// daemon to a client. ZeroMQ cannot pass fds, so this is a plain AF_UNIX SOCK_SEQPACKET socket
// beside the ZeroMQ one. A client proves which ZeroMQ session it belongs to with a one-time
// token that the daemon handed out in the manifest; the daemon also compares the connection's
// SO_PEERCRED with the session's peer credentials. Validating the token is the server's job;
// this module moves bytes, credentials and fds.
//
// Wire format (version 1; one message per SEQPACKET record, little-endian):
//   request:       u8 version=1, then the token (1..kMaxTokenBytes bytes)
//   reply:         u8 version, u8 'R', u8 code (weightd::Code), u8 0, u32 fd_total, u32 payload_len,
//                  payload (for an error: "<reason>\n<message>"); up to kMaxFdsPerMessage fds
//   continuation:  u8 version, u8 'C', u16 0, u32 index of its first fd; 1..kMaxFdsPerMessage fds
//
// Contract:
//  - FdListener and FdConnection are move-only RAII owners of their sockets; destructors close
//    and never unlink. Neither blocks, except SendReply when the peer's queue is full (bounded
//    by its timeout), so both are safe to drive from the daemon's poll loop. Not thread-safe:
//    one owner thread each.
//  - FetchFds (client) blocks for at most its timeout. Every fd it returns is close-on-exec and
//    owned by the caller; on any error every fd that did arrive is closed.
//  - Nothing read from the socket is trusted: sizes are bounded, truncation (MSG_TRUNC,
//    MSG_CTRUNC) is an error, and fds a client tries to send to the daemon are discarded.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "posix.h"
#include "status_macros.h"

namespace weightd::fdchan {

inline constexpr std::uint8_t kVersion = 1;
inline constexpr std::size_t kMaxTokenBytes = 64;
inline constexpr std::size_t kMaxFdsPerMessage = 250;  // the kernel's SCM_MAX_FD is 253
inline constexpr std::size_t kMaxFdsPerReply = 8192;
inline constexpr std::size_t kMaxPayloadBytes = 16 * 1024;

struct PeerCredentials {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
};

// Server side of one accepted connection.
class FdConnection {
 public:
  FdConnection() = default;
  FdConnection(FdConnection&&) noexcept = default;
  FdConnection& operator=(FdConnection&&) noexcept = default;

  int fd() const { return sock_.get(); }  // poll for POLLIN
  const PeerCredentials& peer() const { return peer_; }

  // Non-blocking. nullopt while the request has not arrived. Unavailable "fdchan.peer_closed"
  // when the peer hung up, InvalidArgument "fdchan.malformed" for a bad request.
  Result<std::optional<std::string>> TryReadToken();

  // Sends `status` (OK: `payload` and `fds`; error: its reason and message, no fds). Waits at
  // most `timeout` in total when the peer does not drain its queue (DeadlineExceeded). The fds
  // are duplicated into the message; the caller keeps (and closes) its own.
  Status SendReply(const Status& status, std::string_view payload, std::span<const int> fds,
                   std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));

 private:
  friend class FdListener;
  FdConnection(posix::Fd sock, PeerCredentials peer) : sock_(std::move(sock)), peer_(peer) {}
  posix::Fd sock_;
  PeerCredentials peer_;
};

class FdListener {
 public:
  // Binds `path` with permissions `mode` (owner and group may connect by default). A stale
  // socket file at `path` is replaced; a live one (something accepts connections) is
  // FailedPrecondition "fdchan.in_use"; a non-socket file there is FailedPrecondition too.
  static Result<FdListener> Bind(const std::string& path, mode_t mode = 0660, int backlog = 64);

  FdListener() = default;
  FdListener(FdListener&&) noexcept = default;
  FdListener& operator=(FdListener&&) noexcept = default;

  int fd() const { return sock_.get(); }  // poll for POLLIN
  const std::string& path() const { return path_; }

  // Non-blocking: nullopt when no connection is pending.
  Result<std::optional<FdConnection>> Accept();
  // Removes the socket file (the owner's explicit step at shutdown).
  Status Unlink() const;

 private:
  FdListener(posix::Fd sock, std::string path) : sock_(std::move(sock)), path_(std::move(path)) {}
  posix::Fd sock_;
  std::string path_;
};

struct FdReply {
  std::string payload;
  std::vector<posix::Fd> fds;
};

// Client: connects to `path`, sends `token`, and returns the daemon's payload and fds. A reply
// carrying an error becomes that Status. DeadlineExceeded "fdchan.timeout" after `timeout`;
// ResourceExhausted "fdchan.too_many_fds" when the daemon announces more than `max_fds`.
Result<FdReply> FetchFds(const std::string& path, std::string_view token, std::chrono::milliseconds timeout,
                         std::size_t max_fds = kMaxFdsPerReply);

// Low-level message I/O, exposed for tests.
namespace detail {
struct Message {
  std::string data;
  std::vector<posix::Fd> fds;
};
// One sendmsg with at most kMaxFdsPerMessage fds; returns DeadlineExceeded if the socket stays
// full past `deadline`.
Status SendMessage(int sock, std::string_view data, std::span<const int> fds,
                   std::chrono::steady_clock::time_point deadline);
// One recvmsg of at most `max_bytes` and `max_fds`, waiting until `deadline`. Fds arrive
// close-on-exec. A message or control data that did not fit is an error (and the fds that did
// arrive are closed): InvalidArgument "fdchan.malformed" for data, ResourceExhausted
// "fdchan.fds_truncated" for fds. Unavailable "fdchan.peer_closed" at end of stream.
Result<Message> RecvMessage(int sock, std::size_t max_bytes, std::size_t max_fds,
                            std::chrono::steady_clock::time_point deadline);
}  // namespace detail

}  // namespace weightd::fdchan
