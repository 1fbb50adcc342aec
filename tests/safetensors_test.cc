// Tests of the safetensors header parser: one test per rule (asserting the exact ParseError),
// round trips through the writer for every dtype, and the edge cases the format allows.
#include "safetensors.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "safetensors_writer.h"

namespace weightd::st {
namespace {

namespace fs = std::filesystem;
using namespace std::string_literals;

// A private directory removed with its contents at scope exit (tests/support is not used so
// this file stays self-contained).
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/safetensors_test.XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed: " + std::string(std::strerror(errno)));
    path_ = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string File(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string LengthPrefix(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(n >> (8 * i));
  return s;
}

// u64 LE length + header + `data_size` zero bytes.
std::string Image(const std::string& header, std::uint64_t data_size = 0) {
  return LengthPrefix(header.size()) + header + std::string(data_size, '\0');
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

// Parses `header` as the header of a file whose data section holds `data_size` bytes.
Result<Header> Parse(const std::string& header, std::uint64_t data_size = 0) {
  return ParseHeader(header, 8 + header.size() + data_size);
}

// The ParseError of `r`, with a readable failure if `r` is OK or not a parser error.
::testing::AssertionResult FailsWith(const Result<Header>& r, ParseError want) {
  if (r.ok()) return ::testing::AssertionFailure() << "parsed OK, wanted " << ParseErrorReason(want);
  ParseError got;
  if (!ParseErrorFromStatus(r.status(), &got))
    return ::testing::AssertionFailure() << "not a parser error: " << r.status().ToString();
  if (r.status().code() != ParseErrorCode(want))
    return ::testing::AssertionFailure() << "code is not " << CodeName(ParseErrorCode(want)) << ": "
                                         << r.status().ToString();
  if (got != want)
    return ::testing::AssertionFailure() << "got " << ParseErrorReason(got) << ", wanted " << ParseErrorReason(want)
                                         << ": " << r.status().ToString();
  return ::testing::AssertionSuccess() << r.status().ToString();
}

// A tensor entry's JSON text.
std::string Entry(const std::string& dtype, const std::string& shape, std::uint64_t b, std::uint64_t e) {
  return R"({"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":[)" + std::to_string(b) + "," +
         std::to_string(e) + "]}";
}

// A deterministic byte for tensor `i` at byte `off`, so data read back can be checked.
std::byte Pattern(std::size_t i, std::uint64_t off) {
  return static_cast<std::byte>((i * 131 + off * 7 + (off >> 8)) & 0xff);
}

void FillPattern(std::size_t i, std::uint64_t off, std::span<std::byte> out) {
  for (std::size_t k = 0; k < out.size(); ++k) out[k] = Pattern(i, off + k);
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// ---- Rule: the file holds the 8-byte length, N fits, N <= kMaxHeaderSize -----------------

TEST(Safetensors, RejectsFileTooSmall) {
  TempDir dir;
  for (std::size_t size : {0, 1, 7}) {
    const std::string path = dir.File("small" + std::to_string(size));
    WriteBytes(path, std::string(size, '\x02'));
    EXPECT_TRUE(FailsWith(ReadHeaderFile(path), ParseError::kFileTooSmall)) << size;
  }
}

TEST(Safetensors, RejectsHeaderLengthOf2Pow63) {
  TempDir dir;
  const std::string path = dir.File("huge.safetensors");
  WriteBytes(path, LengthPrefix(std::uint64_t{1} << 63) + "{}");
  auto r = ReadHeaderFile(path);
  EXPECT_TRUE(FailsWith(r, ParseError::kHeaderTooLarge));
  EXPECT_NE(r.status().message().find("9223372036854775808"), std::string::npos) << r.status().message();
}

TEST(Safetensors, RejectsHeaderLargerThanLimit) {
  TempDir dir;
  const std::string path = dir.File("big.safetensors");
  WriteBytes(path, LengthPrefix(kMaxHeaderSize + 1) + "{}");
  EXPECT_TRUE(FailsWith(ReadHeaderFile(path), ParseError::kHeaderTooLarge));
  WriteBytes(path, LengthPrefix(std::numeric_limits<std::uint64_t>::max()) + "{}");
  EXPECT_TRUE(FailsWith(ReadHeaderFile(path), ParseError::kHeaderTooLarge));
}

TEST(Safetensors, RejectsHeaderBeyondEndOfFile) {
  TempDir dir;
  const std::string path = dir.File("short.safetensors");
  WriteBytes(path, LengthPrefix(100) + "{}");
  EXPECT_TRUE(FailsWith(ReadHeaderFile(path), ParseError::kHeaderOutOfBounds));
  // ParseHeader applies the same rule to the size it is given.
  EXPECT_TRUE(FailsWith(ParseHeader("{}", 9), ParseError::kHeaderOutOfBounds));
  EXPECT_TRUE(FailsWith(ParseHeader("{}", 0), ParseError::kHeaderOutOfBounds));
}

// ---- Rule: valid UTF-8 ------------------------------------------------------------------------

TEST(Safetensors, RejectsInvalidUtf8) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"overlong 2-byte NUL", "\xC0\x80"},
      {"overlong 2-byte '/'", "\xC1\xAF"},
      {"overlong 3-byte", "\xE0\x80\xAF"},
      {"overlong 4-byte", "\xF0\x80\x80\xAF"},
      {"high surrogate", "\xED\xA0\x80"},
      {"low surrogate", "\xED\xBF\xBF"},
      {"above U+10FFFF", "\xF4\x90\x80\x80"},
      {"F5 lead byte", "\xF5\x80\x80\x80"},
      {"FF byte", "\xFF"},
      {"lone continuation", "\x80"},
      {"truncated 3-byte", "\xE2\x82"},
      {"bad continuation", "\xE2\x28\xA1"},
  };
  for (const auto& [what, bytes] : cases) {
    // In a key, in a value, and at the very end of the header (no room for continuations).
    EXPECT_TRUE(FailsWith(Parse(R"({"a)" + bytes + R"(":)" + Entry("U8", "[0]", 0, 0) + "}"), ParseError::kInvalidUtf8))
        << what;
    EXPECT_TRUE(FailsWith(Parse(R"({"__metadata__":{"k":")" + bytes + R"("}})"), ParseError::kInvalidUtf8)) << what;
    EXPECT_TRUE(FailsWith(Parse("{}" + bytes), ParseError::kInvalidUtf8)) << what;
    EXPECT_FALSE(IsValidUtf8(bytes)) << what;
  }
}

TEST(Safetensors, AcceptsMultibyteUtf8Names) {
  // 2-, 3- and 4-byte sequences at the edges of their valid ranges.
  const std::string names[] = {"\xC2\x80", "\xDF\xBF", "\xE0\xA0\x80", "\xED\x9F\xBF", "\xEE\x80\x80",
                               "\xEF\xBF\xBF", "\xF0\x90\x80\x80", "\xF4\x8F\xBF\xBF", "caf\xC3\xA9.w"};
  std::string header = "{";
  for (std::size_t i = 0; i < std::size(names); ++i) {
    if (i) header += ",";
    header += "\"" + names[i] + "\":" + Entry("U8", "[1]", i, i + 1);
  }
  header += "}";
  auto r = Parse(header, std::size(names));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->tensors.size(), std::size(names));
  for (std::size_t i = 0; i < std::size(names); ++i) EXPECT_EQ(r->tensors[i].name, names[i]);
}

TEST(Safetensors, RejectsByteOrderMarkAsInvalidJson) {
  auto r = Parse("\xEF\xBB\xBF{}");
  EXPECT_TRUE(FailsWith(r, ParseError::kInvalidJson));
  EXPECT_NE(r.status().message().find("byte-order mark"), std::string::npos);
}

// ---- Rule: valid JSON ---------------------------------------------------------------------

TEST(Safetensors, RejectsInvalidJson) {
  const std::string cases[] = {
      "",
      "{",
      R"({"a":)",
      "{} x",
      "{}{}",
      "{}\0"s,
      "{}\0garbage"s,  // nlohmann alone stops at a NUL and would accept this
      "{\"__metadata__\":{\"k\":\"a\0b\"}}"s,
      R"({'a':1})",
      R"({a:1})",
      R"({"__metadata__":{},})",
      "{/* comment */}",
      " {}",     // the format requires '{' first
      "\n\t{}",
      R"({"\ud800":{}})",  // lone surrogate escape
      "{\"a\x01\":{}}",    // raw control character in a string
      R"({"a":{"dtype":"U8","shape":[1e400],"data_offsets":[0,0]}})",  // number out of double range
      "nul",
  };
  for (const std::string& h : cases) EXPECT_TRUE(FailsWith(Parse(h), ParseError::kInvalidJson)) << h;
}

TEST(Safetensors, AcceptsTrailingWhitespacePadding) {
  auto r = Parse("{}      \n\t\r ");
  EXPECT_TRUE(r.ok()) << r.status().ToString();
}

// ---- Rule: the header and tensor entries are objects ---------------------------------------

TEST(Safetensors, RejectsHeaderThatIsNotAnObject) {
  for (const std::string h : {"[]", "[{}]", R"("x")", "1", "-1", "1.5", "null", "true", "false"})
    EXPECT_TRUE(FailsWith(Parse(h), ParseError::kNotAnObject)) << h;
}

TEST(Safetensors, RejectsTensorEntryThatIsNotAnObject) {
  for (const std::string v : {"[]", "[0,0]", R"("U8")", "0", "null", "true"}) {
    auto r = Parse(R"({"weight":)" + v + "}");
    EXPECT_TRUE(FailsWith(r, ParseError::kNotAnObject)) << v;
    EXPECT_NE(r.status().message().find("'weight'"), std::string::npos) << r.status().message();
  }
}

// ---- Rule: no duplicate keys at any level ------------------------------------------------

TEST(Safetensors, RejectsDuplicateKey) {
  auto r = Parse(R"({"w":)" + Entry("U8", "[1]", 0, 1) + R"(,"w":)" + Entry("U8", "[1]", 1, 2) + "}", 2);
  EXPECT_TRUE(FailsWith(r, ParseError::kDuplicateKey));
  EXPECT_NE(r.status().message().find("'w'"), std::string::npos) << r.status().message();
}

TEST(Safetensors, RejectsDuplicateKeyAfterUnescaping) {
  EXPECT_TRUE(FailsWith(Parse(R"({"ab":)" + Entry("U8", "[1]", 0, 1) + R"(,"\u0061b":)" + Entry("U8", "[1]", 1, 2) + "}", 2),
                        ParseError::kDuplicateKey));
}

TEST(Safetensors, RejectsNestedDuplicateKeyInTensorEntry) {
  for (const std::string e : {
           R"({"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]})",
           R"({"dtype":"U8","shape":[1],"shape":[1],"data_offsets":[0,1]})",
           R"({"dtype":"U8","shape":[1],"data_offsets":[0,1],"data_offsets":[0,1]})",
       }) {
    auto r = Parse(R"({"w":)" + e + "}", 1);
    EXPECT_TRUE(FailsWith(r, ParseError::kDuplicateKey)) << e;
    EXPECT_NE(r.status().message().find("'w'"), std::string::npos) << r.status().message();
  }
}

