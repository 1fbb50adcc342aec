// The protocol decoder against hostile input: round trips of every message type, length fields
// that lie, and the decoder's memory bound, measured.
//
// The bound (common/protocol.h): no length field may make the decoder allocate more than a
// small multiple of the frame. Strings matter as much as vectors: cereal's string loader
// resizes the string to the claimed size before reading a byte, so without the archive's
// size-tag check a 40-byte frame claiming a 1 GiB string would allocate 1 GiB. This file
// replaces the global operator new to count what decoding allocates, so a regression shows up
// as a number, not as an out-of-memory kill (or, for absurd sizes, as a bad_alloc the decoder
// would quietly turn into "malformed").
//
// The checked-in fuzz seeds (tests/fuzz/corpus/protocol) are also checked here: each decodes,
// or fails, as its name says.
#include "protocol.h"

#include <malloc.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <new>
#include <sstream>

#include <gtest/gtest.h>

// ---- allocation accounting ------------------------------------------------------------------
// Only allocations made while g_counting is set are counted; malloc_usable_size lets operator
// delete subtract what operator new added without a size header.
namespace {
std::atomic<bool> g_counting{false};
std::atomic<long long> g_live{0}, g_peak{0}, g_largest{0};

void* CountedAlloc(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) {
    long long largest = g_largest.load();
    while (static_cast<long long>(n) > largest && !g_largest.compare_exchange_weak(largest, static_cast<long long>(n))) {
    }
  }
  void* p = std::malloc(n == 0 ? 1 : n);
  if (p == nullptr) return nullptr;
  if (g_counting.load(std::memory_order_relaxed)) {
    const long long live = g_live += static_cast<long long>(malloc_usable_size(p));
    long long peak = g_peak.load();
    while (live > peak && !g_peak.compare_exchange_weak(peak, live)) {
    }
  }
  return p;
}
void CountedFree(void* p) noexcept {
  if (p == nullptr) return;
  if (g_counting.load(std::memory_order_relaxed)) g_live -= static_cast<long long>(malloc_usable_size(p));
  std::free(p);
}
}  // namespace

