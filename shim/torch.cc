// torch.cc — the LibTorch shim: zero-copy tensors over a lease, and binding them into modules.

#include "weightd/torch.h"

#include <torch/script.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace weightd::shim {
namespace {

#define WEIGHTD_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

// The LibTorch dtype of each safetensors dtype, where the linked LibTorch has one. F4 maps to
// float4_e2m1fn_x2, whose one element holds two values (see TorchShape).
std::optional<at::ScalarType> ToScalarType(DType t) {
  switch (t) {
    case DType::kF64: return at::kDouble;
    case DType::kF32: return at::kFloat;
    case DType::kF16: return at::kHalf;
    case DType::kBF16: return at::kBFloat16;
    case DType::kI64: return at::kLong;
    case DType::kI32: return at::kInt;
    case DType::kI16: return at::kShort;
    case DType::kI8: return at::kChar;
    case DType::kU8: return at::kByte;
    case DType::kBool: return at::kBool;
    case DType::kC64: return at::kComplexFloat;
#if WEIGHTD_TORCH_AT_LEAST(2, 1)
    case DType::kF8E4M3: return at::ScalarType::Float8_e4m3fn;
    case DType::kF8E5M2: return at::ScalarType::Float8_e5m2;
#else
    case DType::kF8E4M3: case DType::kF8E5M2: return std::nullopt;
#endif
#if WEIGHTD_TORCH_AT_LEAST(2, 2)
    case DType::kF8E4M3Fnuz: return at::ScalarType::Float8_e4m3fnuz;
    case DType::kF8E5M2Fnuz: return at::ScalarType::Float8_e5m2fnuz;
#else
    case DType::kF8E4M3Fnuz: case DType::kF8E5M2Fnuz: return std::nullopt;
#endif
#if WEIGHTD_TORCH_AT_LEAST(2, 3)
    case DType::kU16: return at::ScalarType::UInt16;
    case DType::kU32: return at::ScalarType::UInt32;
    case DType::kU64: return at::ScalarType::UInt64;
#else
    case DType::kU16: case DType::kU32: case DType::kU64: return std::nullopt;
#endif
#if WEIGHTD_TORCH_AT_LEAST(2, 7)
    case DType::kF8E8M0: return at::ScalarType::Float8_e8m0fnu;
#else
    case DType::kF8E8M0: return std::nullopt;
#endif
#if WEIGHTD_TORCH_AT_LEAST(2, 8)
    case DType::kF4: return at::ScalarType::Float4_e2m1fn_x2;
#else
    case DType::kF4: return std::nullopt;
#endif
    // No LibTorch has an FP6 dtype (torchao keeps FP6 in uint8 tensors of its own layout).
    case DType::kF6E2M3: case DType::kF6E3M2: return std::nullopt;
  }
  return std::nullopt;
}

// The safetensors spelling of a torch dtype, so that messages use one vocabulary.
std::string DTypeLabel(at::ScalarType s) {
  for (DType t : kAllDTypes)
    if (auto st = ToScalarType(t); st.has_value() && *st == s) return std::string(DTypeName(t));
  return c10::toString(s);
}

std::string ShapeString(at::IntArrayRef shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string Join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s.empty() ? "(none)" : s;
}

// The tensor's shape in LibTorch: the file's, except for F4, whose LibTorch element packs two
// values along the last dimension (as the safetensors library itself loads F4 into torch).
std::vector<std::int64_t> TorchShape(const Lease& lease, const Tensor& t) {
  if (t.dtype != DType::kF4) return t.shape;
  if (t.shape.empty() || t.shape.back() % 2 != 0)
    throw Error(InvalidArgument("tensor '" + t.name + "' of model '" + lease.model() + "' has dtype F4 and shape " +
                                    ShapeString(t.shape) +
                                    "; LibTorch's float4_e2m1fn_x2 packs two values along the last dimension, "
                                    "which must therefore be even",
                                "shim.unsupported_shape"));
  std::vector<std::int64_t> shape = t.shape;
  shape.back() /= 2;
  return shape;
}

torch::Tensor MakeTensor(const Lease& lease, const Tensor& t) {
  auto scalar = ToScalarType(t.dtype);
  if (!scalar.has_value())
    throw Error(InvalidArgument("tensor '" + t.name + "' of model '" + lease.model() + "' has dtype " +
                                    std::string(DTypeName(t.dtype)) + ", which LibTorch " TORCH_VERSION
                                    " cannot represent",
                                "shim.unsupported_dtype"));
  const std::vector<std::int64_t> shape = TorchShape(lease, t);
  const torch::Device device = lease.cuda_device() >= 0
                                  ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(lease.cuda_device()))
                                  : torch::Device(torch::kCPU);
  auto options = torch::TensorOptions().dtype(*scalar).device(device);
  if (t.nbytes == 0) return torch::empty(shape, options);
  void* data = const_cast<std::byte*>(t.data);
  if (device.is_cuda() && reinterpret_cast<std::uintptr_t>(data) % c10::elementSize(*scalar) != 0) {
    // safetensors does not pad between tensors, so a tensor may start at an address that is
    // not a multiple of its element size. GPU kernels fault on such loads ("misaligned
    // address"), so this one tensor gets an aligned copy of its bytes (a byte-wise
    // device-to-device copy) instead of a view; it holds no reference to the lease.
    torch::Tensor bytes = torch::from_blob(data, {static_cast<std::int64_t>(t.nbytes)}, [lease](void*) {},
                                           torch::TensorOptions().dtype(torch::kByte).device(device));
    return bytes.clone().view(*scalar).view(shape);
  }
  // The deleter owns a copy of the lease: the mapping outlives every view of it.
  return torch::from_blob(data, shape, [lease](void*) {}, options);
}

}  // namespace

