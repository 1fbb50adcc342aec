#include "fd_channel.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <thread>

namespace weightd::fdchan {

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::size_t kReplyHeader = 12;
constexpr std::size_t kContinuationHeader = 8;
constexpr char kKindReply = 'R';
constexpr char kKindContinuation = 'C';

Status Malformed(std::string m) { return InvalidArgument("fd channel: " + m, "fdchan.malformed"); }

void PutU32(std::string& s, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
std::uint32_t GetU32(std::string_view s, std::size_t at) {
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<std::uint32_t>(static_cast<unsigned char>(s[at + i])) << (8 * i);
  return v;
}

Result<sockaddr_un> Address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return InvalidArgument("fd channel path \"" + path + "\" is empty or longer than " +
                               std::to_string(sizeof(addr.sun_path) - 1) + " bytes",
                           "fdchan.bad_path");
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

Result<posix::Fd> Socket(const std::string& what) {
  int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return posix::ErrnoStatus("socket(AF_UNIX, SOCK_SEQPACKET) for " + what);
  return posix::Fd(fd);
}

int MillisLeft(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<long long>(left, 1 << 30));
}

// Waits for `events` until `deadline`; false when it passed.
Result<bool> WaitFor(int sock, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd p{sock, events, 0};
    int n = ::poll(&p, 1, MillisLeft(deadline));
    if (n < 0) {
      if (errno == EINTR) continue;
      return posix::ErrnoStatus("poll(fd channel)");
    }
    if (n == 0) return false;
    return true;
  }
}

Status Timeout(std::string_view what) {
  return DeadlineExceeded("fd channel: timed out " + std::string(what), "fdchan.timeout");
}

}  // namespace

namespace detail {

Status SendMessage(int sock, std::string_view data, std::span<const int> fds, Clock::time_point deadline) {
  if (fds.size() > kMaxFdsPerMessage)
    return InvalidArgument("fd channel: " + std::to_string(fds.size()) + " fds in one message (at most " +
                               std::to_string(kMaxFdsPerMessage) + ")",
                           "fdchan.too_many_fds");
  iovec iov{const_cast<char*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.assign(CMSG_SPACE(sizeof(int) * fds.size()), 0);
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) {
      if (static_cast<std::size_t>(n) != data.size()) return Internal("fd channel: short sendmsg on a SEQPACKET socket");
      return Status::Ok();
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      return posix::ErrnoStatus("sendmsg(fd channel, " + std::to_string(data.size()) + " bytes, " +
                                std::to_string(fds.size()) + " fds)");
    ASSIGN_OR_RETURN(bool ready, WaitFor(sock, POLLOUT, deadline));
    if (!ready) return Timeout("sending (the peer does not read)");
  }
}

Result<Message> RecvMessage(int sock, std::size_t max_bytes, std::size_t max_fds, Clock::time_point deadline) {
  // One byte more than allowed, so that an oversized message shows as MSG_TRUNC even when the
  // kernel reports the truncated length.
  std::string data(max_bytes + 1, '\0');
  std::vector<char> control(max_fds > 0 ? CMSG_SPACE(sizeof(int) * max_fds) : 0);
  for (;;) {
    iovec iov{data.data(), data.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.empty() ? nullptr : control.data();
    msg.msg_controllen = control.size();
    ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return posix::ErrnoStatus("recvmsg(fd channel)");
      ASSIGN_OR_RETURN(bool ready, WaitFor(sock, POLLIN, deadline));
      if (!ready) return Timeout("waiting for the peer");
      continue;
    }
    Message out;
    // Take ownership of every fd first, so that each error path below closes them.
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const unsigned char* p = CMSG_DATA(c);
      for (std::size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, p + i * sizeof(int), sizeof(int));
        out.fds.emplace_back(fd);
      }
    }
    if (msg.msg_flags & MSG_CTRUNC)
      return ResourceExhausted("fd channel: file descriptors were dropped (more than " + std::to_string(max_fds) +
                                   " in one message, or the process is out of fds); " +
                                   std::to_string(out.fds.size()) + " arrived and were closed",
                               "fdchan.fds_truncated");
    if ((msg.msg_flags & MSG_TRUNC) || static_cast<std::size_t>(n) > max_bytes)
      return Malformed("message longer than " + std::to_string(max_bytes) + " bytes");
    if (n == 0 && out.fds.empty())
      return Unavailable("fd channel: the peer closed the connection", "fdchan.peer_closed");
    data.resize(static_cast<std::size_t>(n));
    out.data = std::move(data);
    return out;
  }
}

}  // namespace detail

// ---- server -------------------------------------------------------------------------------------

