// CPU layer of the PUB step, shared by the per-optimizer translation units: work items, OpenMP
// and tiles around the per-element rules of pub_native/update_rules.h. Two passes per
// weight-update step (SPEC section 6): the Gram pass reads gradients and state, the apply pass
// writes θ and the state; a read-only finiteness pass serves the steps that have no Gram pass.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>
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

// Lanes of the single-sweep Gram: the updates of eight elements side by side (one AVX2 register
// of float32).
constexpr int kGramLanes = 8;
// Elements per lane of a single-sweep block: the block's updates, stored in float64, and the
// float32 sums of its squared gradients before a lane adds them to its float64 sum.
constexpr int kGramBlock = 16;
constexpr int64_t kFixedBlock = int64_t(kGramLanes) * kGramBlock;
// Smallest float32 block sum of squared gradients taken as it is (2⁻¹⁰⁰): above it, squares
// that fell into the subnormal range (below 2⁻¹²⁶) are too small to matter to the sum.
constexpr float kSquareSumMin = 0x1p-100f;

// x86-64 builds compile each kernel twice, whatever CPU builds them: for x86-64-v3 (AVX2 +
// FMA, every x86-64 server CPU since 2013-2015), with the single-sweep loops of K ≥ 2 tasks,
// and for the baseline instruction set with the tiled loops only; the CPU picks one at run
// time (run_adam etc. below). Like target_clones, but the baseline version, which next to no
// machine runs, carries neither the single-sweep loops nor the full optimization level, which
// halves the build time of the kernels.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PN_CPU_DISPATCH 1
#define PN_CPU_V3 __attribute__((target("arch=x86-64-v3")))
// PUB_NATIVE_CPU_BASELINE=1 takes the baseline version on any processor (the tests compare
// the two versions).
inline bool cpu_has_v3() {
  static const bool has = [] {
    const char* forced = std::getenv("PUB_NATIVE_CPU_BASELINE");
    if (forced != nullptr && forced[0] != '\0' && forced[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v3") != 0;
  }();
  return has;
}
#else
#define PN_CPU_DISPATCH 0
#define PN_CPU_V3
#endif
// Element types whose every loop the x86-64-v3 version compiles where there is a dispatch: all
// but float16, which CPUs train in bfloat16 instead. For float16 parameters it compiles the base
// optimizer's step (K = 1) only, and their PUB steps take the baseline version at about twice
// the time: their loops in the x86-64-v3 version were an eighth of the kernels' compile time
// (see v3_compiles).
#if PN_CPU_DISPATCH
template <class Tp>
constexpr bool kV3AllSteps = !std::is_same_v<Tp, half_t>;
#else
template <class Tp>
constexpr bool kV3AllSteps = true;
#endif
// The bodies are inlined into each compiled version of a kernel: a body compiled on its own
// would be compiled for the baseline instruction set only.
#if defined(__GNUC__)
#define PN_CPU_INLINE inline __attribute__((always_inline))
#define PN_CPU_LAMBDA_INLINE __attribute__((always_inline))
#else
#define PN_CPU_INLINE inline
#define PN_CPU_LAMBDA_INLINE
#endif

// Whether a float32 block sum of squares must be summed again in float64: 1 unless
// kSquareSumMin ≤ q ≤ the largest float (so also for NaN), as an int, without a branch.
PN_CPU_INLINE int square_sum_bad(float q) {
  return static_cast<int>(!(q >= kSquareSumMin)) |
         static_cast<int>(!(q <= std::numeric_limits<float>::max()));
}

#if defined(__GNUC__)
// Eight floats, one AVX2 register in the x86-64-v3 code, and their unaligned load and store.
typedef float f8 __attribute__((vector_size(32)));
PN_CPU_INLINE f8 load8(const float* p) {
  f8 x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}
PN_CPU_INLINE void store8(float* p, f8 x) { __builtin_memcpy(p, &x, sizeof x); }

// kLanes float64 sums held in four 4-wide vectors, so that they stay in registers at any
// optimization level: lane l takes the terms of the elements j ≡ l (mod kLanes), and sum()
// adds the lanes in order. The alignment is explicit: the baseline compilation of a file
// aligns 32-byte vector types to 16 bytes only, while its x86-64-v3 functions load them with
// aligned AVX instructions.
struct alignas(32) Lanes16 {
  typedef double d4 __attribute__((vector_size(32)));
  d4 v[4] = {};
  PN_CPU_INLINE static d4 load(const double* p) {
    d4 x;
    __builtin_memcpy(&x, p, sizeof x);
    return x;
  }
  PN_CPU_INLINE void fma(const double* a, const double* b) {
    for (int q = 0; q < 4; ++q) v[q] += load(a + 4 * q) * load(b + 4 * q);
  }
  PN_CPU_INLINE void add(const double* a) {
    for (int q = 0; q < 4; ++q) v[q] += load(a + 4 * q);
  }
  PN_CPU_INLINE void add0(double x) { v[0][0] += x; }
  PN_CPU_INLINE double sum() const {
    double s = 0.0;
    for (int q = 0; q < 4; ++q)
      for (int l = 0; l < 4; ++l) s += v[q][l];
    return s;
  }
};
#else
struct Lanes16 {
  double v[kLanes] = {};
  void fma(const double* a, const double* b) {
    for (int l = 0; l < kLanes; ++l) v[l] += a[l] * b[l];
  }
  void add(const double* a) {
    for (int l = 0; l < kLanes; ++l) v[l] += a[l];
  }
  void add0(double x) { v[0] += x; }
  double sum() const {
    double s = 0.0;
    for (int l = 0; l < kLanes; ++l) s += v[l];
    return s;
  }
};
#endif

// Σ_j a_j·b_j over a tile of float64 values (the task updates, exact in float64 whatever their
// element type), kLanes lanes (lane l takes j ≡ l mod kLanes), added to `acc`.
PN_CPU_INLINE void add_products(Lanes16& acc, const double* a, const double* b, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) acc.fma(a + j, b + j);
  for (; j < n; ++j) acc.add0(a[j] * b[j]);
}

struct Item {
  int64_t tensor, begin, end;
};

// f(std::integral_constant<int, 0>{}), ..., f(std::integral_constant<int, N - 1>{}): loops over
// tasks and task pairs written out, so that an element loop's body is straight-line code.
template <int N, class F, int... I>
PN_CPU_INLINE void unroll_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
PN_CPU_INLINE void unroll(F&& f) {
  unroll_impl<N>(f, std::make_integer_sequence<int, N>{});
}
// Row i of the p-th entry of the lower triangle in row order: p = i(i + 1)/2 + k, k ≤ i.
constexpr int pair_row(int p) {
  int i = 0;
  while ((i + 1) * (i + 2) / 2 <= p) ++i;
  return i;
}

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
// Element-task pairs (elements × tasks) a thread should have before another one joins: waking
// a team member costs microseconds on a quiet machine and a whole time slice when another
// process holds the core, far more than a pass over a few small tensors.
constexpr int64_t kWorkPerThread = int64_t(1) << 18;
// Threads for a pass over `items` (K tasks each): no more than there are items, nor than the
// work keeps busy. The results do not depend on it (per-item partial sums, fixed order).
inline int team_size(int64_t work, int64_t n_items) {
  const int64_t by_work = std::max<int64_t>(work / kWorkPerThread, 1);
  return static_cast<int>(std::min<int64_t>({max_threads(), std::max<int64_t>(n_items, 1), by_work}));
}
inline int team_size(const std::vector<Item>& items, int64_t K) {
  int64_t elements = 0;
  for (const Item& it : items) elements += it.end - it.begin;
  return team_size(elements * std::max<int64_t>(K, 1), static_cast<int64_t>(items.size()));
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The state entries of one element, written out: a loop over three entries (Adam with amsgrad,
// RMSProp centered with momentum) stayed a loop inside the element loops, which then did not
// vectorize (3-6 times the time of the two-entry rules).
template <class Rule, class T>
PN_CPU_INLINE void load_state(T* const* state, int64_t idx, T* s) {
  unroll<Rule::kStates>([&](auto I) PN_CPU_LAMBDA_INLINE { s[I] = state[I][idx]; });
}
template <class Rule, class T>
PN_CPU_INLINE void store_state(T* const* state, int64_t idx, const T* s) {
  unroll<Rule::kStates>([&](auto I) PN_CPU_LAMBDA_INLINE { state[I][idx] = s[I]; });
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
  // The single-sweep loops are compiled for float32 parameters only: the other element types
  // take the tiled loops (half-precision conversions branch, which keeps a single sweep from
  // vectorizing; bfloat16 and float64 would double the build time of these files).
  static constexpr bool kFixedType = std::is_same_v<Tp, float>;

  // acc[p] += Σ_t u_i,t · u_k,t over the kGramBlock vectors t of a block's float64 updates ub,
  // in the order t = 0, 1, ..., for the K(K + 1)/2 pairs p = (i, k ≤ i), in register tiles of
  // at most ten sums of four lanes (half the lanes at a time), each loaded from and stored to
  // acc once per block: all pairs at K ≤ 4; at K = 8 rows 0-3 and 4-7 with themselves and rows
  // 4-5 and 6-7 with columns 0-3. The products of float32 updates are exact in float64, so
  // the Gram is that of the updates the step applies, to the rounding of float64 sums.
  template <int kK>
  PN_CPU_INLINE static void add_block_products(const double (&ub)[kGramBlock][kK][kGramLanes],
                                               double (&acc)[kK * (kK + 1) / 2][kGramLanes]) {
#if defined(__GNUC__)
    using d4 = Lanes16::d4;
    constexpr auto load4 = Lanes16::load;
    // Rows r0..r0+nr-1 against columns c0..c0+nc-1 (the lower triangle where kDiagonal: the
    // columns are the rows), lanes h..h+3.
    auto tile = [&](auto r0_, auto nr_, auto c0_, auto nc_, auto diagonal_,
                    int h) PN_CPU_LAMBDA_INLINE {
      constexpr int r0 = decltype(r0_)::value, nr = decltype(nr_)::value;
      constexpr int c0 = decltype(c0_)::value, nc = decltype(nc_)::value;
      constexpr bool kDiagonal = decltype(diagonal_)::value;
      constexpr int kSums = kDiagonal ? nr * (nr + 1) / 2 : nr * nc;
      // The pair of each sum, row by row (indices known at compile time, so that the sums
      // stay in registers).
      constexpr auto pairs = [] {
        std::array<int, kSums> a{};
        int q = 0;
        for (int i = 0; i < nr; ++i)
          for (int k = 0; k < (kDiagonal ? i + 1 : nc); ++k)
            a[q++] = (r0 + i) * (r0 + i + 1) / 2 + c0 + k;
        return a;
      }();
      d4 s[kSums];
      unroll<kSums>([&](auto Q) PN_CPU_LAMBDA_INLINE { s[Q] = load4(acc[pairs[Q]] + h); });
      for (int t = 0; t < kGramBlock; ++t) {
        d4 a[nr], b[kDiagonal ? 1 : nc];
        for (int i = 0; i < nr; ++i) a[i] = load4(ub[t][r0 + i] + h);
        if constexpr (!kDiagonal)
          for (int k = 0; k < nc; ++k) b[k] = load4(ub[t][c0 + k] + h);
        int q = 0;
        for (int i = 0; i < nr; ++i)
          for (int k = 0; k < (kDiagonal ? i + 1 : nc); ++k)
            s[q++] += a[i] * (kDiagonal ? a[k] : b[k]);
      }
      unroll<kSums>([&](auto Q) PN_CPU_LAMBDA_INLINE {
        __builtin_memcpy(acc[pairs[Q]] + h, &s[Q], sizeof(d4));
      });
    };
    using std::integral_constant;
    using I0 = integral_constant<int, 0>;
    for (int h = 0; h < kGramLanes; h += 4) {
      if constexpr (kK <= 4) {
        tile(I0{}, integral_constant<int, kK>{}, I0{}, integral_constant<int, kK>{},
             std::true_type{}, h);
      } else {
        static_assert(kK == 8, "single sweeps have 2-4 or 8 tasks");
        using I2 = integral_constant<int, 2>;
        using I4 = integral_constant<int, 4>;
        tile(I0{}, I4{}, I0{}, I4{}, std::true_type{}, h);
        tile(I4{}, I4{}, I4{}, I4{}, std::true_type{}, h);
        tile(I4{}, I2{}, I0{}, I4{}, std::false_type{}, h);
        tile(integral_constant<int, 6>{}, I2{}, I0{}, I4{}, std::false_type{}, h);
      }
    }
#else
    for (int t = 0; t < kGramBlock; ++t) {
      int p = 0;
      for (int i = 0; i < kK; ++i)
        for (int k = 0; k <= i; ++k, ++p)
          for (int l = 0; l < kGramLanes; ++l) acc[p][l] += ub[t][i][l] * ub[t][k][l];
    }
#endif
  }

  // Whole blocks (kFixedBlock elements each) of an item with K known at compile time: a single
  // sweep computes the K task updates of an element and adds its squared gradients and
  // Clippy's ratios into kGramLanes lanes (element j feeds lane j mod kGramLanes), so loads
  // and arithmetic interleave evenly. At K = 2 it adds the updates' products into float64
  // lanes too; at K = 3, 4 and 8 it stores the block's updates in float64 (16 × K × 8 lanes,
  // 8 KiB at K = 8, in L1), whose products add_block_products sums in register tiles. Adds the
  // blocks' sums to Gp and Sq and takes the least Clippy ratio into mr.
  template <int kK>
  PN_CPU_INLINE static void item_fixed(const Rule& rule, const TensorView<T>& tv, const Item& item,
                         const T* mult, T wd, T lrel, T labs, double* Gp, double* Sq, T* mr) {
    constexpr int kPairs = kK * (kK + 1) / 2;
    constexpr int W = kGramLanes;
    // float64 lanes of the products, and of the squared gradients.
    alignas(32) double acc[kPairs][W] = {};
    double sq[kK][W] = {};
    T lo[kClippy ? kK : 1][W];
    for (int i = 0; i < (kClippy ? kK : 1); ++i)
      for (int l = 0; l < W; ++l) lo[i][l] = std::numeric_limits<T>::infinity();
    const Tp* g[kK];
    T m[kK];
    int64_t so[kK];
    for (int i = 0; i < kK; ++i) {
      g[i] = static_cast<const Tp*>(tv.grad) + i * tv.grad_stride;
      m[i] = mult[i];
      so[i] = i * tv.state_stride;
    }
    const Tp* param = static_cast<const Tp*>(tv.param);
    // At K = 2 the three products' float64 lanes (six AVX2 registers) take the products in
    // the sweep itself; larger K store the updates.
    constexpr bool kInSweep = kK == 2;
    alignas(32) double ub[kInSweep ? 1 : kGramBlock][kK][W];
    // The task updates of element j, to ub's lane l (ut = ub[t]) or their products to acc's;
    // its squared gradients go to lane l of the float32 block sums `qa`.
    auto element = [&](int64_t j, int l, T (&qa)[kK][W], double (&ut)[kK][W])
                       PN_CPU_LAMBDA_INLINE {
      T theta = T(0);
      if constexpr (kTheta) theta = to_math<T>(param[j]);
      double u[kK];
      unroll<kK>([&](auto I) PN_CPU_LAMBDA_INLINE {
        constexpr int i = decltype(I)::value;
        T s[kMaxStates], next[kMaxStates];
        load_state<Rule>(tv.state, so[i] + j, s);
        const T raw = to_math<T>(g[i][j]);
        T gi = m[i] * raw;
        if constexpr (kTheta) gi = pn_add_l2(gi, wd, theta);
        const T ui = rule(gi, s, next);
        u[i] = static_cast<double>(ui);
        qa[i][l] += raw * raw;
        if constexpr (kClippy) {
          // u = 0 gives +inf (or NaN when λ_abs = θ = 0), which the minimum ignores, as the
          // ratio is defined over u ≠ 0 only.
          const T r = pn_clippy_bound(lrel, labs, std::abs(theta)) / std::abs(ui);
          lo[i][l] = r < lo[i][l] ? r : lo[i][l];
        }
      });
      if constexpr (kInSweep) {
        unroll<kPairs>([&](auto P) PN_CPU_LAMBDA_INLINE {
          constexpr int p = decltype(P)::value;
          constexpr int i = pair_row(p), k = p - i * (i + 1) / 2;
          acc[p][l] += u[i] * u[k];
        });
      } else {
        unroll<kK>([&](auto I) PN_CPU_LAMBDA_INLINE { ut[I][l] = u[I]; });
      }
    };
    for (int64_t b0 = item.begin; b0 < item.end; b0 += kFixedBlock) {
      T qa[kK][W] = {};
      // Not unrolled: sixteen copies of the body would lengthen the build for nothing.
#pragma GCC unroll 1
      for (int64_t j0 = b0; j0 < b0 + kFixedBlock; j0 += W) {
        double (&ut)[kK][W] = ub[kInSweep ? 0 : (j0 - b0) / W];
#pragma omp simd
        for (int l = 0; l < W; ++l) element(j0 + l, l, qa, ut);
      }
      if constexpr (!kInSweep) add_block_products<kK>(ub, acc);
      // ‖g_i‖²: float32 squares serve when every lane's sum is a normal number well above the
      // subnormal range; otherwise (a square overflowed from |g| ~ 1e19, squares too small to
      // keep their precision, zeros, NaN) the block's squares again in float64, from L1. The
      // test has no branch per lane, so that it is a few vector instructions (a compare and a
      // branch per lane took 4-5% of the pass).
      for (int i = 0; i < kK; ++i) {
        int bad = 0;
        for (int l = 0; l < W; ++l) bad |= square_sum_bad(qa[i][l]);
        if (!bad) {
          for (int l = 0; l < W; ++l) sq[i][l] += static_cast<double>(qa[i][l]);
          continue;
        }
        for (int64_t j0 = b0; j0 < b0 + kFixedBlock; j0 += W)
          for (int l = 0; l < W; ++l) {
            const double x = static_cast<double>(to_math<T>(g[i][j0 + l]));
            sq[i][l] += x * x;
          }
      }
    }
    // Lanes in a fixed order.
    int p = 0;
    for (int i = 0; i < kK; ++i) {
      for (int k = 0; k <= i; ++k, ++p) {
        double t = 0.0;
        for (int l = 0; l < W; ++l) t += acc[p][l];
        Gp[i * kK + k] += t;
      }
      double t = 0.0;
      for (int l = 0; l < W; ++l) t += sq[i][l];
      Sq[i] += t;
      if constexpr (kClippy) {
        T r = lo[i][0];
        for (int l = 1; l < W; ++l) r = lo[i][l] < r ? lo[i][l] : r;
        mr[i] = r < mr[i] ? r : mr[i];
      }
    }
  }

  // One item for any K: tiles of kTile elements; the K task updates of a tile go to scratch
  // `u` (K × kTile, in float64), then their products are summed pair by pair into kLanes
  // float64 lanes per Gram entry (`lanes`: K × K entries, then K squared-gradient sums), which
  // live for the whole item and are added up once at its end.
  PN_CPU_INLINE static void item_tiled(const Rule& rule, const TensorView<T>& tv,
                                       const Item& item, int64_t K, const T* mult, T wd, T lrel,
                                       T labs, double* u, T* theta, Lanes16* lanes, double* Gp,
                                       double* Sq, T* mr) {
    Lanes16* sq_lanes = lanes + K * K;
    for (int64_t e = 0; e < K * K + K; ++e) lanes[e] = Lanes16{};
    const Tp* param = static_cast<const Tp*>(tv.param);
    const Tp* grads = static_cast<const Tp*>(tv.grad);
    for (int64_t j0 = item.begin; j0 < item.end; j0 += kTile) {
      const int64_t n = std::min(kTile, item.end - j0);
      if constexpr (kTheta) {
        for (int64_t j = 0; j < n; ++j) theta[j] = to_math<T>(param[j0 + j]);
      }
      for (int64_t i = 0; i < K; ++i) {
        const Tp* g = grads + i * tv.grad_stride + j0;
        const int64_t s0 = i * tv.state_stride + j0;
        const T mi = mult[i];
        double* ui = u + i * kTile;
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) {
          T s[kMaxStates], next[kMaxStates];
          load_state<Rule>(tv.state, s0 + j, s);
          T gi = mi * to_math<T>(g[j]);
          if constexpr (kTheta) gi = pn_add_l2(gi, wd, theta[j]);
          ui[j] = static_cast<double>(rule(gi, s, next));
        }
      }
      if constexpr (kClippy) {
        // u = 0 gives +inf (or NaN when λ_abs = θ = 0), which the minimum ignores.
        auto ratio = [&](const double* ui, int64_t j) PN_CPU_LAMBDA_INLINE {
          return pn_clippy_bound(lrel, labs, std::abs(theta[j])) /
                 std::abs(static_cast<T>(ui[j]));
        };
        for (int64_t i = 0; i < K; ++i) {
          const double* ui = u + i * kTile;
          // The least ratio per lane (element j in lane j mod kLanes), then over the lanes: a
          // running minimum over j stayed a scalar loop with a division per element. A NaN
          // never replaces a minimum, so the result is the sequential one.
          T lane_min[kLanes];
          for (int l = 0; l < kLanes; ++l) lane_min[l] = std::numeric_limits<T>::infinity();
          int64_t j = 0;
          for (; j + kLanes <= n; j += kLanes)
            for (int l = 0; l < kLanes; ++l) {
              const T r = ratio(ui, j + l);
              lane_min[l] = r < lane_min[l] ? r : lane_min[l];
            }
          T m = mr[i];
          for (; j < n; ++j) {
            const T r = ratio(ui, j);
            m = r < m ? r : m;
          }
          for (int l = 0; l < kLanes; ++l) m = lane_min[l] < m ? lane_min[l] : m;
          mr[i] = m;
        }
      }
      // ‖g_i‖² of the tile (raw values; the multiplier is applied once per item) in float64:
      // float32 squares would overflow from |g| ~ 1e19.
      for (int64_t i = 0; i < K; ++i) {
        const Tp* g = grads + i * tv.grad_stride + j0;
        Lanes16 acc = sq_lanes[i];
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes) {
          double x[kLanes];
          for (int l = 0; l < kLanes; ++l) x[l] = static_cast<double>(to_math<T>(g[j + l]));
          acc.fma(x, x);
        }
        for (; j < n; ++j) {
          const double x = static_cast<double>(to_math<T>(g[j]));
          acc.add0(x * x);
        }
        sq_lanes[i] = acc;
      }
      for (int64_t i = 0; i < K; ++i)
        for (int64_t k = 0; k <= i; ++k) {
          Lanes16 acc = lanes[i * K + k];
          add_products(acc, u + i * kTile, u + k * kTile, n);
          lanes[i * K + k] = acc;
        }
    }
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t k = 0; k <= i; ++k) Gp[i * K + k] = lanes[i * K + k].sum();
      Sq[i] = sq_lanes[i].sum();
    }
  }

  // item_tiled compiled on its own for x86-64-v3: inlined into the function that also holds the
  // single sweeps, it made their loops slower (K = 4: 15 -> 17 ms at P = 16M).