TensorMap tensors_of(const Lease& lease) {
  if (!lease.valid()) throw Error(InvalidArgument("tensors_of() on an empty lease", "shim.empty_lease"));
  TensorMap out;
  for (const Tensor& t : lease.tensors()) out.emplace(t.name, MakeTensor(lease, t));
  return out;
}

TensorMap acquire(Client& client, std::string_view model, const Options& options) {
  AcquireOptions request;
  if (options.device.is_cpu()) {
    request.device = "cpu";
  } else if (options.device.is_cuda()) {
    request.device = "cuda:" + std::to_string(options.device.has_index() ? options.device.index() : 0);
  } else {
    throw Error(InvalidArgument("cannot acquire model '" + std::string(model) + "' on " + options.device.str() +
                                    ": weightd serves cpu and cuda devices",
                                "shim.unsupported_device"));
  }
  request.tensor_filter = options.tensor_filter;
  // A private CPU copy is a copy-on-write mapping of the same segments: pages never written stay
  // shared with every other process.
  request.writable = options.private_copy && options.device.is_cpu();
  auto lease = client.Acquire(model, request);
  if (!lease.ok()) throw Error(lease.status());
  TensorMap tensors = tensors_of(*lease);
  if (options.private_copy && options.device.is_cuda()) {
    // clone() is a device-to-device copy; the views (and with them the lease) go when this map
    // is overwritten.
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : tensors) t = t.clone();
  }
  return tensors;
}

TensorMap acquire(Client& client, std::string_view model, torch::Device device,
                  const std::vector<std::string>& tensor_filter) {
  Options options;
  options.device = device;
  options.tensor_filter = tensor_filter;
  return acquire(client, model, options);
}