Result<FdListener> FdListener::Bind(const std::string& path, mode_t mode, int backlog) {
  ASSIGN_OR_RETURN(sockaddr_un addr, Address(path));
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return FailedPrecondition("fd channel path " + path + " exists and is not a socket", "fdchan.in_use");
    // A socket file: live if something accepts on it, stale otherwise.
    ASSIGN_OR_RETURN(posix::Fd probe, Socket(path));
    if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0 || errno == EAGAIN)
      return FailedPrecondition("fd channel " + path + " is in use by another process", "fdchan.in_use");
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return posix::ErrnoStatus("unlink(stale " + path + ")");
  }
  ASSIGN_OR_RETURN(posix::Fd sock, Socket(path));
  // Linux creates the socket file with the socket inode's mode minus the umask, so setting the
  // mode before bind avoids both a window with wider permissions and touching the process umask.
  if (::fchmod(sock.get(), mode) != 0) return posix::ErrnoStatus("fchmod(fd channel socket)");
  if (::bind(sock.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0)
    return posix::ErrnoStatus("bind(" + path + ")");
  // A umask may have removed bits that were asked for.
  if (::lstat(path.c_str(), &st) != 0) return posix::ErrnoStatus("lstat(" + path + ")");
  if ((st.st_mode & 07777) != mode && ::chmod(path.c_str(), mode) != 0) return posix::ErrnoStatus("chmod(" + path + ")");
  if (::listen(sock.get(), backlog) != 0) return posix::ErrnoStatus("listen(" + path + ")");
  return FdListener(std::move(sock), path);
}

Result<std::optional<FdConnection>> FdListener::Accept() {
  for (;;) {
    int fd = ::accept4(sock_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EINTR) continue;
      // A connection that died before we accepted it is not our error.
      if (errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return std::optional<FdConnection>();
      return posix::ErrnoStatus("accept4(" + path_ + ")");
    }
    posix::Fd conn(fd);
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
      return posix::ErrnoStatus("getsockopt(" + path_ + ", SO_PEERCRED)");
    return std::optional<FdConnection>(FdConnection(std::move(conn), PeerCredentials{cred.uid, cred.gid, cred.pid}));
  }
}

Status FdListener::Unlink() const {
  if (path_.empty()) return Status::Ok();
  if (::unlink(path_.c_str()) != 0 && errno != ENOENT) return posix::ErrnoStatus("unlink(" + path_ + ")");
  return Status::Ok();
}

Result<std::optional<std::string>> FdConnection::TryReadToken() {
  if (!sock_.valid()) return FailedPrecondition("fd channel: connection is closed", "fdchan.closed");
  // A past deadline makes RecvMessage non-blocking. max_fds 0: fds a client sends us are
  // dropped by the kernel and reported as truncation.
  auto m = detail::RecvMessage(sock_.get(), 1 + kMaxTokenBytes, 0, Clock::time_point{});
  if (!m.ok()) {
    if (m.status().code() == Code::kDeadlineExceeded) return std::optional<std::string>();
    if (m.status().reason() == "fdchan.fds_truncated") return Malformed("the client sent file descriptors");
    return m.status();
  }
  const std::string& d = m->data;
  if (d.size() < 2) return Malformed("request without a token");
  if (static_cast<std::uint8_t>(d[0]) != kVersion)
    return InvalidArgument("fd channel: request version " + std::to_string(static_cast<std::uint8_t>(d[0])) +
                               ", expected " + std::to_string(kVersion),
                           "fdchan.version_mismatch");
  return std::optional<std::string>(d.substr(1));
}

Status FdConnection::SendReply(const Status& status, std::string_view payload, std::span<const int> fds,
                               std::chrono::milliseconds timeout) {
  if (!sock_.valid()) return FailedPrecondition("fd channel: connection is closed", "fdchan.closed");
  std::string body;
  if (status.ok()) {
    body = std::string(payload);
  } else {
    body = status.reason() + "\n" + status.message();
    fds = {};
  }
  if (body.size() > kMaxPayloadBytes) {
    if (!status.ok()) body.resize(kMaxPayloadBytes);
    else return InvalidArgument("fd channel: payload of " + std::to_string(body.size()) + " bytes (at most " +
                                    std::to_string(kMaxPayloadBytes) + ")",
                                "fdchan.payload_too_large");
  }
  if (fds.size() > kMaxFdsPerReply)
    return InvalidArgument("fd channel: " + std::to_string(fds.size()) + " fds in one reply (at most " +
                               std::to_string(kMaxFdsPerReply) + ")",
                           "fdchan.too_many_fds");
  const auto deadline = Clock::now() + timeout;
  std::string head;
  head.push_back(static_cast<char>(kVersion));
  head.push_back(kKindReply);
  head.push_back(static_cast<char>(status.code()));
  head.push_back('\0');
  PutU32(head, static_cast<std::uint32_t>(fds.size()));
  PutU32(head, static_cast<std::uint32_t>(body.size()));
  head += body;
  std::size_t first = std::min(fds.size(), kMaxFdsPerMessage);
  RETURN_IF_ERROR(detail::SendMessage(sock_.get(), head, fds.first(first), deadline));
  for (std::size_t at = first; at < fds.size(); at += kMaxFdsPerMessage) {
    std::size_t n = std::min(fds.size() - at, kMaxFdsPerMessage);
    std::string cont;
    cont.push_back(static_cast<char>(kVersion));
    cont.push_back(kKindContinuation);
    cont.append(2, '\0');
    PutU32(cont, static_cast<std::uint32_t>(at));
    RETURN_IF_ERROR(detail::SendMessage(sock_.get(), cont, fds.subspan(at, n), deadline));
  }
  return Status::Ok();
}

