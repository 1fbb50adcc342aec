// The LibTorch shim. ShimBind: zero-copy binding of named tensors into a module's parameters
// and buffers, and its refusals, with plain tensors (bind() does not care where memory comes
// from). ShimLease: tensors of a real lease served by the weightd binary.
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <span>
#include <stdexcept>
#include <string_view>

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/torch.h>
#include <torch/version.h>

#include "posix.h"
#include "support/daemon_process.h"
#include "support/dtype_files.h"
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

// ---- TorchScript modules -----------------------------------------------------------------

// TinyNet as TorchScript: made in C++ (Module::define compiles TorchScript source), with the
// weights `w` (or, without them, constants that are none of Weights()), saved to `path` and
// loaded back with torch::jit::load, as a LibTorch server loads a model.
torch::jit::Module ScriptedTinyNet(const std::string& path, const std::optional<shim::TensorMap>& w = std::nullopt) {
  auto init = [&](const std::string& name, const torch::Tensor& like) {
    return w ? w->at(name).clone() : torch::full_like(like, 0.25);
  };
  const auto ref = Weights();
  torch::jit::Module bn("__torch__.ScriptedBatchNorm");
  bn.register_parameter("weight", init("bn.weight", ref.at("bn.weight")), false);
  bn.register_parameter("bias", init("bn.bias", ref.at("bn.bias")), false);
  bn.register_buffer("running_mean", init("bn.running_mean", ref.at("bn.running_mean")));
  bn.register_buffer("running_var", init("bn.running_var", ref.at("bn.running_var")));
  bn.register_buffer("num_batches_tracked", w ? w->at("bn.num_batches_tracked").clone() : torch::tensor(0, torch::kLong));
  bn.define(R"(
def forward(self, x):
    return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, False, 0.1, 1e-05, True)
)");
  torch::jit::Module fc("__torch__.ScriptedLinear");
  fc.register_parameter("weight", init("fc.weight", ref.at("fc.weight")), false);
  fc.register_parameter("bias", init("fc.bias", ref.at("fc.bias")), false);
  fc.define(R"(
def forward(self, x):
    return torch.linear(x, self.weight, self.bias)
)");
  torch::jit::Module net("__torch__.ScriptedTinyNet");
  net.register_module("bn", bn);
  net.register_module("fc", fc);
  net.define(R"(
def forward(self, x):
    return self.fc.forward(torch.mean(self.bn.forward(x), [2, 3]))
)");
  net.save(path);
  return torch::jit::load(path);
}

torch::Tensor Forward(torch::jit::Module& m, const torch::Tensor& x) { return m.forward({x}).toTensor(); }

TEST(ShimBindScript, LoadedModuleComputesWithTheBoundTensorsWithoutCopying) {
  testing::TempDir dir;
  torch::jit::Module scripted = ScriptedTinyNet(dir.file("tiny.pt"));
  auto w = Weights();
  auto report = shim::bind(scripted, w);
  EXPECT_EQ(report.bound.size(), w.size());
  EXPECT_TRUE(report.missing.empty() && report.unexpected.empty() && report.mismatched.empty());
  for (const auto& p : scripted.named_parameters()) EXPECT_EQ(p.value.data_ptr(), w.at(p.name).data_ptr()) << p.name;
  for (const auto& b : scripted.named_buffers()) EXPECT_EQ(b.value.data_ptr(), w.at(b.name).data_ptr()) << b.name;
  // The same network in torch::nn, given the same weights, computes the same.
  TinyNet reference;
  shim::bind(*reference, w);
  reference->eval();
  torch::NoGradGuard no_grad;
  auto x = torch::randn({4, 3, 5, 5});
  auto got = Forward(scripted, x), want = reference->forward(x);
  EXPECT_TRUE(torch::equal(got, want)) << got << "\nvs\n" << want;
}