TEST(Safetensors, RejectsDuplicateMetadataKeys) {
  EXPECT_TRUE(FailsWith(Parse(R"({"__metadata__":{"k":"a","k":"b"}})"), ParseError::kDuplicateKey));
  EXPECT_TRUE(FailsWith(Parse(R"({"__metadata__":{},"__metadata__":{}})"), ParseError::kDuplicateKey));
}

// ---- Rule: exactly dtype, shape and data_offsets, correctly typed --------------------------

TEST(Safetensors, RejectsBadTensorEntry) {
  const std::string cases[] = {
      R"({})",
      R"({"shape":[1],"data_offsets":[0,1]})",                                        // no dtype
      R"({"dtype":"U8","data_offsets":[0,1]})",                                       // no shape
      R"({"dtype":"U8","shape":[1]})",                                                // no data_offsets
      R"({"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1})",                 // extra field
      R"({"dtype":"U8","shape":[1],"data_offsets":[0,1],"__metadata__":{}})",         // extra field
      R"({"dtype":1,"shape":[1],"data_offsets":[0,1]})",                              // dtype mistyped
      R"({"dtype":["U8"],"shape":[1],"data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":"1","data_offsets":[0,1]})",                           // shape mistyped
      R"({"dtype":"U8","shape":{"0":1},"data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":[1.0],"data_offsets":[0,1]})",                         // float dim
      R"({"dtype":"U8","shape":[1e0],"data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":[-1],"data_offsets":[0,1]})",                          // negative dim
      R"({"dtype":"U8","shape":[-0],"data_offsets":[0,0]})",
      R"({"dtype":"U8","shape":[[1]],"data_offsets":[0,1]})",                         // nested
      R"({"dtype":"U8","shape":[null],"data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]})",        // > UINT64_MAX
      R"({"dtype":"U8","shape":[1],"data_offsets":[0]})",                             // 1 offset
      R"({"dtype":"U8","shape":[1],"data_offsets":[]})",
      R"({"dtype":"U8","shape":[1],"data_offsets":[0,1,1]})",                         // 3 offsets
      R"({"dtype":"U8","shape":[1],"data_offsets":[0,1.0]})",
      R"({"dtype":"U8","shape":[1],"data_offsets":[-0,1]})",
      R"({"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551617]})",
      R"({"dtype":"U8","shape":[1],"data_offsets":{"begin":0,"end":1}})",
      R"({"dtype":"U8","shape":[1],"data_offsets":"0,1"})",
  };
  for (const std::string& e : cases) {
    auto r = Parse(R"({"w":)" + e + "}", 1);
    EXPECT_TRUE(FailsWith(r, ParseError::kBadTensorEntry)) << e;
    EXPECT_NE(r.status().message().find("'w'"), std::string::npos) << r.status().message();
  }
}

