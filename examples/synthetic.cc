#include "synthetic.h"

#include <bit>
#include <cmath>

#include <xxhash.h>

namespace weightd::example {
namespace {

constexpr double kLn2 = 0.6931471805599453094;
constexpr double kHalfPi = 1.5707963267948966192;
constexpr double kTwoPow24 = 16777216.0;

// ln(u) for u in (0, 1], to ~1e-13 relative: u = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172.
double Log(double u) {
  std::uint64_t bits = std::bit_cast<std::uint64_t>(u);
  int e = static_cast<int>((bits >> 52) & 0x7ff) - 1023;
  bits = (bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;  // mantissa in [1, 2)
  double m = std::bit_cast<double>(bits);
  if (m > 1.4142135623730951) {
    m *= 0.5;
    ++e;
  }
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  const double series =
      1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11 + s2 * (1.0 / 13))))));
  return e * kLn2 + 2.0 * s * series;
}

// sin and cos of x in [0, pi/2], Taylor to x^17 / x^16 (error < 1e-11).
void SinCosQuadrant(double x, double* s, double* c) {
  const double x2 = x * x;
  *s = x * (1.0 + x2 * (-1.0 / 6 + x2 * (1.0 / 120 + x2 * (-1.0 / 5040 + x2 * (1.0 / 362880 +
            x2 * (-1.0 / 39916800 + x2 * (1.0 / 6227020800 + x2 * (-1.0 / 1307674368000 +
            x2 * (1.0 / 355687428096000)))))))));
  *c = 1.0 + x2 * (-1.0 / 2 + x2 * (1.0 / 24 + x2 * (-1.0 / 720 + x2 * (1.0 / 40320 + x2 * (-1.0 / 3628800 +
            x2 * (1.0 / 479001600 + x2 * (-1.0 / 87178291200 + x2 * (1.0 / 20922789888000))))))));
}

// One Box-Muller pair from 48 random bits: u1 in (0, 1] and u2 in [0, 1) with 24 bits each,
// exact in double, so every step below is exactly reproducible.
void BoxMuller(std::uint64_t r, double* z0, double* z1) {
  const double u1 = static_cast<double>((r >> 40) + 1) / kTwoPow24;
  const std::uint32_t a = static_cast<std::uint32_t>(r & 0xffffffu);
  const double radius = std::sqrt(-2.0 * Log(u1));
  // theta = 2 pi a / 2^24: quadrant q = a >> 22, angle within it = (a mod 2^22) / 2^22 * pi/2.
  const std::uint32_t q = a >> 22;
  const double x = static_cast<double>(a & 0x3fffffu) / 4194304.0 * kHalfPi;
  double s, c;
  SinCosQuadrant(x, &s, &c);
  double cs = c, sn = s;  // cos/sin of q * pi/2 + x
  switch (q) {
    case 0: break;
    case 1: cs = -s; sn = c; break;
    case 2: cs = -c; sn = -s; break;
    default: cs = s; sn = -c; break;
  }
  *z0 = radius * cs;
  *z1 = radius * sn;
}

constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

}  // namespace

std::uint64_t StreamKey(std::uint64_t seed, std::string_view name) { return XXH64(name.data(), name.size(), seed); }

void NormalValues(std::uint64_t key, std::uint64_t first, double scale, std::span<float> out) {
  std::size_t i = 0;
  std::uint64_t k = first;
  const std::size_t n = out.size();
  double z0, z1;
  if (n > 0 && (k & 1)) {  // the second half of a pair
    BoxMuller(Mix64(key + (k >> 1) * kGolden), &z0, &z1);
    out[i++] = static_cast<float>(z1 * scale);
    ++k;
  }
  for (; i + 1 < n; i += 2, k += 2) {
    BoxMuller(Mix64(key + (k >> 1) * kGolden), &z0, &z1);
    out[i] = static_cast<float>(z0 * scale);
    out[i + 1] = static_cast<float>(z1 * scale);
  }
  if (i < n) {
    BoxMuller(Mix64(key + (k >> 1) * kGolden), &z0, &z1);
    out[i] = static_cast<float>(z0 * scale);
  }
}

}  // namespace weightd::example
