// libFuzzer target for the safetensors header parser.
//
// Each input is treated two ways:
//  1. as a whole file image: the first 8 bytes are the little-endian header length N, the
//     next N bytes the header, and the rest the data section (what ReadHeader would see);
//  2. as a bare header inside files of several sizes, so the bounds rules get exercised with
//     data sections both smaller and larger than the offsets in the header.
// On success the parser's invariants are checked; a violation aborts (a finding).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "safetensors.h"

namespace {

using weightd::st::Header;
using weightd::st::ParseError;

void Check(bool ok) {
  if (!ok) std::abort();
}

void CheckResult(const weightd::Result<Header>& r, std::uint64_t header_size, std::uint64_t file_size) {
  if (!r.ok()) {
    ParseError e;
    // Anything the parser returns for well-formed calls is one of its own errors (or OOM).
    Check(weightd::st::ParseErrorFromStatus(r.status(), &e) || r.status().reason() == "safetensors.out_of_memory");
    return;
  }
  const Header& h = *r;
  Check(h.header_size == header_size);
  Check(h.data_offset == 8 + header_size);
  Check(h.data_offset + h.data_size == file_size);
  std::uint64_t cursor = 0;
  for (const auto& t : h.tensors) {
    Check(t.begin == cursor);  // tensors tile the data section in order
    Check(t.begin <= t.end && t.end <= h.data_size);
    for (std::int64_t d : t.shape) Check(d >= 0);
    const weightd::DTypeBytesResult bytes = weightd::DTypeBytes(t.dtype, t.shape);
    Check(bytes.ok() && bytes.bytes == t.nbytes());
    cursor = t.end;
  }
  Check(cursor == h.data_size);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);

  // 1. A whole file image, checked as ReadHeader does before it calls ParseHeader.
  if (size >= 8) {
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
    if (n <= weightd::st::kMaxHeaderSize && n <= size - 8) {
      CheckResult(weightd::st::ParseHeader(bytes.substr(8, n), size), n, size);
    }
  }

  // 2. The input as a bare header with data sections of several sizes.
  for (std::uint64_t extra : {std::uint64_t{0}, std::uint64_t{8}, std::uint64_t{4096}, std::uint64_t{1} << 40}) {
    const std::uint64_t file_size = 8 + size + extra;
    CheckResult(weightd::st::ParseHeader(bytes, file_size), size, file_size);
  }
  // A file size too small for the header must be refused, never parsed.
  auto r = weightd::st::ParseHeader(bytes, size + 7);
  ParseError e;
  Check(!r.ok() && weightd::st::ParseErrorFromStatus(r.status(), &e) &&
        (e == ParseError::kHeaderOutOfBounds || e == ParseError::kHeaderTooLarge));
  return 0;
}
