#include "support/dtype_files.h"

#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

namespace weightd::testing {
namespace {

std::string FromHex(const std::string& hex) {
  std::string out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2) out += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  return out;
}

void AppendValue(const nlohmann::json& v, std::vector<double>* out) {
  if (v.is_null()) out->push_back(std::numeric_limits<double>::quiet_NaN());
  else if (v.is_array()) for (const auto& x : v) AppendValue(x, out);
  else out->push_back(v.get<double>());
}

}  // namespace

Result<std::vector<ExpectedTensor>> ReadExpectedTensors(const std::string& dir) {
  const std::string path = dir + "/expected.json";
  std::ifstream f(path);
  if (!f) return NotFound("cannot read " + path);
  std::stringstream text;
  text << f.rdbuf();
  try {
    const auto j = nlohmann::json::parse(text.str());
    std::vector<ExpectedTensor> out;
    for (const auto& t : j.at("tensors")) {
      ExpectedTensor e;
      e.name = t.at("name").get<std::string>();
      e.dtype = t.at("dtype").get<std::string>();
      e.shape = t.at("shape").get<std::vector<std::int64_t>>();
      e.bytes = FromHex(t.at("hex").get<std::string>());
      if (t.contains("values") && !t["values"].is_null()) AppendValue(t["values"], &e.values);
      if (t.contains("torch_dtype")) e.torch_dtype = t["torch_dtype"].get<std::string>();
      if (t.contains("torch_shape")) e.torch_shape = t["torch_shape"].get<std::vector<std::int64_t>>();
      out.push_back(std::move(e));
    }
    return out;
  } catch (const std::exception& e) {
    return DataLoss(path + ": " + e.what());
  }
}

Result<std::vector<ExpectedTensor>> WriteIndependentDtypeModel(const std::string& dir, const std::string& variant) {
  const std::string cmd = std::string(WEIGHTD_PYTHON3) + " '" WEIGHTD_TEST_DATA_DIR "/dtypes/write_dtypes.py' '" + dir +
                          "' '" + variant + "' 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return Internal("popen(" + cmd + ") failed");
  std::string out;
  char buf[1024];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int st = ::pclose(p);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) return Internal(cmd + " failed: " + out);
  return ReadExpectedTensors(dir);
}

std::optional<std::string> SafetensorsLibraryDir() {
  const char* d = std::getenv("WEIGHTD_SAFETENSORS_LIBRARY_DIR");
  if (d == nullptr || *d == '\0') return std::nullopt;
  return std::string(d);
}

}  // namespace weightd::testing
