// weightd/dtype.h — element types of safetensors tensors, as they travel in a manifest.
//
// The numeric values are part of the wire protocol (docs/protocol.md): never renumber.
// These are the 22 dtypes the safetensors format defines. Three are narrower than a byte and
// are packed without padding, as the format lays them out: F4 (two values a byte) and
// F6_E2M3/F6_E3M2 (four values in three bytes). A tensor of those must hold a whole number of
// bytes; DTypeBytes says how many. weightd serves every tensor's bytes as the file holds them.
// Everything here is thread-safe, and all but DTypeBytes constexpr.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

namespace weightd {

enum class DType : std::uint8_t {
  kF64 = 1, kF32 = 2, kF16 = 3, kBF16 = 4,
  kI64 = 5, kI32 = 6, kI16 = 7, kI8 = 8,
  kU64 = 9, kU32 = 10, kU16 = 11, kU8 = 12,
  kBool = 13, kF8E4M3 = 14, kF8E5M2 = 15,
  // Protocol 3.1.
  kF8E8M0 = 16,       // the MX scale type: an 8-bit exponent, no sign, no mantissa
  kF8E4M3Fnuz = 17,   // FP8 without infinities or negative zero (AMD's variants)
  kF8E5M2Fnuz = 18,
  kC64 = 19,          // complex: two F32, real part first
  kF4 = 20,           // FP4 E2M1, two values a byte
  kF6E2M3 = 21,       // FP6, four values in three bytes
  kF6E3M2 = 22,
};

inline constexpr DType kAllDTypes[] = {
    DType::kF64,    DType::kF32,    DType::kF16,        DType::kBF16,       DType::kI64,  DType::kI32,
    DType::kI16,    DType::kI8,     DType::kU64,        DType::kU32,        DType::kU16,  DType::kU8,
    DType::kBool,   DType::kF8E4M3, DType::kF8E5M2,     DType::kF8E8M0,     DType::kF8E4M3Fnuz,
    DType::kF8E5M2Fnuz, DType::kC64, DType::kF4,        DType::kF6E2M3,     DType::kF6E3M2,
};

// Bits of one element: 4, 6, 8, 16, 32 or 64.
constexpr unsigned DTypeBits(DType t) {
  switch (t) {
    case DType::kF64: case DType::kI64: case DType::kU64: case DType::kC64: return 64;
    case DType::kF32: case DType::kI32: case DType::kU32: return 32;
    case DType::kF16: case DType::kBF16: case DType::kI16: case DType::kU16: return 16;
    case DType::kI8: case DType::kU8: case DType::kBool: case DType::kF8E4M3: case DType::kF8E5M2:
    case DType::kF8E8M0: case DType::kF8E4M3Fnuz: case DType::kF8E5M2Fnuz: return 8;
    case DType::kF6E2M3: case DType::kF6E3M2: return 6;
    case DType::kF4: return 4;
  }
  return 0;
}

// The safetensors spelling ("BF16", "F8_E4M3", ...).
constexpr std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF64: return "F64";
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kI64: return "I64";
    case DType::kI32: return "I32";
    case DType::kI16: return "I16";
    case DType::kI8: return "I8";
    case DType::kU64: return "U64";
    case DType::kU32: return "U32";
    case DType::kU16: return "U16";
    case DType::kU8: return "U8";
    case DType::kBool: return "BOOL";
    case DType::kF8E4M3: return "F8_E4M3";
    case DType::kF8E5M2: return "F8_E5M2";
    case DType::kF8E8M0: return "F8_E8M0";
    case DType::kF8E4M3Fnuz: return "F8_E4M3FNUZ";
    case DType::kF8E5M2Fnuz: return "F8_E5M2FNUZ";
    case DType::kC64: return "C64";
    case DType::kF4: return "F4";
    case DType::kF6E2M3: return "F6_E2M3";
    case DType::kF6E3M2: return "F6_E3M2";
  }
  return "?";
}

constexpr std::optional<DType> DTypeFromName(std::string_view s) {
  for (DType t : kAllDTypes)
    if (DTypeName(t) == s) return t;
  return std::nullopt;
}

// True if `raw` (e.g. from the wire) is one of the enumerators above.
constexpr bool IsValidDType(std::uint8_t raw) { return raw >= 1 && raw <= 22; }

// The size of a tensor's data, or why it has none.
struct DTypeBytesResult {
  enum class Error : std::uint8_t {
    kNone,
    kNegativeDimension,
    kOverflow,     // the element count or the size overflows 64 bits
    kPartialByte,  // a sub-byte dtype whose values end inside a byte (e.g. 3 F4 values)
  };
  std::uint64_t bytes = 0;
  Error error = Error::kNone;
  constexpr bool ok() const { return error == Error::kNone; }
};

// Bytes that a tensor of `shape` (product of the dimensions elements; [] is one element)
// takes in a safetensors data section. Not constexpr: C++17 (which the public headers keep to)
// cannot iterate a std::vector at compile time.
inline DTypeBytesResult DTypeBytes(DType t, const std::vector<std::int64_t>& shape) {
  using E = DTypeBytesResult::Error;
  std::uint64_t elements = 1;
  for (std::int64_t d : shape) {
    if (d < 0) return {0, E::kNegativeDimension};
    if (__builtin_mul_overflow(elements, static_cast<std::uint64_t>(d), &elements)) return {0, E::kOverflow};
  }
  const unsigned bits = DTypeBits(t);
  std::uint64_t n = 0;
  if (bits % 8 == 0) {
    if (__builtin_mul_overflow(elements, std::uint64_t{bits / 8}, &n)) return {0, E::kOverflow};
    return {n, E::kNone};
  }
  if (__builtin_mul_overflow(elements, std::uint64_t{bits}, &n)) return {0, E::kOverflow};
  if (n % 8 != 0) return {0, E::kPartialByte};
  return {n / 8, E::kNone};
}

}  // namespace weightd
