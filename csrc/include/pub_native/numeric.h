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

PN_HD uint64_t pn_double_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  return __builtin_bit_cast(uint64_t, d);
#endif
}
PN_HD double pn_bits_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  return __builtin_bit_cast(double, u);
#endif
}

PN_HD float bf16_to_float(bf16_t h) { return pn_bits_float(static_cast<uint32_t>(h.bits) << 16); }

PN_HD bf16_t float_to_bf16(float f) {
  uint32_t u = pn_float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x0040u)};
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

// c ? a : b by masks, without a branch (a ternary may stay a branch, which keeps a loop from
// vectorizing).
PN_HD uint32_t pn_select(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}
PN_HD uint64_t pn_select(bool c, uint64_t a, uint64_t b) {
  const uint64_t m = uint64_t(0) - static_cast<uint64_t>(c);
  return (a & m) | (b & ~m);
}

// x where keep, −0 elsewhere (the number whose sum with any y is y), by pn_select on its bits:
// a select the element loops vectorize (GCC keeps a select between floating-point values a
// branch there).
PN_HD float pn_keep(float x, bool keep) {
  return pn_bits_float(pn_select(keep, pn_float_bits(x), 0x80000000u));
}
PN_HD double pn_keep(double x, bool keep) {
  return pn_bits_double(pn_select(keep, pn_double_bits(x), uint64_t(1) << 63));
}

// The two half-precision conversions compute the value of every case and select one, so that
// the CPU element loops over float16 tensors vectorize (with branches they stayed scalar, and a
// float16 step took five times as long as a bfloat16 one).
PN_HD float half_to_float(half_t h) {
  const uint32_t b = h.bits;
  const uint32_t sign = (b & 0x8000u) << 16;
  const uint32_t em = b & 0x7FFFu;  // exponent and mantissa
  // Normal: the exponent rebiased from 15 to 127; Inf and NaN (exponent 31): to 255.
  const uint32_t normal = (em << 13) + 0x38000000u;
  const uint32_t special = (em << 13) + 0x70000000u;
  // Zero or subnormal (exponent 0): mantissa · 2⁻²⁴, exact in float.
  const uint32_t tiny = pn_float_bits(static_cast<float>(em & 0x3FFu) * 5.9604644775390625e-8f);
  const uint32_t exp = em >> 10;
  return pn_bits_float(sign | pn_select(exp == 0, tiny, pn_select(exp == 31, special, normal)));
}

// Round to nearest, ties to even (the default rounding mode).
PN_HD half_t float_to_half(float f) {
  const uint32_t u = pn_float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // NaN (quiet) and Inf.
  const uint32_t special = pn_select(a > 0x7F800000u, 0x7E00u, 0x7C00u);
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
  const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
  // Below the smallest normal 2⁻¹⁴: |f| in units of 2⁻²⁴, rounded to nearest even, is the
  // subnormal's mantissa (a carry into 0x400 is the smallest normal). Added to 0.5, whose float
  // ulp is 2⁻²⁴, |f| is rounded so by the float addition itself, and the sum's low bits are it.
  const uint32_t sub = pn_float_bits(pn_bits_float(a) + 0.5f) - 0x3F000000u;
  const uint32_t mag = pn_select(a >= 0x7F800000u, special,
                                 pn_select(a >= 0x477FF000u, 0x7C00u,  // rounds past 65504
                                           pn_select(a < 0x38800000u, sub, normal)));
  return half_t{static_cast<uint16_t>(sign | mag)};
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
