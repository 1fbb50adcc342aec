// e2e_attach — one fresh process of the end-to-end harness (bench/e2e/): from main() to every
// tensor of a weightd model usable as a torch::Tensor, through the C++ shim. Prints one JSON
// line with CLOCK_MONOTONIC timestamps (seconds), so that the harness can time the row from
// the moment it spawned this process.
//
//   weightd_bench_e2e_attach --socket EP --model NAME [--device cpu|cuda:N] [--context-first] [--hold]
//   weightd_bench_e2e_attach --context-only [--device cuda:N] [--hold]
//
//   --context-first  create the CUDA context (and LibTorch's CUDA state: one tiny tensor on the
//                    device) before connecting, so that t_ready - t_ctx is the attach alone;
//                    otherwise the client overlaps the context with the handshake
//                    (ClientOptions::prepare_cuda_device), which is what a real process does
//   --context-only   only create the context (the memory and time of a context alone)
//   --hold           after the JSON line, keep everything until stdin reaches end-of-file
//
// Output: {"t_main", "t_ctx" (null without --context-first), "t_connected", "t_ready",
// "tensors", "bytes", "device"}. Errors: {"error": "..."} and exit status 1.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include <torch/torch.h>

#include "weightd/client.h"
#include "weightd/torch.h"

namespace {

double Mono() {
  // steady_clock is CLOCK_MONOTONIC with libstdc++, the clock of Python's time.monotonic().
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string Quote(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    o += c;
  }
  return o + "\"";
}

int Error(const std::string& what) {
  std::printf("{\"error\": %s}\n", Quote(what).c_str());
  std::fflush(stdout);
  return 1;
}

void Hold() {
  char c;
  while (::read(STDIN_FILENO, &c, 1) > 0) {
  }
}

}  // namespace

int main(int argc, char** argv) {
  const double t_main = Mono();
  std::string socket, model, device = "cpu";
  bool context_first = false, context_only = false, hold = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--socket") socket = value();
    else if (a == "--model") model = value();
    else if (a == "--device") device = value();
    else if (a == "--context-first") context_first = true;
    else if (a == "--context-only") context_only = true;
    else if (a == "--hold") hold = true;
    else return Error("unknown argument " + a);
  }
  if (!context_only && (socket.empty() || model.empty())) return Error("give --socket EP --model NAME");
  try {
    const torch::Device dev(device);
    double t_ctx = -1;
    if (context_first || context_only) {
      if (!dev.is_cuda()) return Error("--context-first/--context-only need a CUDA --device");
      torch::Tensor one = torch::ones({1}, torch::TensorOptions().device(dev));
      (void)one.sum().item<float>();  // waits for the device: the context is usable
      t_ctx = Mono();
    }
    if (context_only) {
      std::printf("{\"t_main\": %.6f, \"t_ctx\": %.6f, \"t_connected\": null, \"t_ready\": %.6f, \"tensors\": 0, "
                  "\"bytes\": 0, \"device\": %s}\n",
                  t_main, t_ctx, t_ctx, Quote(device).c_str());
      std::fflush(stdout);
      if (hold) Hold();
      return 0;
    }
    weightd::ClientOptions co;
    co.endpoint = socket;
    co.client_name = "weightd_bench_e2e_attach";
    if (dev.is_cuda() && !context_first) co.prepare_cuda_device = dev.has_index() ? dev.index() : 0;
    auto client = weightd::Client::Connect(co);
    if (!client.ok()) return Error(client.status().ToString());
    const double t_connected = Mono();
    weightd::shim::TensorMap tensors = weightd::shim::acquire(*client, model, dev);
    const double t_ready = Mono();
    std::uint64_t bytes = 0;
    for (const auto& [name, t] : tensors) {
      if (t.device() != dev && !(dev.is_cuda() && !dev.has_index() && t.is_cuda()))
        return Error("tensor " + name + " is on " + t.device().str());
      bytes += static_cast<std::uint64_t>(t.numel()) * t.element_size();
    }
    char ctx[32];
    if (t_ctx < 0) std::snprintf(ctx, sizeof ctx, "null");
    else std::snprintf(ctx, sizeof ctx, "%.6f", t_ctx);
    std::printf("{\"t_main\": %.6f, \"t_ctx\": %s, \"t_connected\": %.6f, \"t_ready\": %.6f, \"tensors\": %zu, "
                "\"bytes\": %llu, \"device\": %s}\n",
                t_main, ctx, t_connected, t_ready, tensors.size(), static_cast<unsigned long long>(bytes),
                Quote(device).c_str());
    std::fflush(stdout);
    if (hold) Hold();
    return 0;
  } catch (const weightd::Error& e) {
    return Error(e.status().ToString());
  } catch (const std::exception& e) {
    return Error(e.what());
  }
}
