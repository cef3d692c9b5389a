// CPU layer of the PUB step, shared by the per-optimizer translation units: work items, OpenMP
// and tiles around the per-element rules of pub_native/update_rules.h. Two passes per
// weight-update step (SPEC section 6): the Gram pass reads gradients and state, the apply pass
// writes θ and the state; a read-only finiteness pass serves the steps that have no Gram pass.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "pub_native/step.h"

namespace pub_native::cpu::detail {

// Elements per tile: the K task updates of one tile stay in L1 while the K(K+1)/2 products are
// summed.
constexpr int64_t kTile = 256;
// Independent float64 accumulators per Gram entry (vectorizable, fixed summation order).
// Sixteen lanes are four AVX2 registers: enough independent FMA chains to hide their latency.
constexpr int kLanes = 16;

// The element loops are bound by the divider (one division and one square root per task
// update): x86-64 builds carry an AVX2+FMA clone of each kernel, picked once at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PN_CPU_CLONES
#endif

struct Item {
  int64_t tensor, begin, end;
};

inline std::vector<Item> make_items(const int64_t* table, int64_t n_tensors) {
  std::vector<Item> items;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t n = table[t * kTableCols + kTNumel];
    for (int64_t b = 0; b < n; b += kGramChunk)
      items.push_back({t, b, std::min(n, b + kGramChunk)});
  }
  return items;
}

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
// Threads for a pass over n_items work items: no more than there are items.
inline int team_size(int64_t n_items) {
  return static_cast<int>(std::min<int64_t>(max_threads(), std::max<int64_t>(n_items, 1)));
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <class Rule, class T>
inline void load_state(T* const* state, int64_t idx, T* s) {
  for (int k = 0; k < Rule::kStates; ++k) s[k] = state[k][idx];
}
template <class Rule, class T>
inline void store_state(T* const* state, int64_t idx, const T* s) {
  for (int k = 0; k < Rule::kStates; ++k) state[k][idx] = s[k];
}

// One segment of the plan, as every pass sees it.
struct SegmentArgs {
  const StepConfig& cfg;
  const int64_t* table;
  int64_t n_tensors;
  const double* base;        // base table (rows indexed by kTBase)
  const double* gscale;      // n_tensors × K multipliers of the task gradients, or null
  const double* task_scale;  // K: 0 marks a task absent from this batch; null: all present
};

// The multiplier of task i's gradient of tensor t: the sign of maximize times the unscaling.
template <class T>
inline T grad_multiplier(const SegmentArgs& a, int64_t t, int64_t i) {
  const double s = a.gscale ? a.gscale[t * a.cfg.num_tasks + i] : 1.0;
  return static_cast<T>(a.cfg.grad_sign * s);
}

// ---- Gram pass --------------------------------------------------------------------------------

template <class Rule, class Tp, bool kTheta, bool kClippy>
struct GramKernel {
  using T = typename MathType<Tp>::type;

  // G (K×K) of the segment's task updates; with Clippy, sigma (n_tensors × K) receives each
  // tensor's per-task scale and G is the Gram of the scaled updates. task_sq (K) receives
  // Σ‖g_i‖² of the task gradients as the updates saw them (multipliers applied).
  PN_CPU_CLONES static void run(const SegmentArgs& a, double* G, double* sigma,
                                double* task_sq) {
    const StepConfig& cfg = a.cfg;
    const int64_t K = cfg.num_tasks;
    const std::vector<Item> items = make_items(a.table, a.n_tensors);
    const int64_t n_items = static_cast<int64_t>(items.size());
    std::vector<double> partial(static_cast<size_t>(n_items * K * K), 0.0);
    std::vector<double> partial_sq(static_cast<size_t>(n_items * K), 0.0);
    std::vector<T> min_ratio(kClippy ? static_cast<size_t>(n_items * K) : 0,
                             std::numeric_limits<T>::infinity());
    const int nthreads = team_size(n_items);
    // Per thread: the K task updates of a tile, widened to float64 once for the products, θ,
    // and the K gradient multipliers of the item's tensor.
    std::vector<double> scratch(static_cast<size_t>(nthreads) * K * kTile);
    std::vector<T> theta_scratch(static_cast<size_t>(nthreads) * kTile);
    std::vector<T> mult_scratch(static_cast<size_t>(nthreads) * K);

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item item = items[static_cast<size_t>(it)];
      const TensorView<T> tv = tensor_view<T>(cfg, a.table, item.tensor, a.base);
      double h[kHyperCols];
      tensor_hyper(cfg, tv, h);
      const Rule rule(h);
      const T wd = static_cast<T>(h[kHWeightDecay]);
      const T lrel = static_cast<T>(cfg.clippy_rel), labs = static_cast<T>(cfg.clippy_abs);
      const int tid = thread_id();
      double* u = scratch.data() + static_cast<size_t>(tid) * K * kTile;
      T* theta = theta_scratch.data() + static_cast<size_t>(tid) * kTile;
      T* mult = mult_scratch.data() + static_cast<size_t>(tid) * K;
      for (int64_t i = 0; i < K; ++i) mult[i] = grad_multiplier<T>(a, item.tensor, i);
      double* Gp = partial.data() + it * K * K;
      double* Sq = partial_sq.data() + it * K;
      T* mr = kClippy ? min_ratio.data() + it * K : nullptr;
      const Tp* param = static_cast<const Tp*>(tv.param);
      const Tp* grads = static_cast<const Tp*>(tv.grad);

      for (int64_t j0 = item.begin; j0 < item.end; j0 += kTile) {
        const int64_t n = std::min(kTile, item.end - j0);
        if constexpr (kTheta) {
          for (int64_t j = 0; j < n; ++j) theta[j] = to_math<T>(param[j0 + j]);
        }
        // Two tasks per sweep: two independent division chains keep the divider busy.
        int64_t i = 0;
        for (; i + 1 < K; i += 2) {
          const Tp* ga = grads + i * tv.grad_stride + j0;
          const Tp* gb = ga + tv.grad_stride;
          const int64_t sa = i * tv.state_stride + j0, sb = sa + tv.state_stride;
          const T ma = mult[i], mb = mult[i + 1];
          double* ua = u + i * kTile;
          double* ub = ua + kTile;
#pragma GCC ivdep
          for (int64_t j = 0; j < n; ++j) {
            T s[kMaxStates], t[kMaxStates], next[kMaxStates];
            load_state<Rule>(tv.state, sa + j, s);
            load_state<Rule>(tv.state, sb + j, t);
            T gi = ma * to_math<T>(ga[j]);
            T gk = mb * to_math<T>(gb[j]);
            if constexpr (kTheta) {
              gi += wd * theta[j];
              gk += wd * theta[j];
            }
            ua[j] = static_cast<double>(rule(gi, s, next));
            ub[j] = static_cast<double>(rule(gk, t, next));
          }
        }
        for (; i < K; ++i) {
          const Tp* g = grads + i * tv.grad_stride + j0;
          const int64_t s0 = i * tv.state_stride + j0;
          const T mi = mult[i];
          double* ui = u + i * kTile;
#pragma GCC ivdep
          for (int64_t j = 0; j < n; ++j) {
            T s[kMaxStates], next[kMaxStates];
            load_state<Rule>(tv.state, s0 + j, s);
            T gi = mi * to_math<T>(g[j]);
            if constexpr (kTheta) gi += wd * theta[j];
            ui[j] = rule(gi, s, next);
          }
        }
        if constexpr (kClippy) {
          for (int64_t i = 0; i < K; ++i) {
            const double* ui = u + i * kTile;
            T m = mr[i];
#pragma GCC ivdep
            for (int64_t j = 0; j < n; ++j) {
              const T a = std::abs(static_cast<T>(ui[j]));
              const T r = a != T(0) ? (lrel * std::abs(theta[j]) + labs) / a
                                    : std::numeric_limits<T>::infinity();
              m = r < m ? r : m;
            }
            mr[i] = m;
          }
        }
        // ‖g_i‖² of the tile (raw values; the multiplier is applied once per item below), in
        // independent float64 lanes like the products.
        for (int64_t i = 0; i < K; ++i) {
          const Tp* g = grads + i * tv.grad_stride + j0;
          double acc[kLanes] = {};
          int64_t j = 0;
          for (; j + kLanes <= n; j += kLanes)
            for (int l = 0; l < kLanes; ++l) {
              const double x = static_cast<double>(to_math<T>(g[j + l]));
              acc[l] += x * x;
            }
          for (; j < n; ++j) {
            const double x = static_cast<double>(to_math<T>(g[j]));
            acc[0] += x * x;
          }
          double s = 0.0;
          for (int l = 0; l < kLanes; ++l) s += acc[l];
          Sq[i] += s;
        }
        for (int64_t i = 0; i < K; ++i) {
          const double* ui = u + i * kTile;
          for (int64_t k = 0; k <= i; ++k) {
            const double* uk = u + k * kTile;
            double acc[kLanes] = {};
            int64_t j = 0;
            for (; j + kLanes <= n; j += kLanes)
              for (int l = 0; l < kLanes; ++l) acc[l] += ui[j + l] * uk[j + l];
            for (; j < n; ++j) acc[0] += ui[j] * uk[j];
            double s = 0.0;
            for (int l = 0; l < kLanes; ++l) s += acc[l];
            Gp[i * K + k] += s;
          }
        }
      }
    }

    // Deterministic reduction in item order (items are ordered by tensor).
    std::fill(task_sq, task_sq + K, 0.0);
    for (int64_t it = 0; it < n_items; ++it)
      for (int64_t i = 0; i < K; ++i) {
        const double m = static_cast<double>(grad_multiplier<T>(a, items[static_cast<size_t>(it)].tensor, i));
        task_sq[i] += m * m * partial_sq[static_cast<size_t>(it * K + i)];
      }
    std::fill(G, G + K * K, 0.0);
    std::vector<double> Gt(static_cast<size_t>(K * K));
    std::vector<double> tensor_min(static_cast<size_t>(K));
    int64_t it = 0;
    for (int64_t t = 0; t < a.n_tensors; ++t) {
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
          for (int64_t k = 0; k <= i; ++k)
            G[i * K + k] += sg[i] * sg[k] * Gt[static_cast<size_t>(i * K + k)];
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

  template <int kK>
  static void apply_fixed(const Rule& rule, const TensorView<T>& tv, const Item& item,
                          const T* mult, const double* weights, const double* sigma, T wd,
                          T decay) {
    T w[kK], c[kK], m[kK];
    const Tp* g[kK];
    for (int i = 0; i < kK; ++i) {
      w[i] = static_cast<T>(weights[i]);
      c[i] = static_cast<T>(sigma ? weights[i] * sigma[item.tensor * kK + i] : weights[i]);
      m[i] = mult[i];
      g[i] = static_cast<const Tp*>(tv.grad) + i * tv.grad_stride;
    }
    Tp* param = static_cast<Tp*>(tv.param);
    // θ, the state and the gradient rows are distinct tensors: no dependence between
    // iterations (without this, GCC gives up its run-time alias checks beyond a few pointers).
#pragma GCC ivdep
    for (int64_t j = item.begin; j < item.end; ++j) {
      const T theta = to_math<T>(param[j]);
      T s[kMaxStates], next[kMaxStates];
      load_state<Rule>(tv.state, j, s);
      T upd = T(0), g_alpha = T(0);
      for (int i = 0; i < kK; ++i) {
        const T gi = m[i] * to_math<T>(g[i][j]) + wd * theta;
        upd += c[i] * rule(gi, s, next);
        g_alpha += w[i] * gi;
      }
      rule(g_alpha, s, next);
      store_state<Rule>(tv.state, j, next);
      param[j] = from_math<Tp>(theta * decay - upd);
    }
  }

  // θ ← decay·θ − Σ_i α̂_i σ_i u_i, then the state advances with g_α = Σ_i α̂_i g_i (AdaTask:
  // each task's state with its own g_i). weights: K values α̂ (1 for a plain segment).
  PN_CPU_CLONES static void run(const SegmentArgs& a, const double* weights,
                                const double* sigma) {
    const StepConfig& cfg = a.cfg;
    const int64_t K = cfg.num_tasks;
    const std::vector<Item> items = make_items(a.table, a.n_tensors);
    const int64_t n_items = static_cast<int64_t>(items.size());
    const int nthreads = team_size(n_items);
    std::vector<T> scratch(static_cast<size_t>(nthreads) * 3 * kTile);
    std::vector<T> mult_scratch(static_cast<size_t>(nthreads) * K);

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item item = items[static_cast<size_t>(it)];
      const TensorView<T> tv = tensor_view<T>(cfg, a.table, item.tensor, a.base);
      double h[kHyperCols];
      tensor_hyper(cfg, tv, h);
      const Rule rule(h);
      const T wd = static_cast<T>(h[kHWeightDecay]);
      const T decay = static_cast<T>(h[kHDecay]);
      const int tid = thread_id();
      T* theta = scratch.data() + static_cast<size_t>(tid) * 3 * kTile;
      T* upd = theta + kTile;
      T* g_alpha = upd + kTile;
      T* mult = mult_scratch.data() + static_cast<size_t>(tid) * K;
      for (int64_t i = 0; i < K; ++i) mult[i] = grad_multiplier<T>(a, item.tensor, i);
      Tp* param = static_cast<Tp*>(tv.param);
      if constexpr (!kAdaTask) {
        // Up to four tasks: one sweep with the task loop unrolled, everything in registers.
        switch (K) {
          case 1: apply_fixed<1>(rule, tv, item, mult, weights, sigma, wd, decay); continue;
          case 2: apply_fixed<2>(rule, tv, item, mult, weights, sigma, wd, decay); continue;
          case 3: apply_fixed<3>(rule, tv, item, mult, weights, sigma, wd, decay); continue;
          case 4: apply_fixed<4>(rule, tv, item, mult, weights, sigma, wd, decay); continue;
          default: break;
        }
      }

      for (int64_t j0 = item.begin; j0 < item.end; j0 += kTile) {
        const int64_t n = std::min(kTile, item.end - j0);
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) {
          theta[j] = to_math<T>(param[j0 + j]);
          upd[j] = T(0);
          g_alpha[j] = T(0);
        }
        for (int64_t i = 0; i < K; ++i) {
          const T w = static_cast<T>(weights[i]);
          const T c = static_cast<T>(sigma ? weights[i] * sigma[item.tensor * K + i] : weights[i]);
          // A task with weight 0 (excluded) contributes nothing; AdaTask still advances its state,
          // except for a task absent from this batch, whose state is left as it was.
          if (!kAdaTask && w == T(0)) continue;
          if (kAdaTask && a.task_scale && a.task_scale[i] == 0.0) continue;
          const Tp* g = static_cast<const Tp*>(tv.grad) + i * tv.grad_stride + j0;
          const int64_t s0 = i * tv.state_stride + j0;
          const T mi = mult[i];
#pragma GCC ivdep
          for (int64_t j = 0; j < n; ++j) {
            T s[kMaxStates], next[kMaxStates];
            load_state<Rule>(tv.state, s0 + j, s);
            const T gi = mi * to_math<T>(g[j]) + wd * theta[j];
            upd[j] += c * rule(gi, s, next);
            if constexpr (kAdaTask) {
              store_state<Rule>(tv.state, s0 + j, next);
            } else {
              g_alpha[j] += w * gi;
            }
          }
        }
        if constexpr (!kAdaTask) {
#pragma GCC ivdep
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

// What one call of a family's entry point does.
enum class Pass { kGram, kApply };

struct PassArgs {
  const SegmentArgs& seg;
  double* G;              // kGram output
  double* sigma;          // kGram output (Clippy); kApply input (Clippy)
  double* task_sq;        // kGram output
  const double* weights;  // kApply input
};

template <class Tp>
struct GramByRule {
  const PassArgs& a;
  template <class Rule>
  void operator()() const {
    const StepConfig& c = a.seg.cfg;
    if (c.umm == Umm::kClippy)
      GramKernel<Rule, Tp, true, true>::run(a.seg, a.G, a.sigma, a.task_sq);
    else if (c.gram_reads_theta())
      GramKernel<Rule, Tp, true, false>::run(a.seg, a.G, a.sigma, a.task_sq);
    else
      GramKernel<Rule, Tp, false, false>::run(a.seg, a.G, a.sigma, a.task_sq);
  }
};

template <class Tp>
struct ApplyByRule {
  const PassArgs& a;
  template <class Rule>
  void operator()() const {
    if (a.seg.cfg.adatask())
      ApplyKernel<Rule, Tp, true>::run(a.seg, a.weights, a.sigma);
    else
      ApplyKernel<Rule, Tp, false>::run(a.seg, a.weights, a.sigma);
  }
};

template <class F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case kFloat32: return f.template operator()<float>();
    case kFloat64: return f.template operator()<double>();
    case kBFloat16: return f.template operator()<bf16_t>();
    case kFloat16: return f.template operator()<half_t>();
  }
}

template <class Family, template <class> class ByRule>
struct ByDtype {
  const PassArgs& a;
  template <class Tp>
  void operator()() const {
    using T = typename MathType<Tp>::type;
    Family::template dispatch<T>(a.seg.cfg, ByRule<Tp>{a});
  }
};

// One pass of one base optimizer, for every element type; defined in <optimizer>_cpu.cpp.
template <class Family>
void run_family(const PassArgs& a, Pass pass) {
  if (pass == Pass::kGram)
    dispatch_dtype(a.seg.cfg.dtype, ByDtype<Family, GramByRule>{a});
  else
    dispatch_dtype(a.seg.cfg.dtype, ByDtype<Family, ApplyByRule>{a});
}

void run_adam(const PassArgs& a, Pass pass);
void run_adagrad(const PassArgs& a, Pass pass);
void run_rmsprop(const PassArgs& a, Pass pass);

}  // namespace pub_native::cpu::detail