namespace {

// A module's parameters and then its buffers, recursively, by dotted name.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// bind() for either kind of module, given its named tensors.
BindReport BindNamed(const NamedTensors& named, const std::string& module_name, const TensorMap& tensors,
                     bool strict) {
  // Every check happens before the first set_data, so a throw leaves the module unchanged.
  // A tensor registered under several names (tied weights) is one slot: any of its names
  // binds it, and it is missing only when none is given.
  struct Slot {
    torch::Tensor slot;
    std::vector<std::string> names;
  };
  std::vector<Slot> slots;
  std::unordered_map<const void*, std::size_t> by_impl;
  std::set<std::string> seen;
  auto collect = [&](const std::string& name, const torch::Tensor& t) {
    if (!seen.insert(name).second) return;
    auto [it, fresh] = by_impl.emplace(t.unsafeGetTensorImpl(), slots.size());
    if (fresh) slots.push_back(Slot{t, {}});
    slots[it->second].names.push_back(name);
  };
  for (const auto& [name, t] : named) {
    // An undefined buffer (e.g. BatchNorm without running stats) has nothing to bind.
    if (t.defined()) collect(name, t);
  }

  struct Target {
    std::string name;
    torch::Tensor slot;
    const torch::Tensor* source;
  };
  std::vector<Target> targets;
  BindReport report;
  for (const Slot& sl : slots) {
    const torch::Tensor* source = nullptr;
    std::string source_name;
    for (const std::string& name : sl.names) {
      auto it = tensors.find(name);
      if (it == tensors.end()) continue;
      const torch::Tensor& src = it->second;
      if (!src.defined()) {
        report.mismatched.push_back(name + ": undefined tensor, expected shape " + ShapeString(sl.slot.sizes()) + " " +
                                    DTypeLabel(sl.slot.scalar_type()));
      } else if (src.sizes() != sl.slot.sizes() || src.scalar_type() != sl.slot.scalar_type()) {
        report.mismatched.push_back(name + ": shape " + ShapeString(src.sizes()) + " " + DTypeLabel(src.scalar_type()) +
                                    " vs expected " + ShapeString(sl.slot.sizes()) + " " +
                                    DTypeLabel(sl.slot.scalar_type()));
      } else if (source == nullptr) {
        source = &src;
        source_name = name;
      }
    }
    if (source != nullptr) targets.push_back(Target{source_name, sl.slot, source});
    else if (std::none_of(sl.names.begin(), sl.names.end(), [&](const std::string& n) { return tensors.count(n) > 0; }))
      report.missing.push_back(sl.names.front());
  }
  for (const auto& [name, tensor] : tensors)
    if (seen.count(name) == 0) report.unexpected.push_back(name);

  const bool refuse = !report.mismatched.empty() ||
                      (strict && (!report.missing.empty() || !report.unexpected.empty()));
  if (refuse) {
    throw Error(InvalidArgument("cannot bind " + std::to_string(tensors.size()) + " tensors into module " +
                                    module_name + ": missing: " + Join(report.missing) +
                                    "; unexpected: " + Join(report.unexpected) +
                                    "; mismatched: " + Join(report.mismatched),
                                "shim.bind_mismatch"));
  }

  torch::NoGradGuard no_grad;
  for (auto& t : targets) {
    t.slot.set_data(*t.source);
    report.bound.push_back(std::move(t.name));
  }
  return report;
}

}  // namespace

BindReport bind(torch::nn::Module& module, const TensorMap& tensors, bool strict) {
  NamedTensors named;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) named.emplace_back(item.key(), item.value());
  for (const auto& item : module.named_buffers(/*recurse=*/true)) named.emplace_back(item.key(), item.value());
  return BindNamed(named, module.name(), tensors, strict);
}

BindReport bind(torch::jit::Module& module, const TensorMap& tensors, bool strict) {
  // A TorchScript module's parameters and buffers are tensor attributes of its object (and of
  // its submodules' objects); set_data swaps the storage under each in place, so the methods
  // compiled against those attributes read the lease's memory.
  NamedTensors named;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) named.emplace_back(item.name, item.value);
  for (const auto& item : module.named_buffers(/*recurse=*/true)) named.emplace_back(item.name, item.value);
  return BindNamed(named, module.type()->name() ? module.type()->name()->qualifiedName() : std::string("(TorchScript)"),
                   tensors, strict);
}

}  // namespace weightd::shim
