// CPU layer of the PUB step: work items, OpenMP and tiles; the math is in
// pub_native/update_rules.h. Two passes per weight-update step (SPEC section 6): the Gram pass
// reads gradients and state, the apply pass writes θ and the state.
#include "pub_step_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pub_native::cpu {
namespace {

// Elements per tile: the K task updates of one tile stay in L1 while the K(K+1)/2 products are
// summed.
constexpr int64_t kTile = 256;
// Independent float64 accumulators per Gram entry (vectorizable, fixed summation order).
constexpr int kLanes = 8;

struct Item {
  int64_t tensor, begin, end;
};

std::vector<Item> make_items(const int64_t* table, int64_t n_tensors, int64_t chunk) {
  std::vector<Item> items;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t n = table[t * kTableCols + kTNumel];
    for (int64_t b = 0; b < n; b += chunk) items.push_back({t, b, std::min(n, b + chunk)});
  }
  return items;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <class T>
struct TensorView {
  void* param;
  int64_t numel, grad_offset;
  const double* hyper;
  T* state[kMaxStates];
  int64_t task_stride;  // state elements between tasks (AdaTask), else 0
};

template <class T>
TensorView<T> view(const StepConfig& cfg, const int64_t* table, int64_t t, const double* hyper) {
  const int64_t* row = table + t * kTableCols;
  TensorView<T> v;
  v.param = reinterpret_cast<void*>(row[kTParam]);
  v.numel = row[kTNumel];
  v.grad_offset = row[kTGradOffset];
  v.hyper = hyper + row[kTGroup] * kHyperCols;
  for (int s = 0; s < kMaxStates; ++s) v.state[s] = reinterpret_cast<T*>(row[kTState + s]);
  v.task_stride = cfg.umm == Umm::kAdaTask ? v.numel : 0;
  return v;
}

template <class Rule, class T>
inline void load_state(T* const* state, int64_t idx, T* s) {
  for (int k = 0; k < Rule::kStates; ++k) s[k] = state[k][idx];
}
template <class Rule, class T>
inline void store_state(T* const* state, int64_t idx, const T* s) {
  for (int k = 0; k < Rule::kStates; ++k) state[k][idx] = s[k];
}

// ---- Gram pass --------------------------------------------------------------------------------

template <class Rule, class Tp, bool kTheta, bool kClippy>
struct GramKernel {
  using T = typename MathType<Tp>::type;

  static void run(const StepConfig& cfg, const int64_t* table, int64_t n_tensors,
                  const double* hyper, const void* grads_v, double* G, double* sigma) {
    const int64_t K = cfg.num_tasks, P = cfg.row_length;
    const Tp* grads = static_cast<const Tp*>(grads_v);
    const std::vector<Item> items = make_items(table, n_tensors, kGramChunk);
    const int64_t n_items = static_cast<int64_t>(items.size());
    std::vector<double> partial(static_cast<size_t>(n_items * K * K), 0.0);
    std::vector<T> min_ratio(kClippy ? static_cast<size_t>(n_items * K) : 0,
                             std::numeric_limits<T>::infinity());
    const int nthreads = static_cast<int>(std::min<int64_t>(max_threads(), std::max<int64_t>(n_items, 1)));
    std::vector<T> scratch(static_cast<size_t>(nthreads) * (K + 1) * kTile);

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item item = items[static_cast<size_t>(it)];
      const TensorView<T> tv = view<T>(cfg, table, item.tensor, hyper);
      const Rule rule(tv.hyper);
      const T sign = static_cast<T>(cfg.grad_sign);
      const T wd = static_cast<T>(tv.hyper[kHWeightDecay]);
      const T lrel = static_cast<T>(cfg.clippy_rel), labs = static_cast<T>(cfg.clippy_abs);
      T* u = scratch.data() + static_cast<size_t>(thread_id()) * (K + 1) * kTile;
      T* theta = u + K * kTile;
      double* Gp = partial.data() + it * K * K;
      T* mr = kClippy ? min_ratio.data() + it * K : nullptr;
      const Tp* param = static_cast<const Tp*>(tv.param);

      for (int64_t j0 = item.begin; j0 < item.end; j0 += kTile) {
        const int64_t n = std::min(kTile, item.end - j0);
        if constexpr (kTheta) {
          for (int64_t j = 0; j < n; ++j) theta[j] = to_math<T>(param[j0 + j]);
        }
        for (int64_t i = 0; i < K; ++i) {
          const Tp* g = grads + i * P + tv.grad_offset + j0;
          const int64_t s0 = i * tv.task_stride + j0;
          T* ui = u + i * kTile;
          for (int64_t j = 0; j < n; ++j) {
            T s[kMaxStates], next[kMaxStates];
            load_state<Rule>(tv.state, s0 + j, s);
            T gi = sign * to_math<T>(g[j]);
            if constexpr (kTheta) gi += wd * theta[j];
            ui[j] = rule(gi, s, next);
          }
          if constexpr (kClippy) {
            T m = mr[i];
            for (int64_t j = 0; j < n; ++j) {
              const T a = std::abs(ui[j]);
              const T r = a != T(0) ? (lrel * std::abs(theta[j]) + labs) / a
                                    : std::numeric_limits<T>::infinity();
              m = r < m ? r : m;
            }
            mr[i] = m;
          }
        }
        for (int64_t i = 0; i < K; ++i) {
          const T* ui = u + i * kTile;
          for (int64_t k = 0; k <= i; ++k) {
            const T* uk = u + k * kTile;
            double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t j = 0;
            for (; j + kLanes <= n; j += kLanes)
              for (int l = 0; l < kLanes; ++l)
                acc[l] += static_cast<double>(ui[j + l]) * static_cast<double>(uk[j + l]);
            for (; j < n; ++j) acc[0] += static_cast<double>(ui[j]) * static_cast<double>(uk[j]);
            double s = 0.0;
            for (int l = 0; l < kLanes; ++l) s += acc[l];
            Gp[i * K + k] += s;
          }
        }
      }
    }

