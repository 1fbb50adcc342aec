// weightd/dtype.h — element types of safetensors tensors, as they travel in a manifest.
//
// The numeric values are part of the wire protocol (docs/protocol.md): never renumber.
// Everything here is constexpr and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace weightd {

enum class DType : std::uint8_t {
  kF64 = 1, kF32 = 2, kF16 = 3, kBF16 = 4,
  kI64 = 5, kI32 = 6, kI16 = 7, kI8 = 8,
  kU64 = 9, kU32 = 10, kU16 = 11, kU8 = 12,
  kBool = 13, kF8E4M3 = 14, kF8E5M2 = 15,
};

inline constexpr DType kAllDTypes[] = {
    DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kI64,    DType::kI32,   DType::kI16, DType::kI8,
    DType::kU64, DType::kU32, DType::kU16, DType::kU8,   DType::kBool,   DType::kF8E4M3, DType::kF8E5M2,
};

// Size in bytes of one element.
constexpr std::size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF64: case DType::kI64: case DType::kU64: return 8;
    case DType::kF32: case DType::kI32: case DType::kU32: return 4;
    case DType::kF16: case DType::kBF16: case DType::kI16: case DType::kU16: return 2;
    case DType::kI8: case DType::kU8: case DType::kBool: case DType::kF8E4M3: case DType::kF8E5M2: return 1;
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
  }
  return "?";
}

constexpr std::optional<DType> DTypeFromName(std::string_view s) {
  for (DType t : kAllDTypes)
    if (DTypeName(t) == s) return t;
  return std::nullopt;
}

// True if `raw` (e.g. from the wire) is one of the enumerators above.
constexpr bool IsValidDType(std::uint8_t raw) { return raw >= 1 && raw <= 15; }

}  // namespace weightd
