// raw_client.h — one client session over a raw ZeroMQ DEALER socket, speaking the protocol
// directly (no libweightd), for tests that drive the daemon message by message: several
// requests in flight, requests the library would never send, replies in any order.
//
// Header-only and free of GoogleTest, like the rest of tests/support. Not thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include <zmq.hpp>

#include "protocol.h"

namespace weightd::testing {

class RawClient {
 public:
  // Connects and sends Hello; hello_ok() tells whether a HelloReply came back.
  explicit RawClient(const std::string& endpoint, const std::string& name = "raw-test-client")
      : socket_(ctx_, zmq::socket_type::dealer) {
    socket_.set(zmq::sockopt::linger, 0);
    socket_.connect(endpoint);
    hello_ok_ = std::holds_alternative<proto::HelloReply>(Call(proto::Hello{name}).body);
  }

  bool hello_ok() const { return hello_ok_; }
  std::uint64_t NextId() { return next_id_++; }

  void Send(const proto::RequestBody& body, std::uint64_t id) {
    socket_.send(zmq::buffer(proto::EncodeRequest(proto::Request{id, body})));
  }
  // Sends with a fresh id, and returns it.
  std::uint64_t Send(const proto::RequestBody& body) {
    const std::uint64_t id = NextId();
    Send(body, id);
    return id;
  }
  // The next reply, or nullopt when none comes within `timeout` or it does not decode.
  std::optional<proto::Reply> Receive(std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, timeout) == 0) return std::nullopt;
    zmq::message_t msg;
    (void)socket_.recv(msg);
    auto r = proto::DecodeReply(msg.to_string_view());
    if (!r.ok()) return std::nullopt;
    return *r;
  }
  // Sends and waits for the reply. A missing or undecodable reply, or one for another request,
  // comes back as an ErrorReply with reason "test.no_reply", which every check then reports.
  proto::Reply Call(const proto::RequestBody& body) {
    const std::uint64_t id = Send(body);
    auto r = Receive();
    if (r && r->id == id) return *r;
    return proto::Reply{id, proto::ErrorReply{static_cast<std::uint8_t>(Code::kUnavailable),
                                              r ? "a reply to another request" : "no reply within 20 s", "test.no_reply"}};
  }

 private:
  zmq::context_t ctx_{1};
  zmq::socket_t socket_;
  std::uint64_t next_id_ = 1;
  bool hello_ok_ = false;
};

}  // namespace weightd::testing