TEST(Safetensors, RejectsEmptyOverlongAndControlCharacterNames) {
  const std::string entry = R"({"dtype":"U8","shape":[1],"data_offsets":[0,1]})";
  for (const std::string& name : {std::string(""), std::string("a\\u0000b"), std::string("tab\\there"),
                                  std::string(kMaxTensorNameBytes + 1, 'n')}) {
    auto r = Parse("{\"" + name + "\":" + entry + "}", 1);
    EXPECT_TRUE(FailsWith(r, ParseError::kBadTensorEntry)) << name.substr(0, 20);
  }
  EXPECT_TRUE(Parse("{\"" + std::string(kMaxTensorNameBytes, 'n') + "\":" + entry + "}", 1).ok());
}

TEST(Safetensors, RefusesUnknownDtypeNamesAsUnsupportedNotDataLoss) {
  // Names of no safetensors release, misspellings, and torch's spellings of real types.
  for (const std::string d : {"F128", "f32", "bf16", "", "U8 ", "FLOAT", "F8_E4M3FN", "F8_E8M0FNU", "C128", "F4_X2"}) {
    auto r = Parse(R"({"w":)" + Entry(d, "[1]", 0, 1) + "}", 1);
    EXPECT_TRUE(FailsWith(r, ParseError::kUnsupportedDtype)) << d;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << d;
    EXPECT_EQ(r.status().reason(), "safetensors.unsupported_dtype") << d;
    EXPECT_NE(r.status().message().find("'w'"), std::string::npos) << r.status().message();
  }
}

