// The LibTorch shim. ShimBind: zero-copy binding of named tensors into a module's parameters
// and buffers, and its refusals, with plain tensors (bind() does not care where memory comes
// from). ShimLease: tensors of a real lease served by the weightd binary.
#include <cstring>
#include <optional>
#include <span>

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>
#include <torch/version.h>

#include "posix.h"
#include "support/daemon_process.h"
#include "weightd/torch.h"

namespace weightd {
namespace {

// Parameters and buffers of both kinds, including BatchNorm's I64 num_batches_tracked.
struct TinyNetImpl : torch::nn::Module {
  TinyNetImpl() {
    bn = register_module("bn", torch::nn::BatchNorm2d(3));
    fc = register_module("fc", torch::nn::Linear(3, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc(bn(x).mean({2, 3})); }
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(TinyNet);

shim::TensorMap Weights() {
  torch::manual_seed(1);
  return {
      {"bn.weight", torch::rand({3}) + 0.5},
      {"bn.bias", torch::randn({3})},
      {"bn.running_mean", torch::randn({3})},
      {"bn.running_var", torch::rand({3}) + 0.5},
      {"bn.num_batches_tracked", torch::tensor(17, torch::kLong)},
      {"fc.weight", torch::randn({2, 3})},
      {"fc.bias", torch::randn({2})},
  };
}

std::map<std::string, const void*> DataPtrs(TinyNet& net) {
  std::map<std::string, const void*> out;
  for (const auto& p : net->named_parameters()) out[p.key()] = p.value().data_ptr();
  for (const auto& b : net->named_buffers()) out[b.key()] = b.value().data_ptr();
  return out;
}

Status BindError(TinyNet& net, const shim::TensorMap& w, bool strict) {
  try {
    shim::bind(*net, w, strict);
  } catch (const Error& e) {
    return e.status();
  }
  return Status::Ok();
}

TEST(ShimBind, BindsWithoutCopying) {
  TinyNet net;
  auto w = Weights();
  auto report = shim::bind(*net, w);
  EXPECT_EQ(report.bound.size(), w.size());
  EXPECT_TRUE(report.missing.empty());
  EXPECT_TRUE(report.unexpected.empty());
  EXPECT_TRUE(report.mismatched.empty());
  auto ptrs = DataPtrs(net);
  ASSERT_EQ(ptrs.size(), w.size());
  for (const auto& [name, t] : w) EXPECT_EQ(ptrs.at(name), t.data_ptr()) << name << " was copied";
  // Parameters stay parameters: autograd metadata survives set_data.
  EXPECT_TRUE(net->fc->weight.requires_grad());
}

TEST(ShimBind, ForwardEqualsModuleLoadedByCopy) {
  auto w = Weights();
  TinyNet bound, copied;
  shim::bind(*bound, w);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : copied->named_parameters()) p.value().copy_(w.at(p.key()));
    for (auto& b : copied->named_buffers()) b.value().copy_(w.at(b.key()));
  }
  bound->eval();
  copied->eval();
  torch::NoGradGuard no_grad;
  auto x = torch::randn({4, 3, 5, 5});
  auto a = bound->forward(x), b = copied->forward(x);
  EXPECT_TRUE(torch::equal(a, b)) << a << "\nvs\n" << b;
  // And the values really are the bound ones, not the module's initial ones.
  EXPECT_TRUE(torch::equal(bound->bn->running_mean, w.at("bn.running_mean")));
  EXPECT_EQ(bound->bn->num_batches_tracked.item<std::int64_t>(), 17);
}

TEST(ShimBind, StrictErrorListsAllThreeKindsAndChangesNothing) {
  TinyNet net;
  auto before = DataPtrs(net);
  auto w = Weights();
  w.erase("fc.bias");
  w.erase("bn.running_var");
  w["extra.weight"] = torch::zeros({1});
  w["bn.weight"] = torch::zeros({4}, torch::kBFloat16);
  Status s = BindError(net, w, /*strict=*/true);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.reason(), "shim.bind_mismatch");
  // Parameters are listed before buffers, each in registration order.
  EXPECT_NE(s.message().find("missing: fc.bias, bn.running_var;"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("unexpected: extra.weight"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("mismatched: bn.weight: shape [4] BF16 vs expected [3] F32"), std::string::npos)
      << s.message();
  EXPECT_EQ(DataPtrs(net), before);
}

TEST(ShimBind, StrictRefusesMissingAloneAndUnexpectedAlone) {
  {
    TinyNet net;
    auto w = Weights();
    w.erase("bn.num_batches_tracked");
    Status s = BindError(net, w, true);
    EXPECT_EQ(s.code(), Code::kInvalidArgument);
    EXPECT_NE(s.message().find("missing: bn.num_batches_tracked"), std::string::npos) << s.message();
  }
  {
    TinyNet net;
    auto w = Weights();
    w["head.bias"] = torch::zeros({2});
    Status s = BindError(net, w, true);
    EXPECT_EQ(s.code(), Code::kInvalidArgument);
    EXPECT_NE(s.message().find("unexpected: head.bias"), std::string::npos) << s.message();
  }
}

TEST(ShimBind, NonStrictBindsWhatMatchesAndReports) {
  TinyNet net;
  const void* bias_before = net->fc->bias.data_ptr();
  auto w = Weights();
  w.erase("fc.bias");
  w["extra"] = torch::zeros({1});
  auto report = shim::bind(*net, w, /*strict=*/false);
  EXPECT_EQ(report.missing, std::vector<std::string>{"fc.bias"});
  EXPECT_EQ(report.unexpected, std::vector<std::string>{"extra"});
  EXPECT_TRUE(report.mismatched.empty());
  EXPECT_EQ(report.bound.size(), 6u);
  EXPECT_EQ(net->fc->weight.data_ptr(), w.at("fc.weight").data_ptr());
  EXPECT_EQ(net->bn->num_batches_tracked.data_ptr(), w.at("bn.num_batches_tracked").data_ptr());
  EXPECT_EQ(net->fc->bias.data_ptr(), bias_before);
}

TEST(ShimBind, MismatchedShapeThrowsInBothModes) {
  for (bool strict : {true, false}) {
    TinyNet net;
    auto before = DataPtrs(net);
    auto w = Weights();
    w["fc.weight"] = torch::zeros({3, 2});  // transposed
    Status s = BindError(net, w, strict);
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << "strict=" << strict;
    EXPECT_NE(s.message().find("fc.weight: shape [3, 2] F32 vs expected [2, 3] F32"), std::string::npos)
        << s.message();
    EXPECT_EQ(DataPtrs(net), before) << "strict=" << strict;
  }
}

TEST(ShimBind, DtypeMismatchThrows) {
  for (bool strict : {true, false}) {
    TinyNet net;
    auto w = Weights();
    w["bn.num_batches_tracked"] = torch::tensor(17, torch::kInt);
    Status s = BindError(net, w, strict);
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << "strict=" << strict;
    EXPECT_NE(s.message().find("bn.num_batches_tracked: shape [] I32 vs expected [] I64"), std::string::npos)
        << s.message();
  }
}

TEST(ShimBind, NonStrictEmptyMapReportsEverythingMissing) {
  TinyNet net;
  auto report = shim::bind(*net, {}, /*strict=*/false);
  EXPECT_TRUE(report.bound.empty());
  EXPECT_EQ(report.missing.size(), 7u);
}

// ---- tensors of real leases ----------------------------------------------------------------

// Writes `tensors` (plain CPU tensors) as one safetensors file, byte for byte.
Status WriteTensors(const std::string& dir, const shim::TensorMap& tensors) {
  std::vector<st::TensorSpec> specs;
  std::vector<torch::Tensor> order;
  for (const auto& [name, t] : tensors) {
    DType dt = t.scalar_type() == torch::kLong ? DType::kI64 : DType::kF32;
    specs.push_back({name, dt, t.sizes().vec()});
    order.push_back(t.contiguous());
  }
  RETURN_IF_ERROR(posix::MakeDirs(dir));
  auto r = st::WriteFile(dir + "/model.safetensors", specs,
                         [&](std::size_t index, std::uint64_t offset, std::span<std::byte> out) {
                           std::memcpy(out.data(), static_cast<const std::byte*>(order[index].data_ptr()) + offset,
                                       out.size());
                         });
  return r.ok() ? Status::Ok() : r.status();
}

// Binds the served tensors and the expected ones into two TinyNets on `device`: the served
// module must alias the lease's memory and compute what the reference computes.
void ExpectBoundForwardMatches(const shim::TensorMap& served_tensors, const shim::TensorMap& expected,
                               const torch::Device& device) {
  TinyNet served, reference;
  served->to(device);
  reference->to(device);
  shim::bind(*served, served_tensors);
  shim::bind(*reference, expected);
  EXPECT_EQ(served->fc->weight.data_ptr(), served_tensors.at("fc.weight").data_ptr());
  served->eval();
  reference->eval();
  torch::NoGradGuard no_grad;
  auto x = torch::randn({2, 3, 4, 4}, torch::TensorOptions().device(device));
  EXPECT_TRUE(torch::equal(served->forward(x), reference->forward(x)));
}

class ShimLease : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(WriteTensors(models_.file("tiny"), Weights()).ok());
    ASSERT_TRUE(testing::WriteModel(models_.file("u16"), {{"w.u16", DType::kU16, {4}}, {"w.f32", DType::kF32, {2}}}, 5)
                    .ok());
    testing::DaemonOptions o;
    o.models = {{"tiny", models_.file("tiny")}, {"u16", models_.file("u16")}};
    auto d = testing::DaemonProcess::Start(o);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    daemon_ = std::move(d).value();
    ClientOptions co;
    co.endpoint = daemon_->endpoint();
    co.client_name = "shim_test";
    auto c = Client::Connect(co);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    client_.emplace(std::move(c).value());
  }

