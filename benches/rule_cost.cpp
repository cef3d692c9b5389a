// Cost of one Adam rule evaluation per element (the per-task update u = s·m/(sqrt(v)·c + ε)
// with m and v advanced by the gradient), on data that stays in L1, one thread: IEEE division
// and square root ("exact"); hardware reciprocal and reciprocal-square-root estimates refined by
// one Newton step each ("estimated"); an IEEE square root and a reciprocal estimate refined by
// one Newton step ("sqrt+rcp"); the same with the divisors the estimate gets wrong sent to the
// IEEE division ("safe rcp"); a safe reciprocal-square-root estimate with IEEE division ("safe
// rsqrt"); and the largest relative difference of each from "exact".
// Standalone:
//
//   g++ -O2 -fno-math-errno -fopenmp-simd benches/rule_cost.cpp -o /tmp/rule_cost && /tmp/rule_cost
//
// x86-64 with AVX2 and FMA only.
#include <immintrin.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#define V3 __attribute__((target("arch=x86-64-v3"), noinline))
#define V3_INLINE __attribute__((target("arch=x86-64-v3"), always_inline)) inline

struct Hyper {
  float s, one_minus_beta1, beta2, one_minus_beta2, c, eps;
};

// What the AVX2 variants share: the hyper-parameters in vectors, and the moments m and v of
// eight elements advanced by their gradients.
struct Avx2Adam {
  __m256 b1, b2, b2c, c, eps, s;
  V3_INLINE explicit Avx2Adam(const Hyper& h, float c_scale = 1.0f)
      : b1(_mm256_set1_ps(h.one_minus_beta1)),
        b2(_mm256_set1_ps(h.beta2)),
        b2c(_mm256_set1_ps(h.one_minus_beta2)),
        c(_mm256_set1_ps(h.c * c_scale)),
        eps(_mm256_set1_ps(h.eps)),
        s(_mm256_set1_ps(h.s)) {}
  V3_INLINE void moments(const float* g, const float* m0, const float* v0, long j, __m256& m,
                         __m256& v) const {
    const __m256 gg = _mm256_loadu_ps(g + j), mm = _mm256_loadu_ps(m0 + j);
    const __m256 vv = _mm256_loadu_ps(v0 + j);
    m = _mm256_fmadd_ps(_mm256_sub_ps(gg, mm), b1, mm);
    v = _mm256_fmadd_ps(_mm256_mul_ps(b2c, gg), gg, _mm256_mul_ps(vv, b2));
  }
};

V3 void exact(const float* g, const float* m0, const float* v0, float* u, long n, Hyper h) {
#pragma omp simd
  for (long j = 0; j < n; ++j) {
    const float m = m0[j] + (g[j] - m0[j]) * h.one_minus_beta1;
    const float v = v0[j] * h.beta2 + h.one_minus_beta2 * g[j] * g[j];
    u[j] = h.s * m / (std::sqrt(v) * h.c + h.eps);
  }
}

V3 void estimated(const float* g, const float* m0, const float* v0, float* u, long n, Hyper h) {
  const Avx2Adam a(h);
  const __m256 half = _mm256_set1_ps(0.5f), three = _mm256_set1_ps(3.0f);
  const __m256 two = _mm256_set1_ps(2.0f), tiny = _mm256_set1_ps(1.17549435e-38f);
  for (long j = 0; j + 8 <= n; j += 8) {
    __m256 m, v;
    a.moments(g, m0, v0, j, m, v);
    const __m256 vm = _mm256_max_ps(v, tiny);
    __m256 r = _mm256_rsqrt_ps(vm);  // 1/sqrt(v), then r·(3 − v·r²)/2
    r = _mm256_mul_ps(_mm256_mul_ps(half, r), _mm256_fnmadd_ps(_mm256_mul_ps(vm, r), r, three));
    const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(v, r), a.c, a.eps);  // sqrt(v)·c + ε
    __m256 q = _mm256_rcp_ps(d);  // 1/d, then q·(2 − d·q)
    q = _mm256_mul_ps(q, _mm256_fnmadd_ps(d, q, two));
    _mm256_storeu_ps(u + j, _mm256_mul_ps(_mm256_mul_ps(a.s, m), q));
  }
}

V3 void sqrt_rcp(const float* g, const float* m0, const float* v0, float* u, long n, Hyper h) {
  const Avx2Adam a(h);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (long j = 0; j + 8 <= n; j += 8) {
    __m256 m, v;
    a.moments(g, m0, v0, j, m, v);
    const __m256 d = _mm256_fmadd_ps(_mm256_sqrt_ps(v), a.c, a.eps);  // sqrt(v)·c + ε
    const __m256 q0 = _mm256_rcp_ps(d);  // 1/d, then q + q·(1 − d·q)
    const __m256 q = _mm256_fmadd_ps(q0, _mm256_fnmadd_ps(d, q0, one), q0);
    _mm256_storeu_ps(u + j, _mm256_mul_ps(_mm256_mul_ps(a.s, m), q));
  }
}

