// A downstream LibTorch program using the installed shim (weightd::torch): a torch::nn module
// and a TorchScript module bound to a model that the daemon serves, computing what the same
// weights compute in the program's own memory.
//
//   downstream_torch write DIR             writes DIR/model.safetensors (the weights of Net with
//                                          seed 1, by a small writer of its own) and DIR/net.pt
//                                          (the same network and weights as TorchScript)
//   downstream_torch check ENDPOINT MODEL DIR
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <torch/script.h>
#include <torch/torch.h>
#include <weightd/torch.h>

namespace {

struct NetImpl : torch::nn::Module {
  NetImpl() {
    lin = register_module("lin", torch::nn::Linear(8, 4));
    bn = register_module("bn", torch::nn::BatchNorm1d(4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return bn(lin(x)); }
  torch::nn::Linear lin{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
};
TORCH_MODULE(Net);

Net MakeNet(std::uint64_t seed) {
  torch::manual_seed(seed);
  Net net;
  torch::NoGradGuard no_grad;
  net->bn->running_mean.copy_(torch::randn({4}));
  net->bn->running_var.copy_(torch::rand({4}) + 0.5);
  net->bn->weight.copy_(torch::randn({4}));
  net->bn->num_batches_tracked.fill_(static_cast<std::int64_t>(seed) + 4);
  net->eval();
  return net;
}

std::vector<std::pair<std::string, torch::Tensor>> StateOf(Net& net) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : net->named_parameters()) out.emplace_back(p.key(), p.value().detach());
  for (const auto& b : net->named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

// The safetensors format: u64 little-endian header length, a JSON header, the data.
void WriteSafetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
  std::string header = "{", data;
  for (const auto& [name, t] : tensors) {
    const torch::Tensor c = t.contiguous();
    const char* dtype = c.scalar_type() == torch::kFloat ? "F32" : "I64";
    std::string shape;
    for (std::int64_t d : c.sizes()) shape += (shape.empty() ? "" : ",") + std::to_string(d);
    const std::size_t begin = data.size();
    data.append(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
    header += (header.size() > 1 ? "," : "") + std::string("\"") + name + "\":{\"dtype\":\"" + dtype +
              "\",\"shape\":[" + shape + "],\"data_offsets\":[" + std::to_string(begin) + "," +
              std::to_string(data.size()) + "]}";
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::ofstream f(path, std::ios::binary);
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) f.put(static_cast<char>((n >> (8 * i)) & 0xff));
  f << header << data;
}

// Net as TorchScript, with `net`'s weights, compiled from source here.
torch::jit::Module Script(Net& net) {
  torch::jit::Module lin("__torch__.Lin"), bn("__torch__.BN"), m("__torch__.Net");
  lin.register_parameter("weight", net->lin->weight.detach().clone(), false);
  lin.register_parameter("bias", net->lin->bias.detach().clone(), false);
  lin.define("def forward(self, x):\n    return torch.linear(x, self.weight, self.bias)\n");
  bn.register_parameter("weight", net->bn->weight.detach().clone(), false);
  bn.register_parameter("bias", net->bn->bias.detach().clone(), false);
  bn.register_buffer("running_mean", net->bn->running_mean.clone());
  bn.register_buffer("running_var", net->bn->running_var.clone());
  bn.register_buffer("num_batches_tracked", net->bn->num_batches_tracked.clone());
  bn.define(
      "def forward(self, x):\n"
      "    return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, False, 0.1, "
      "1e-05, True)\n");
  m.register_module("lin", lin);
  m.register_module("bn", bn);
  m.define("def forward(self, x):\n    return self.bn.forward(self.lin.forward(x))\n");
  return m;
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "downstream_torch: FAIL: %s\n", what.c_str());
  return 1;
}

int Check(const std::string& endpoint, const std::string& model, const std::string& dir) {
  weightd::ClientOptions o;
  o.endpoint = endpoint;
  o.client_name = "downstream_torch";
  weightd::Client client = weightd::Client::Connect(o).value();
  weightd::shim::TensorMap tensors = weightd::shim::acquire(client, model);
  const torch::Tensor x = torch::randn({5, 8});
  torch::NoGradGuard no_grad;

  // torch::nn: a net of other weights, bound to the lease, computes what seed 1's net computes.
  Net expected = MakeNet(1), served = MakeNet(2);
  weightd::shim::BindReport r = weightd::shim::bind(*served, tensors);
  if (r.bound.size() != tensors.size()) return Fail("nn bind bound " + std::to_string(r.bound.size()));
  if (served->lin->weight.data_ptr() != tensors.at("lin.weight").data_ptr()) return Fail("nn weights were copied");
  if (!torch::equal(served->forward(x), expected->forward(x))) return Fail("nn outputs differ");

  // TorchScript: the saved module computes with the lease's tensors what it computes with its own.
  torch::jit::Module own = torch::jit::load(dir + "/net.pt"), bound = torch::jit::load(dir + "/net.pt");
  weightd::shim::bind(bound, tensors);
  for (const auto& p : bound.named_parameters())
    if (p.value.data_ptr() != tensors.at(p.name).data_ptr()) return Fail("jit parameter " + p.name + " was copied");
  if (!torch::equal(bound.forward({x}).toTensor(), own.forward({x}).toTensor())) return Fail("jit outputs differ");
  std::printf("downstream_torch: %zu tensors of '%s' bound into a torch::nn and a TorchScript module; outputs match\n",
              tensors.size(), model.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.size() == 2 && args[0] == "write") {
      Net net = MakeNet(1);
      WriteSafetensors(args[1] + "/model.safetensors", StateOf(net));
      Script(net).save(args[1] + "/net.pt");
      return 0;
    }
    if (args.size() == 4 && args[0] == "check") return Check(args[1], args[2], args[3]);
  } catch (const std::exception& e) {
    return Fail(e.what());
  }
  std::fprintf(stderr, "usage: %s write DIR | check ENDPOINT MODEL DIR\n", argv[0]);
  return 2;
}
