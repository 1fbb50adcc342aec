// libFuzzer target for the protocol decoder (common/protocol.cc): DecodeRequest and
// DecodeReply, which the daemon and the clients run on every message a peer sends.
//
// Each input is decoded as a Request and as a Reply, twice: as a whole frame (so the frame
// header checks are exercised), and, unless it already starts with the magic, as the payload
// of a frame of our version (so mutations are not wasted on the 8-byte header). The seeds in
// tests/fuzz/corpus/protocol are whole frames, written by protocol_corpus_gen.
//
// Besides the sanitizers, two properties are checked; a violation aborts (a finding):
//  - a failure is InvalidArgument with one of the decoder's own reasons, never anything else
//    (an exception escaping, a different code);
//  - a success re-encodes to exactly the input: the wire format is canonical, so anything the
//    decoder accepts but the encoder would write differently is a decoder/encoder mismatch.
// The decoder must also never allocate more than a small multiple of the input (a length
// field trusted); scripts/fuzz.sh runs this target with a low -malloc_limit_mb for that, and
// tests/protocol_test.cc measures it exactly.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "protocol.h"

namespace {

namespace proto = weightd::proto;

void Check(bool ok) {
  if (!ok) std::abort();
}

void CheckFailure(const weightd::Status& s) {
  Check(s.code() == weightd::Code::kInvalidArgument);
  Check(s.reason() == "protocol.bad_frame" || s.reason() == "protocol.version_mismatch" ||
        s.reason() == "protocol.malformed");
}

void DecodeFrame(std::string_view frame) {
  if (auto r = proto::DecodeRequest(frame); r.ok()) {
    auto v = proto::PeekVersion(frame);
    Check(v.ok());
    Check(proto::EncodeRequest(*r, *v) == frame);
  } else {
    CheckFailure(r.status());
  }
  if (auto r = proto::DecodeReply(frame); r.ok()) {
    // EncodeReply always writes our own minor version; compare the header's magic and major
    // and the payload (a peer's minor may differ within the same major).
    const std::string again = proto::EncodeReply(*r);
    Check(again.size() == frame.size());
    Check(std::memcmp(again.data(), frame.data(), 6) == 0);
    Check(std::string_view(again).substr(proto::kFrameHeaderSize) == frame.substr(proto::kFrameHeaderSize));
  } else {
    CheckFailure(r.status());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  DecodeFrame(input);
  if (input.substr(0, 4) != std::string_view("WTD\0", 4)) {
    std::string frame("WTD\0", 4);
    frame.push_back(static_cast<char>(proto::kVersionMajor & 0xff));
    frame.push_back(static_cast<char>(proto::kVersionMajor >> 8));
    frame.push_back(static_cast<char>(proto::kVersionMinor & 0xff));
    frame.push_back(static_cast<char>(proto::kVersionMinor >> 8));
    frame.append(input);
    DecodeFrame(frame);
  }
  return 0;
}
