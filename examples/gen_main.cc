// weightd-gen — writes a synthetic checkpoint (safetensors, Hugging Face layout) of one of the
// example presets, for tests, benchmarks and the example program.
//
//   weightd-gen --preset tiny|classifier|dit5b|glm9b --out DIR [--seed N]
//               [--shard-size BYTES] [--threads N]
#include <cstdio>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>

#include "classifier_spec.h"
#include "generator.h"

int main(int argc, char** argv) {
  using namespace weightd::example;
  GenerateOptions options;
  CLI::App app{"Writes a synthetic safetensors checkpoint of an example preset."};
  app.add_option("--preset", options.preset, "tiny | classifier | dit5b | glm9b")
      ->required()
      ->check(CLI::IsMember(PresetNames()));
  app.add_option("--out", options.out_dir, "output directory (created if missing)")->required();
  app.add_option("--seed", options.seed, "seed of the values (same seed, same bytes)");
  app.add_option("--shard-size", options.shard_size,
                 "largest shard in bytes before splitting into model-0000N-of-0000M files (0: one file)")
      ->capture_default_str();
  options.threads = std::max(1u, std::thread::hardware_concurrency());
  app.add_option("--threads", options.threads, "threads computing values")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1024u));
  CLI11_PARSE(app, argc, argv);

  auto report = Generate(options);
  if (!report.ok()) {
    std::fprintf(stderr, "weightd-gen: %s\n", report.status().ToString().c_str());
    return 1;
  }
  for (const GeneratedFile& f : report->files)
    std::printf("%s  %zu tensors  %llu bytes\n", f.path.c_str(), f.tensors, static_cast<unsigned long long>(f.bytes));
  if (!report->index_path.empty()) std::printf("%s\n", report->index_path.c_str());
  const double gb = static_cast<double>(report->file_bytes) / 1e9;
  std::printf("preset %s seed %llu: %zu tensors, %llu tensor bytes, %zu file(s) of %llu bytes in %.2f s (%.2f GB/s)\n",
              options.preset.c_str(), static_cast<unsigned long long>(options.seed), report->tensors,
              static_cast<unsigned long long>(report->tensor_bytes), report->files.size(),
              static_cast<unsigned long long>(report->file_bytes), report->seconds,
              report->seconds > 0 ? gb / report->seconds : 0.0);
  return 0;
}