// sqrt+rcp made safe: divisors outside [2⁻¹²⁵, 2¹²⁵] (0, subnormal, huge, Inf, NaN), where the
// estimate and its Newton step go wrong (rcp(Inf) then a Newton step gives NaN, IEEE gives 0),
// take the IEEE division; a branch per eight elements, never taken here.
V3 void sqrt_rcp_safe(const float* g, const float* m0, const float* v0, float* u, long n,
                      Hyper h) {
  const Avx2Adam a(h);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 lo = _mm256_set1_ps(0x1p-125f), hi = _mm256_set1_ps(0x1p125f);
  for (long j = 0; j + 8 <= n; j += 8) {
    __m256 m, v;
    a.moments(g, m0, v0, j, m, v);
    const __m256 d = _mm256_fmadd_ps(_mm256_sqrt_ps(v), a.c, a.eps);
    const __m256 q0 = _mm256_rcp_ps(d);
    const __m256 q = _mm256_fmadd_ps(q0, _mm256_fnmadd_ps(d, q0, one), q0);
    const __m256 num = _mm256_mul_ps(a.s, m);
    __m256 out = _mm256_mul_ps(num, q);
    const __m256 ok =
        _mm256_and_ps(_mm256_cmp_ps(d, lo, _CMP_GE_OQ), _mm256_cmp_ps(d, hi, _CMP_LE_OQ));
    if (__builtin_expect(_mm256_movemask_ps(ok) != 0xFF, 0))
      out = _mm256_blendv_ps(_mm256_div_ps(num, d), out, ok);
    _mm256_storeu_ps(u + j, out);
  }
}

// A reciprocal-square-root estimate made safe, and IEEE division ("safe rsqrt"): x = v·2²⁴ (a
// subnormal v becomes normal), the estimate r of 1/sqrt(max(2⁻¹²⁶, x)) (v = 0 gives 0), one Newton
// step of the square root x·r, the 2⁻¹² folded into c. v > 2¹⁰⁴, Inf and NaN give NaN, which a
// kernel would have to catch and compute again.
V3 void rsqrt_safe(const float* g, const float* m0, const float* v0, float* u, long n, Hyper h) {
  const Avx2Adam a(h, 0x1p-12f);  // the 2⁻¹² of the scaled square root
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  const __m256 up = _mm256_set1_ps(0x1p24f), tiny = _mm256_set1_ps(0x1p-126f);
  for (long j = 0; j + 8 <= n; j += 8) {
    __m256 m, v;
    a.moments(g, m0, v0, j, m, v);
    const __m256 x = _mm256_mul_ps(v, up);
    const __m256 r = _mm256_rsqrt_ps(_mm256_max_ps(tiny, x));
    const __m256 s0 = _mm256_mul_ps(x, r);
    const __m256 e = _mm256_fnmadd_ps(s0, r, one);
    const __m256 sq = _mm256_fmadd_ps(_mm256_mul_ps(half, s0), e, s0);
    const __m256 d = _mm256_fmadd_ps(sq, a.c, a.eps);
    _mm256_storeu_ps(u + j, _mm256_div_ps(_mm256_mul_ps(a.s, m), d));
  }
}

int main() {
  const long n = 2048;
  const int reps = 200000;
  std::vector<float> g(n), m(n), v(n);
  for (long j = 0; j < n; ++j) {
    g[j] = std::sin(static_cast<float>(j) * 0.37f) * 1e-3f * static_cast<float>(1 + j % 7);
    m[j] = std::cos(static_cast<float>(j) * 0.11f) * 1e-4f;
    v[j] = 1e-7f * static_cast<float>(1 + j % 13);
  }
  const Hyper h{1e-3f, 0.1f, 0.999f, 0.001f, 31.6f, 1e-8f};
  typedef void (*Variant)(const float*, const float*, const float*, float*, long, Hyper);
  const Variant variants[5] = {exact, estimated, sqrt_rcp, sqrt_rcp_safe, rsqrt_safe};
  const char* names[5] = {"exact", "estimated", "sqrt+rcp", "safe rcp", "safe rsqrt"};
  std::vector<std::vector<float>> out(5, std::vector<float>(n));
  for (int round = 0; round < 3; ++round) {
    for (int which = 0; which < 5; ++which) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int it = 0; it < reps; ++it)
        variants[which](g.data(), m.data(), v.data(), out[which].data(), n, h);
      const auto t1 = std::chrono::steady_clock::now();
      const double dt = std::chrono::duration<double>(t1 - t0).count();
      std::printf("%-10s %.3f ns per element\n", names[which],
                  dt / (static_cast<double>(reps) * n) * 1e9);
    }
  }
  for (int which = 1; which < 5; ++which) {
    double worst = 0.0;
    for (long j = 0; j < n; ++j)
      worst = std::fmax(worst, std::fabs(static_cast<double>(out[which][j]) - out[0][j]) /
                                   std::fabs(out[0][j]));
    std::printf("%-10s largest relative difference from exact %.3g (%.1f float32 ulp)\n",
                names[which], worst, worst / 5.96e-8);
  }
  return 0;
}
