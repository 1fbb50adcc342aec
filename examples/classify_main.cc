// weightd-example — classifies a synthetic image with the example ResNet, its weights either
// read from the checkpoint files (--from-file, what a program without weightd does) or
// mapped from the weightd daemon (--attach, zero-copy), and reports how long each took.
//
//   weightd-example --preset tiny|classifier (--from-file DIR | --attach MODEL [--socket EP])
//                   [--device cpu|cuda:N] [--seed N] [--json]
//
// --device runs the network there: --from-file copies the tensors it read onto the device
// (what a program without weightd does), --attach imports the daemon's GPU copy (zero-copy).
// --json also prints CLOCK_MONOTONIC timestamps (start_mono_s, ready_mono_s,
// first_forward_mono_s: after the first forward pass's logits are back on the host), so that a
// harness can time the process from the moment it spawned it.
//
// The logits digest (xxh64 of the logits' bytes) lets two runs be compared exactly: both
// modes bind the same bytes, so they must print the same digest.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "checkpoint_reader.h"
#include "classifier_net.h"
#include "weightd/client.h"
#include "weightd/torch.h"

namespace {

using Clock = std::chrono::steady_clock;
using weightd::Status;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
// steady_clock is CLOCK_MONOTONIC with libstdc++, the clock of Python's time.monotonic().
double MonoS(Clock::time_point t) { return std::chrono::duration<double>(t.time_since_epoch()).count(); }

int Fail(const Status& s) {
  std::fprintf(stderr, "weightd-example: %s\n", s.ToString().c_str());
  return 1;
}

struct Options {
  std::string preset;
  std::string from_file;
  std::string attach;
  std::string socket;
  std::string device = "cpu";
  std::uint64_t seed = 0;
  bool json = false;
};

int Run(const Options& opt, Clock::time_point start) {
  using namespace weightd;
  using namespace weightd::example;
  auto config = ClassifierPreset(opt.preset);
  if (!config.ok()) return Fail(config.status());
  const torch::Device device(opt.device);
  ClassifierNet net(*config);
  const Clock::time_point built = Clock::now();

  shim::TensorMap tensors;
  std::string mode, detail;
  if (!opt.from_file.empty()) {
    mode = "from-file";
    CheckpointReadStats stats;
    auto read = ReadCheckpoint(opt.from_file, &stats);
    if (!read.ok()) return Fail(read.status().WithContext("reading " + opt.from_file));
    tensors = std::move(read).value();
    if (device != torch::Device(torch::kCPU))
      for (auto& [name, t] : tensors) t = t.to(device);
    detail = opt.from_file;
  } else {
    mode = "attach";
    ClientOptions co;
    co.endpoint = opt.socket;
    co.client_name = "weightd-example";
    if (device.is_cuda()) co.prepare_cuda_device = device.has_index() ? device.index() : 0;
    auto client = Client::Connect(co);
    if (!client.ok()) return Fail(client.status());
    // The tensors' deleters hold the lease; the client may go out of scope.
    tensors = shim::acquire(*client, opt.attach, device);
    detail = opt.attach;
  }
  shim::bind(*net, tensors, /*strict=*/true);
  tensors.clear();  // the module now holds the only references
  const Clock::time_point ready = Clock::now();

  net->eval();
  torch::InferenceMode guard;
  const torch::Tensor images = SyntheticImages(net->config(), opt.seed).to(device);
  const Clock::time_point f0 = Clock::now();
  // On a GPU, the copy back to the host waits for the forward pass.
  const torch::Tensor logits = net->forward(images).to(torch::kCPU).contiguous();
  const Clock::time_point f1 = Clock::now();

  const torch::Tensor probs = torch::softmax(logits, 1);
  const auto [top_p, top_i] = probs.topk(std::min<std::int64_t>(5, net->config().num_classes), 1);
  const std::uint64_t digest =
      XXH64(logits.data_ptr(), static_cast<std::size_t>(logits.numel()) * logits.element_size(), 0);
  char digest_hex[17];
  std::snprintf(digest_hex, sizeof digest_hex, "%016llx", static_cast<unsigned long long>(digest));

  if (opt.json) {
    nlohmann::json top = nlohmann::json::array();
    for (std::int64_t k = 0; k < top_i.size(1); ++k)
      top.push_back({{"class", top_i[0][k].item<std::int64_t>()}, {"score", top_p[0][k].item<double>()}});
    nlohmann::json j = {{"mode", mode},         {"preset", opt.preset},
                        {"source", detail},     {"seed", opt.seed},
                        {"device", opt.device},  {"start_mono_s", MonoS(start)},
                        {"ready_mono_s", MonoS(ready)}, {"first_forward_mono_s", MonoS(f1)},
                        {"ready_ms", Ms(ready - start)}, {"build_ms", Ms(built - start)},
                        {"weights_ms", Ms(ready - built)}, {"forward_ms", Ms(f1 - f0)},
                        {"top5", top},          {"scores_digest", digest_hex}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("mode: %s (%s)\n", mode.c_str(), detail.c_str());
    std::printf("device: %s\n", opt.device.c_str());
    std::printf("preset: %s, seed %llu, input %lldx%lldx%lld\n", opt.preset.c_str(),
                static_cast<unsigned long long>(opt.seed), static_cast<long long>(images.size(1)),
                static_cast<long long>(images.size(2)), static_cast<long long>(images.size(3)));
    std::printf("time to ready: %.1f ms (net built %.1f ms, weights %.1f ms)\n", Ms(ready - start),
                Ms(built - start), Ms(ready - built));
    std::printf("forward: %.1f ms\n", Ms(f1 - f0));
    std::printf("top-5:\n");
    for (std::int64_t k = 0; k < top_i.size(1); ++k)
      std::printf("  class %4lld  %.6f\n", static_cast<long long>(top_i[0][k].item<std::int64_t>()),
                  top_p[0][k].item<double>());
    std::printf("scores digest: %s\n", digest_hex);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Clock::time_point start = Clock::now();
  Options opt;
  CLI::App app{"Classifies a synthetic image with the example ResNet, weights from files or from weightd."};
  app.add_option("--preset", opt.preset, "tiny | classifier")
      ->required()
      ->check(CLI::IsMember({"tiny", "classifier"}));
  auto* from_file = app.add_option("--from-file", opt.from_file, "read the checkpoint in DIR (safetensors, HF layout)");
  auto* attach = app.add_option("--attach", opt.attach, "map MODEL from the weightd daemon");
  from_file->excludes(attach);
  app.add_option("--socket", opt.socket, "daemon endpoint (default: $WEIGHTD_SOCKET, else the system socket)")
      ->needs(attach);
  app.add_option("--device", opt.device, "where the network runs: cpu or cuda:N")->capture_default_str();
  app.add_option("--seed", opt.seed, "seed of the synthetic input image");
  app.add_flag("--json", opt.json, "print one JSON object");
  CLI11_PARSE(app, argc, argv);
  if (opt.from_file.empty() && opt.attach.empty()) {
    std::fprintf(stderr, "weightd-example: give --from-file DIR or --attach MODEL\n%s", app.help().c_str());
    return 2;
  }
  try {
    return Run(opt, start);
  } catch (const weightd::Error& e) {  // the shim and the net report this way
    return Fail(e.status());
  } catch (const std::exception& e) {  // c10::Error and friends
    return Fail(weightd::Internal(e.what()));
  }
}
