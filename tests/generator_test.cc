// Tests of the example checkpoint specs and generator (examples/): what weightd-gen writes.
#include <stdlib.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "classifier_spec.h"
#include "generator.h"
#include "safetensors.h"
#include "synthetic.h"

namespace weightd::example {
namespace {

class ScratchDir {
 public:
  ScratchDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "weightd-gen-test-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The data section of a safetensors file.
std::string DataSection(const std::string& path) {
  auto h = st::ReadHeaderFile(path);
  EXPECT_TRUE(h.ok()) << h.status().ToString();
  if (!h.ok()) return {};
  return Slurp(path).substr(h->data_offset);
}

GenerateOptions Tiny(const std::string& dir, std::uint64_t seed = 7) {
  GenerateOptions o;
  o.preset = "tiny";
  o.out_dir = dir;
  o.seed = seed;
  o.threads = 2;
  return o;
}

std::vector<float> FloatsOf(const std::string& file, const std::string& tensor) {
  auto h = st::ReadHeaderFile(file);
  EXPECT_TRUE(h.ok());
  const std::string bytes = Slurp(file);
  for (const st::TensorEntry& e : h->tensors) {
    if (e.name != tensor) continue;
    EXPECT_EQ(e.dtype, DType::kF32);
    std::vector<float> v(e.nbytes() / 4);
    std::memcpy(v.data(), bytes.data() + h->data_offset + e.begin, e.nbytes());
    return v;
  }
  ADD_FAILURE() << "no tensor " << tensor << " in " << file;
  return {};
}

TEST(ClassifierSpec, Resnet50HasTorchvisionParameterCount) {
  auto config = ClassifierPreset("classifier");
  ASSERT_TRUE(config.ok());
  const auto tensors = ClassifierTensors(*config);
  std::uint64_t params = 0;
  for (const st::TensorSpec& t : tensors) {
    const std::string& n = t.name;
    if (n.ends_with(".running_mean") || n.ends_with(".running_var") || n.ends_with(".num_batches_tracked")) continue;
    params += t.nbytes() / 4;
  }
  EXPECT_EQ(params, 25'557'032u);  // torchvision.models.resnet50()
  EXPECT_EQ(tensors.size(), 320u);  // len(resnet50().state_dict())
  EXPECT_EQ(tensors.front().name, "conv1.weight");
  EXPECT_EQ(tensors.back().name, "fc.bias");
}

TEST(ClassifierSpec, NamesDownsampleAndScalarCounters) {
  auto config = ClassifierPreset("tiny");
  ASSERT_TRUE(config.ok());
  std::map<std::string, st::TensorSpec> by_name;
  for (const auto& t : ClassifierTensors(*config)) by_name.emplace(t.name, t);
  ASSERT_TRUE(by_name.contains("layer2.0.downsample.0.weight"));
  EXPECT_EQ(by_name["layer2.0.downsample.0.weight"].shape, (std::vector<std::int64_t>{16, 8, 1, 1}));
  EXPECT_TRUE(by_name.contains("layer2.0.downsample.1.running_var"));
  EXPECT_FALSE(by_name.contains("layer1.0.downsample.0.weight"));  // same width, stride 1
  EXPECT_EQ(by_name["bn1.num_batches_tracked"].dtype, DType::kI64);
  EXPECT_TRUE(by_name["bn1.num_batches_tracked"].shape.empty());
  EXPECT_EQ(by_name["fc.weight"].shape, (std::vector<std::int64_t>{10, 16}));
  EXPECT_LT(TotalBytes(ClassifierTensors(*config)), std::uint64_t{1} << 20);
}

TEST(ClassifierSpec, BenchmarkPresetsHaveReferenceSizes) {
  const auto dit = Dit5bTensors();
  EXPECT_EQ(dit.size(), 270u);
  EXPECT_EQ(TotalBytes(dit), 10'192'527'360u);
  const auto glm = Glm9bTensors();
  EXPECT_EQ(glm.size(), 40u * 11 + 3);
  EXPECT_EQ(glm.front().name, "model.embed_tokens.weight");
  EXPECT_EQ(glm.back().name, "lm_head.weight");
  EXPECT_EQ(TotalBytes(glm), 18'799'902'720u);
  for (const auto& t : glm) EXPECT_EQ(t.dtype, DType::kBF16) << t.name;
}

TEST(ClassifierSpec, UnknownPresetIsNotFound) {
  auto r = PresetTensors("resnet9000");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_EQ(r.status().reason(), "example.unknown_preset");
}

TEST(Synthetic, ValuesAreIndependentOfChunking) {
  const std::uint64_t key = StreamKey(3, "w");
  std::vector<float> whole(1001);
  NormalValues(key, 0, 1.0, whole);
  for (std::size_t split : {1u, 2u, 7u, 500u, 1000u}) {
    std::vector<float> a(split), b(whole.size() - split);
    NormalValues(key, 0, 1.0, a);
    NormalValues(key, split, 1.0, b);
    a.insert(a.end(), b.begin(), b.end());
    EXPECT_EQ(0, std::memcmp(a.data(), whole.data(), whole.size() * 4)) << "split at " << split;
  }
}

TEST(Synthetic, SamplesLookStandardNormal) {
  std::vector<float> v(200000);
  NormalValues(StreamKey(1, "stats"), 0, 1.0, v);
  double sum = 0, sq = 0;
  for (float x : v) {
    ASSERT_TRUE(std::isfinite(x));
    sum += x;
    sq += double{x} * x;
  }
  const double mean = sum / v.size(), var = sq / v.size() - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(var, 1.0, 0.02);
}

TEST(Generator, TinyHeaderMatchesSpec) {
  ScratchDir dir;
  auto report = Generate(Tiny(dir.sub("m")));
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  ASSERT_EQ(report->files.size(), 1u);
  EXPECT_TRUE(report->index_path.empty());
  EXPECT_EQ(report->files[0].path, dir.sub("m") + "/model.safetensors");
  EXPECT_FALSE(std::filesystem::exists(dir.sub("m") + "/model.safetensors.index.json"));

  auto header = st::ReadHeaderFile(report->files[0].path);
  ASSERT_TRUE(header.ok()) << header.status().ToString();
  const auto spec = ClassifierTensors(*ClassifierPreset("tiny"));
  ASSERT_EQ(header->tensors.size(), spec.size());
  for (std::size_t i = 0; i < spec.size(); ++i) {  // file order is spec order
    EXPECT_EQ(header->tensors[i].name, spec[i].name);
    EXPECT_EQ(header->tensors[i].dtype, spec[i].dtype) << spec[i].name;
    EXPECT_EQ(header->tensors[i].shape, spec[i].shape) << spec[i].name;
  }
  EXPECT_EQ(header->metadata.at("format"), "pt");
  EXPECT_EQ(report->tensors, spec.size());
  EXPECT_EQ(report->tensor_bytes, TotalBytes(spec));
  EXPECT_EQ(report->file_bytes, std::filesystem::file_size(report->files[0].path));
}

TEST(Generator, ClassifierValuesFollowInitRules) {
  ScratchDir dir;
  auto report = Generate(Tiny(dir.sub("m")));
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  const std::string file = report->files[0].path;
  for (float x : FloatsOf(file, "bn1.running_var")) EXPECT_EQ(x, 1.0f);
  for (float x : FloatsOf(file, "bn1.running_mean")) EXPECT_EQ(x, 0.0f);
  for (float x : FloatsOf(file, "bn1.weight")) EXPECT_EQ(x, 1.0f);
  for (float x : FloatsOf(file, "bn1.bias")) EXPECT_EQ(x, 0.0f);
  for (float x : FloatsOf(file, "fc.bias")) EXPECT_EQ(x, 0.0f);
  // Residual branch ends: 1/sqrt(2 blocks).
  for (float x : FloatsOf(file, "layer1.0.bn2.weight")) EXPECT_EQ(x, static_cast<float>(1 / std::sqrt(2.0)));

  const std::vector<float> w = FloatsOf(file, "conv1.weight");  // He: std sqrt(2 / (3*7*7))
  double sq = 0;
  for (float x : w) sq += double{x} * x;
  EXPECT_NEAR(std::sqrt(sq / w.size()), std::sqrt(2.0 / 147), 0.1 * std::sqrt(2.0 / 147));

  auto header = st::ReadHeaderFile(file);
  ASSERT_TRUE(header.ok());
  const std::string bytes = Slurp(file);
  for (const auto& e : header->tensors) {
    if (!e.name.ends_with(".num_batches_tracked")) continue;
    ASSERT_EQ(e.nbytes(), 8u);
    EXPECT_EQ(bytes.substr(header->data_offset + e.begin, 8), std::string(8, '\0')) << e.name;
  }
}

TEST(Generator, SameSeedSameBytesOtherSeedOtherBytes) {
  ScratchDir dir;
  ASSERT_TRUE(Generate(Tiny(dir.sub("a"), 42)).ok());
  GenerateOptions b = Tiny(dir.sub("b"), 42);
  b.threads = 5;  // the thread count must not matter
  ASSERT_TRUE(Generate(b).ok());
  ASSERT_TRUE(Generate(Tiny(dir.sub("c"), 43)).ok());
  const std::string a_bytes = Slurp(dir.sub("a") + "/model.safetensors");
  ASSERT_FALSE(a_bytes.empty());
  EXPECT_EQ(a_bytes, Slurp(dir.sub("b") + "/model.safetensors"));
  EXPECT_NE(DataSection(dir.sub("a") + "/model.safetensors"), DataSection(dir.sub("c") + "/model.safetensors"));
  // Rewriting in place gives the same bytes again.
  ASSERT_TRUE(Generate(Tiny(dir.sub("a"), 42)).ok());
  EXPECT_EQ(a_bytes, Slurp(dir.sub("a") + "/model.safetensors"));
}

TEST(Generator, ShardsCoverEveryTensorOnceWithValidIndex) {
  ScratchDir dir;
  GenerateOptions o = Tiny(dir.sub("m"));
  o.shard_size = 8000;  // tiny is ~25 KB, its largest tensor 9216 B
  auto report = Generate(o);
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  ASSERT_GT(report->files.size(), 2u);
  ASSERT_EQ(report->index_path, dir.sub("m") + "/model.safetensors.index.json");

  const auto index = nlohmann::json::parse(Slurp(report->index_path));
  const auto spec = ClassifierTensors(*ClassifierPreset("tiny"));
  EXPECT_EQ(index["metadata"]["total_size"].get<std::uint64_t>(), TotalBytes(spec));
  const auto& weight_map = index["weight_map"];
  ASSERT_EQ(weight_map.size(), spec.size());

  std::map<std::string, std::string> seen;  // tensor -> file holding it
  for (std::size_t s = 0; s < report->files.size(); ++s) {
    const std::string fname = ShardFileName(s, report->files.size());
    EXPECT_EQ(report->files[s].path, dir.sub("m") + "/" + fname);
    auto header = st::ReadHeaderFile(report->files[s].path);
    ASSERT_TRUE(header.ok()) << header.status().ToString();
    std::uint64_t bytes = 0;
    for (const auto& e : header->tensors) {
      EXPECT_TRUE(seen.emplace(e.name, fname).second) << e.name << " is in two shards";
      bytes += e.nbytes();
    }
    EXPECT_TRUE(bytes <= o.shard_size || header->tensors.size() == 1) << fname << " holds " << bytes;
  }
  for (const auto& t : spec) {
    ASSERT_TRUE(weight_map.contains(t.name)) << t.name;
    EXPECT_EQ(weight_map[t.name].get<std::string>(), seen[t.name]) << t.name;
  }
  EXPECT_EQ(seen.size(), spec.size());

  // The same values as the single-file layout, tensor by tensor.
  ASSERT_TRUE(Generate(Tiny(dir.sub("single"))).ok());
  const std::string single = dir.sub("single") + "/model.safetensors";
  EXPECT_EQ(FloatsOf(single, "fc.weight"), FloatsOf(dir.sub("m") + "/" + seen["fc.weight"], "fc.weight"));
}

TEST(Generator, RefusesToMixLayouts) {
  ScratchDir dir;
  GenerateOptions sharded = Tiny(dir.sub("m"));
  sharded.shard_size = 8000;
  ASSERT_TRUE(Generate(sharded).ok());
  auto r = Generate(Tiny(dir.sub("m")));  // one file next to the shards and their index
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(r.status().reason(), "example.stale_checkpoint");
  EXPECT_FALSE(std::filesystem::exists(dir.sub("m") + "/model.safetensors"));
  EXPECT_TRUE(Generate(sharded).ok());  // the same layout again is fine
}

TEST(Generator, PlanShardsIsGreedyAndIsolatesHugeTensors) {
  std::vector<st::TensorSpec> t = {{"a", DType::kU8, {40}}, {"b", DType::kU8, {40}}, {"c", DType::kU8, {500}},
                                   {"d", DType::kU8, {10}}, {"e", DType::kU8, {100}}};
  EXPECT_EQ(PlanShards(t, 100), (std::vector<std::vector<std::size_t>>{{0, 1}, {2}, {3}, {4}}));
  EXPECT_EQ(PlanShards(t, 0), (std::vector<std::vector<std::size_t>>{{0, 1, 2, 3, 4}}));
  EXPECT_EQ(PlanShards(t, 1000), (std::vector<std::vector<std::size_t>>{{0, 1, 2, 3, 4}}));
  EXPECT_EQ(ShardFileName(1, 3), "model-00002-of-00003.safetensors");
}

TEST(Generator, UnknownPresetAndMissingDirAreRejected) {
  ScratchDir dir;
  GenerateOptions o = Tiny(dir.sub("m"));
  o.preset = "nope";
  EXPECT_EQ(Generate(o).status().code(), Code::kNotFound);
  o = Tiny("");
  EXPECT_EQ(Generate(o).status().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace weightd::example