TEST(Safetensors, AcceptsAllTwentyTwoDtypesWithPackedSubByteSizes) {
  // name, shape, bytes: the sub-byte types pack without padding (F4: 4 bits, F6: 6 bits).
  const std::tuple<std::string, std::string, std::uint64_t> cases[] = {
      {"F64", "[2]", 16},        {"F32", "[2]", 8},        {"F16", "[2]", 4},         {"BF16", "[2]", 4},
      {"I64", "[2]", 16},        {"I32", "[2]", 8},        {"I16", "[2]", 4},         {"I8", "[2]", 2},
      {"U64", "[2]", 16},        {"U32", "[2]", 8},        {"U16", "[2]", 4},         {"U8", "[2]", 2},
      {"BOOL", "[2]", 2},        {"F8_E4M3", "[2]", 2},    {"F8_E5M2", "[2]", 2},     {"F8_E8M0", "[3]", 3},
      {"F8_E4M3FNUZ", "[3]", 3}, {"F8_E5M2FNUZ", "[3]", 3}, {"C64", "[3]", 24},       {"F4", "[3,2]", 3},
      {"F4", "[1,6]", 3},        {"F6_E2M3", "[4]", 3},    {"F6_E3M2", "[2,2,2]", 6}, {"F4", "[0,3]", 0},
      {"F6_E2M3", "[0]", 0},
  };
  std::set<std::string> names;
  for (const auto& [dtype, shape, bytes] : cases) {
    auto r = Parse(R"({"w":)" + Entry(dtype, shape, 0, bytes) + "}", bytes);
    ASSERT_TRUE(r.ok()) << dtype << " " << shape << ": " << r.status().ToString();
    EXPECT_EQ(DTypeName(r->tensors.at(0).dtype), dtype);
    EXPECT_EQ(r->tensors.at(0).nbytes(), bytes);
    names.insert(dtype);
  }
  EXPECT_EQ(names.size(), 22u);
  EXPECT_EQ(std::size(kAllDTypes), 22u);
}

TEST(Safetensors, RejectsSubByteShapesThatDoNotFillWholeBytes) {
  const std::pair<std::string, std::string> cases[] = {
      {"F4", "[3]"}, {"F4", "[]"}, {"F4", "[5,1]"}, {"F6_E2M3", "[1]"}, {"F6_E3M2", "[2]"}, {"F6_E2M3", "[3,3]"},
  };
  for (const auto& [dtype, shape] : cases) {
    // Whatever span the header claims: no byte count fits a partial byte.
    for (std::uint64_t span : {0, 1, 2, 3}) {
      auto r = Parse(R"({"w":)" + Entry(dtype, shape, 0, span) + "}", span);
      EXPECT_TRUE(FailsWith(r, ParseError::kPartialByte)) << dtype << " " << shape << " span " << span;
      EXPECT_NE(r.status().message().find("'w'"), std::string::npos) << r.status().message();
    }
  }
  // Sub-byte sizes that overflow 64 bits are overflows, not partial bytes.
  EXPECT_TRUE(FailsWith(Parse(R"({"w":)" + Entry("F4", "[4611686018427387904,4]", 0, 0) + "}"), ParseError::kShapeOverflow));
  EXPECT_TRUE(FailsWith(Parse(R"({"w":)" + Entry("F6_E2M3", "[3074457345618258603]", 0, 0) + "}"),
                        ParseError::kShapeOverflow));
}

// ---- Rule: product(shape) * size fits 64 bits and equals end - begin -----------------------

TEST(Safetensors, RejectsShapeOverflow) {
  const std::string cases[] = {
      "[4294967296,4294967296]",           // 2^64 elements
      "[2305843009213693952]",             // 2^61 F32 elements: 2^63 bytes fits, F64 would not
      "[9223372036854775808]",             // a dimension above INT64_MAX
      "[4294967296,4294967296,0]",         // overflows before the zero, as the reference does
      "[18446744073709551615]",
  };
  for (const std::string& shape : cases) {
    auto r = Parse(R"({"w":)" + Entry("F64", shape, 0, 0) + "}");
    EXPECT_TRUE(FailsWith(r, ParseError::kShapeOverflow)) << shape;
  }
}

