// Framework-free basics shared by every native layer (host C++ and CUDA device code):
// the PN_HD qualifier, status codes reported by the weight solver, and small math helpers.
#pragma once

#include <cstdint>

// PN_HD_CALLED: for the solver's large steps, which each kernel calls rather than inlines (every
// inlined copy was compiled again by ptxas: the solver's CUDA file took 24 s, now 12 s).
#if defined(__CUDACC__)
#define PN_HD __host__ __device__ __forceinline__
#define PN_HD_CALLED __host__ __device__ __noinline__ inline
#else
#define PN_HD inline
#define PN_HD_CALLED inline
#endif

namespace pub_native {

// Status of one K x K weight solve. Values are part of the Python API (pub_native.SolveStatus).
enum SolveStatus : int32_t {
  kConverged = 0,         // stopping rule met
  kMaxIter = 1,           // iteration limit reached before the stopping rule
  kLineSearchFailed = 2,  // no step decreased the objective (rounding floor reached)
  kNotPositiveDefinite = 3,  // G is not positive semi-definite (Cholesky of the Hessian failed)
  kAllZero = 4,           // every task update is zero: all weights are 0
  kInvalidInput = 5,      // non-finite or non-symmetric G (device path, where nothing can throw)
};

enum SolveMethod : int32_t { kNewton = 0, kCcp = 1 };

PN_HD double pn_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return __builtin_sqrt(x);
#endif
}
PN_HD double pn_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return __builtin_log(x);
#endif
}
PN_HD double pn_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return __builtin_exp(x);
#endif
}
PN_HD bool pn_isfinite(double x) { return x - x == 0.0; }
PN_HD double pn_abs(double x) { return x < 0.0 ? -x : x; }
PN_HD double pn_max(double a, double b) { return a > b ? a : b; }
PN_HD double pn_min(double a, double b) { return a < b ? a : b; }

}  // namespace pub_native
