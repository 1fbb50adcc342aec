// http.h — the loopback HTTP listener: /healthz, /readyz and /metrics.
//
// A thin wrapper over cpp-httplib, kept in its own translation unit (the header is large). The
// listener runs its own threads; every request is handed to `handler`, which the server answers
// from its loop thread. Only GET is served; anything else is 405.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "status_macros.h"
#include "thread_pool.h"

namespace weightd {

struct HttpResponse {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

class HttpServer {
 public:
  using Handler = std::function<HttpResponse(const std::string& path)>;

  // Binds `listen` ("HOST:PORT", as ParseHttpListen takes it) and starts serving. Unavailable
  // "http.bind_failed" when the address cannot be bound.
  static Result<std::unique_ptr<HttpServer>> Start(const std::string& listen, Handler handler);
  // The same, with `handler` run on the control loop: each request is handed to it with `post`,
  // and the listener's thread waits for the answer. A loop that does not answer within 2 s is
  // itself the health check's answer (503), and so is one that stops first.
  static Result<std::unique_ptr<HttpServer>> StartOnLoop(const std::string& listen, LoopPost post, Handler handler);
  ~HttpServer();

  // Stops listening and joins the threads; idempotent.
  void Stop();

 private:
  struct Impl;
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace weightd