TEST(Safetensors, RejectsSizeMismatch) {
  auto r = Parse(R"({"w":)" + Entry("F32", "[2,2]", 0, 12) + "}", 12);
  EXPECT_TRUE(FailsWith(r, ParseError::kSizeMismatch));
  EXPECT_NE(r.status().message().find("'w'"), std::string::npos);
  EXPECT_NE(r.status().message().find("16 bytes"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("[0, 12]"), std::string::npos) << r.status().message();
  // A scalar is one element, not zero.
  EXPECT_TRUE(FailsWith(Parse(R"({"s":)" + Entry("F32", "[]", 0, 0) + "}"), ParseError::kSizeMismatch));
  EXPECT_TRUE(FailsWith(Parse(R"({"z":)" + Entry("F32", "[0]", 0, 4) + "}", 4), ParseError::kSizeMismatch));
}

// ---- Rule: offsets inside the data section, begin <= end -----------------------------------

TEST(Safetensors, RejectsOffsetOutOfBounds) {
  // begin > end
  EXPECT_TRUE(FailsWith(Parse(R"({"w":)" + Entry("U8", "[4]", 8, 4) + "}", 8), ParseError::kOffsetOutOfBounds));
  // end beyond the data section
  auto r = Parse(R"({"w":)" + Entry("U8", "[4]", 0, 4) + "}", 3);
  EXPECT_TRUE(FailsWith(r, ParseError::kOffsetOutOfBounds));
  EXPECT_NE(r.status().message().find("3 bytes"), std::string::npos) << r.status().message();
  // zero-size tensor past the end
  EXPECT_TRUE(FailsWith(Parse(R"({"w":)" + Entry("U8", "[0]", 5, 5) + "}", 4), ParseError::kOffsetOutOfBounds));
  // offsets near UINT64_MAX
  EXPECT_TRUE(FailsWith(Parse(R"({"w":)" + Entry("U8", "[1]", 18446744073709551614ull, 18446744073709551615ull) + "}", 4),
                        ParseError::kOffsetOutOfBounds));
}

// ---- Rule: tensors tile the data section ----------------------------------------------------

TEST(Safetensors, RejectsOverlap) {
  auto r = Parse(R"({"a":)" + Entry("U8", "[8]", 0, 8) + R"(,"b":)" + Entry("U8", "[8]", 4, 12) + "}", 12);
  EXPECT_TRUE(FailsWith(r, ParseError::kOverlap));
  EXPECT_NE(r.status().message().find("'a'"), std::string::npos);
  EXPECT_NE(r.status().message().find("'b'"), std::string::npos);
  // Two tensors on the same bytes (aliasing) are an overlap too.
  EXPECT_TRUE(FailsWith(Parse(R"({"a":)" + Entry("U8", "[8]", 0, 8) + R"(,"b":)" + Entry("U8", "[8]", 0, 8) + "}", 8),
                        ParseError::kOverlap));
  // A zero-size tensor strictly inside another one is not on a boundary.
  EXPECT_TRUE(FailsWith(Parse(R"({"a":)" + Entry("U8", "[8]", 0, 8) + R"(,"z":)" + Entry("U8", "[0]", 4, 4) + "}", 8),
                        ParseError::kOverlap));
}

TEST(Safetensors, RejectsGap) {
  auto r = Parse(R"({"a":)" + Entry("U8", "[4]", 0, 4) + R"(,"b":)" + Entry("U8", "[4]", 8, 12) + "}", 12);
  EXPECT_TRUE(FailsWith(r, ParseError::kGap));
  EXPECT_NE(r.status().message().find("'b'"), std::string::npos);
  // A gap before the first tensor.
  EXPECT_TRUE(FailsWith(Parse(R"({"a":)" + Entry("U8", "[4]", 4, 8) + "}", 8), ParseError::kGap));
}

TEST(Safetensors, RejectsTrailingData) {
  EXPECT_TRUE(FailsWith(Parse(R"({"a":)" + Entry("U8", "[4]", 0, 4) + "}", 8), ParseError::kTrailingData));
  EXPECT_TRUE(FailsWith(Parse("{}", 1), ParseError::kTrailingData));
  EXPECT_TRUE(FailsWith(Parse(R"({"__metadata__":{"a":"b"}})", 16), ParseError::kTrailingData));
}

// ---- Rule: __metadata__ maps strings to strings ---------------------------------------------

TEST(Safetensors, RejectsBadMetadata) {
  for (const std::string m : {R"("x")", "[]", "1", "null", R"({"k":1})", R"({"k":null})", R"({"k":["v"]})",
                              R"({"k":{"a":"b"}})", R"({"k":true})"}) {
    EXPECT_TRUE(FailsWith(Parse(R"({"__metadata__":)" + m + "}"), ParseError::kBadMetadata)) << m;
  }
}

// ---- Hostile shapes of input -----------------------------------------------------------------

TEST(Safetensors, RefusesDeepNestingAtItsFirstLevel) {
  const std::size_t depth = 1'000'000;  // would overflow a recursive parser's stack
  EXPECT_TRUE(FailsWith(Parse(std::string(depth, '[') + std::string(depth, ']')), ParseError::kNotAnObject));
  EXPECT_TRUE(FailsWith(Parse(R"({"w":)" + std::string(depth, '[')), ParseError::kNotAnObject));
  EXPECT_TRUE(FailsWith(Parse(R"({"w":{"shape":)" + std::string(depth, '[')), ParseError::kBadTensorEntry));
  EXPECT_TRUE(FailsWith(Parse(R"({"__metadata__":{"k":)" + std::string(depth, '{')), ParseError::kBadMetadata));
}

TEST(Safetensors, ClipsHostileNamesInMessages) {
  // Both names are refused (too long; control characters), and the refusal quotes them safely.
  const std::string name(1 << 20, 'n');
  auto r = Parse("{\"" + name + "\":" + Entry("U8", "[2]", 0, 1) + "}", 1);
  EXPECT_TRUE(FailsWith(r, ParseError::kBadTensorEntry));
  EXPECT_LT(r.status().message().size(), 1024u);
  EXPECT_NE(r.status().message().find("1048576 bytes"), std::string::npos) << r.status().message();
  // Control characters in names are escaped, not written raw into logs.
  auto c = Parse(R"({"a\nb\u001b":)" + Entry("U8", "[2]", 0, 1) + "}", 1);
  EXPECT_TRUE(FailsWith(c, ParseError::kBadTensorEntry));
  EXPECT_EQ(c.status().message().find('\n'), std::string::npos);
  EXPECT_NE(c.status().message().find("a\\x0ab\\x1b"), std::string::npos) << c.status().message();
}

// ---- What the format allows ------------------------------------------------------------------

TEST(Safetensors, AcceptsEmptyHeaderWithNoData) {
  auto r = Parse("{}");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->tensors.empty());
  EXPECT_TRUE(r->metadata.empty());
  EXPECT_EQ(r->header_size, 2u);
  EXPECT_EQ(r->data_offset, 10u);
  EXPECT_EQ(r->data_size, 0u);

  TempDir dir;
  const std::string path = dir.File("empty.safetensors");
  auto w = WriteFile(path, {}, FillPattern);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_EQ(*w, 16u);  // 8 + "{}" padded to 8
  auto h = ReadHeaderFile(path);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_TRUE(h->tensors.empty());
  EXPECT_EQ(h->data_size, 0u);
}

