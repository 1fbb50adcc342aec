#include "http.h"

#include <chrono>
#include <future>

namespace weightd {

Result<std::unique_ptr<HttpServer>> HttpServer::StartOnLoop(const std::string& listen, LoopPost post, Handler handler) {
  return Start(listen, [post = std::move(post), handler = std::move(handler)](const std::string& path) {
    auto reply = std::make_shared<std::promise<HttpResponse>>();
    std::future<HttpResponse> answer = reply->get_future();
    post([handler, path, reply] {
      try {
        reply->set_value(handler(path));
      } catch (const std::exception& e) {
        reply->set_value(HttpResponse{500, "text/plain", std::string("internal error: ") + e.what() + "\n"});
      }
    });
    if (answer.wait_for(std::chrono::seconds(2)) != std::future_status::ready)
      return HttpResponse{503, "text/plain", "the daemon's loop did not answer within 2 s\n"};
    try {
      return answer.get();
    } catch (const std::future_error&) {
      return HttpResponse{503, "text/plain", "the daemon is stopping\n"};
    }
  });
}

}  // namespace weightd

#if WEIGHTD_WITH_HTTP

#include <thread>

#include <httplib.h>

#include "config.h"

namespace weightd {

struct HttpServer::Impl {
  httplib::Server server;
  std::thread thread;
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { Stop(); }

void HttpServer::Stop() {
  if (!impl_) return;
  impl_->server.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_.reset();
}

Result<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& listen, Handler handler) {
  ASSIGN_OR_RETURN(HttpListen at, ParseHttpListen(listen));

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

  if (!impl->server.bind_to_port(at.host.c_str(), at.port))
    return Unavailable("cannot listen for HTTP on " + listen + " (address in use, or not a local address?)", "http.bind_failed");
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->server.listen_after_bind(); });
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

}  // namespace weightd

#else  // !WEIGHTD_WITH_HTTP

namespace weightd {

struct HttpServer::Impl {};
HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpServer::~HttpServer() = default;
void HttpServer::Stop() {}

Result<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& listen, Handler) {
  return FailedPrecondition("daemon.http_listen is " + listen +
                                ", but this weightd was built without cpp-httplib (WEIGHTD_WITH_HTTP=OFF): no HTTP listener",
                            "http.unsupported");
}

}  // namespace weightd

#endif
