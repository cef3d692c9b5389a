// Every float32 bit pattern through pub_native's float_to_half, and every float16 one through
// half_to_float (numeric.h, shared by the CPU and CUDA layers), against the processor's own
// conversions (F16C, round to nearest even). A NaN must stay a quiet NaN of the same sign.
// Built and run by test_half_exhaustive.py; prints the number of mismatches.
#include <immintrin.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "pub_native/common.h"
#include "pub_native/numeric.h"

using pub_native::half_t;

__attribute__((target("f16c"))) static uint16_t reference_f2h(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) static float reference_h2f(uint16_t h) { return _cvtsh_ss(h); }

// Out of line, so that the conversion is compiled as the kernels' loops compile it.
__attribute__((noinline)) void convert(const float* in, uint16_t* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = pub_native::float_to_half(in[i]).bits;
}

int main() {
  long bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float x = pub_native::half_to_float(half_t{static_cast<uint16_t>(h)});
    const float y = reference_h2f(static_cast<uint16_t>(h));
    uint32_t bx, by;
    std::memcpy(&bx, &x, 4);
    std::memcpy(&by, &y, 4);
    if (bx != by && !(x != x && y != y && (bx >> 31) == (by >> 31)) && bad++ < 5)
      std::printf("half_to_float(0x%04x) = 0x%08x, expected 0x%08x\n", h, bx, by);
  }
  const long chunk = 1L << 24;
  std::vector<float> in(chunk);
  std::vector<uint16_t> out(chunk);
  for (uint64_t base = 0; base < (uint64_t(1) << 32); base += chunk) {
    for (long i = 0; i < chunk; ++i) {
      const uint32_t u = static_cast<uint32_t>(base + i);
      std::memcpy(&in[i], &u, 4);
    }
    convert(in.data(), out.data(), chunk);
    for (long i = 0; i < chunk; ++i) {
      const uint16_t r = reference_f2h(in[i]);
      const uint16_t o = out[i];
      const bool ok = in[i] != in[i]
                          ? (o & 0x7E00) == 0x7E00 && (o & 0x8000) == (r & 0x8000)
                          : o == r;
      if (!ok && bad++ < 5) {
        uint32_t u;
        std::memcpy(&u, &in[i], 4);
        std::printf("float_to_half(0x%08x) = 0x%04x, expected 0x%04x\n", u, o, r);
      }
    }
  }
  std::printf("mismatches: %ld\n", bad);
  return bad != 0;
}