TEST(Safetensors, AcceptsZeroSizeTensors) {
  // Several zero-size tensors at one offset, at the start, between two tensors and at the end.
  const std::string h = std::string("{") + R"("z0":)" + Entry("F32", "[0]", 0, 0) + R"(,"z1":)" +
                        Entry("F16", "[3,0,2]", 0, 0) + R"(,"a":)" + Entry("U8", "[4]", 0, 4) + R"(,"zm":)" +
                        Entry("I64", "[0,7]", 4, 4) + R"(,"b":)" + Entry("U8", "[2,2]", 4, 8) + R"(,"ze":)" +
                        Entry("BOOL", "[0]", 8, 8) + "}";
  auto r = Parse(h, 8);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  std::vector<std::string> names;
  for (const auto& t : r->tensors) names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"z0", "z1", "a", "zm", "b", "ze"}));
  EXPECT_EQ(r->tensors[1].shape, (std::vector<std::int64_t>{3, 0, 2}));
  EXPECT_EQ(r->tensors[1].nbytes(), 0u);

  // Only zero-size tensors and no data.
  auto z = Parse(R"({"a":)" + Entry("U8", "[0]", 0, 0) + R"(,"b":)" + Entry("U8", "[0]", 0, 0) + "}");
  ASSERT_TRUE(z.ok()) << z.status().ToString();
  EXPECT_EQ(z->tensors.size(), 2u);
}

TEST(Safetensors, AcceptsScalars) {
  auto r = Parse(R"({"s":)" + Entry("F64", "[]", 0, 8) + R"(,"t":)" + Entry("BOOL", "[]", 8, 9) + "}", 9);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->tensors.size(), 2u);
  EXPECT_TRUE(r->tensors[0].shape.empty());
  EXPECT_EQ(r->tensors[0].nbytes(), 8u);
  EXPECT_EQ(r->tensors[1].dtype, DType::kBool);
}