  std::uint32_t Leases(const std::string& model) {
    auto s = client_->Status(model);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? s->leases : 0;
  }

  testing::TempDir models_;
  std::unique_ptr<testing::DaemonProcess> daemon_;
  std::optional<Client> client_;
};

TEST_F(ShimLease, BoundModuleRunsOnTheDaemonsMemory) {
  auto expected = Weights();
  auto tensors = shim::acquire(*client_, "tiny");
  ASSERT_EQ(tensors.size(), expected.size());
  for (const auto& [name, t] : tensors) {
    EXPECT_TRUE(torch::equal(t, expected.at(name))) << name;
    EXPECT_FALSE(t.requires_grad()) << name;
  }
  ExpectBoundForwardMatches(tensors, expected, torch::kCPU);
}

TEST_F(ShimLease, LeaseEndsWithItsLastTensor) {
  auto tensors = shim::acquire(*client_, "tiny");
  EXPECT_EQ(Leases("tiny"), 1u);
  torch::Tensor keep = tensors.at("fc.weight");
  torch::Tensor view = keep.t();  // views share the storage, and so the lease
  tensors.clear();
  keep.reset();
  EXPECT_EQ(Leases("tiny"), 1u) << "lease ended while a view of its memory lived";
  EXPECT_TRUE(torch::equal(view.t(), Weights().at("fc.weight")));
  view.reset();
  EXPECT_EQ(Leases("tiny"), 0u);
}

TEST_F(ShimLease, TensorFilterSelectsTensors) {
  auto tensors = shim::acquire(*client_, "tiny", torch::kCPU, {"fc.bias"});
  ASSERT_EQ(tensors.size(), 1u);
  EXPECT_TRUE(torch::equal(tensors.at("fc.bias"), Weights().at("fc.bias")));
}

TEST_F(ShimLease, CudaDeviceWithoutAGpuIsUnavailable) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "this machine has a CUDA device";
  try {
    shim::acquire(*client_, "tiny", torch::Device(torch::kCUDA, 0));
    FAIL() << "acquire on cuda:0 did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.status().code(), Code::kUnavailable) << e.what();
    EXPECT_EQ(e.status().reason(), "gpu.no_device") << e.what();
  }
  EXPECT_EQ(Leases("tiny"), 0u);
}

TEST_F(ShimLease, PrivateCopyIsWritableAndLeavesTheSharedCopyAlone) {
  std::vector<torch::Device> devices = {torch::kCPU};
  if (torch::cuda::is_available()) devices.emplace_back(torch::kCUDA, 0);
  for (const torch::Device& device : devices) {
    SCOPED_TRACE(device.str());
    shim::Options o;
    o.device = device;
    o.private_copy = true;
    auto mine = shim::acquire(*client_, "tiny", o);
    // CPU: a copy-on-write mapping of the shared segments, held by a lease; CUDA: a device copy.
    EXPECT_EQ(Leases("tiny"), device.is_cpu() ? 1u : 0u);
    torch::NoGradGuard no_grad;
    mine.at("fc.weight").add_(1.0);  // would fault on the shared, read-only copy
    auto shared = shim::acquire(*client_, "tiny", device);
    EXPECT_TRUE(torch::equal(shared.at("fc.weight").cpu(), Weights().at("fc.weight")));
    EXPECT_TRUE(torch::equal(mine.at("fc.weight").cpu(), Weights().at("fc.weight") + 1.0));
    EXPECT_EQ(mine.at("fc.weight").device(), device);
  }
}

TEST_F(ShimLease, CudaTensorsAreZeroCopyViewsAndBindIntoACudaModule) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device cuda(torch::kCUDA, 0);
  auto tensors = shim::acquire(*client_, "tiny", cuda);
  EXPECT_EQ(Leases("tiny"), 1u);
  shim::TensorMap expected;
  for (const auto& [name, t] : Weights()) expected[name] = t.to(cuda);
  for (const auto& [name, t] : tensors) {
    EXPECT_TRUE(t.is_cuda()) << name;
    EXPECT_TRUE(torch::equal(t, expected.at(name))) << name;
  }
  ExpectBoundForwardMatches(tensors, expected, cuda);
  tensors.clear();
  EXPECT_EQ(Leases("tiny"), 0u);
}

TEST_F(ShimLease, DtypeLibTorchLacksNamesTheTensor) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  GTEST_SKIP() << "LibTorch " TORCH_VERSION " has unsigned 16-bit tensors";
#else
  try {
    shim::acquire(*client_, "u16");
    FAIL() << "U16 tensor accepted by LibTorch " TORCH_VERSION;
  } catch (const Error& e) {
    EXPECT_EQ(e.status().code(), Code::kInvalidArgument);
    EXPECT_EQ(e.status().reason(), "shim.unsupported_dtype");
    EXPECT_NE(e.status().message().find("'w.u16'"), std::string::npos) << e.what();
  }
  EXPECT_EQ(Leases("u16"), 0u) << "the lease outlived the failed conversion";
#endif
}

}  // namespace
}  // namespace weightd
