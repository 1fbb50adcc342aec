// synthetic.h — deterministic pseudo-random values for generated checkpoints and inputs.
//
// Contract
//  - Counter-based: the value of element k of a stream depends only on (stream key, k), so
//    any byte range of a tensor can be produced on any thread, in any order, and chunks agree.
//  - Reproducible across machines and compilers: only IEEE-754 +, -, *, / and sqrt are used
//    (no libm, whose last bits differ between versions), and the library is compiled with
//    -ffp-contract=off so no FMA changes the rounding.
//  - All functions are pure and thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

namespace weightd::example {

// The key of a named stream: xxh64(name, seed).
std::uint64_t StreamKey(std::uint64_t seed, std::string_view name);

// splitmix64's output function (Steele, Lea, Flood 2014).
constexpr std::uint64_t Mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Writes scale * N(0,1) samples for elements [first, first + out.size()) of stream `key`.
// Elements 2p and 2p+1 are the two outputs of one Box-Muller transform of the p-th splitmix64
// output of the stream.
void NormalValues(std::uint64_t key, std::uint64_t first, double scale, std::span<float> out);

// Round-to-nearest-even float -> bfloat16 (the values here are finite).
constexpr std::uint16_t FloatBitsToBf16(std::uint32_t bits) {
  return static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace weightd::example