void* operator new(std::size_t n) {
  if (void* p = CountedAlloc(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  if (void* p = CountedAlloc(n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return CountedAlloc(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return CountedAlloc(n); }
void operator delete(void* p) noexcept { CountedFree(p); }
void operator delete[](void* p) noexcept { CountedFree(p); }
void operator delete(void* p, std::size_t) noexcept { CountedFree(p); }
void operator delete[](void* p, std::size_t) noexcept { CountedFree(p); }

namespace weightd::proto {
namespace {

namespace fs = std::filesystem;

struct Usage {
  long long peak = 0;     // the most bytes live at once during the decode
  long long largest = 0;  // the largest single allocation requested
};

// Decodes `frame` as a request and as a reply and reports the worse of the two.
Usage MeasureDecode(std::string_view frame) {
  Usage worst;
  for (int kind = 0; kind < 2; ++kind) {
    g_live = 0;
    g_peak = 0;
    g_largest = 0;
    g_counting = true;
    if (kind == 0) (void)DecodeRequest(frame);
    else (void)DecodeReply(frame);
    g_counting = false;
    worst.peak = std::max(worst.peak, g_peak.load());
    worst.largest = std::max(worst.largest, g_largest.load());
  }
  return worst;
}

// What the decoder may use for a frame of n bytes: decoded structs are larger than their
// encoding (a 300-byte ModelStatus from ~100 bytes of wire, vectors at up to twice their
// size while growing), so a generous constant factor, plus a fixed allowance for the small
// objects every decode makes. A trusted length field exceeds this by orders of magnitude.
long long Allowance(std::size_t n) { return 16 * static_cast<long long>(n) + 16 * 1024; }

ModelStatus SomeModel() {
  ModelStatus m;
  m.name = "tiny";
  m.dir = "/srv/models/tiny";
  m.state = "resident";
  m.last_error = Status(Code::kDataLoss, "bad shard", "safetensors.overlap");
  m.gpus.push_back(GpuCopyStatus{.device = "cuda:0", .uuid = "GPU-0", .state = "resident", .bytes = 1, .leases = 1,
                                 .copy_ms = 1, .h2d_us = 1, .last_error = {}});
  return m;
}

std::vector<std::string> ValidFrames() {
  std::vector<std::string> f;
  auto req = [&](RequestBody b) { f.push_back(EncodeRequest(Request{.id = 9, .body = std::move(b)})); };
  auto rep = [&](ReplyBody b) { f.push_back(EncodeReply(Reply{.id = 9, .body = std::move(b)})); };
  req(Hello{.client_name = "test"});
  req(Acquire{.model = "tiny", .device = "cpu", .tensor_filter = {"a", "bb", "ccc"}});
  req(Release{.lease_id = 3});
  req(StatusRequest{.model = "tiny"});
  req(Load{.model = "tiny"});
  req(Evict{.model = "tiny"});
  req(Goodbye{});
  rep(ErrorReply{.code = 2, .message = "no such model", .reason = "catalog.unknown_model"});
  rep(HelloReply{.daemon_version = "0.1.0", .session_id = 1});
  Manifest m;
  m.model = "tiny";
  m.segments.push_back(SegmentInfo{.shm_name = "/w.tiny.1.0", .size = 4096, .data_size = 24, .file = "a.safetensors"});
  m.tensors.push_back(TensorRecord{.name = "w", .dtype = 0, .shape = {2, 3}, .segment = 0, .offset = 0, .nbytes = 24});
  m.tensors.push_back(TensorRecord{.name = "s", .dtype = 0, .shape = {}, .segment = 0, .offset = 24, .nbytes = 4});
  m.fd_token = "token";
  rep(m);
  rep(ModelList{.models = {SomeModel(), SomeModel()}});
  DaemonStats s;
  s.daemon_version = "0.1.0";
  s.models = {SomeModel()};
  s.gpus.push_back(GpuDeviceStatus{.device = "cuda:0", .uuid = "GPU-0", .name = "H100"});
  rep(s);
  return f;
}

std::string WithU64At(std::string frame, std::size_t at, std::uint64_t v) {
  std::memcpy(frame.data() + at, &v, sizeof v);
  return frame;
}

TEST(Protocol, EveryMessageTypeRoundTrips) {
  for (const std::string& frame : ValidFrames()) {
    auto req = DecodeRequest(frame);
    auto rep = DecodeReply(frame);
    ASSERT_TRUE(req.ok() || rep.ok()) << req.status().ToString() << " / " << rep.status().ToString();
    if (req.ok()) {
      EXPECT_EQ(EncodeRequest(*req), frame);
    }
    if (rep.ok()) {
      EXPECT_EQ(EncodeReply(*rep), frame);
    }
  }
}

// A scalar tensor has an empty shape: decoding the empty vector must not copy zero bytes into
// its (null) storage, which is undefined behaviour that UBSan reports (the sanitizer build in
// CI runs this test); found by tests/fuzz/protocol_fuzz.
TEST(Protocol, DecodesEmptyVectorsAndStrings) {
  Manifest m;
  m.tensors.push_back(TensorRecord{.name = "scale", .dtype = 0, .shape = {}, .segment = 0, .offset = 0, .nbytes = 4});
  m.tensors.push_back(TensorRecord{.name = "", .dtype = 0, .shape = {1}, .segment = 0, .offset = 4, .nbytes = 4});
  const std::string frame = EncodeReply(Reply{.id = 5, .body = m});
  auto r = DecodeReply(frame);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const auto& got = std::get<Manifest>(r->body);
  ASSERT_EQ(got.tensors.size(), 2u);
  EXPECT_TRUE(got.tensors[0].shape.empty());
  EXPECT_EQ(got.tensors[0].name, "scale");
  EXPECT_EQ(got.tensors[1].name, "");
  EXPECT_EQ(got.tensors[1].shape, std::vector<std::int64_t>{1});
}

// The layout of Hello: header(8) id(8) variant index(4) string size(8) string bytes.
constexpr std::size_t kHelloSizeAt = kFrameHeaderSize + 8 + 4;

TEST(Protocol, RefusesAStringLongerThanTheFrame) {
  const std::string hello = EncodeRequest(Request{.id = 1, .body = Hello{.client_name = "abc"}});
  for (std::uint64_t claimed : {std::uint64_t{4}, std::uint64_t{1} << 30, std::uint64_t{1} << 62, ~std::uint64_t{0}}) {
    const std::string frame = WithU64At(hello, kHelloSizeAt, claimed);
    auto r = DecodeRequest(frame);
    ASSERT_FALSE(r.ok()) << claimed;
    EXPECT_EQ(r.status().reason(), "protocol.malformed") << claimed;
    EXPECT_NE(r.status().message().find("length field exceeds"), std::string::npos) << r.status().ToString();
    const Usage u = MeasureDecode(frame);
    EXPECT_LE(u.largest, Allowance(frame.size())) << "claimed string size " << claimed;
  }
  // The exact size still decodes.
  EXPECT_TRUE(DecodeRequest(WithU64At(hello, kHelloSizeAt, 3)).ok());
}

TEST(Protocol, RefusesVectorCountsLargerThanTheFrame) {
  // A vector of strings (Acquire.tensor_filter) and a vector of large structs (ModelList).
  const std::string acquire = EncodeRequest(Request{.id = 1, .body = Acquire{.model = "m", .device = "c"}});
  const std::size_t filter_at = kHelloSizeAt + 9 + 9;  // after model and device (8 + 1 bytes each)
  const std::string list = EncodeReply(Reply{.id = 1, .body = ModelList{}});
  const std::size_t models_at = kHelloSizeAt;
  for (auto [frame0, at] : {std::pair{acquire, filter_at}, std::pair{list, models_at}}) {
    for (std::uint64_t claimed : {std::uint64_t{1} << 20, std::uint64_t{1} << 40, ~std::uint64_t{0}}) {
      const std::string frame = WithU64At(frame0, at, claimed);
      EXPECT_EQ(DecodeRequest(frame).status().reason(), "protocol.malformed");
      EXPECT_EQ(DecodeReply(frame).status().reason(), "protocol.malformed");
      const Usage u = MeasureDecode(frame);
      EXPECT_LE(u.peak, Allowance(frame.size())) << "claimed count " << claimed;
      EXPECT_LE(u.largest, Allowance(frame.size())) << "claimed count " << claimed;
    }
  }
  // A count that fits the frame's size but not its content: each element must still decode
  // from bytes actually present, so the vector cannot grow past them.
  std::string few = list + std::string(64, '\0');
  const std::string frame = WithU64At(few, models_at, 64);
  EXPECT_EQ(DecodeReply(frame).status().reason(), "protocol.malformed");
  EXPECT_LE(MeasureDecode(frame).peak, Allowance(frame.size()));
}

TEST(Protocol, RefusesBadVariantIndexesTruncationAndTrailingBytes) {
  const std::string hello = EncodeRequest(Request{.id = 1, .body = Hello{.client_name = "abc"}});
  for (std::int32_t index : {-1, 10, 1000, std::numeric_limits<std::int32_t>::min()}) {
    std::string frame = hello;
    std::memcpy(frame.data() + kFrameHeaderSize + 8, &index, sizeof index);
    EXPECT_EQ(DecodeRequest(frame).status().reason(), "protocol.malformed") << index;
  }
  for (std::size_t n = kFrameHeaderSize; n < hello.size(); ++n)
    EXPECT_EQ(DecodeRequest(hello.substr(0, n)).status().reason(), "protocol.malformed") << n;
  EXPECT_EQ(DecodeRequest(hello + "x").status().reason(), "protocol.malformed");
  EXPECT_EQ(DecodeRequest(hello.substr(0, 7)).status().reason(), "protocol.bad_frame");
  std::string other = hello;
  other[4] = static_cast<char>(kVersionMajor + 1);
  EXPECT_EQ(DecodeRequest(other).status().reason(), "protocol.version_mismatch");
}

// Every 8-byte window of every message type overwritten with hostile lengths, and every
// truncation: whatever the decoder answers, it allocates within the bound.
TEST(Protocol, NoLengthFieldAllocatesBeyondTheFrame) {
  long long worst_ratio_x100 = 0;
  int decodes = 0;
  for (const std::string& valid : ValidFrames()) {
    std::vector<std::string> hostile;
    for (std::size_t at = kFrameHeaderSize; at + 8 <= valid.size(); ++at) {
      const std::uint64_t left = valid.size() - at - 8;
      for (std::uint64_t v : {left, left + 1, std::uint64_t{1} << 31, std::uint64_t{1} << 32, std::uint64_t{1} << 40,
                              std::uint64_t{1} << 62, ~std::uint64_t{0}})
        hostile.push_back(WithU64At(valid, at, v));
    }
    for (std::size_t n = kFrameHeaderSize; n < valid.size(); ++n) hostile.push_back(valid.substr(0, n));
    for (const std::string& frame : hostile) {
      const Usage u = MeasureDecode(frame);
      ASSERT_LE(u.largest, Allowance(frame.size())) << "a single allocation of " << u.largest << " bytes for a "
                                                    << frame.size() << "-byte frame";
      ASSERT_LE(u.peak, Allowance(frame.size())) << u.peak << " bytes live for a " << frame.size() << "-byte frame";
      worst_ratio_x100 = std::max(worst_ratio_x100, 100 * u.peak / static_cast<long long>(frame.size()));
      ++decodes;
    }
  }
  RecordProperty("decodes", decodes);
  RecordProperty("worst_peak_per_frame_byte_x100", static_cast<int>(worst_ratio_x100));
}

// A large legitimate string decodes, in about its own size.
TEST(Protocol, ALargeValidStringDecodesWithinTheBound) {
  const std::string frame = EncodeRequest(Request{.id = 1, .body = Hello{.client_name = std::string(1 << 20, 'x')}});
  const Usage u = MeasureDecode(frame);
  EXPECT_TRUE(DecodeRequest(frame).ok());
  EXPECT_GE(u.peak, 1 << 20);  // the accounting sees the allocation at all
  EXPECT_LE(u.peak, 2 * static_cast<long long>(frame.size()) + 16 * 1024);
}

// tests/fuzz/corpus/protocol: request.* decode as requests, reply.* as replies (and re-encode
// to the same bytes), malformed.* fail as malformed.
TEST(Protocol, CheckedInFuzzSeedsDecodeAsNamed) {
  const fs::path dir = fs::path(WEIGHTD_TEST_DATA_DIR) / ".." / "fuzz" / "corpus" / "protocol";
  int requests = 0, replies = 0, malformed = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::ifstream in(e.path(), std::ios::binary);
    const std::string frame((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string name = e.path().filename().string();
    const std::string kind = name.substr(0, name.find('.'));
    if (kind == "request") {
      auto r = DecodeRequest(frame);
      ASSERT_TRUE(r.ok()) << name << ": " << r.status().ToString() << " (regenerate: scripts/fuzz.sh --write-corpus)";
      EXPECT_EQ(EncodeRequest(*r), frame) << name;
      ++requests;
    } else if (kind == "reply") {
      auto r = DecodeReply(frame);
      ASSERT_TRUE(r.ok()) << name << ": " << r.status().ToString() << " (regenerate: scripts/fuzz.sh --write-corpus)";
      EXPECT_EQ(EncodeReply(*r), frame) << name;
      ++replies;
    } else {
      ASSERT_EQ(kind, "malformed") << "unexpected file " << name << " in " << dir;
      EXPECT_EQ(DecodeRequest(frame).status().reason(), "protocol.malformed") << name;
      EXPECT_EQ(DecodeReply(frame).status().reason(), "protocol.malformed") << name;
      ++malformed;
    }
  }
  EXPECT_EQ(requests, static_cast<int>(std::variant_size_v<RequestBody>) + 1) << "one seed per request type (+ GPU acquire)";
  EXPECT_EQ(replies, static_cast<int>(std::variant_size_v<ReplyBody>) + 2)
      << "one seed per reply type (+ GPU manifest, + a host manifest in parts)";
  EXPECT_GE(malformed, 6);
}

}  // namespace
}  // namespace weightd::proto
