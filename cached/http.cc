#include "http.h"

#if WEIGHTD_WITH_HTTP

#include <thread>

#include <httplib.h>

namespace weightd {

struct HttpServer::Impl {
  httplib::Server server;
  std::thread thread;
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl, int port) : impl_(std::move(impl)), port_(port) {}

HttpServer::~HttpServer() { Stop(); }

void HttpServer::Stop() {
  if (!impl_) return;
  impl_->server.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_.reset();
}

Result<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& listen, Handler handler) {
  const auto colon = listen.rfind(':');
  if (colon == std::string::npos) return InvalidArgument("http listen address must be HOST:PORT", "config.bad_listen");
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  const int port = std::atoi(listen.c_str() + colon + 1);

  auto impl = std::make_unique<Impl>();
  // Scrapes are small and rare: a few threads are plenty, and bound what a flood can take.
  impl->server.new_task_queue = [] { return new httplib::ThreadPool(2); };
  impl->server.set_read_timeout(5, 0);
  impl->server.set_write_timeout(5, 0);
  impl->server.set_keep_alive_max_count(10);
  impl->server.set_payload_max_length(4096);
  impl->server.Get(".*", [handler](const httplib::Request& req, httplib::Response& res) {
    HttpResponse r = handler(req.path);
    res.status = r.status;
    res.set_content(r.body, r.content_type.c_str());
  });
  auto not_allowed = [](const httplib::Request&, httplib::Response& res) {
    res.status = 405;
    res.set_content("only GET is served\n", "text/plain");
  };
  impl->server.Post(".*", not_allowed);
  impl->server.Put(".*", not_allowed);
  impl->server.Delete(".*", not_allowed);

  int bound = port;
  if (port == 0) bound = impl->server.bind_to_any_port(host.c_str());
  else if (!impl->server.bind_to_port(host.c_str(), port)) bound = -1;
  if (bound <= 0)
    return Unavailable("cannot listen for HTTP on " + listen + " (address in use, or not a local address?)", "http.bind_failed");
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->server.listen_after_bind(); });
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl), bound));
}

}  // namespace weightd

#else  // !WEIGHTD_WITH_HTTP

namespace weightd {

struct HttpServer::Impl {};
HttpServer::HttpServer(std::unique_ptr<Impl> impl, int port) : impl_(std::move(impl)), port_(port) {}
HttpServer::~HttpServer() = default;
void HttpServer::Stop() {}

Result<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& listen, Handler) {
  return FailedPrecondition("daemon.http_listen is " + listen +
                                ", but this weightd was built without cpp-httplib (WEIGHTD_WITH_HTTP=OFF): no HTTP listener",
                            "http.unsupported");
}

}  // namespace weightd

#endif
