// Tests of the example network (examples/classifier_net.h) and of the plain file reader that
// weightd-example --from-file uses: names match the spec, weights bind, forward runs.
#include <stdlib.h>

#include <fstream>
#include <map>
#include <string>
#include <tuple>

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "checkpoint_reader.h"
#include "classifier_net.h"
#include "classifier_spec.h"
#include "generator.h"
#include "posix.h"
#include "support/daemon_process.h"
#include "weightd/torch.h"

namespace weightd::example {
namespace {

class ScratchDir {
 public:
  ScratchDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/weightd-net-test-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~ScratchDir() { (void)posix::RemoveTree(path_); }
  std::string sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

using Signature = std::tuple<std::vector<std::int64_t>, torch::ScalarType>;

torch::ScalarType TorchOf(DType t) {
  switch (t) {
    case DType::kF32: return torch::kFloat32;
    case DType::kI64: return torch::kInt64;
    default: ADD_FAILURE() << "unexpected dtype " << DTypeName(t); return torch::kFloat32;
  }
}

std::map<std::string, Signature> SpecSignatures(const ClassifierConfig& c) {
  std::map<std::string, Signature> out;
  for (const auto& t : ClassifierTensors(c)) out[t.name] = {t.shape, TorchOf(t.dtype)};
  return out;
}

std::map<std::string, Signature> ModuleSignatures(torch::nn::Module& m) {
  std::map<std::string, Signature> out;
  for (const auto& p : m.named_parameters()) out[p.key()] = {p.value().sizes().vec(), p.value().scalar_type()};
  for (const auto& b : m.named_buffers()) out[b.key()] = {b.value().sizes().vec(), b.value().scalar_type()};
  return out;
}

void ExpectSameSignatures(const std::map<std::string, Signature>& module, const std::map<std::string, Signature>& spec) {
  for (const auto& [name, sig] : spec) {
    auto it = module.find(name);
    if (it == module.end()) {
      ADD_FAILURE() << "module lacks " << name;
      continue;
    }
    EXPECT_EQ(std::get<0>(it->second), std::get<0>(sig)) << name;
    EXPECT_EQ(std::get<1>(it->second), std::get<1>(sig)) << name;
  }
  for (const auto& [name, sig] : module) EXPECT_TRUE(spec.contains(name)) << "module has extra " << name;
}

class ClassifierNetNames : public ::testing::TestWithParam<const char*> {};

TEST_P(ClassifierNetNames, ParametersAndBuffersMatchSpec) {
  auto config = ClassifierPreset(GetParam());
  ASSERT_TRUE(config.ok());
  ClassifierNet net(*config);
  ExpectSameSignatures(ModuleSignatures(*net), SpecSignatures(*config));
}

INSTANTIATE_TEST_SUITE_P(Presets, ClassifierNetNames, ::testing::Values("tiny", "classifier"));

TEST(ClassifierNet, InvalidConfigThrows) {
  ClassifierConfig c = *ClassifierPreset("tiny");
  c.widths.pop_back();
  EXPECT_THROW(ClassifierNet{c}, weightd::Error);
}

torch::Tensor ForwardTiny(const shim::TensorMap& tensors, std::uint64_t seed = 0) {
  ClassifierNet net(*ClassifierPreset("tiny"));
  shim::bind(*net, tensors, /*strict=*/true);
  net->eval();
  torch::InferenceMode guard;
  return net->forward(SyntheticImages(net->config(), seed));
}

GenerateOptions TinyOptions(const std::string& dir, std::uint64_t shard_size = kDefaultShardSize) {
  GenerateOptions o;
  o.preset = "tiny";
  o.out_dir = dir;
  o.seed = 11;
  o.shard_size = shard_size;
  o.threads = 2;
  return o;
}

TEST(ClassifierNet, TinyForwardFromGeneratedCheckpoint) {
  ScratchDir dir;
  ASSERT_TRUE(Generate(TinyOptions(dir.sub("m"))).ok());
  CheckpointReadStats stats;
  auto tensors = ReadCheckpoint(dir.sub("m"), &stats);
  ASSERT_TRUE(tensors.ok()) << tensors.status().ToString();
  EXPECT_EQ(stats.files, 1u);
  EXPECT_EQ(stats.bytes, TotalBytes(ClassifierTensors(*ClassifierPreset("tiny"))));

  const torch::Tensor logits = ForwardTiny(*tensors);
  ASSERT_EQ(logits.sizes().vec(), (std::vector<std::int64_t>{1, 10}));
  EXPECT_TRUE(torch::isfinite(logits).all().item<bool>());
  EXPECT_GT(logits.std().item<float>(), 0.0f);
  // Deterministic: the same weights and input give the same bits.
  EXPECT_TRUE(torch::equal(logits, ForwardTiny(*tensors)));
  // The bound weights are the checkpoint's: another seed's checkpoint gives other logits.
  GenerateOptions other = TinyOptions(dir.sub("other"));
  other.seed = 12;
  ASSERT_TRUE(Generate(other).ok());
  auto other_tensors = ReadCheckpoint(dir.sub("other"));
  ASSERT_TRUE(other_tensors.ok());
  EXPECT_FALSE(torch::equal(logits, ForwardTiny(*other_tensors)));
}

TEST(ClassifierNet, ShardedAndSingleFileGiveIdenticalLogits) {
  ScratchDir dir;
  ASSERT_TRUE(Generate(TinyOptions(dir.sub("single"))).ok());
  ASSERT_TRUE(Generate(TinyOptions(dir.sub("sharded"), 8000)).ok());
  CheckpointReadStats stats;
  auto sharded = ReadCheckpoint(dir.sub("sharded"), &stats);
  ASSERT_TRUE(sharded.ok()) << sharded.status().ToString();
  EXPECT_GT(stats.files, 2u);
  auto single = ReadCheckpoint(dir.sub("single"));
  ASSERT_TRUE(single.ok());
  EXPECT_TRUE(torch::equal(ForwardTiny(*single), ForwardTiny(*sharded)));
}

torch::Tensor ForwardOn(const torch::Device& device, const shim::TensorMap& tensors) {
  ClassifierNet net(*ClassifierPreset("tiny"));
  net->to(device);
  shim::bind(*net, tensors, /*strict=*/true);
  net->eval();
  torch::InferenceMode guard;
  return net->forward(SyntheticImages(net->config(), 3).to(device)).cpu();
}

TEST(ClassifierNet, CudaForwardThroughWeightdEqualsLoadingTheFile) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  // Same weights, same device, same kernels: the logits must agree bit for bit.
  at::globalContext().setDeterministicCuDNN(true);
  at::globalContext().setBenchmarkCuDNN(false);
  const torch::Device cuda(torch::kCUDA, 0);
  ScratchDir dir;
  ASSERT_TRUE(Generate(TinyOptions(dir.sub("m"), 8000)).ok());
  testing::DaemonOptions o;
  o.models = {{"tiny", dir.sub("m")}};
  auto daemon = testing::DaemonProcess::Start(o);
  ASSERT_TRUE(daemon.ok()) << daemon.status().ToString();
  ClientOptions co;
  co.endpoint = (*daemon)->endpoint();
  auto client = Client::Connect(co);
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  const torch::Tensor served = ForwardOn(cuda, shim::acquire(*client, "tiny", cuda));

