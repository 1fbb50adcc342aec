// safetensors.h — a parser for safetensors headers that trusts nothing in the file.
//
// File layout: u64 little-endian N, then N bytes of UTF-8 JSON (the header), then the data
// section. Tensor offsets in the header are relative to the start of the data section.
//
// Rules enforced, each with its own ParseError (and Status reason "safetensors.<name>"):
//   - the file holds at least the 8-byte length, N fits in the file, N <= kMaxHeaderSize;
//   - the header is valid UTF-8 (no overlongs, surrogates or code points above U+10FFFF),
//     valid JSON, a JSON object, without duplicate keys (at any level, compared after
//     unescaping); it begins with '{' as the format requires (a byte-order mark or leading
//     whitespace is kInvalidJson); trailing spaces (the usual padding) are allowed;
//   - every entry other than "__metadata__" is an object (else kNotAnObject) with exactly
//     "dtype", "shape" and "data_offsets"; dtype is one of the 22 names of weightd/dtype.h
//     (any other is kUnsupportedDtype, InvalidArgument: a newer writer, not a damaged file,
//     is its likely cause); shape is an array of
//     non-negative integers; data_offsets is [begin, end] of non-negative integers with
//     begin <= end (else kOffsetOutOfBounds). A negative number (even -0), a number written
//     as a float (1.0, 1e3) or one above UINT64_MAX is kBadTensorEntry; a dimension above
//     INT64_MAX is kShapeOverflow;
//   - product(shape) * dtype size does not overflow 64 bits and equals end - begin; values of
//     a sub-byte dtype (F4, F6_*) fill whole bytes (else kPartialByte);
//   - offsets lie inside the data section; sorted by begin, tensors tile [0, data size)
//     with no overlap and no gap. Zero-size tensors (begin == end) are legal, several may
//     share an offset, but they must sit on a tensor boundary (inside another tensor is
//     kOverlap), as in the reference implementation;
//   - the data section ends exactly at the end of the file;
//   - "__metadata__", if present, is an object mapping strings to strings.
// When a header breaks several rules, the first one met in file order is reported; the
// tiling rules (overlap, gap, trailing data) are checked after the whole header is read.
// The parser never builds a JSON DOM: memory stays proportional to the accepted schema.
// All functions are thread-safe (no shared state).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "weightd/dtype.h"
#include "status_macros.h"

namespace weightd::st {

inline constexpr std::uint64_t kMaxHeaderSize = 100'000'000;  // 100 MB, as the reference library

// The longest tensor name accepted (Hugging Face names are well under 200 bytes).
inline constexpr std::size_t kMaxTensorNameBytes = 1024;

enum class ParseError {
  kFileTooSmall,       // fewer than 8 bytes
  kHeaderTooLarge,     // N > kMaxHeaderSize
  kHeaderOutOfBounds,  // 8 + N > file size
  kInvalidUtf8,
  kInvalidJson,
  kNotAnObject,        // the header (or a tensor entry) is not a JSON object
  kDuplicateKey,
  kBadTensorEntry,     // missing, extra or mistyped fields in a tensor entry
  kUnsupportedDtype,   // a dtype name not in weightd/dtype.h (InvalidArgument, not DataLoss)
  kShapeOverflow,      // product(shape) * dtype size overflows 64 bits
  kPartialByte,        // sub-byte values (F4, F6_*) that end inside a byte
  kSizeMismatch,       // product(shape) * dtype size != end - begin
  kOffsetOutOfBounds,  // end beyond the data section, or begin > end
  kOverlap,
  kGap,
  kTrailingData,       // the data section ends before the end of the file
  kBadMetadata,        // __metadata__ is not a map of strings to strings
};

// "safetensors.duplicate_key" etc.
std::string_view ParseErrorReason(ParseError e);
// The Status code of each error: DataLoss, except InvalidArgument for kUnsupportedDtype.
Code ParseErrorCode(ParseError e);
// Recovers the ParseError from a Status made by this parser (false if it is not one).
bool ParseErrorFromStatus(const Status& s, ParseError* out);

struct TensorEntry {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // relative to the data section
  std::uint64_t end = 0;
  std::uint64_t nbytes() const { return end - begin; }
};

struct Header {
  std::uint64_t header_size = 0;  // N
  std::uint64_t data_offset = 0;  // 8 + N: where the data section starts in the file
  std::uint64_t data_size = 0;    // file size - data_offset
  // Sorted by begin, then by end (so zero-size tensors come first at a shared offset), then
  // by name.
  std::vector<TensorEntry> tensors;
  std::map<std::string, std::string> metadata;
};

// Parses `header_json` (the N bytes after the length prefix) of a file of `file_size` bytes.
// Errors carry ParseErrorCode and the reason of the rule that failed, and a message naming
// the tensor.
Result<Header> ParseHeader(std::string_view header_json, std::uint64_t file_size);

// Reads and parses the header of an open file (pread; the file offset is not used). N is
// checked against kMaxHeaderSize and the file size before anything is allocated. I/O errors
// are the Status of posix::PreadFull (not DataLoss with a safetensors reason).
Result<Header> ReadHeader(int fd, std::uint64_t file_size);

// Opens `path` (O_RDONLY | O_CLOEXEC | O_NONBLOCK, so a FIFO cannot block the caller),
// fstat()s it and reads the header. Something other than a regular file is InvalidArgument
// with reason "safetensors.not_a_regular_file". The message of an error names the file.
Result<Header> ReadHeaderFile(const std::string& path);

// True if `s` is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above
// U+10FFFF). Shared with the writer, which refuses to produce what this parser rejects.
bool IsValidUtf8(std::string_view s);

}  // namespace weightd::st