TEST(ShimBindScript, StrictErrorNamesTheScriptedModuleAndChangesNothing) {
  testing::TempDir dir;
  torch::jit::Module scripted = ScriptedTinyNet(dir.file("tiny.pt"));
  std::map<std::string, const void*> before;
  for (const auto& p : scripted.named_parameters()) before[p.name] = p.value.data_ptr();
  auto w = Weights();
  w.erase("fc.bias");
  w["bn.weight"] = torch::zeros({4});
  try {
    shim::bind(scripted, w);
    FAIL() << "bound a mismatched map";
  } catch (const Error& e) {
    EXPECT_EQ(e.status().reason(), "shim.bind_mismatch");
    EXPECT_NE(e.status().message().find("ScriptedTinyNet"), std::string::npos) << e.what();
    EXPECT_NE(e.status().message().find("missing: fc.bias;"), std::string::npos) << e.what();
    EXPECT_NE(e.status().message().find("mismatched: bn.weight: shape [4] F32 vs expected [3] F32"),
              std::string::npos)
        << e.what();
  }
  for (const auto& p : scripted.named_parameters()) EXPECT_EQ(p.value.data_ptr(), before.at(p.name)) << p.name;
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
    // One tensor of every safetensors dtype, from a writer that is not weightd's.
    auto w = testing::WriteIndependentDtypeModel(models_.file("all"));
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    written_ = std::move(w).value();
    testing::DaemonOptions o;
    o.models = {{"tiny", models_.file("tiny")}, {"u16", models_.file("u16")}, {"all", models_.file("all")}};
    if (auto lib = testing::SafetensorsLibraryDir()) o.models["library"] = *lib;
    auto d = testing::DaemonProcess::Start(o);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    daemon_ = std::move(d).value();
    auto c = daemon_->Connect("shim_test");
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    client_.emplace(std::move(c).value());
  }

  std::uint32_t Leases(const std::string& model) {
    auto s = client_->Status(model);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? s->leases : 0;
  }

  testing::TempDir models_;
  std::vector<testing::ExpectedTensor> written_;
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

TEST_F(ShimLease, ScriptedModuleOnTheDaemonsMemoryComputesWhatItsOwnWeightsCompute) {
  // The model as its author saved it, with its own weights: what it computes is the reference.
  torch::jit::Module own = ScriptedTinyNet(models_.file("own.pt"), Weights());
  // The same file's module, its weights replaced by the lease's (the daemon serves Weights()).
  torch::jit::Module served = torch::jit::load(models_.file("own.pt"));
  auto tensors = shim::acquire(*client_, "tiny");
  shim::bind(served, tensors);
  for (const auto& p : served.named_parameters())
    EXPECT_EQ(p.value.data_ptr(), tensors.at(p.name).data_ptr()) << p.name << " was copied";
  for (const auto& b : served.named_buffers())
    EXPECT_EQ(b.value.data_ptr(), tensors.at(b.name).data_ptr()) << b.name << " was copied";
  tensors.clear();
  EXPECT_EQ(Leases("tiny"), 1u) << "the bound module holds its lease";
  torch::NoGradGuard no_grad;
  auto x = torch::randn({2, 3, 4, 4});
  EXPECT_TRUE(torch::equal(Forward(served, x), Forward(own, x)));
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

// ---- every safetensors dtype, from files weightd did not write -------------------------------

// What each safetensors dtype must become in LibTorch, written down here independently of the
// shim: the first LibTorch version with the dtype (99: none has it), its c10 name, and its
// Python name (as the safetensors library's expected.json records it).
struct TorchDtype {
  std::string_view st;
  int major, minor;
  std::string_view c10, python;
};
constexpr TorchDtype kTorchDtypes[] = {
    {"F64", 1, 0, "Double", "float64"},
    {"F32", 1, 0, "Float", "float32"},
    {"F16", 1, 0, "Half", "float16"},
    {"BF16", 1, 0, "BFloat16", "bfloat16"},
    {"I64", 1, 0, "Long", "int64"},
    {"I32", 1, 0, "Int", "int32"},
    {"I16", 1, 0, "Short", "int16"},
    {"I8", 1, 0, "Char", "int8"},
    {"U8", 1, 0, "Byte", "uint8"},
    {"BOOL", 1, 0, "Bool", "bool"},
    {"C64", 1, 0, "ComplexFloat", "complex64"},
    {"F8_E4M3", 2, 1, "Float8_e4m3fn", "float8_e4m3fn"},
    {"F8_E5M2", 2, 1, "Float8_e5m2", "float8_e5m2"},
    {"F8_E4M3FNUZ", 2, 2, "Float8_e4m3fnuz", "float8_e4m3fnuz"},
    {"F8_E5M2FNUZ", 2, 2, "Float8_e5m2fnuz", "float8_e5m2fnuz"},
    {"U16", 2, 3, "UInt16", "uint16"},
    {"U32", 2, 3, "UInt32", "uint32"},
    {"U64", 2, 3, "UInt64", "uint64"},
    {"F8_E8M0", 2, 7, "Float8_e8m0fnu", "float8_e8m0fnu"},
    {"F4", 2, 8, "Float4_e2m1fn_x2", "float4_e2m1fn_x2"},
    {"F6_E2M3", 99, 0, "", ""},
    {"F6_E3M2", 99, 0, "", ""},
};

const TorchDtype& TorchDtypeOf(std::string_view st) {
  for (const auto& d : kTorchDtypes)
    if (d.st == st) return d;
  throw std::runtime_error("no such dtype " + std::string(st));
}

bool LinkedTorchHas(const TorchDtype& d) {
  return TORCH_VERSION_MAJOR > d.major || (TORCH_VERSION_MAJOR == d.major && TORCH_VERSION_MINOR >= d.minor);
}

// The tensor's bytes, as the process sees them through LibTorch. Viewed as bytes before the
// copy to the host: LibTorch copies some of the narrow types (float4_e2m1fn_x2) on few devices.
std::string BytesOf(const torch::Tensor& t) {
  const torch::Tensor c = t.contiguous().flatten().view(torch::kByte).cpu();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<std::size_t>(c.numel()));
}

