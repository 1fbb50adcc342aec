// The fd side channel over real AF_UNIX SEQPACKET sockets.
#include "fd_channel.h"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <optional>
#include <cstring>
#include <thread>

namespace weightd::fdchan {
namespace {

using namespace std::chrono_literals;

std::string SocketPath(const char* name) {
  return "/tmp/weightd-fdchan-" + std::to_string(::getpid()) + "-" + name + ".sock";
}

posix::Fd MemfdWith(const std::string& content) {
  int fd = ::memfd_create("fdchan-test", MFD_CLOEXEC);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(::write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
  return posix::Fd(fd);
}

std::string ReadAll(int fd) {
  std::string out(4096, '\0');
  ssize_t n = ::pread(fd, out.data(), out.size(), 0);
  out.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
  return out;
}

int OpenFdCount() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  while (dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') ++n;
  ::closedir(d);
  return n - 1;  // the DIR's own fd
}

// Serves one connection on a thread: waits for its token, records it and the peer, replies.
struct Server {
  explicit Server(FdListener& l) : listener(l) {}
  FdListener& listener;
  std::string token;
  PeerCredentials peer;
  Status error;

  void ServeOne(const std::function<Status(FdConnection&)>& reply) {
    auto deadline = std::chrono::steady_clock::now() + 5s;
    std::optional<FdConnection> conn;
    while (!conn && std::chrono::steady_clock::now() < deadline) {
      pollfd p{listener.fd(), POLLIN, 0};
      ::poll(&p, 1, 50);
      auto a = listener.Accept();
      if (!a.ok()) { error = a.status(); return; }
      if (a->has_value()) conn = std::move(**a);
    }
    if (!conn) { error = DeadlineExceeded("no connection"); return; }
    peer = conn->peer();
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{conn->fd(), POLLIN, 0};
      ::poll(&p, 1, 50);
      auto t = conn->TryReadToken();
      if (!t.ok()) { error = t.status(); return; }
      if (t->has_value()) {
        token = **t;
        error = reply(*conn);
        return;
      }
    }
    error = DeadlineExceeded("no token");
  }
};

TEST(FdChannel, PassesMemfdsWithPayloadAndPeerCredentials) {
  auto listener = FdListener::Bind(SocketPath("basic"));
  ASSERT_TRUE(listener.ok()) << listener.status().ToString();
  struct stat st {};
  ASSERT_EQ(::stat(listener->path().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0660u);

  posix::Fd a = MemfdWith("alpha"), b = MemfdWith("bravo-bravo");
  Server server(*listener);
  std::thread t([&] {
    server.ServeOne([&](FdConnection& c) {
      int fds[] = {a.get(), b.get()};
      return c.SendReply(Status::Ok(), "manifest-bits", fds);
    });
  });
  auto reply = FetchFds(listener->path(), "tok-123", 5s);
  t.join();
  ASSERT_TRUE(server.error.ok()) << server.error.ToString();
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(server.token, "tok-123");
  EXPECT_EQ(server.peer.uid, ::getuid());
  EXPECT_EQ(server.peer.gid, ::getgid());
  EXPECT_EQ(server.peer.pid, ::getpid());
  EXPECT_EQ(reply->payload, "manifest-bits");
  ASSERT_EQ(reply->fds.size(), 2u);
  EXPECT_EQ(ReadAll(reply->fds[0].get()), "alpha");
  EXPECT_EQ(ReadAll(reply->fds[1].get()), "bravo-bravo");
  EXPECT_NE(reply->fds[0].get(), a.get());
  EXPECT_TRUE(::fcntl(reply->fds[0].get(), F_GETFD) & FD_CLOEXEC);
  EXPECT_TRUE(listener->Unlink().ok());
  EXPECT_NE(::access(listener->path().c_str(), F_OK), 0);
}

TEST(FdChannel, ReportsPeerCredentialsOfAnotherProcess) {
  auto listener = FdListener::Bind(SocketPath("child"));
  ASSERT_TRUE(listener.ok());
  posix::Fd a = MemfdWith("from-parent");
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto r = FetchFds(listener->path(), "child-token", 5s);
    ::_exit(r.ok() && r->fds.size() == 1 && ReadAll(r->fds[0].get()) == "from-parent" ? 0 : 1);
  }
  Server server(*listener);
  server.ServeOne([&](FdConnection& c) {
    int fds[] = {a.get()};
    return c.SendReply(Status::Ok(), "", fds);
  });
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(server.error.ok()) << server.error.ToString();
  EXPECT_EQ(server.peer.pid, pid);
  EXPECT_EQ(server.token, "child-token");
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  (void)listener->Unlink();
}

TEST(FdChannel, SplitsManyFdsOverSeveralMessages) {
  auto listener = FdListener::Bind(SocketPath("many"));
  ASSERT_TRUE(listener.ok());
  std::vector<posix::Fd> own;
  std::vector<int> raw;
  for (int i = 0; i < 260; ++i) {
    own.push_back(MemfdWith("fd-" + std::to_string(i)));
    raw.push_back(own.back().get());
  }
  Server server(*listener);
  std::thread t([&] { server.ServeOne([&](FdConnection& c) { return c.SendReply(Status::Ok(), "x", raw); }); });
  auto reply = FetchFds(listener->path(), "t", 5s);
  t.join();
  ASSERT_TRUE(server.error.ok()) << server.error.ToString();
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  ASSERT_EQ(reply->fds.size(), 260u);
  for (int i : {0, 249, 250, 259}) EXPECT_EQ(ReadAll(reply->fds[i].get()), "fd-" + std::to_string(i));
  (void)listener->Unlink();
}

TEST(FdChannel, ClientRefusesMoreFdsThanExpectedAndLeaksNone) {
  auto listener = FdListener::Bind(SocketPath("toomany"));
  ASSERT_TRUE(listener.ok());
  posix::Fd a = MemfdWith("a");
  std::vector<int> raw(5, a.get());
  const int before = OpenFdCount();
  Server server(*listener);
  std::thread t([&] { server.ServeOne([&](FdConnection& c) { return c.SendReply(Status::Ok(), "", raw); }); });
  auto reply = FetchFds(listener->path(), "t", 5s, /*max_fds=*/3);
  t.join();
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), Code::kResourceExhausted);
  EXPECT_EQ(reply.status().reason(), "fdchan.too_many_fds");
  EXPECT_EQ(OpenFdCount(), before);
  (void)listener->Unlink();
}

