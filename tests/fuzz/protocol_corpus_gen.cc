// protocol_corpus_gen DIR — writes the protocol fuzzer's seed corpus into DIR: one valid frame
// per request and reply type (request.<type>, reply.<type>) and a few hostile frames
// (malformed.<what>: each breaks one rule of the decoder). tests/protocol_test.cc checks that
// every checked-in file still decodes, or fails, as its name says, so a protocol change that
// stales the corpus fails the unit tests. Regenerate with `scripts/fuzz.sh --write-corpus`.
//
// Values are small but realistic, so the seeds stay a few hundred bytes (the fuzzer's default
// -max_len follows the largest seed) and every field is non-empty: the mutator then finds
// every length field to change.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "protocol.h"

namespace proto = weightd::proto;
namespace fs = std::filesystem;

namespace {

fs::path g_dir;
int g_written = 0;

void Write(const std::string& name, const std::string& bytes) {
  std::ofstream out(g_dir / name, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "protocol_corpus_gen: cannot write %s\n", (g_dir / name).c_str());
    std::exit(1);
  }
  ++g_written;
}

void Req(const std::string& name, proto::RequestBody body) {
  Write("request." + name, proto::EncodeRequest(proto::Request{.id = 7, .body = std::move(body)}));
}
void Rep(const std::string& name, proto::ReplyBody body) {
  Write("reply." + name, proto::EncodeReply(proto::Reply{.id = 7, .body = std::move(body)}));
}

proto::ErrorReply Error() {
  return proto::ErrorReply{.code = 2, .message = "no model 'x'", .reason = "catalog.unknown_model"};
}

proto::ModelStatus Model() {
  proto::ModelStatus m;
  m.name = "tiny";
  m.dir = "/srv/models/tiny";
  m.state = "resident";
  m.shards = 1;
  m.tensors = 2;
  m.bytes = 4096;
  m.resident_bytes = 4096;
  m.leases = 1;
  m.loads = 1;
  m.last_load_ms = 3;
  m.idle_ms = 10;
  m.gpus.push_back(proto::GpuCopyStatus{.device = "cuda:0", .uuid = "GPU-0", .state = "resident", .bytes = 4096,
                                        .leases = 1, .copy_ms = 1, .h2d_us = 90, .last_error = {}});
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  g_dir = argv[1];
  fs::create_directories(g_dir);

  // ---- requests
  Req("hello", proto::Hello{.client_name = "fuzz"});
  Req("acquire", proto::Acquire{.model = "tiny", .device = "cpu", .tensor_filter = {"w", "b"}});
  Req("acquire_gpu", proto::Acquire{.model = "tiny", .device = "cuda:0", .tensor_filter = {}});
  Req("release", proto::Release{.lease_id = 42});
  Req("heartbeat", proto::Heartbeat{});
  Req("list", proto::List{});
  Req("status", proto::StatusRequest{.model = "tiny"});
  Req("load", proto::Load{.model = "tiny"});
  Req("evict", proto::Evict{.model = "tiny"});
  Req("stats", proto::Stats{});
  Req("goodbye", proto::Goodbye{});

  // ---- replies
  Rep("error", Error());
  Rep("ok", proto::OkReply{});
  Rep("hello", proto::HelloReply{.daemon_version = "0.1.0", .session_id = 1, .heartbeat_interval_ms = 1000,
                                 .heartbeat_timeout_ms = 10000, .max_leases = 256, .peer_uid = 1000,
                                 .peer_pid = 4242});
  proto::Manifest m;
  m.lease_id = 42;
  m.model = "tiny";
  m.device = "cpu";
  m.model_dir = "/srv/models/tiny";
  m.segments.push_back(proto::SegmentInfo{.shm_name = "/weightd-0.tiny.1.0", .size = 4096, .data_size = 28,
                                          .file = "model.safetensors", .file_data_offset = 128,
                                          .gpu_alloc_size = 0, .ipc_handle = ""});
  m.tensors.push_back(proto::TensorRecord{.name = "w", .dtype = 0, .shape = {2, 2}, .segment = 0, .offset = 0, .nbytes = 16});
  m.tensors.push_back(proto::TensorRecord{.name = "b", .dtype = 0, .shape = {2}, .segment = 0, .offset = 16, .nbytes = 8});
  // A scalar: an empty shape (an empty vector of integers: no storage to copy into).
  m.tensors.push_back(proto::TensorRecord{.name = "s", .dtype = 0, .shape = {}, .segment = 0, .offset = 24, .nbytes = 4});
  Rep("manifest", m);
  // A segment in three parts (SegmentInfo::part_size).
  proto::Manifest parted = m;
  parted.segments[0].size = 5ull << 20;
  parted.segments[0].data_size = (5ull << 20) - 100;
  parted.segments[0].part_size = 2ull << 20;
  Rep("manifest_parts", parted);
  proto::Manifest g = m;
  g.device = "GPU-0";
  g.segments[0].shm_name.clear();
  g.segments[0].size = 0;
  g.segments[0].gpu_alloc_size = 2 << 20;
  g.gpu_export = static_cast<std::uint8_t>(proto::GpuExport::kVmm);
  g.fd_socket = "/run/weightd/weightd.sock.fds";
  g.fd_token = "0123456789abcdef";
  Rep("manifest_gpu", g);
  Rep("model_list", proto::ModelList{.models = {Model()}});
  Rep("model_status", Model());
  proto::DaemonStats s;
  s.daemon_version = "0.1.0";
  s.uptime_ms = 1000;
  s.sessions = 1;
  s.leases = 1;
  s.host_resident_bytes = 4096;
  s.bytes_read_from_disk = 4096;
  s.loads_ok = 1;
  s.requests = 5;
  s.models = {Model()};
  s.gpus.push_back(proto::GpuDeviceStatus{.device = "cuda:0", .uuid = "GPU-0", .name = "H100", .total_bytes = 80ull << 30,
                                          .resident_bytes = 4096, .copies = 1, .leases = 1});
  Rep("stats", s);

  // ---- hostile frames: each must fail with protocol.malformed
  const std::string hello = proto::EncodeRequest(proto::Request{.id = 7, .body = proto::Hello{.client_name = "fuzz"}});
  // Layout of a Hello: header(8) id(8) variant index(4) string size(8) bytes.
  constexpr std::size_t kSizeAt = proto::kFrameHeaderSize + 8 + 4;
  auto with_u64_at = [](std::string f, std::size_t at, std::uint64_t v) {
    std::memcpy(f.data() + at, &v, sizeof v);
    return f;
  };
  Write("malformed.huge_string", with_u64_at(hello, kSizeAt, std::uint64_t{1} << 62));
  Write("malformed.string_past_end", with_u64_at(hello, kSizeAt, 5));
  const std::string acquire = proto::EncodeRequest(
      proto::Request{.id = 7, .body = proto::Acquire{.model = "m", .device = "c", .tensor_filter = {}}});
  // Acquire: header id index, model(8+1), device(8+1), then the vector's count.
  Write("malformed.huge_vector", with_u64_at(acquire, kSizeAt + 9 + 9, std::uint64_t{1} << 40));
  std::string bad_variant = hello;
  const std::int32_t index = 1000;
  std::memcpy(bad_variant.data() + proto::kFrameHeaderSize + 8, &index, sizeof index);
  Write("malformed.bad_variant", bad_variant);
  Write("malformed.truncated", hello.substr(0, hello.size() - 1));
  Write("malformed.trailing", hello + "x");

  std::printf("protocol_corpus_gen: wrote %d files to %s\n", g_written, g_dir.c_str());
  return 0;
}