TEST_F(ShimLease, EachDtypeBecomesLibTorchsOwnOrFailsNamingTheDtypeAndVersion) {
  ASSERT_EQ(written_.size(), 23u);  // 22 dtypes and an empty F4 tensor
  for (const auto& e : written_) {
    SCOPED_TRACE(e.name + " " + e.dtype + " with LibTorch " TORCH_VERSION);
    const TorchDtype& want = TorchDtypeOf(e.dtype);
    if (!LinkedTorchHas(want)) {
      try {
        shim::acquire(*client_, "all", torch::kCPU, {e.name});
        ADD_FAILURE() << "acquired a tensor that this LibTorch cannot represent";
      } catch (const Error& err) {
        EXPECT_EQ(err.status().code(), Code::kInvalidArgument) << err.what();
        EXPECT_EQ(err.status().reason(), "shim.unsupported_dtype") << err.what();
        EXPECT_NE(err.status().message().find("'" + e.name + "'"), std::string::npos) << err.what();
        EXPECT_NE(err.status().message().find("dtype " + e.dtype + ","), std::string::npos) << err.what();
        EXPECT_NE(err.status().message().find("LibTorch " TORCH_VERSION), std::string::npos) << err.what();
      }
      EXPECT_EQ(Leases("all"), 0u) << "the lease outlived the failed conversion";
      continue;
    }
    auto tensors = shim::acquire(*client_, "all", torch::kCPU, {e.name});
    ASSERT_EQ(tensors.size(), 1u);
    const torch::Tensor& t = tensors.at(e.name);
    EXPECT_EQ(c10::toString(t.scalar_type()), want.c10);
    std::vector<std::int64_t> shape = e.shape;
    if (e.dtype == "F4") shape.back() /= 2;  // float4_e2m1fn_x2: two values an element
    EXPECT_EQ(t.sizes().vec(), shape);
    EXPECT_EQ(BytesOf(t), e.bytes);
    // The numbers, where LibTorch can convert the type (not F4; not the unsigned shell types).
    if (e.values.empty() || e.dtype == "F4" || e.dtype == "U16" || e.dtype == "U32" || e.dtype == "U64") continue;
    torch::Tensor d = (t.is_complex() ? torch::view_as_real(t) : t).to(torch::kDouble).flatten().contiguous();
    ASSERT_EQ(static_cast<std::size_t>(d.numel()), e.values.size());
    for (std::size_t i = 0; i < e.values.size(); ++i) {
      const double got = d[static_cast<std::int64_t>(i)].item<double>();
      if (std::isnan(e.values[i])) {
        EXPECT_TRUE(std::isnan(got)) << "element " << i << " is " << got;
      } else {
        EXPECT_EQ(got, e.values[i]) << "element " << i;
      }
    }
  }
}

