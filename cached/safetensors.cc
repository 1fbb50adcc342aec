#include "safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <optional>
#include <unordered_set>
#include <utility>

#include <nlohmann/json.hpp>

#include "posix.h"

namespace weightd::st {
namespace {

using Json = nlohmann::json;

constexpr std::string_view kMetadataKey = "__metadata__";
constexpr std::size_t kMaxQuoted = 96;  // names in messages are clipped: a hostile name can be 100 MB

constexpr ParseError kAllParseErrors[] = {
    ParseError::kFileTooSmall,   ParseError::kHeaderTooLarge,  ParseError::kHeaderOutOfBounds,
    ParseError::kInvalidUtf8,    ParseError::kInvalidJson,     ParseError::kNotAnObject,
    ParseError::kDuplicateKey,   ParseError::kBadTensorEntry,  ParseError::kUnsupportedDtype,
    ParseError::kShapeOverflow,  ParseError::kPartialByte,     ParseError::kSizeMismatch,
    ParseError::kOffsetOutOfBounds, ParseError::kOverlap,      ParseError::kGap,
    ParseError::kTrailingData,   ParseError::kBadMetadata,
};

Status Fail(ParseError e, std::string message) {
  return Status(ParseErrorCode(e), "safetensors header: " + std::move(message), std::string(ParseErrorReason(e)));
}

// 'name' with control and non-ASCII bytes escaped and long names clipped, for messages and logs.
std::string Quote(std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "'";
  const std::size_t n = std::min(s.size(), kMaxQuoted);
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  if (n < s.size()) out += "...(" + std::to_string(s.size()) + " bytes)";
  out += '\'';
  return out;
}

// "F64 F32 ... F6_E3M2", for the message that refuses a dtype name.
std::string KnownDtypes() {
  std::string s;
  for (DType t : kAllDTypes) s += (s.empty() ? "" : " ") + std::string(DTypeName(t));
  return s;
}

std::string ShapeString(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::string Range(std::uint64_t b, std::uint64_t e) {
  return "[" + std::to_string(b) + ", " + std::to_string(e) + "]";
}

// Offset of the first byte that is not part of well-formed UTF-8, or nullopt (Unicode 15,
// table 3-7). Bulk ASCII is checked 8 bytes at a time: headers are almost all ASCII.
std::optional<std::size_t> FirstInvalidUtf8(std::string_view sv) {
  const auto* s = reinterpret_cast<const unsigned char*>(sv.data());
  const std::size_t n = sv.size();
  std::size_t i = 0;
  while (i < n) {
    if (i + 8 <= n) {
      std::uint64_t w;
      std::memcpy(&w, s + i, 8);
      if ((w & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;       // overlong
      else if (c == 0xed) hi = 0x9f;  // UTF-16 surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;       // overlong
      else if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
    } else {
      return i;  // continuation byte, C0/C1 overlong lead, or F5..FF
    }
    if (n - i < len) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if ((s[i + k] & 0xc0) != 0x80) return i;
    i += len;
  }
  return std::nullopt;
}

// A SAX handler that accepts exactly the safetensors schema and stops at the first violation.
// Nothing deeper than a tensor entry's arrays is ever accepted, so hostile nesting is refused
// at its first level and no DOM is built.
class SchemaHandler {
 public:
  explicit SchemaHandler(std::uint64_t data_size) : data_size_(data_size) {}

  // The first rule broken, if any (set by a callback that returned false).
  const std::optional<Status>& failure() const { return failure_; }
  const std::optional<std::string>& json_error() const { return json_error_; }
  bool done() const { return state_ == State::kDone; }
  std::vector<TensorEntry>& tensors() { return tensors_; }
  std::map<std::string, std::string>& metadata() { return metadata_; }

  // --- nlohmann SAX interface -------------------------------------------------------------
  bool null() { return Scalar("null"); }
  bool boolean(bool) { return Scalar("boolean"); }
  bool binary(Json::binary_t&) { return Scalar("binary"); }
  bool number_integer(Json::number_integer_t v) {
    // The lexer reports only numbers written with a '-' here (even "-0").
    return Number("negative number " + std::to_string(v) + (v == 0 ? " (written -0)" : ""));
  }
  bool number_float(Json::number_float_t, const Json::string_t& text) {
    return Number("non-integer or out-of-range number " + Clip(text));
  }
  bool number_unsigned(Json::number_unsigned_t v) {
    switch (state_) {
      case State::kShape:
        if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          return Reject(ParseError::kShapeOverflow,
                        "tensor " + Quote(entry_.name) + ": dimension " + std::to_string(v) + " exceeds INT64_MAX");
        entry_.shape.push_back(static_cast<std::int64_t>(v));
        return true;
      case State::kOffsets:
        if (offsets_seen_ >= 2)
          return Reject(ParseError::kBadTensorEntry,
                        "tensor " + Quote(entry_.name) + ": data_offsets has more than 2 elements");
        (offsets_seen_ == 0 ? entry_.begin : entry_.end) = v;
        ++offsets_seen_;
        return true;
      default:
        return Scalar("number");
    }
  }
  bool string(Json::string_t& v) {
    switch (state_) {
      case State::kDtype: {
        const auto dt = DTypeFromName(v);
        if (!dt)
          return Reject(ParseError::kUnsupportedDtype, "tensor " + Quote(entry_.name) + ": dtype " + Quote(v) +
                                                           " is not one this weightd knows (" + KnownDtypes() + ")");
        entry_.dtype = *dt;
        state_ = State::kEntry;
        return true;
      }
      case State::kMetaValue:
        meta_it_->second = std::move(v);
        state_ = State::kMeta;
        return true;
      default:
        return Scalar("string");
    }
  }
  bool start_object(std::size_t) {
    switch (state_) {
      case State::kStart: state_ = State::kTop; return true;
      case State::kTopValue: state_ = State::kEntry; return true;
      case State::kMetaObject: state_ = State::kMeta; return true;
      default: return Scalar("object");
    }
  }
  bool start_array(std::size_t) {
    switch (state_) {
      case State::kShapeValue: state_ = State::kShape; return true;
      case State::kOffsetsValue: state_ = State::kOffsets; offsets_seen_ = 0; return true;
      default: return Scalar("array");
    }
  }
  bool end_array() {
    // Only arrays we opened can end here: anything nested was refused at its start.
    if (state_ == State::kOffsets && offsets_seen_ != 2)
      return Reject(ParseError::kBadTensorEntry, "tensor " + Quote(entry_.name) + ": data_offsets has " +
                                                     std::to_string(offsets_seen_) + " elements, expected 2");
    state_ = State::kEntry;
    return true;
  }
  bool key(Json::string_t& k) {
    switch (state_) {
      case State::kTop:
        if (!names_.insert(k).second) return Reject(ParseError::kDuplicateKey, "duplicate key " + Quote(k));
        if (k == kMetadataKey) {
          state_ = State::kMetaObject;
          return true;
        }
        // Names travel in manifests and index maps: they must be printable and bounded.
        if (k.empty() || k.size() > kMaxTensorNameBytes ||
            std::any_of(k.begin(), k.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20; }))
          return Reject(ParseError::kBadTensorEntry,
                        "tensor name " + Quote(k) + " is empty, longer than " + std::to_string(kMaxTensorNameBytes) +
                            " bytes, or holds control characters");
        // Copied, not moved: `k` is the lexer's token buffer, and stealing it would make the
        // lexer regrow a buffer for every later string.
        entry_ = TensorEntry{};
        entry_.name = k;
        have_dtype_ = have_shape_ = have_offsets_ = false;
        state_ = State::kTopValue;
        return true;
      case State::kEntry: {
        bool* seen;
        State next;
        if (k == "dtype") {
          seen = &have_dtype_, next = State::kDtype;
        } else if (k == "shape") {
          seen = &have_shape_, next = State::kShapeValue;
        } else if (k == "data_offsets") {
          seen = &have_offsets_, next = State::kOffsetsValue;
        } else {
          return Reject(ParseError::kBadTensorEntry, "tensor " + Quote(entry_.name) + ": unexpected field " + Quote(k));
        }
        if (*seen)
          return Reject(ParseError::kDuplicateKey, "tensor " + Quote(entry_.name) + ": duplicate key " + Quote(k));
        *seen = true;
        state_ = next;
        return true;
      }
      case State::kMeta: {
        auto [it, inserted] = metadata_.try_emplace(k);
        if (!inserted) return Reject(ParseError::kDuplicateKey, "__metadata__: duplicate key " + Quote(it->first));
        meta_it_ = it;
        state_ = State::kMetaValue;
        return true;
      }
      default:
        return Reject(ParseError::kInvalidJson, "unexpected key");  // unreachable with a sane lexer
    }
  }
  bool end_object() {
    switch (state_) {
      case State::kTop: state_ = State::kDone; return true;
      case State::kMeta: state_ = State::kTop; return true;
      case State::kEntry: state_ = State::kTop; return FinishEntry();
      default: return Reject(ParseError::kInvalidJson, "unexpected end of object");  // unreachable
    }
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    json_error_ = e.what();
    return false;
  }

 private:
  enum class State {
    kStart,         // before the top-level value
    kTop,           // in the top object: a key or its end
    kTopValue,      // after a tensor name: its entry object
    kMetaObject,    // after "__metadata__": its object
    kMeta,          // in __metadata__: a key or its end
    kMetaValue,     // after a metadata key: a string
    kEntry,         // in a tensor entry: a field name or its end
    kDtype,         // after "dtype": a string
    kShapeValue,    // after "shape": an array
    kShape,         // in the shape array: non-negative integers
    kOffsetsValue,  // after "data_offsets": an array
    kOffsets,       // in data_offsets: two non-negative integers
    kDone,
  };

  bool Reject(ParseError e, std::string message) {
    failure_ = Fail(e, std::move(message));
    return false;
  }

  static std::string Clip(std::string_view s) { return s.size() > 40 ? std::string(s.substr(0, 40)) + "..." : std::string(s); }

  bool Number(std::string what) {
    switch (state_) {
      case State::kShape:
        return Reject(ParseError::kBadTensorEntry, "tensor " + Quote(entry_.name) + ": shape holds a " + what);
      case State::kOffsets:
        return Reject(ParseError::kBadTensorEntry, "tensor " + Quote(entry_.name) + ": data_offsets holds a " + what);
      default:
        return Scalar("number");
    }
  }

  // A value of kind `what` where the schema does not allow it.
  bool Scalar(std::string_view what) {
    const std::string kind(what);
    switch (state_) {
      case State::kStart:
        return Reject(ParseError::kNotAnObject, "the header is a JSON " + kind + ", not an object");
      case State::kTopValue:
        return Reject(ParseError::kNotAnObject, "tensor " + Quote(entry_.name) + " is a JSON " + kind + ", not an object");
      case State::kMetaObject:
        return Reject(ParseError::kBadMetadata, "__metadata__ is a JSON " + kind + ", not an object");
      case State::kMetaValue:
        return Reject(ParseError::kBadMetadata,
                      "__metadata__ value of " + Quote(meta_it_->first) + " is a JSON " + kind + ", not a string");
      case State::kDtype:
        return Reject(ParseError::kBadTensorEntry, "tensor " + Quote(entry_.name) + ": dtype is a JSON " + kind);
      case State::kShapeValue:
        return Reject(ParseError::kBadTensorEntry, "tensor " + Quote(entry_.name) + ": shape is a JSON " + kind);
      case State::kShape:
        return Reject(ParseError::kBadTensorEntry, "tensor " + Quote(entry_.name) + ": shape holds a JSON " + kind);
      case State::kOffsetsValue:
        return Reject(ParseError::kBadTensorEntry, "tensor " + Quote(entry_.name) + ": data_offsets is a JSON " + kind);
      case State::kOffsets:
        return Reject(ParseError::kBadTensorEntry,
                      "tensor " + Quote(entry_.name) + ": data_offsets holds a JSON " + kind);
      default:
        return Reject(ParseError::kInvalidJson, "unexpected JSON " + kind);  // unreachable with a sane lexer
    }
  }

  bool FinishEntry() {
    // Messages are built only on failure: this runs once per tensor on the hot path.
    auto name = [&] { return "tensor " + Quote(entry_.name); };
    auto offsets = [&] { return " data_offsets " + Range(entry_.begin, entry_.end); };
    auto shape = [&] { return " shape " + ShapeString(entry_.shape) + " of " + std::string(DTypeName(entry_.dtype)); };
    if (!have_dtype_ || !have_shape_ || !have_offsets_) {
      std::string missing;
      for (auto [have, field] : {std::pair{have_dtype_, "dtype"}, {have_shape_, "shape"}, {have_offsets_, "data_offsets"}})
        if (!have) missing += missing.empty() ? field : std::string(", ") + field;
      return Reject(ParseError::kBadTensorEntry, name() + ": missing " + missing);
    }
    // Dimensions are non-negative here: the SAX callbacks refused anything else.
    const DTypeBytesResult size = DTypeBytes(entry_.dtype, entry_.shape);
    if (size.error == DTypeBytesResult::Error::kPartialByte)
      return Reject(ParseError::kPartialByte, name() + ":" + shape() + " holds " + std::to_string(DTypeBits(entry_.dtype)) +
                                                  "-bit values that do not fill whole bytes");
    if (!size.ok()) return Reject(ParseError::kShapeOverflow, name() + ":" + shape() + " overflows 64 bits");
    const std::uint64_t bytes = size.bytes;
    if (entry_.begin > entry_.end)
      return Reject(ParseError::kOffsetOutOfBounds, name() + ":" + offsets() + " begin after end");
    if (entry_.end > data_size_)
      return Reject(ParseError::kOffsetOutOfBounds, name() + ":" + offsets() + " end beyond the data section of " +
                                                        std::to_string(data_size_) + " bytes");
    if (bytes != entry_.end - entry_.begin)
      return Reject(ParseError::kSizeMismatch, name() + ":" + shape() + " is " + std::to_string(bytes) + " bytes but" +
                                                   offsets() + " span " + std::to_string(entry_.end - entry_.begin));
    tensors_.push_back(std::move(entry_));
    return true;
  }

  const std::uint64_t data_size_;
  State state_ = State::kStart;
  std::optional<Status> failure_;
  std::optional<std::string> json_error_;

  std::unordered_set<std::string> names_;  // top-level keys seen, for duplicates
  std::vector<TensorEntry> tensors_;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, std::string>::iterator meta_it_;

  TensorEntry entry_;  // the entry being read
  bool have_dtype_ = false, have_shape_ = false, have_offsets_ = false;
  int offsets_seen_ = 0;
};

bool IsJsonSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

Status CheckTiling(const std::vector<TensorEntry>& tensors, std::uint64_t data_size) {
  std::uint64_t cursor = 0;
  const TensorEntry* prev = nullptr;
  for (const TensorEntry& t : tensors) {
    if (t.begin > cursor)
      return Fail(ParseError::kGap, "gap of " + std::to_string(t.begin - cursor) + " bytes at data offset " +
                                        std::to_string(cursor) + " before tensor " + Quote(t.name) + " " +
                                        Range(t.begin, t.end));
    if (t.begin < cursor)
      return Fail(ParseError::kOverlap, "tensor " + Quote(t.name) + " " + Range(t.begin, t.end) + " overlaps tensor " +
                                            Quote(prev->name) + " " + Range(prev->begin, prev->end));
    cursor = t.end;
    prev = &t;
  }
  if (cursor != data_size)
    return Fail(ParseError::kTrailingData, "tensors end at data offset " + std::to_string(cursor) +
                                               " but the data section holds " + std::to_string(data_size) +
                                               " bytes (" + std::to_string(data_size - cursor) + " trailing)");
  return Status::Ok();
}

}  // namespace

std::string_view ParseErrorReason(ParseError e) {
  switch (e) {
    case ParseError::kFileTooSmall: return "safetensors.file_too_small";
    case ParseError::kHeaderTooLarge: return "safetensors.header_too_large";
    case ParseError::kHeaderOutOfBounds: return "safetensors.header_out_of_bounds";
    case ParseError::kInvalidUtf8: return "safetensors.invalid_utf8";
    case ParseError::kInvalidJson: return "safetensors.invalid_json";
    case ParseError::kNotAnObject: return "safetensors.not_an_object";
    case ParseError::kDuplicateKey: return "safetensors.duplicate_key";
    case ParseError::kBadTensorEntry: return "safetensors.bad_tensor_entry";
    case ParseError::kUnsupportedDtype: return "safetensors.unsupported_dtype";
    case ParseError::kShapeOverflow: return "safetensors.shape_overflow";
    case ParseError::kPartialByte: return "safetensors.partial_byte";
    case ParseError::kSizeMismatch: return "safetensors.size_mismatch";
    case ParseError::kOffsetOutOfBounds: return "safetensors.offset_out_of_bounds";
    case ParseError::kOverlap: return "safetensors.overlap";
    case ParseError::kGap: return "safetensors.gap";
    case ParseError::kTrailingData: return "safetensors.trailing_data";
    case ParseError::kBadMetadata: return "safetensors.bad_metadata";
  }
  return "safetensors.unknown";
}

Code ParseErrorCode(ParseError e) {
  // A dtype name this build does not know says nothing about the file's integrity: a newer
  // safetensors may have written it. Every other rule is broken only by a damaged or forged file.
  return e == ParseError::kUnsupportedDtype ? Code::kInvalidArgument : Code::kDataLoss;
}

bool ParseErrorFromStatus(const Status& s, ParseError* out) {
  for (ParseError e : kAllParseErrors) {
    if (s.code() == ParseErrorCode(e) && s.reason() == ParseErrorReason(e)) {
      if (out != nullptr) *out = e;
      return true;
    }
  }
  return false;
}

bool IsValidUtf8(std::string_view s) { return !FirstInvalidUtf8(s).has_value(); }

Result<Header> ParseHeader(std::string_view header_json, std::uint64_t file_size) {
  const std::uint64_t n = header_json.size();
  if (n > kMaxHeaderSize)
    return Fail(ParseError::kHeaderTooLarge,
                "header of " + std::to_string(n) + " bytes exceeds the limit of " + std::to_string(kMaxHeaderSize));
  if (file_size < 8 || file_size - 8 < n)
    return Fail(ParseError::kHeaderOutOfBounds, "8 + header of " + std::to_string(n) + " bytes exceeds the file size of " +
                                                    std::to_string(file_size) + " bytes");
  Header h;
  h.header_size = n;
  h.data_offset = 8 + n;
  h.data_size = file_size - h.data_offset;

  if (auto bad = FirstInvalidUtf8(header_json))
    return Fail(ParseError::kInvalidUtf8, "invalid UTF-8 at header byte " + std::to_string(*bad));

  // nlohmann's lexer takes a NUL byte for the end of input and would ignore whatever follows
  // it. JSON allows NUL nowhere unescaped, so any NUL is refused.
  if (const auto nul = header_json.find('\0'); nul != std::string_view::npos)
    return Fail(ParseError::kInvalidJson, "NUL byte at header byte " + std::to_string(nul));

  // The format requires the header to begin with '{'. nlohmann would silently skip a BOM and
  // leading whitespace, so they are refused here.
  if (header_json.starts_with("\xEF\xBB\xBF"))
    return Fail(ParseError::kInvalidJson, "the header begins with a byte-order mark");
  if (!header_json.empty() && header_json.front() != '{') {
    const auto first = std::find_if_not(header_json.begin(), header_json.end(), IsJsonSpace);
    if (first != header_json.end() && *first == '{')
      return Fail(ParseError::kInvalidJson, "the header must begin with '{', not whitespace");
  }

  SchemaHandler handler(h.data_size);
  bool ok;
  try {
    ok = Json::sax_parse(header_json.begin(), header_json.end(), &handler, Json::input_format_t::json,
                         /*strict=*/true, /*ignore_comments=*/false);
  } catch (const std::bad_alloc&) {
    return ResourceExhausted("safetensors header: out of memory parsing a header of " + std::to_string(n) + " bytes",
                             "safetensors.out_of_memory");
  } catch (const std::exception& e) {
    return Fail(ParseError::kInvalidJson, e.what());
  }
  if (handler.failure()) return *handler.failure();
  if (!ok || !handler.done())
    return Fail(ParseError::kInvalidJson, handler.json_error().value_or("the JSON parser stopped early"));

  h.tensors = std::move(handler.tensors());
  h.metadata = std::move(handler.metadata());
  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorEntry& a, const TensorEntry& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  RETURN_IF_ERROR(CheckTiling(h.tensors, h.data_size));
  return h;
}

Result<Header> ReadHeader(int fd, std::uint64_t file_size) {
  if (file_size < 8)
    return Fail(ParseError::kFileTooSmall,
                "file of " + std::to_string(file_size) + " bytes is too small for the 8-byte header length");
  unsigned char len_le[8];
  RETURN_IF_ERROR(posix::PreadFull(fd, std::as_writable_bytes(std::span(len_le)), 0, "safetensors header length"));
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_le[i];
  // Both checks come before the allocation: N is attacker-controlled.
  if (n > kMaxHeaderSize)
    return Fail(ParseError::kHeaderTooLarge, "header length " + std::to_string(n) + " exceeds the limit of " +
                                                 std::to_string(kMaxHeaderSize));
  if (n > file_size - 8)
    return Fail(ParseError::kHeaderOutOfBounds, "8 + header length " + std::to_string(n) +
                                                    " exceeds the file size of " + std::to_string(file_size) + " bytes");
  std::string json(static_cast<std::size_t>(n), '\0');
  RETURN_IF_ERROR(posix::PreadFull(fd, std::as_writable_bytes(std::span(json.data(), json.size())), 8,
                                   "safetensors header"));
  return ParseHeader(json, file_size);
}

Result<Header> ReadHeaderFile(const std::string& path) {
  ASSIGN_OR_RETURN(posix::Fd fd, posix::Open(path, O_RDONLY | O_NONBLOCK));
  ASSIGN_OR_RETURN(posix::FileInfo info, posix::Stat(fd.get(), path));
  if (!S_ISREG(info.mode)) return InvalidArgument(path + " is not a regular file", "safetensors.not_a_regular_file");
  auto h = ReadHeader(fd.get(), info.size);
  if (!h.ok()) return h.status().WithContext(path);
  return h;
}

}  // namespace weightd::st
