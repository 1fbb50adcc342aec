#include "models.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace weightd::bench {

std::vector<st::TensorSpec> DitLikeTensors(int count, std::uint64_t target_bytes) {
  // The tensors of a block hold d^2 (q, k, v, o), 14/3 d^2 (w1, w2, w3) or d (norms) BF16
  // elements; the norms are left out of the sizing.
  constexpr double kSquares[9] = {1, 1, 1, 1, 14.0 / 3, 14.0 / 3, 14.0 / 3, 0, 0};
  double squares = 0;
  for (int i = 0; i < count; ++i) squares += kSquares[i % 9];
  const double d_exact = std::sqrt(static_cast<double>(target_bytes) / (2 * std::max(1.0, squares)));
  const std::int64_t d = std::max<std::int64_t>(8, std::llround(d_exact / 8) * 8);
  const std::int64_t f = std::max<std::int64_t>(8, d * 14 / 3 / 8 * 8);
  std::vector<st::TensorSpec> out;
  out.reserve(static_cast<std::size_t>(count));
  for (int i = 0; static_cast<int>(out.size()) < count; ++i) {
    const std::string p = "blocks." + std::to_string(i);
    const std::vector<st::TensorSpec> block = {
        {p + ".attn.q.weight", DType::kBF16, {d, d}},  {p + ".attn.k.weight", DType::kBF16, {d, d}},
        {p + ".attn.v.weight", DType::kBF16, {d, d}},  {p + ".attn.o.weight", DType::kBF16, {d, d}},
        {p + ".ffn.w1.weight", DType::kBF16, {f, d}},  {p + ".ffn.w2.weight", DType::kBF16, {d, f}},
        {p + ".ffn.w3.weight", DType::kBF16, {f, d}},  {p + ".norm1.weight", DType::kBF16, {d}},
        {p + ".norm2.weight", DType::kBF16, {d}},
    };
    for (const auto& t : block)
      if (static_cast<int>(out.size()) < count) out.push_back(t);
  }
  return out;
}

}  // namespace weightd::bench