TEST_F(ShimLease, AModelWithADtypeLibTorchLacksFailsAloneAndItsOtherTensorsServe) {
  std::vector<std::string> representable;
  bool any_missing = false;
  for (const auto& e : written_) {
    if (LinkedTorchHas(TorchDtypeOf(e.dtype))) representable.push_back(e.name);
    else any_missing = true;
  }
  ASSERT_TRUE(any_missing) << "no LibTorch has F6";
  try {
    shim::acquire(*client_, "all");
    FAIL() << "the whole model was acquired";
  } catch (const Error& err) {
    EXPECT_EQ(err.status().reason(), "shim.unsupported_dtype") << err.what();
  }
  EXPECT_EQ(Leases("all"), 0u);
  auto tensors = shim::acquire(*client_, "all", torch::kCPU, representable);
  EXPECT_EQ(tensors.size(), representable.size());
  EXPECT_EQ(Leases("all"), 1u);
}

TEST_F(ShimLease, OddF4LastDimensionIsATypedError) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  // [2, 3] F4 is 6 values, 3 whole bytes, but float4_e2m1fn_x2 cannot split a row of 3.
  ASSERT_TRUE(testing::WriteModel(models_.file("odd"), {{"w", DType::kF4, {2, 3}}}, 3).ok());
  testing::DaemonOptions o;
  o.models = {{"odd", models_.file("odd")}};
  auto d = testing::DaemonProcess::Start(o);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  auto c = (*d)->Connect();
  ASSERT_TRUE(c.ok());
  try {
    shim::acquire(*c, "odd");
    FAIL() << "an F4 tensor with an odd last dimension was acquired";
  } catch (const Error& err) {
    EXPECT_EQ(err.status().reason(), "shim.unsupported_shape") << err.what();
    EXPECT_NE(err.status().message().find("[2, 3]"), std::string::npos) << err.what();
  }
#else
  GTEST_SKIP() << "LibTorch " TORCH_VERSION " has no float4_e2m1fn_x2";
#endif
}

// On the GPU machine scripts/gpu-check.sh has the Python safetensors library write torch
// tensors of every dtype it can; served through the shim they must be those very tensors.
TEST_F(ShimLease, SafetensorsLibraryFilesComeBackAsTheTorchTensorsWritten) {
  const auto dir = testing::SafetensorsLibraryDir();
  if (!dir) GTEST_SKIP() << "WEIGHTD_SAFETENSORS_LIBRARY_DIR is not set (scripts/gpu-check.sh sets it)";
  auto expected = testing::ReadExpectedTensors(*dir);
  ASSERT_TRUE(expected.ok()) << expected.status().ToString();
  std::vector<torch::Device> devices = {torch::kCPU};
  if (torch::cuda::is_available()) devices.emplace_back(torch::kCUDA, 0);
  for (const torch::Device& device : devices) {
    auto tensors = shim::acquire(*client_, "library", device);
    ASSERT_EQ(tensors.size(), expected->size());
    for (const auto& e : *expected) {
      SCOPED_TRACE(e.name + " " + e.dtype + " on " + device.str());
      const torch::Tensor& t = tensors.at(e.name);
      std::string python;
      for (const auto& d : kTorchDtypes)
        if (d.c10 == c10::toString(t.scalar_type())) python = std::string(d.python);
      EXPECT_EQ("torch." + python, e.torch_dtype);
      EXPECT_EQ(t.sizes().vec(), e.torch_shape);
      EXPECT_EQ(t.device(), device);
      EXPECT_EQ(BytesOf(t), e.bytes);
    }
  }
}

}  // namespace
}  // namespace weightd