TEST(Safetensors, SortsTensorsGivenOutOfOrderByOffset) {
  const std::string h = std::string("{") + R"("c":)" + Entry("U8", "[3]", 7, 10) + R"(,"a":)" +
                        Entry("U16", "[2]", 3, 7) + R"(,"__metadata__":{"format":"pt"},"b":)" +
                        Entry("U8", "[3]", 0, 3) + "}";
  auto r = Parse(h, 10);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->tensors.size(), 3u);
  EXPECT_EQ(r->tensors[0].name, "b");
  EXPECT_EQ(r->tensors[1].name, "a");
  EXPECT_EQ(r->tensors[1].dtype, DType::kU16);
  EXPECT_EQ(r->tensors[1].begin, 3u);
  EXPECT_EQ(r->tensors[1].end, 7u);
  EXPECT_EQ(r->tensors[2].name, "c");
  EXPECT_EQ(r->metadata.at("format"), "pt");
}

TEST(Safetensors, MetadataRoundTrips) {
  TempDir dir;
  const std::string path = dir.File("meta.safetensors");
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"empty", ""}, {"quote\"and\\slash", "line\nbreak\ttab"}, {"unicode \xE2\x82\xAC", "\xF0\x9F\x98\x80"}};
  auto w = WriteFile(path, {{"w", DType::kF32, {2}}}, FillPattern, meta);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  auto h = ReadHeaderFile(path);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->metadata, meta);
  // An empty __metadata__ object is legal too.
  auto e = Parse(R"({"__metadata__":{}})");
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_TRUE(e->metadata.empty());
}

TEST(Safetensors, EveryDtypeRoundTripsThroughTheWriter) {
  TempDir dir;
  const std::string path = dir.File("all.safetensors");
  std::vector<TensorSpec> specs;
  for (std::size_t i = 0; i < std::size(kAllDTypes); ++i) {
    const DType dt = kAllDTypes[i];
    // The last dimension a multiple of 4, so that the sub-byte types fill whole bytes.
    specs.push_back({"t." + std::string(DTypeName(dt)), dt,
                     {static_cast<std::int64_t>(i % 3 + 1), 3, static_cast<std::int64_t>(4 * (i + 1))}});
  }
  auto w = WriteFile(path, specs, FillPattern);
  ASSERT_TRUE(w.ok()) << w.status().ToString();

  auto h = ReadHeaderFile(path);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->data_offset % 8, 0u) << "the writer pads the header so the data is 8-byte aligned";
  EXPECT_EQ(h->data_offset + h->data_size, *w);
  ASSERT_EQ(h->tensors.size(), specs.size());

  const std::string file = ReadAll(path);
  ASSERT_EQ(file.size(), *w);
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const TensorEntry& t = h->tensors[i];  // written in order, so sorted order is spec order
    SCOPED_TRACE(t.name);
    EXPECT_EQ(t.name, specs[i].name);
    EXPECT_EQ(t.dtype, specs[i].dtype);
    EXPECT_EQ(t.shape, specs[i].shape);
    EXPECT_EQ(t.begin, offset);
    EXPECT_EQ(t.nbytes(), specs[i].nbytes());
    EXPECT_EQ(t.nbytes() * 8, DTypeBits(specs[i].dtype) * (i % 3 + 1) * 3 * 4 * (i + 1));
    for (std::uint64_t k = 0; k < t.nbytes(); ++k)
      ASSERT_EQ(static_cast<std::byte>(file[h->data_offset + t.begin + k]), Pattern(i, k)) << "byte " << k;
    offset = t.end;
  }
}

TEST(Safetensors, ParsesManyTensors) {
  std::vector<TensorSpec> specs;
  for (int i = 0; i < 2000; ++i)
    specs.push_back({"model.layers." + std::to_string(i / 10) + ".mlp.weight_" + std::to_string(i), DType::kBF16, {i % 5, 3}});
  const std::string header = BuildHeaderJson(specs, {{"format", "pt"}});
  std::uint64_t data = 0;
  for (const auto& s : specs) data += s.nbytes();
  auto r = Parse(header, data);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->tensors.size(), 2000u);
  for (std::size_t i = 1; i < r->tensors.size(); ++i) {
    const auto& a = r->tensors[i - 1];
    const auto& b = r->tensors[i];
    ASSERT_EQ(a.end, b.begin);
    ASSERT_TRUE(a.begin < b.begin || (a.begin == b.begin && (a.end < b.end || (a.end == b.end && a.name < b.name))));
  }
}

TEST(Safetensors, RejectsTruncatedFile) {
  TempDir dir;
  const std::string path = dir.File("t.safetensors");
  auto w = WriteFile(path, {{"a", DType::kF32, {4}}, {"b", DType::kF32, {4}}}, FillPattern);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  const std::string full = ReadAll(path);

  // Cut inside the data: the last tensor runs past the end.
  WriteBytes(path, full.substr(0, full.size() - 3));
  auto r = ReadHeaderFile(path);
  EXPECT_TRUE(FailsWith(r, ParseError::kOffsetOutOfBounds));
  EXPECT_NE(r.status().message().find(path), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("'b'"), std::string::npos) << r.status().message();

  // Cut inside the header.
  WriteBytes(path, full.substr(0, 20));
  EXPECT_TRUE(FailsWith(ReadHeaderFile(path), ParseError::kHeaderOutOfBounds));

  // Cut inside the length.
  WriteBytes(path, full.substr(0, 5));
  EXPECT_TRUE(FailsWith(ReadHeaderFile(path), ParseError::kFileTooSmall));
}