TEST(FdChannel, ServerRefusesOversizedReplies) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  posix::Fd s0(sv[0]), s1(sv[1]);
  std::vector<int> raw(kMaxFdsPerMessage + 1, s0.get());
  EXPECT_EQ(detail::SendMessage(s0.get(), "x", raw, std::chrono::steady_clock::now() + 1s).reason(),
            "fdchan.too_many_fds");
}

TEST(FdChannel, TruncatedControlMessageClosesWhatArrived) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  posix::Fd s0(sv[0]), s1(sv[1]);
  posix::Fd a = MemfdWith("a");
  std::vector<int> raw(6, a.get());
  const int before = OpenFdCount();
  ASSERT_TRUE(detail::SendMessage(s0.get(), "hdr", raw, std::chrono::steady_clock::now() + 1s).ok());
  auto m = detail::RecvMessage(s1.get(), 16, 2, std::chrono::steady_clock::now() + 1s);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kResourceExhausted);
  EXPECT_EQ(m.status().reason(), "fdchan.fds_truncated");
  EXPECT_EQ(OpenFdCount(), before);
}

TEST(FdChannel, OversizedDataIsMalformed) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  posix::Fd s0(sv[0]), s1(sv[1]);
  ASSERT_TRUE(detail::SendMessage(s0.get(), std::string(100, 'x'), {}, std::chrono::steady_clock::now() + 1s).ok());
  auto m = detail::RecvMessage(s1.get(), 10, 0, std::chrono::steady_clock::now() + 1s);
  EXPECT_EQ(m.status().reason(), "fdchan.malformed");
}

TEST(FdChannel, ServerDropsFdsAClientSends) {
  auto listener = FdListener::Bind(SocketPath("clientfds"));
  ASSERT_TRUE(listener.ok());
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, listener->path().c_str());
  posix::Fd c(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(c.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  posix::Fd a = MemfdWith("a");
  int raw[] = {a.get()};
  ASSERT_TRUE(detail::SendMessage(c.get(), std::string("\x01tok", 4), raw, std::chrono::steady_clock::now() + 1s).ok());
  auto conn = listener->Accept();
  ASSERT_TRUE(conn.ok() && conn->has_value());
  const int before = OpenFdCount();
  auto t = (*conn)->TryReadToken();
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().reason(), "fdchan.malformed");
  EXPECT_EQ(OpenFdCount(), before);
  (void)listener->Unlink();
}

