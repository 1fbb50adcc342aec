// weightd_ops_client_loop — the client that scripts/systemd-check.sh and
// scripts/container-check.sh run against a daemon that is being killed and restarted: one
// long-lived Client that loops over attach, verify, forward, release until SIGTERM/SIGINT or
// --seconds, then prints one JSON line and exits 0 only if no step ever failed.
//
//   weightd_ops_client_loop --model NAME --dir DIR [--preset classifier] [--socket EP]
//                           [--seconds N] [--request-timeout-ms N] [--iterations N]
//
// attach:  Client::Acquire of the host copy (the Client is connected once and reattaches by
//          itself after a daemon restart; that is what is under test).
// verify:  every tensor's mapped bytes against the model's files (read by this process).
// forward: the example ResNet bound to the mapped tensors (the shim), one forward pass, its
//          logits' digest against the digest of the same network read from the files at start.
// Any error, mismatch or wrong digest counts; the first few are kept in the report. A request
// that hangs is an error too: --request-timeout-ms bounds each one (default 60 s, far above a
// restart's few seconds, far below the library's 10 min). --connect-timeout-ms (30 s) is how
// long a call waits for a daemon that went away: above systemd's RestartSec=2s plus a start on a
// busy machine (the library's 5 s default is not).
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "checkpoint_reader.h"
#include "classifier_net.h"
#include "support/daemon_process.h"
#include "weightd/client.h"
#include "weightd/torch.h"

namespace {

using Clock = std::chrono::steady_clock;
std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

std::uint64_t Forward(weightd::example::ClassifierNet& net, const weightd::shim::TensorMap& tensors) {
  weightd::shim::bind(*net, tensors, /*strict=*/true);
  net->eval();
  torch::InferenceMode guard;
  const torch::Tensor logits =
      net->forward(weightd::example::SyntheticImages(net->config(), /*seed=*/7)).contiguous();
  return XXH64(logits.data_ptr(), static_cast<std::size_t>(logits.numel()) * logits.element_size(), 0);
}

}  // namespace

int main(int argc, char** argv) {
  std::string model, dir, preset = "classifier", socket;
  double seconds = 0;
  long iterations_limit = 0;
  long request_timeout_ms = 60000;
  long connect_timeout_ms = 30000;
  CLI::App app{"weightd ops client loop: attach, verify, forward, release, until stopped"};
  app.add_option("--model", model, "model name in the daemon's catalog")->required();
  app.add_option("--dir", dir, "the model's directory (read once for the reference digest)")->required();
  app.add_option("--preset", preset, "example network preset: tiny | classifier")->capture_default_str();
  app.add_option("--socket", socket, "daemon endpoint (default: $WEIGHTD_SOCKET, else the system socket)");
  app.add_option("--seconds", seconds, "stop after this long (0: at SIGTERM/SIGINT only)");
  app.add_option("--iterations", iterations_limit, "stop after this many iterations (0: no limit)");
  app.add_option("--request-timeout-ms", request_timeout_ms, "bound on each request")->capture_default_str();
  app.add_option("--connect-timeout-ms", connect_timeout_ms,
                 "how long a call waits for a daemon that went away (above a restart's duration)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);

  using namespace weightd;
  auto config = example::ClassifierPreset(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "client_loop: %s\n", config.status().ToString().c_str());
    return 2;
  }
  example::ClassifierNet net(*config);
  auto files = example::ReadCheckpoint(dir, nullptr);
  if (!files.ok()) {
    std::fprintf(stderr, "client_loop: reading %s: %s\n", dir.c_str(), files.status().ToString().c_str());
    return 2;
  }
  const std::uint64_t reference = Forward(net, *files);
  files->clear();

  ClientOptions co;
  co.endpoint = socket;
  co.client_name = "ops-client-loop";
  co.request_timeout = std::chrono::milliseconds(request_timeout_ms);
  co.connect_timeout = std::chrono::milliseconds(connect_timeout_ms);
  auto client = Client::Connect(co);
  if (!client.ok()) {
    std::fprintf(stderr, "client_loop: %s\n", client.status().ToString().c_str());
    return 1;
  }

  long iterations = 0, errors = 0;
  std::vector<std::string> first_errors;
  auto record = [&](const std::string& what) {
    ++errors;
    if (first_errors.size() < 10) first_errors.push_back(what);
    std::fprintf(stderr, "client_loop: iteration %ld: %s\n", iterations, what.c_str());
  };
  double worst_ms = 0;
  const auto start = Clock::now();
  while (!g_stop && (seconds <= 0 || Clock::now() - start < std::chrono::duration<double>(seconds)) &&
         (iterations_limit <= 0 || iterations < iterations_limit)) {
    const auto t0 = Clock::now();
    auto lease = client->Acquire(model);
    if (!lease.ok()) {
      record("attach: " + lease.status().ToString());
    } else if (Status v = testing::CompareWithFiles(*lease); !v.ok()) {
      record("verify: " + v.ToString());
    } else {
      try {
        const std::uint64_t digest = Forward(net, shim::tensors_of(*lease));
        if (digest != reference) record("forward: logits digest differs from the files' network");
      } catch (const std::exception& e) {
        record(std::string("forward: ") + e.what());
      }
    }
    // Drops the module's references too, so that the lease ends with this iteration.
    net = example::ClassifierNet(*config);
    worst_ms = std::max(worst_ms, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    ++iterations;
  }
  nlohmann::json j = {{"iterations", iterations},
                      {"errors", errors},
                      {"first_errors", first_errors},
                      {"reattaches", client->reconnects()},
                      {"worst_iteration_ms", worst_ms},
                      {"seconds", std::chrono::duration<double>(Clock::now() - start).count()}};
  std::printf("%s\n", j.dump().c_str());
  return errors == 0 && iterations > 0 ? 0 : 1;
}