    // Deterministic reduction in item order (items are ordered by tensor).
    std::fill(G, G + K * K, 0.0);
    std::vector<double> Gt(static_cast<size_t>(K * K));
    std::vector<double> tensor_min(static_cast<size_t>(K));
    int64_t it = 0;
    for (int64_t t = 0; t < n_tensors; ++t) {
      std::fill(Gt.begin(), Gt.end(), 0.0);
      std::fill(tensor_min.begin(), tensor_min.end(), std::numeric_limits<double>::infinity());
      for (; it < n_items && items[static_cast<size_t>(it)].tensor == t; ++it) {
        const double* Gp = partial.data() + it * K * K;
        for (int64_t e = 0; e < K * K; ++e) Gt[static_cast<size_t>(e)] += Gp[e];
        if constexpr (kClippy)
          for (int64_t i = 0; i < K; ++i)
            tensor_min[static_cast<size_t>(i)] =
                std::min(tensor_min[static_cast<size_t>(i)],
                         static_cast<double>(min_ratio[static_cast<size_t>(it * K + i)]));
      }
      if constexpr (kClippy) {
        // σ = min(1, min_j (λ_rel|θ_j| + λ_abs)/|u_ij|); a NaN ratio (NaN update) gives NaN σ,
        // so the Gram stays non-finite and the step is refused.
        double* sg = sigma + t * K;
        for (int64_t i = 0; i < K; ++i) {
          const double r = tensor_min[static_cast<size_t>(i)];
          sg[i] = r < 1.0 ? r : (r >= 1.0 ? 1.0 : r);
        }
        for (int64_t i = 0; i < K; ++i)
          for (int64_t k = 0; k <= i; ++k) G[i * K + k] += sg[i] * sg[k] * Gt[static_cast<size_t>(i * K + k)];
      } else {
        for (int64_t e = 0; e < K * K; ++e) G[e] += Gt[static_cast<size_t>(e)];
      }
    }
    for (int64_t i = 0; i < K; ++i)
      for (int64_t k = 0; k < i; ++k) G[k * K + i] = G[i * K + k];
  }
};

// ---- Apply pass -------------------------------------------------------------------------------

template <class Rule, class Tp, bool kAdaTask>
struct ApplyKernel {
  using T = typename MathType<Tp>::type;

  static void run(const StepConfig& cfg, const int64_t* table, int64_t n_tensors,
                  const double* hyper, const void* grads_v, const double* weights,
                  const double* sigma) {
    const int64_t K = cfg.num_tasks, P = cfg.row_length;
    const Tp* grads = static_cast<const Tp*>(grads_v);
    const std::vector<Item> items = make_items(table, n_tensors, kGramChunk);
    const int64_t n_items = static_cast<int64_t>(items.size());
    const int nthreads = static_cast<int>(std::min<int64_t>(max_threads(), std::max<int64_t>(n_items, 1)));
    std::vector<T> scratch(static_cast<size_t>(nthreads) * 3 * kTile);

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item item = items[static_cast<size_t>(it)];
      const TensorView<T> tv = view<T>(cfg, table, item.tensor, hyper);
      const Rule rule(tv.hyper);
      const T sign = static_cast<T>(cfg.grad_sign);
      const T wd = static_cast<T>(tv.hyper[kHWeightDecay]);
      const T decay = static_cast<T>(tv.hyper[kHDecay]);
      T* theta = scratch.data() + static_cast<size_t>(thread_id()) * 3 * kTile;
      T* upd = theta + kTile;
      T* g_alpha = upd + kTile;
      Tp* param = static_cast<Tp*>(tv.param);

      for (int64_t j0 = item.begin; j0 < item.end; j0 += kTile) {
        const int64_t n = std::min(kTile, item.end - j0);
        for (int64_t j = 0; j < n; ++j) {
          theta[j] = to_math<T>(param[j0 + j]);
          upd[j] = T(0);
          g_alpha[j] = T(0);
        }
        for (int64_t i = 0; i < K; ++i) {
          const T w = static_cast<T>(weights[i]);
          const T c = static_cast<T>(sigma ? weights[i] * sigma[item.tensor * K + i] : weights[i]);
          // A task with weight 0 (excluded) contributes nothing; AdaTask still advances its state.
          if (!kAdaTask && w == T(0)) continue;
          const Tp* g = grads + i * P + tv.grad_offset + j0;
          const int64_t s0 = i * tv.task_stride + j0;
          for (int64_t j = 0; j < n; ++j) {
            T s[kMaxStates], next[kMaxStates];
            load_state<Rule>(tv.state, s0 + j, s);
            const T gi = sign * to_math<T>(g[j]) + wd * theta[j];
            upd[j] += c * rule(gi, s, next);
            if constexpr (kAdaTask) {
              store_state<Rule>(tv.state, s0 + j, next);
            } else {
              g_alpha[j] += w * gi;
            }
          }
        }
        if constexpr (!kAdaTask) {
          for (int64_t j = 0; j < n; ++j) {
            T s[kMaxStates], next[kMaxStates];
            load_state<Rule>(tv.state, j0 + j, s);
            rule(g_alpha[j], s, next);
            store_state<Rule>(tv.state, j0 + j, next);
          }
        }
        for (int64_t j = 0; j < n; ++j) param[j0 + j] = from_math<Tp>(theta[j] * decay - upd[j]);
      }
    }
  }
};