TEST(FdChannel, ErrorRepliesBecomeStatuses) {
  auto listener = FdListener::Bind(SocketPath("error"));
  ASSERT_TRUE(listener.ok());
  Server server(*listener);
  std::thread t([&] {
    server.ServeOne([&](FdConnection& c) {
      return c.SendReply(PermissionDenied("token does not match the session", "fdchan.bad_token"), "", {});
    });
  });
  auto reply = FetchFds(listener->path(), "wrong", 5s);
  t.join();
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), Code::kPermissionDenied);
  EXPECT_EQ(reply.status().reason(), "fdchan.bad_token");
  EXPECT_NE(reply.status().message().find("token does not match"), std::string::npos);
  (void)listener->Unlink();
}

TEST(FdChannel, SilentClientDoesNotBlockTheServer) {
  auto listener = FdListener::Bind(SocketPath("silent"));
  ASSERT_TRUE(listener.ok());
  // Nothing pending: Accept returns at once.
  auto none = listener->Accept();
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, listener->path().c_str());
  posix::Fd silent(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(silent.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  auto conn = listener->Accept();
  ASSERT_TRUE(conn.ok());
  ASSERT_TRUE(conn->has_value());
  // The silent client has said nothing: TryReadToken returns "not yet" instead of blocking.
  auto t = (*conn)->TryReadToken();
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_FALSE(t->has_value());

  // Meanwhile a well-behaved client is served.
  posix::Fd a = MemfdWith("served");
  Server server(*listener);
  std::thread th([&] {
    server.ServeOne([&](FdConnection& c) {
      int fds[] = {a.get()};
      return c.SendReply(Status::Ok(), "", fds);
    });
  });
  auto reply = FetchFds(listener->path(), "good", 5s);
  th.join();
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(ReadAll(reply->fds[0].get()), "served");

  // The silent client hangs up: the server learns it without blocking.
  silent.reset();
  auto gone = (*conn)->TryReadToken();
  ASSERT_FALSE(gone.ok());
  EXPECT_EQ(gone.status().reason(), "fdchan.peer_closed");
  (void)listener->Unlink();
}

TEST(FdChannel, ClientTimesOutOnASilentServer) {
  auto listener = FdListener::Bind(SocketPath("timeout"));
  ASSERT_TRUE(listener.ok());
  // The listener never accepts; the kernel queues the connection and the request.
  auto reply = FetchFds(listener->path(), "t", 100ms);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), Code::kDeadlineExceeded);
  EXPECT_EQ(reply.status().reason(), "fdchan.timeout");
  (void)listener->Unlink();
}

TEST(FdChannel, BindReplacesStaleSocketButNotLiveOneOrAFile) {
  const std::string path = SocketPath("stale");
  {
    auto first = FdListener::Bind(path);
    ASSERT_TRUE(first.ok());
    auto second = FdListener::Bind(path);
    ASSERT_FALSE(second.ok());
    EXPECT_EQ(second.status().reason(), "fdchan.in_use");
  }
  // The first listener is closed but its file remains: stale, replaced.
  ASSERT_EQ(::access(path.c_str(), F_OK), 0);
  auto third = FdListener::Bind(path);
  ASSERT_TRUE(third.ok()) << third.status().ToString();
  (void)third->Unlink();

  const std::string file = SocketPath("regular");
  posix::Fd f(::open(file.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
  auto onfile = FdListener::Bind(file);
  ASSERT_FALSE(onfile.ok());
  EXPECT_EQ(onfile.status().code(), Code::kFailedPrecondition);
  ::unlink(file.c_str());

  EXPECT_EQ(FdListener::Bind(std::string(200, 'x')).status().reason(), "fdchan.bad_path");
  EXPECT_EQ(FetchFds(SocketPath("nobody"), "t", 100ms).status().reason(), "fdchan.unavailable");
  EXPECT_EQ(FetchFds(path, std::string(65, 't'), 100ms).status().reason(), "fdchan.bad_token");
}

}  // namespace
}  // namespace weightd::fdchan
