// weightd/torch.h — the LibTorch shim: leases as torch::Tensors, bound into nn::Modules.
//
// Contract
//  - Errors: every function throws weightd::Error (weightd/status.h), LibTorch's own style.
//  - Zero-copy: tensors are torch::from_blob views of the lease's read-only mapping (host
//    shared memory, or the GPU copy imported into this process for CUDA devices). Each
//    tensor's deleter holds a reference to the lease, so the lease ends when the last tensor
//    (or the TensorMap, or any module parameter bound to one) is destroyed, and no sooner.
//  - Alignment: safetensors does not pad between tensors. A CUDA tensor whose address is not a
//    multiple of its element size (which GPU kernels cannot load) is returned as an aligned
//    private copy of its bytes instead of a view; every other tensor is zero-copy. CPU tensors
//    are always views.
//  - Read-only: host memory is mapped PROT_READ and GPU memory is imported read-only. In-place
//    operations on these tensors (or on parameters bound to them: optimizers, `param.add_()`,
//    `load_state_dict` copies) end the process with SIGSEGV on the CPU, and on a GPU with a
//    CUDA error that poisons the process's context. Use them for inference under
//    torch::NoGradGuard/InferenceMode, or ask for Options::private_copy.
//  - Thread safety: functions may be called concurrently on different modules; binding the
//    same module from two threads at once is a data race, as for any LibTorch module.
//  - Builds against LibTorch 1.13 and 2.x. Each safetensors dtype becomes the LibTorch dtype
//    of the same bits where the linked LibTorch has one: F8_E4M3/F8_E5M2 float8_e4m3fn/e5m2
//    (2.1), F8_E4M3FNUZ/F8_E5M2FNUZ float8_*fnuz (2.2), U16/U32/U64 (2.3), F8_E8M0
//    float8_e8m0fnu (2.7), F4 float4_e2m1fn_x2 (2.8; one element holds two values, so the last
//    dimension is halved and must be even, else InvalidArgument "shim.unsupported_shape"),
//    C64 complex64. F6_E2M3 and F6_E3M2 have none. A tensor whose dtype the linked LibTorch
//    lacks raises InvalidArgument "shim.unsupported_dtype" naming the tensor, the model, the
//    dtype and the LibTorch version; tensor_filter can leave such tensors out.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <torch/torch.h>

#include "weightd/client.h"
#include "weightd/export.h"

// TorchScript's module type, declared here so that programs that bind only torch::nn modules
// need not compile <torch/script.h>; include it to bind a torch::jit::Module.
namespace torch::jit {
struct Module;
}  // namespace torch::jit

namespace weightd::shim {

using TensorMap = std::map<std::string, torch::Tensor>;

struct Options {
  // torch::kCPU maps the host tier; a CUDA device (torch::Device(torch::kCUDA, N), index 0 when
  // none is given) imports the daemon's shared copy on that GPU.
  torch::Device device = torch::kCPU;
  std::vector<std::string> tensor_filter;  // empty: every tensor of the model
  // Give this process its own writable copy instead of read-only views of the shared one. For
  // CUDA a device-to-device copy (it costs one copy of the model per process; the lease ends
  // when acquire returns). For the CPU copy-on-write mappings of the same segments
  // (AcquireOptions::writable): only the pages this process writes become its own, the rest stay
  // shared, and no other process sees the writes.
  bool private_copy = false;
};

// Acquires `model` and returns its tensors by name: zero-copy, read-only views of the shared
// copy on options.device, unless options.private_copy.
WEIGHTD_API TensorMap acquire(Client& client, std::string_view model, const Options& options);
WEIGHTD_API TensorMap acquire(Client& client, std::string_view model, torch::Device device = torch::kCPU,
                              const std::vector<std::string>& tensor_filter = {});

// The tensors of an existing lease (the lease stays alive through the tensors' deleters).
WEIGHTD_API TensorMap tensors_of(const Lease& lease);

struct BindReport {
  std::vector<std::string> bound;
  std::vector<std::string> missing;     // in the module, not in `tensors`
  std::vector<std::string> unexpected;  // in `tensors`, not in the module
  std::vector<std::string> mismatched;  // "name: shape [..] dtype X, expected [..] dtype Y"
};

// Sets the module's parameters and buffers (recursively, by their dotted names) to the given
// tensors, without copying. Shapes and dtypes must match exactly; a parameter takes the device
// of its tensor (bind CUDA tensors into a module that lives on that GPU). A tensor registered
// under several names (tied weights) is bound by any one of them. With strict=true any
// missing, unexpected or mismatched name throws InvalidArgument listing all three lists, and
// nothing is changed; with strict=false the matching names are bound, mismatched ones throw
// (a wrong shape is never silently skipped), and missing/unexpected ones are reported.
WEIGHTD_API BindReport bind(torch::nn::Module& module, const TensorMap& tensors, bool strict = true);

// The same for a TorchScript module (torch::jit::load, as LibTorch servers such as Triton's
// PyTorch backend load models): its parameters and buffers, and those of its submodules, by
// their dotted names (`named_parameters()`/`named_buffers()`), alias the given tensors, and its
// methods compute with them. A frozen module (torch::jit::freeze) has folded its weights into
// constants and has none to bind: strict mode then reports every tensor as unexpected.
WEIGHTD_API BindReport bind(torch::jit::Module& module, const TensorMap& tensors, bool strict = true);

}  // namespace weightd::shim