// ---- dispatch ---------------------------------------------------------------------------------

template <class F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case kFloat32: return f.template operator()<float>();
    case kFloat64: return f.template operator()<double>();
    case kBFloat16: return f.template operator()<bf16_t>();
    case kFloat16: return f.template operator()<half_t>();
  }
}

struct StepArgs {
  const StepConfig& cfg;
  const int64_t* table;
  int64_t n;
  const double* hyper;
  const void* grads;
  double* G;              // Gram pass output
  double* sigma_out;      // Gram pass output (Clippy)
  const double* weights;  // apply pass input
  const double* sigma;    // apply pass input (Clippy)
};

template <class Tp>
struct GramByRule {
  const StepArgs& a;
  template <class Rule>
  void operator()() const {
    const StepConfig& c = a.cfg;
    if (c.umm == Umm::kClippy)
      GramKernel<Rule, Tp, true, true>::run(c, a.table, a.n, a.hyper, a.grads, a.G, a.sigma_out);
    else if (c.gram_reads_theta())
      GramKernel<Rule, Tp, true, false>::run(c, a.table, a.n, a.hyper, a.grads, a.G, a.sigma_out);
    else
      GramKernel<Rule, Tp, false, false>::run(c, a.table, a.n, a.hyper, a.grads, a.G, a.sigma_out);
  }
};

template <class Tp>
struct ApplyByRule {
  const StepArgs& a;
  template <class Rule>
  void operator()() const {
    const StepConfig& c = a.cfg;
    if (c.umm == Umm::kAdaTask)
      ApplyKernel<Rule, Tp, true>::run(c, a.table, a.n, a.hyper, a.grads, a.weights, a.sigma);
    else
      ApplyKernel<Rule, Tp, false>::run(c, a.table, a.n, a.hyper, a.grads, a.weights, a.sigma);
  }
};

template <template <class> class ByRule>
struct ByDtype {
  const StepArgs& a;
  template <class Tp>
  void operator()() const {
    using T = typename MathType<Tp>::type;
    dispatch_rule<T>(a.cfg.algo, a.cfg.amsgrad, a.cfg.centered, a.cfg.momentum, ByRule<Tp>{a});
  }
};

template <class Tp>
void rows_finite_typed(const Tp* g, int64_t K, int64_t P, uint8_t* bad) {
  using T = typename MathType<Tp>::type;
  for (int64_t i = 0; i < K; ++i) {
    const Tp* row = g + i * P;
    // x − x is 0 for finite x and NaN otherwise; the sum stays 0 exactly when all are finite.
    T acc = 0;
#pragma omp parallel for reduction(+ : acc) schedule(static)
    for (int64_t j = 0; j < P; ++j) {
      const T x = to_math<T>(row[j]);
      acc += x - x;
    }
    bad[i] = acc == T(0) ? 0 : 1;
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

void pub_gram(const StepConfig& cfg, const int64_t* table, int64_t n_tensors, const double* hyper,
              const void* grads, double* G, double* sigma) {
  const StepArgs a{cfg, table, n_tensors, hyper, grads, G, sigma, nullptr, nullptr};
  dispatch_dtype(cfg.dtype, ByDtype<GramByRule>{a});
}

void pub_apply(const StepConfig& cfg, const int64_t* table, int64_t n_tensors,
               const double* hyper, const void* grads, const double* weights,
               const double* sigma) {
  const StepArgs a{cfg, table, n_tensors, hyper, grads, nullptr, nullptr, weights, sigma};
  dispatch_dtype(cfg.dtype, ByDtype<ApplyByRule>{a});
}

void rows_finite(DType dtype, const void* grads, int64_t K, int64_t P, uint8_t* bad) {
  dispatch_dtype(dtype, FiniteDispatch{grads, K, P, bad});
}

}  // namespace pub_native::cpu