  auto from_file = ReadCheckpoint(dir.sub("m"));
  ASSERT_TRUE(from_file.ok());
  shim::TensorMap on_gpu;
  for (const auto& [name, t] : *from_file) on_gpu[name] = t.to(cuda);
  EXPECT_TRUE(torch::equal(served, ForwardOn(cuda, on_gpu)));
  // And the GPU agrees with the CPU within float tolerance.
  EXPECT_TRUE(torch::allclose(served, ForwardOn(torch::kCPU, *from_file), 1e-3, 1e-4));
}

TEST(CheckpointReader, RejectsIndexDisagreeingWithShards) {
  ScratchDir dir;
  ASSERT_TRUE(Generate(TinyOptions(dir.sub("m"), 8000)).ok());
  const std::string index = dir.sub("m") + "/model.safetensors.index.json";
  auto write_index = [&](const std::string& text) { std::ofstream(index, std::ios::trunc) << text; };

  write_index(R"({"metadata":{},"weight_map":{"fc.weight":"../evil.safetensors"}})");
  auto r = ReadCheckpoint(dir.sub("m"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
  EXPECT_EQ(r.status().reason(), "example.index_mismatch");

  // The shard holds more tensors than the index maps to it.
  write_index(R"({"metadata":{},"weight_map":{"conv1.weight":"model-00001-of-00004.safetensors"}})");
  r = ReadCheckpoint(dir.sub("m"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().reason(), "example.index_mismatch");

  write_index(R"({"metadata":{},"weight_map":{}})");
  r = ReadCheckpoint(dir.sub("m"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().reason(), "example.index_mismatch");

  write_index("not json");
  r = ReadCheckpoint(dir.sub("m"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
}

TEST(CheckpointReader, MissingCheckpointIsNotFound) {
  ScratchDir dir;
  ASSERT_TRUE(posix::MakeDirs(dir.sub("empty")).ok());
  auto r = ReadCheckpoint(dir.sub("empty"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
}

}  // namespace
}  // namespace weightd::example