#if defined(__GNUC__)
  PN_CPU_V3 __attribute__((noinline))
#endif
  static void tiled_v3(const Rule& rule, const TensorView<T>& tv, const Item& item, int64_t K,
                       const T* mult, T wd, T lrel, T labs, double* u, T* theta, Lanes16* lanes,
                       double* Gp, double* Sq, T* mr) {
    item_tiled(rule, tv, item, K, mult, wd, lrel, labs, u, theta, lanes, Gp, Sq, mr);
  }

  // The work of one call: items, per-item partial sums and per-thread scratch.
  struct Work {
    const SegmentArgs& a;
    const int64_t K;
    const std::vector<Item> items;
    const int64_t n_items;
    const int nthreads;
    std::vector<double> partial, partial_sq;
    std::vector<T> min_ratio;
    // Per thread: the K task updates of a tile (tiled items), θ, and the K gradient
    // multipliers of the item's tensor.
    std::vector<double> scratch;
    std::vector<T> theta_scratch, mult_scratch;
    std::vector<Lanes16> lanes_scratch;

    explicit Work(const SegmentArgs& args)
        : a(args),
          K(args.cfg.num_tasks),
          items(make_items(args.table, args.n_tensors)),
          n_items(static_cast<int64_t>(items.size())),
          nthreads(team_size(items, K)),
          partial(static_cast<size_t>(n_items * K * K), 0.0),
          partial_sq(static_cast<size_t>(n_items * K), 0.0),
          min_ratio(kClippy ? static_cast<size_t>(n_items * K) : 0,
                    std::numeric_limits<T>::infinity()),
          scratch(static_cast<size_t>(nthreads) * K * kTile),
          theta_scratch(static_cast<size_t>(nthreads) * kTile),
          mult_scratch(static_cast<size_t>(nthreads) * K),
          lanes_scratch(static_cast<size_t>(nthreads * (K * K + K))) {}

    // kFast: with the single-sweep loops (float32 parameters, K = 2-4 and 8).
    template <bool kFast>
    PN_CPU_INLINE void item(int64_t it) {
      const StepConfig& cfg = a.cfg;
      const Item item = items[static_cast<size_t>(it)];
      const TensorView<T> tv = tensor_view<T>(cfg, a.table, item.tensor, a.base);
      double h[kHyperCols];
      tensor_hyper(cfg, tv, h);
      const Rule rule(h);
      const T wd = static_cast<T>(h[kHWeightDecay]);
      const T lrel = static_cast<T>(cfg.clippy_rel), labs = static_cast<T>(cfg.clippy_abs);
      const int tid = thread_id();
      T* mult = mult_scratch.data() + static_cast<size_t>(tid) * K;
      for (int64_t i = 0; i < K; ++i) mult[i] = grad_multiplier<T>(a, item.tensor, i);
      double* Gp = partial.data() + it * K * K;
      double* Sq = partial_sq.data() + it * K;
      T* mr = kClippy ? min_ratio.data() + it * K : nullptr;
      double* u = scratch.data() + static_cast<size_t>(tid) * K * kTile;
      T* theta = theta_scratch.data() + static_cast<size_t>(tid) * kTile;
      Lanes16* lanes = lanes_scratch.data() + static_cast<size_t>(tid * (K * K + K));
      auto tiled = [&](const Item& part) PN_CPU_LAMBDA_INLINE {
        if constexpr (kFast)
          tiled_v3(rule, tv, part, K, mult, wd, lrel, labs, u, theta, lanes, Gp, Sq, mr);
        else
          item_tiled(rule, tv, part, K, mult, wd, lrel, labs, u, theta, lanes, Gp, Sq, mr);
      };
      // Whole blocks of 2-4 or 8 tasks (the task counts whose apply pass has a single sweep
      // too) in a single sweep, the rest of the item (fewer than kFixedBlock elements) in the
      // tiled loop, first: the sweep adds its sums to the tail's. Every other case, and K = 8
      // with Clippy (a K = 8 sweep for each rule's Clippy variant would add a tenth to the
      // kernels' build), takes the tiled loop for the whole item.
      if constexpr (kFast && kFixedType) {
        const int64_t full = item.begin + (item.end - item.begin) / kFixedBlock * kFixedBlock;
        auto sweep = [&](auto kK) PN_CPU_LAMBDA_INLINE {
          if (full < item.end) tiled(Item{item.tensor, full, item.end});
          item_fixed<decltype(kK)::value>(rule, tv, Item{item.tensor, item.begin, full}, mult,
                                          wd, lrel, labs, Gp, Sq, mr);
        };
        if (full > item.begin) switch (K) {
          case 2: return sweep(std::integral_constant<int, 2>{});
          case 3: return sweep(std::integral_constant<int, 3>{});
          case 4: return sweep(std::integral_constant<int, 4>{});
          case 8:
            if constexpr (!kClippy) return sweep(std::integral_constant<int, 8>{});
            break;
          default: break;
        }
      }
      tiled(item);
    }

    // Deterministic reduction in item order (items are ordered by tensor).
    void reduce(double* G, double* sigma, double* task_sq) const {
      std::fill(task_sq, task_sq + K, 0.0);
      for (int64_t it = 0; it < n_items; ++it)
        for (int64_t i = 0; i < K; ++i) {
          const double m =
              static_cast<double>(grad_multiplier<T>(a, items[static_cast<size_t>(it)].tensor, i));
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
          // σ = min(1, min_j (λ_rel|θ_j| + λ_abs)/|u_ij|); a NaN ratio (NaN update) gives NaN
          // σ, so the Gram stays non-finite and the step is refused.
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

  // G (K×K) of the segment's task updates; with Clippy, sigma (n_tensors × K) receives each
  // tensor's per-task scale and G is the Gram of the scaled updates. task_sq (K) receives
  // Σ‖g_i‖² of the task gradients as the updates saw them (multipliers applied). run_v3: the
  // x86-64-v3 version with the single-sweep loops; run_base: the baseline version.
  PN_CPU_V3 static void run_v3(const SegmentArgs& a, double* G, double* sigma, double* task_sq) {
    Work w(a);
#pragma omp parallel for schedule(dynamic, 1) num_threads(w.nthreads)
    for (int64_t it = 0; it < w.n_items; ++it) w.template item<true>(it);
    w.reduce(G, sigma, task_sq);
  }
  static void run_base(const SegmentArgs& a, double* G, double* sigma, double* task_sq) {
    Work w(a);
#pragma omp parallel for schedule(dynamic, 1) num_threads(w.nthreads)
    for (int64_t it = 0; it < w.n_items; ++it) w.template item<false>(it);
    w.reduce(G, sigma, task_sq);
  }
};

// ---- Apply pass -------------------------------------------------------------------------------

template <class Rule, class Tp, bool kAdaTask>
struct ApplyKernel {
  using T = typename MathType<Tp>::type;

  template <int kK>
  PN_CPU_INLINE static void apply_fixed(const Rule& rule, const TensorView<T>& tv, const Item& item,
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
      // Sums from −0, which adds nothing to any term, −0 included: one task's update of −0
      // (g = −0) stays −0, so that θ = −0 steps to +0 as torch's θ + (−lr)·u does.
      T upd = -T(0), g_alpha = -T(0);
      unroll<kK>([&](auto I) PN_CPU_LAMBDA_INLINE {
        constexpr int i = decltype(I)::value;
        const T gi = pn_add_l2(m[i] * to_math<T>(g[i][j]), wd, theta);
        upd += c[i] * rule(gi, s, next);
        g_alpha += w[i] * gi;
      });
      rule(g_alpha, s, next);
      store_state<Rule>(tv.state, j, next);
      param[j] = from_math<Tp>(theta * decay - upd);
    }
  }

  // The work of one call: items and per-thread scratch (θ, the update and g_α of a tile, the K
  // gradient multipliers of the item's tensor).
  struct Work {
    const SegmentArgs& a;
    const double* weights;
    const double* sigma;
    const int64_t K;
    const std::vector<Item> items;
    const int64_t n_items;
    const int nthreads;
    std::vector<T> scratch, mult_scratch;

    Work(const SegmentArgs& args, const double* w, const double* s)
        : a(args),
          weights(w),
          sigma(s),
          K(args.cfg.num_tasks),
          items(make_items(args.table, args.n_tensors)),
          n_items(static_cast<int64_t>(items.size())),
          nthreads(team_size(items, K)),
          scratch(static_cast<size_t>(nthreads) * 3 * kTile),
          mult_scratch(static_cast<size_t>(nthreads) * K) {}

    // kFast: with the single-sweep loops of K ≥ 2 tasks (K = 1, the base optimizer, always).
    template <bool kFast>
    PN_CPU_INLINE void item(int64_t it) {
      const StepConfig& cfg = a.cfg;
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
      if constexpr (kFast && !kV3AllSteps<Tp>) {
        // The base optimizer's step, the only one of this type that reaches this version.
        apply_fixed<1>(rule, tv, item, mult, weights, sigma, wd, decay);
      } else {
        tiled_or_fixed<kFast>(rule, tv, item, mult, wd, decay, theta, upd, g_alpha, param);
      }
    }

    template <bool kFast>
    PN_CPU_INLINE void tiled_or_fixed(const Rule& rule, const TensorView<T>& tv, const Item& item,
                                      const T* mult, T wd, T decay, T* theta, T* upd,
                                      T* g_alpha, Tp* param) {
      if constexpr (!kAdaTask) {
        // K ∈ {1, 2, 3, 4, 8}: one sweep with the task loop unrolled, everything in registers.
        if (K == 1) return apply_fixed<1>(rule, tv, item, mult, weights, sigma, wd, decay);
        if constexpr (kFast) switch (K) {
          case 2: return apply_fixed<2>(rule, tv, item, mult, weights, sigma, wd, decay);
          case 3: return apply_fixed<3>(rule, tv, item, mult, weights, sigma, wd, decay);
          case 4: return apply_fixed<4>(rule, tv, item, mult, weights, sigma, wd, decay);
          case 8: return apply_fixed<8>(rule, tv, item, mult, weights, sigma, wd, decay);
          default: break;
        }
      }
      for (int64_t j0 = item.begin; j0 < item.end; j0 += kTile) {
        const int64_t n = std::min(kTile, item.end - j0);
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) {
          theta[j] = to_math<T>(param[j0 + j]);
          upd[j] = -T(0);  // −0, as in apply_fixed
          g_alpha[j] = -T(0);
        }
        for (int64_t i = 0; i < K; ++i) {
          const T w = static_cast<T>(weights[i]);
          const T c =
              static_cast<T>(sigma ? weights[i] * sigma[item.tensor * K + i] : weights[i]);
          // A task with weight 0 (excluded) contributes nothing; AdaTask still advances its
          // state, except for a task absent from this batch, whose state is left as it was.
          if (!kAdaTask && w == T(0)) continue;
          if (kAdaTask && a.task_scale && a.task_scale[i] == 0.0) continue;
          const Tp* g = static_cast<const Tp*>(tv.grad) + i * tv.grad_stride + j0;
          const int64_t s0 = i * tv.state_stride + j0;
          const T mi = mult[i];
#pragma GCC ivdep
          for (int64_t j = 0; j < n; ++j) {
            T s[kMaxStates], next[kMaxStates];
            load_state<Rule>(tv.state, s0 + j, s);
            const T gi = pn_add_l2(mi * to_math<T>(g[j]), wd, theta[j]);
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
  };

  // θ ← decay·θ − Σ_i α̂_i σ_i u_i, then the state advances with g_α = Σ_i α̂_i g_i (AdaTask:
  // each task's state with its own g_i). weights: K values α̂ (1 for a plain segment). run_v3:
  // the x86-64-v3 version with the single-sweep loops; run_base: the baseline version.
  PN_CPU_V3 static void run_v3(const SegmentArgs& a, const double* weights,
                               const double* sigma) {
    Work w(a, weights, sigma);
#pragma omp parallel for schedule(dynamic, 1) num_threads(w.nthreads)
    for (int64_t it = 0; it < w.n_items; ++it) w.template item<true>(it);
  }
  static void run_base(const SegmentArgs& a, const double* weights, const double* sigma) {
    Work w(a, weights, sigma);
#pragma omp parallel for schedule(dynamic, 1) num_threads(w.nthreads)
    for (int64_t it = 0; it < w.n_items; ++it) w.template item<false>(it);
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

template <class Kernel, bool kV3>
void run_gram(const PassArgs& a) {
  if constexpr (kV3)
    Kernel::run_v3(a.seg, a.G, a.sigma, a.task_sq);
  else
    Kernel::run_base(a.seg, a.G, a.sigma, a.task_sq);
}
template <class Kernel, bool kV3>
void run_apply(const PassArgs& a) {
  if constexpr (kV3)
    Kernel::run_v3(a.seg, a.weights, a.sigma);
  else
    Kernel::run_base(a.seg, a.weights, a.sigma);
}

template <class Tp, bool kV3>
struct GramByRule {
  const PassArgs& a;
  template <class Rule>
  void operator()() const {
    const StepConfig& c = a.seg.cfg;
    if constexpr (kV3 && !kV3AllSteps<Tp>)  // never sent here (v3_compiles)
      throw std::logic_error("a Gram pass of this element type in the x86-64-v3 version");
    else if (c.umm == Umm::kClippy)
      run_gram<GramKernel<Rule, Tp, true, true>, kV3>(a);
    else if (c.gram_reads_theta())
      run_gram<GramKernel<Rule, Tp, true, false>, kV3>(a);
    else
      run_gram<GramKernel<Rule, Tp, false, false>, kV3>(a);
  }
};

template <class Tp, bool kV3>
struct ApplyByRule {
  const PassArgs& a;
  template <class Rule>
  void operator()() const {
    if constexpr (kV3 && !kV3AllSteps<Tp>) {
      // The base optimizer's step only (v3_compiles); checked here, outside the threads.
      if (a.seg.cfg.num_tasks != 1 || a.seg.cfg.adatask())
        throw std::logic_error("a PUB step of this element type in the x86-64-v3 version");
      run_apply<ApplyKernel<Rule, Tp, false>, kV3>(a);
    } else {
      if (a.seg.cfg.adatask())
        run_apply<ApplyKernel<Rule, Tp, true>, kV3>(a);
      else
        run_apply<ApplyKernel<Rule, Tp, false>, kV3>(a);
    }
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

template <class Family, template <class, bool> class ByRule, bool kV3>
struct ByDtype {
  const PassArgs& a;
  template <class Tp>
  void operator()() const {
    using T = typename MathType<Tp>::type;
    Family::template dispatch<T>(a.seg.cfg, ByRule<Tp, kV3>{a});
  }
};

// One pass of one base optimizer, for every element type, in one compiled version (kV3: the
// x86-64-v3 one, or the only one where there is no dispatch).
template <class Family, bool kV3>
void run_family(const PassArgs& a, Pass pass) {
  if (pass == Pass::kGram)
    dispatch_dtype(a.seg.cfg.dtype, ByDtype<Family, GramByRule, kV3>{a});
  else
    dispatch_dtype(a.seg.cfg.dtype, ByDtype<Family, ApplyByRule, kV3>{a});
}

// The versions of each optimizer live in their own translation units, which build in
// parallel: <optimizer>_cpu.cpp (x86-64-v3, or the only version elsewhere) and
// <optimizer>_base_cpu.cpp (the x86-64 baseline, compiled at a lower optimization level).
void run_adam_v3(const PassArgs& a, Pass pass);
void run_adagrad_v3(const PassArgs& a, Pass pass);
void run_rmsprop_v3(const PassArgs& a, Pass pass);
#if PN_CPU_DISPATCH
void run_adam_base(const PassArgs& a, Pass pass);
void run_adagrad_base(const PassArgs& a, Pass pass);
void run_rmsprop_base(const PassArgs& a, Pass pass);
// Whether the x86-64-v3 version compiles the loops of this pass (kV3AllSteps): every pass but
// those of float16 segments, of which the base optimizer's step only.
inline bool v3_compiles(const PassArgs& a, Pass pass) {
  const StepConfig& c = a.seg.cfg;
  return c.dtype != kFloat16 || (pass == Pass::kApply && c.num_tasks == 1 && !c.adatask());
}
#define PN_CPU_PICK(name, a, pass) \
  (cpu_has_v3() && v3_compiles(a, pass) ? name##_v3(a, pass) : name##_base(a, pass))
#else
#define PN_CPU_PICK(name, a, pass) name##_v3(a, pass)
#endif

inline void run_adam(const PassArgs& a, Pass pass) { PN_CPU_PICK(run_adam, a, pass); }
inline void run_adagrad(const PassArgs& a, Pass pass) { PN_CPU_PICK(run_adagrad, a, pass); }
inline void run_rmsprop(const PassArgs& a, Pass pass) { PN_CPU_PICK(run_rmsprop, a, pass); }

}  // namespace pub_native::cpu::detail
