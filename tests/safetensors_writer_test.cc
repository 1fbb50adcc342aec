// Tests of the streaming safetensors writer: spec validation, chunked streaming, padding,
// atomic replacement and cleanup on failure. Round trips of every dtype through the parser
// live in safetensors_test.cc.
#include "safetensors_writer.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "safetensors.h"

namespace weightd::st {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/st_writer_test.XXXXXX";
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
  // Names of the entries in the directory, to spot leftover temporary files.
  std::vector<std::string> List() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  std::string path_;
};

std::byte Pattern(std::size_t i, std::uint64_t off) { return static_cast<std::byte>((i * 31 + off * 13 + (off >> 16)) & 0xff); }

void FillPattern(std::size_t i, std::uint64_t off, std::span<std::byte> out) {
  for (std::size_t k = 0; k < out.size(); ++k) out[k] = Pattern(i, off + k);
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::uint64_t LengthOf(const std::string& file) {
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(file[i]);
  return n;
}

TEST(SafetensorsWriter, NbytesIsProductTimesDtypeSize) {
  EXPECT_EQ((TensorSpec{"s", DType::kF64, {}}.nbytes()), 8u);
  EXPECT_EQ((TensorSpec{"m", DType::kBF16, {3, 5}}.nbytes()), 30u);
  EXPECT_EQ((TensorSpec{"z", DType::kF32, {7, 0, 9}}.nbytes()), 0u);
  constexpr auto kMax = std::numeric_limits<std::uint64_t>::max();
  EXPECT_EQ((TensorSpec{"neg", DType::kU8, {4, -1}}.nbytes()), kMax);
  EXPECT_EQ((TensorSpec{"big", DType::kF32, {std::int64_t{1} << 62, 4}}.nbytes()), kMax);
}

TEST(SafetensorsWriter, RejectsBadSpecsWithoutTouchingTheDestination) {
  TempDir dir;
  const std::string path = dir.File("out.safetensors");
  const std::vector<std::pair<std::string, std::vector<TensorSpec>>> cases = {
      {"negative dim", {{"w", DType::kF32, {2, -3}}}},
      {"overflow", {{"w", DType::kF64, {std::int64_t{1} << 62, 8}}}},
      {"total overflow", {{"a", DType::kU8, {std::int64_t{1} << 62, 3}}, {"b", DType::kU8, {std::int64_t{1} << 62, 2}}}},
      {"duplicate", {{"w", DType::kU8, {1}}, {"w", DType::kU8, {1}}}},
      {"metadata name", {{"__metadata__", DType::kU8, {1}}}},
      {"empty name", {{"", DType::kU8, {1}}}},
      {"bad utf8 name", {{"w\xC0\x80", DType::kU8, {1}}}},
      {"bad dtype", {{"w", static_cast<DType>(99), {1}}}},
  };
  for (const auto& [what, specs] : cases) {
    auto r = WriteFile(path, specs, FillPattern);
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << what;
    EXPECT_EQ(r.status().reason(), "safetensors.bad_spec") << what;
    EXPECT_NE(r.status().message().find(path), std::string::npos) << r.status().message();
  }
  auto m = WriteFile(path, {{"w", DType::kU8, {1}}}, FillPattern, {{"k", "\xED\xA0\x80"}});
  EXPECT_EQ(m.status().reason(), "safetensors.bad_spec");
  EXPECT_TRUE(dir.List().empty()) << "nothing may be created for a rejected spec";
}

TEST(SafetensorsWriter, StreamsLargeTensorsThroughBoundedChunks) {
  TempDir dir;
  const std::string path = dir.File("big.safetensors");
  // One tensor larger than the writer's buffer, so data crosses several flushes.
  const std::vector<TensorSpec> specs = {
      {"head", DType::kF32, {3}},
      {"body", DType::kU8, {(std::int64_t{9} << 20) + 1000}},
      {"empty", DType::kF16, {0, 4}},
      {"tail", DType::kI16, {5}},
  };
  std::vector<std::uint64_t> next(specs.size(), 0);
  std::size_t largest = 0;
  bool in_order = true;
  std::size_t last_index = 0;
  auto fill = [&](std::size_t i, std::uint64_t off, std::span<std::byte> out) {
    EXPECT_LT(i, specs.size());
    EXPECT_EQ(off, next[i]) << "chunks of a tensor arrive in order, without holes";
    EXPECT_FALSE(out.empty());
    EXPECT_LE(off + out.size(), specs[i].nbytes());
    in_order = in_order && i >= last_index;
    last_index = i;
    next[i] = off + out.size();
    largest = std::max(largest, out.size());
    FillPattern(i, off, out);
  };
  auto w = WriteFile(path, specs, fill);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_TRUE(in_order);
  for (std::size_t i = 0; i < specs.size(); ++i) EXPECT_EQ(next[i], specs[i].nbytes()) << specs[i].name;
  EXPECT_LE(largest, std::size_t{8} << 20) << "fill must be called with bounded chunks";

  const std::string file = ReadAll(path);
  ASSERT_EQ(file.size(), *w);
  auto h = ReadHeaderFile(path);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_EQ(h->tensors.size(), 4u);
  for (const TensorEntry& t : h->tensors) {
    const std::size_t i = static_cast<std::size_t>(
        std::find_if(specs.begin(), specs.end(), [&](const TensorSpec& s) { return s.name == t.name; }) - specs.begin());
    ASSERT_LT(i, specs.size()) << t.name;
    for (std::uint64_t k = 0; k < t.nbytes(); ++k)
      if (static_cast<std::byte>(file[h->data_offset + t.begin + k]) != Pattern(i, k))
        FAIL() << t.name << " differs at byte " << k;
  }
}

TEST(SafetensorsWriter, PadsHeaderWithSpacesToAMultipleOf8) {
  TempDir dir;
  for (int len = 1; len <= 9; ++len) {
    const std::string path = dir.File("p" + std::to_string(len));
    auto w = WriteFile(path, {{std::string(len, 'x'), DType::kU8, {1}}}, FillPattern);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    const std::string file = ReadAll(path);
    const std::uint64_t n = LengthOf(file);
    EXPECT_EQ(n % 8, 0u);
    const std::string header = file.substr(8, n);
    const std::string json = BuildHeaderJson({{std::string(len, 'x'), DType::kU8, {1}}}, {});
    EXPECT_EQ(header.substr(0, json.size()), json);
    EXPECT_EQ(header.find_first_not_of(' ', json.size()), std::string::npos) << "padding is spaces only";
    EXPECT_LT(n - json.size(), 8u);
    EXPECT_EQ(file.size(), 8 + n + 1);
  }
}

TEST(SafetensorsWriter, BuildHeaderJsonKeepsTheGivenOrderAfterMetadata) {
  const std::string json = BuildHeaderJson({{"z", DType::kU8, {2}}, {"a", DType::kF8E5M2, {1, 3}}}, {{"format", "pt"}});
  EXPECT_EQ(json,
            R"({"__metadata__":{"format":"pt"},"z":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
            R"("a":{"dtype":"F8_E5M2","shape":[1,3],"data_offsets":[2,5]}})");
  EXPECT_EQ(BuildHeaderJson({}, {}), "{}");
}

TEST(SafetensorsWriter, FailedFillLeavesExistingFileAndNoTemporary) {
  TempDir dir;
  const std::string path = dir.File("model.safetensors");
  { std::ofstream(path) << "old contents"; }
  auto r = WriteFile(path, {{"a", DType::kU8, {4}}, {"b", DType::kU8, {4}}},
                     [](std::size_t i, std::uint64_t, std::span<std::byte> out) {
                       if (i == 1) throw std::runtime_error("disk source vanished");
                       std::fill(out.begin(), out.end(), std::byte{1});
                     });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInternal);
  EXPECT_EQ(r.status().reason(), "safetensors.fill_failed");
  EXPECT_NE(r.status().message().find("disk source vanished"), std::string::npos);
  EXPECT_NE(r.status().message().find("'b'"), std::string::npos);
  EXPECT_EQ(ReadAll(path), "old contents");
  EXPECT_EQ(dir.List(), std::vector<std::string>{"model.safetensors"});
}