// ---- client -------------------------------------------------------------------------------------

Result<FdReply> FetchFds(const std::string& path, std::string_view token, std::chrono::milliseconds timeout,
                         std::size_t max_fds) {
  if (token.empty() || token.size() > kMaxTokenBytes)
    return InvalidArgument("fd channel token must be 1.." + std::to_string(kMaxTokenBytes) + " bytes",
                           "fdchan.bad_token");
  const auto deadline = Clock::now() + timeout;
  ASSIGN_OR_RETURN(sockaddr_un addr, Address(path));
  ASSIGN_OR_RETURN(posix::Fd sock, Socket(path));
  for (;;) {
    if (::connect(sock.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) break;
    if (errno == EINTR) continue;
    // A full backlog: the daemon is busy; retry until the deadline.
    if (errno == EAGAIN) {
      if (Clock::now() >= deadline) return Timeout("connecting to " + path);
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    Status s = posix::ErrnoStatus("connect(" + path + ")");
    if (errno == ENOENT || errno == ECONNREFUSED)
      return Unavailable("fd channel " + path + " is not listening: " + s.message(), "fdchan.unavailable");
    return s;
  }
  std::string req;
  req.push_back(static_cast<char>(kVersion));
  req.append(token);
  RETURN_IF_ERROR(detail::SendMessage(sock.get(), req, {}, deadline));

  ASSIGN_OR_RETURN(detail::Message first,
                   detail::RecvMessage(sock.get(), kReplyHeader + kMaxPayloadBytes, kMaxFdsPerMessage, deadline));
  const std::string& d = first.data;
  if (d.size() < kReplyHeader || static_cast<std::uint8_t>(d[0]) != kVersion || d[1] != kKindReply)
    return Malformed("bad reply header");
  const auto code = static_cast<std::uint8_t>(d[2]);
  const std::uint32_t fd_total = GetU32(d, 4);
  const std::uint32_t payload_len = GetU32(d, 8);
  if (payload_len != d.size() - kReplyHeader) return Malformed("reply payload length does not match");
  std::string payload = d.substr(kReplyHeader);
  if (code != 0) {
    if (code > static_cast<std::uint8_t>(Code::kDeadlineExceeded)) return Malformed("unknown status code");
    auto nl = payload.find('\n');
    std::string reason = nl == std::string::npos ? std::string() : payload.substr(0, nl);
    std::string message = nl == std::string::npos ? payload : payload.substr(nl + 1);
    return Status(static_cast<Code>(code), "daemon: " + message, reason);
  }
  if (fd_total > max_fds)
    return ResourceExhausted("fd channel: the daemon sends " + std::to_string(fd_total) + " fds, more than the " +
                                 std::to_string(max_fds) + " expected",
                             "fdchan.too_many_fds");
  FdReply out;
  out.payload = std::move(payload);
  out.fds = std::move(first.fds);
  if (out.fds.size() > fd_total) return Malformed("more fds than announced");
  while (out.fds.size() < fd_total) {
    ASSIGN_OR_RETURN(detail::Message m, detail::RecvMessage(sock.get(), kContinuationHeader, kMaxFdsPerMessage, deadline));
    if (m.data.size() != kContinuationHeader || static_cast<std::uint8_t>(m.data[0]) != kVersion ||
        m.data[1] != kKindContinuation || GetU32(m.data, 4) != out.fds.size() || m.fds.empty() ||
        out.fds.size() + m.fds.size() > fd_total)
      return Malformed("bad continuation message");
    for (auto& fd : m.fds) out.fds.push_back(std::move(fd));
  }
  return out;
}

}  // namespace weightd::fdchan
