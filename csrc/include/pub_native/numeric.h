// Framework-free element types for the update kernels (host C++ and CUDA device code):
// bfloat16 and float16 storage with exact round-to-nearest-even conversions, and typed
// load/store that widen 16-bit values to the float math type.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace pub_native {

// 16-bit storage types. Only their bits are stored; all math is done in float.
struct bf16_t {
  uint16_t bits;
};
struct half_t {
  uint16_t bits;
};

// Element-type codes shared with Python (pub_native/_kernels.py).
enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

PN_HD uint32_t pn_float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}
PN_HD float pn_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

PN_HD float bf16_to_float(bf16_t h) { return pn_bits_float(static_cast<uint32_t>(h.bits) << 16); }

PN_HD bf16_t float_to_bf16(float f) {
  uint32_t u = pn_float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x0040u)};
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

PN_HD float half_to_float(half_t h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1Fu;
  const uint32_t mant = h.bits & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return pn_bits_float(sign | 0x7F800000u | (mant << 13));
  return pn_bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

PN_HD half_t float_to_half(float f) {
  uint32_t u = pn_float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u >= 0x7F800000u) return half_t{static_cast<uint16_t>(sign | (u > 0x7F800000u ? 0x7E00u : 0x7C00u))};
  if (u >= 0x477FF000u) return half_t{static_cast<uint16_t>(sign | 0x7C00u)};  // rounds past 65504
  if (u < 0x38800000u) {  // below the smallest normal 2^-14: subnormal, in units of 2^-24
#if defined(__CUDA_ARCH__)
    const float q = ::rintf(pn_bits_float(u) * 16777216.0f);
#else
    const float q = std::nearbyint(pn_bits_float(u) * 16777216.0f);
#endif
    return half_t{static_cast<uint16_t>(sign | static_cast<uint16_t>(q))};
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
  const uint32_t r = u + 0xC8000FFFu + ((u >> 13) & 1u);
  return half_t{static_cast<uint16_t>(sign | (r >> 13))};
}

// Math type of a storage type: float for 32- and 16-bit parameters, double for 64-bit ones.
template <class Tp>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};

template <class T>
PN_HD T to_math(float v) {
  return static_cast<T>(v);
}
template <class T>
PN_HD T to_math(double v) {
  return static_cast<T>(v);
}
template <class T>
PN_HD T to_math(bf16_t v) {
  return static_cast<T>(bf16_to_float(v));
}
template <class T>
PN_HD T to_math(half_t v) {
  return static_cast<T>(half_to_float(v));
}

template <class Tp>
struct FromMath {
  template <class T>
  PN_HD static Tp cast(T v) {
    return static_cast<Tp>(v);
  }
};
template <>
struct FromMath<bf16_t> {
  template <class T>
  PN_HD static bf16_t cast(T v) {
    return float_to_bf16(static_cast<float>(v));
  }
};
template <>
struct FromMath<half_t> {
  template <class T>
  PN_HD static half_t cast(T v) {
    return float_to_half(static_cast<float>(v));
  }
};

template <class Tp, class T>
PN_HD Tp from_math(T v) {
  return FromMath<Tp>::cast(v);
}

template <class T>
PN_HD T pn_sqrt_t(T x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}
template <class T>
PN_HD bool pn_isfinite_t(T x) {
  return x - x == T(0);
}

}  // namespace pub_native