TEST(SafetensorsWriter, ReplacesAnExistingFile) {
  TempDir dir;
  const std::string path = dir.File("model.safetensors");
  ASSERT_TRUE(WriteFile(path, {{"a", DType::kU8, {64}}}, FillPattern).ok());
  auto w = WriteFile(path, {{"b", DType::kI32, {2}}}, FillPattern);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_EQ(fs::file_size(path), *w);
  auto h = ReadHeaderFile(path);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_EQ(h->tensors.size(), 1u);
  EXPECT_EQ(h->tensors[0].name, "b");
  EXPECT_EQ(dir.List(), std::vector<std::string>{"model.safetensors"});
}

TEST(SafetensorsWriter, ReportsAMissingDirectory) {
  TempDir dir;
  const std::string path = dir.File("no/such/dir/model.safetensors");
  auto r = WriteFile(path, {{"a", DType::kU8, {1}}}, FillPattern);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_NE(r.status().message().find("no/such/dir/model.safetensors"), std::string::npos) << r.status().message();
}

TEST(SafetensorsWriter, NeverCallsFillForZeroSizeTensors) {
  TempDir dir;
  int calls = 0;
  auto w = WriteFile(dir.File("z"), {{"a", DType::kF32, {0}}, {"b", DType::kU8, {}}, {"c", DType::kF64, {2, 0}}},
                     [&](std::size_t i, std::uint64_t, std::span<std::byte> out) {
                       ++calls;
                       EXPECT_EQ(i, 1u);
                       EXPECT_EQ(out.size(), 1u);
                       out[0] = std::byte{7};
                     });
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_EQ(calls, 1);
  auto h = ReadHeaderFile(dir.File("z"));
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->tensors.size(), 3u);
  EXPECT_EQ(h->data_size, 1u);
}

}  // namespace
}  // namespace weightd::st
