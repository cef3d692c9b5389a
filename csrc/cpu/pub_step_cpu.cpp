// CPU layer of the PUB step: entry points, dispatch to the per-optimizer translation units
// (adam_cpu.cpp, adagrad_cpu.cpp, rmsprop_cpu.cpp) and the finiteness check.
#include "pub_step_cpu_impl.h"

namespace pub_native::cpu {

using detail::StepArgs;
using detail::run_adam;
using detail::run_adagrad;
using detail::run_rmsprop;

namespace {

template <class Tp>
void rows_finite_typed(const Tp* g, int64_t K, int64_t P, uint8_t* bad) {
  using T = typename MathType<Tp>::type;
  for (int64_t i = 0; i < K; ++i) {
    const Tp* row = g + i * P;
    // x − x is 0 for finite x and NaN otherwise; an integer OR keeps the loop vectorizable.
    int flag = 0;
#pragma omp parallel for reduction(| : flag) schedule(static)
    for (int64_t j = 0; j < P; ++j) {
      const T x = to_math<T>(row[j]);
      const T d = x - x;
      flag |= static_cast<int>(d != d);
    }
    bad[i] = flag ? 1 : 0;
  }
}

struct FiniteDispatch {
  const void* g;
  int64_t K, P;
  uint8_t* bad;
  template <class Tp>
  void operator()() const {
    rows_finite_typed(static_cast<const Tp*>(g), K, P, bad);
  }
};

}  // namespace

namespace {

void run(const StepArgs& a, bool gram) {
  switch (a.cfg.algo) {
    case Algorithm::kAdam: return run_adam(a, gram);
    case Algorithm::kAdaGrad: return run_adagrad(a, gram);
    case Algorithm::kRMSProp: return run_rmsprop(a, gram);
  }
}

}  // namespace

void pub_gram(const StepConfig& cfg, const int64_t* table, int64_t n_tensors, const double* hyper,
              const void* grads, double* G, double* sigma) {
  run(StepArgs{cfg, table, n_tensors, hyper, grads, G, sigma, nullptr, nullptr}, true);
}

void pub_apply(const StepConfig& cfg, const int64_t* table, int64_t n_tensors,
               const double* hyper, const void* grads, const double* weights,
               const double* sigma) {
  run(StepArgs{cfg, table, n_tensors, hyper, grads, nullptr, nullptr, weights, sigma}, false);
}

void rows_finite(DType dtype, const void* grads, int64_t K, int64_t P, uint8_t* bad) {
  detail::dispatch_dtype(dtype, FiniteDispatch{grads, K, P, bad});
}

}  // namespace pub_native::cpu