TEST(Safetensors, ReadHeaderUsesPreadNotTheFileOffset) {
  TempDir dir;
  const std::string path = dir.File("p.safetensors");
  ASSERT_TRUE(WriteFile(path, {{"a", DType::kU8, {3}}}, FillPattern).ok());
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::lseek(fd, 5, SEEK_SET), 5);
  auto r = ReadHeader(fd, fs::file_size(path));
  ::close(fd);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->tensors.at(0).name, "a");
}

TEST(Safetensors, ReadHeaderFileNamesTheFileInErrors) {
  TempDir dir;
  auto missing = ReadHeaderFile(dir.File("missing.safetensors"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
  EXPECT_NE(missing.status().message().find("missing.safetensors"), std::string::npos);
  EXPECT_FALSE(ParseErrorFromStatus(missing.status(), nullptr));

  auto d = ReadHeaderFile(dir.path());
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().reason(), "safetensors.not_a_regular_file");

  const std::string fifo = dir.File("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto f = ReadHeaderFile(fifo);  // must not block waiting for a writer
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().reason(), "safetensors.not_a_regular_file");

  const std::string bad = dir.File("bad.safetensors");
  WriteBytes(bad, Image("[]"));
  auto b = ReadHeaderFile(bad);
  EXPECT_TRUE(FailsWith(b, ParseError::kNotAnObject));
  EXPECT_NE(b.status().message().find(bad), std::string::npos) << b.status().message();
}

TEST(Safetensors, ParseErrorReasonsAreDistinctAndRoundTrip) {
  const ParseError all[] = {
      ParseError::kFileTooSmall,  ParseError::kHeaderTooLarge, ParseError::kHeaderOutOfBounds,
      ParseError::kInvalidUtf8,   ParseError::kInvalidJson,    ParseError::kNotAnObject,
      ParseError::kDuplicateKey,  ParseError::kBadTensorEntry, ParseError::kUnsupportedDtype,
      ParseError::kShapeOverflow, ParseError::kPartialByte,    ParseError::kSizeMismatch,
      ParseError::kOffsetOutOfBounds, ParseError::kOverlap,    ParseError::kGap,
      ParseError::kTrailingData,  ParseError::kBadMetadata,
  };
  std::set<std::string_view> seen;
  for (ParseError e : all) {
    const std::string_view reason = ParseErrorReason(e);
    EXPECT_TRUE(reason.starts_with("safetensors.")) << reason;
    EXPECT_TRUE(seen.insert(reason).second) << reason;
    // Only an unknown dtype name is not DataLoss: the file may be sound, from a newer writer.
    EXPECT_EQ(ParseErrorCode(e), e == ParseError::kUnsupportedDtype ? Code::kInvalidArgument : Code::kDataLoss);
    ParseError back;
    ASSERT_TRUE(ParseErrorFromStatus(Status(ParseErrorCode(e), "x", std::string(reason)), &back)) << reason;
    EXPECT_EQ(back, e);
    EXPECT_FALSE(ParseErrorFromStatus(Internal("x", std::string(reason)), &back)) << "the code must match";
  }
  EXPECT_FALSE(ParseErrorFromStatus(DataLoss("x", "io.short_read"), nullptr));
  EXPECT_FALSE(ParseErrorFromStatus(Status::Ok(), nullptr));
}

// Files checked in under tests/data/hostile (also the fuzzer's seeds) are named after the
// reason they must fail with: "<reason>[.<variant>].safetensors".
TEST(Safetensors, RejectsCheckedInHostileFiles) {
  const fs::path dir = fs::path(WEIGHTD_TEST_DATA_DIR) / "hostile";
  int checked = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".safetensors") continue;
    const std::string stem = e.path().filename().string();
    const std::string want = "safetensors." + stem.substr(0, stem.find('.'));
    auto r = ReadHeaderFile(e.path().string());
    ASSERT_FALSE(r.ok()) << stem;
    ParseError got;
    ASSERT_TRUE(ParseErrorFromStatus(r.status(), &got)) << stem << ": " << r.status().ToString();
    EXPECT_EQ(r.status().code(), ParseErrorCode(got)) << stem;
    EXPECT_EQ(r.status().reason(), want) << stem << ": " << r.status().ToString();
    ++checked;
  }
  EXPECT_GE(checked, 17) << "one hostile file per rule is expected in " << dir;
}

}  // namespace
}  // namespace weightd::st
