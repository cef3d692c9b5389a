// Framework-free description of one PUB step over many tensors (host C++ and CUDA device code):
// the tensor table Python fills with checked raw pointers, the configuration of a segment of
// tensors that share one kernel, the fixed work decomposition that makes the Gram sums
// independent of the number of threads, and the step's decisions (outcome, weights) that the
// CPU and CUDA backends share.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "hyper.h"

namespace pub_native {

// Columns of the tensor table (int64, one row per tensor of a segment), shared with Python.
// Pointers are addresses; sizes are 64-bit element counts.
enum TableCol : int32_t {
  kTParam = 0,  // parameter θ (element type of the segment)
  kTNumel = 1,  // elements in the tensor
  kTGrad = 2,   // task 0's gradient of this tensor (same element type as θ); task i's starts
                // i · grad_task_stride elements further
  kTBase = 3,   // row of the base table (the param group's constants)
  kTStep = 4,   // float32 step counter: this step is t = *step + 1; advanced when applied
  kTGradSum = 5,  // shared tensors: the tensor's .grad as it is now, which held Σ_i g_i after
                  // backward and may have been rescaled since (clipping, GradScaler.unscale_),
                  // or 0 when it is known unchanged
  kTState = 6,  // kMaxStates state tensors (math type), 0 when unused; with AdaTask each is
                // (K, numel): task i's state starts at i · numel
  kTableCols = kTState + kMaxStates,
};

// A segment is either the shared tensors of one kernel configuration (K task gradients, part
// of the Gram) or tensors that take the plain base step on their own gradient (K = 1).
enum class SegmentKind : int32_t { kShared = 0, kPlain = 1 };

// Largest K of the CUDA step (per-thread task updates live in registers).
constexpr int kCudaMaxTasks = 32;

struct StepConfig {
  Algorithm algo = Algorithm::kAdam;
  bool amsgrad = false;
  bool centered = false;
  bool momentum = false;
  Umm umm = Umm::kNone;
  DType dtype = kFloat32;
  SegmentKind kind = SegmentKind::kShared;
  int64_t num_tasks = 0;         // K (1 for a plain segment)
  int64_t grad_task_stride = 0;  // elements between two tasks' gradients of a tensor
  double grad_sign = 1.0;        // −1 with maximize=True
  double clippy_rel = 0.0;       // Clippy λ_rel
  double clippy_abs = 0.0;       // Clippy λ_abs
  bool has_l2 = false;           // some group has L2 weight decay (the Gram pass must read θ)
  PN_HD bool gram_reads_theta() const { return umm == Umm::kClippy || has_l2; }
  PN_HD bool adatask() const { return umm == Umm::kAdaTask; }
};

// Host-side construction with validation, shared by the CPU and CUDA bindings
// (std::invalid_argument becomes ValueError in Python).
inline StepConfig make_step_config(int32_t algo, bool amsgrad, bool centered, bool momentum,
                                   int32_t umm, int32_t dtype, int32_t kind, int64_t num_tasks,
                                   int64_t grad_task_stride, double grad_sign, double clippy_rel,
                                   double clippy_abs, bool has_l2) {
  if (algo < 0 || algo > 2) throw std::invalid_argument("unknown algorithm code");
  if (umm < 0 || umm > 2) throw std::invalid_argument("unknown umm code");
  if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("unknown dtype code");
  if (kind < 0 || kind > 1) throw std::invalid_argument("unknown segment kind");
  if (num_tasks < 1) throw std::invalid_argument("num_tasks must be >= 1");
  if (grad_task_stride < 0) throw std::invalid_argument("grad_task_stride must be >= 0");
  if (kind == static_cast<int32_t>(SegmentKind::kPlain) && (num_tasks != 1 || umm == 2))
    throw std::invalid_argument("a plain segment has one task and no per-task state");
  if (grad_sign != 1.0 && grad_sign != -1.0) throw std::invalid_argument("grad_sign must be ±1");
  StepConfig c;
  c.algo = static_cast<Algorithm>(algo);
  c.amsgrad = amsgrad;
  c.centered = centered;
  c.momentum = momentum;
  c.umm = static_cast<Umm>(umm);
  c.dtype = static_cast<DType>(dtype);
  c.kind = static_cast<SegmentKind>(kind);
  c.num_tasks = num_tasks;
  c.grad_task_stride = grad_task_stride;
  c.grad_sign = grad_sign;
  c.clippy_rel = clippy_rel;
  c.clippy_abs = clippy_abs;
  c.has_l2 = has_l2;
  return c;
}

// One row of the tensor table, decoded (host loops and device kernels alike).
template <class T>
struct TensorView {
  void* param;
  int64_t numel;
  const void* grad;
  int64_t grad_stride;   // elements between two tasks' gradients
  int64_t state_stride;  // state elements between two tasks (AdaTask), else 0
  float* step;
  const double* base;
  T* state[kMaxStates];
};

template <class T>
PN_HD TensorView<T> tensor_view(const StepConfig& cfg, const int64_t* table, int64_t t,
                                const double* base) {
  const int64_t* row = table + t * kTableCols;
  TensorView<T> v;
  v.param = reinterpret_cast<void*>(row[kTParam]);
  v.numel = row[kTNumel];
  v.grad = reinterpret_cast<const void*>(row[kTGrad]);
  v.grad_stride = cfg.grad_task_stride;
  v.state_stride = cfg.adatask() ? v.numel : 0;
  v.step = reinterpret_cast<float*>(row[kTStep]);
  v.base = base + row[kTBase] * kBaseCols;
  for (int s = 0; s < kMaxStates; ++s) v.state[s] = reinterpret_cast<T*>(row[kTState + s]);
  return v;
}

// The hyper-parameter row of a tensor for the step being taken (its counter + 1).
template <class T>
PN_HD void tensor_hyper(const StepConfig& cfg, const TensorView<T>& tv, double* h) {
  hyper_row(cfg.algo, tv.base, static_cast<double>(*tv.step) + 1.0, h);
}

// Elements per work item of the passes. Partial Gram matrices are summed per item, then the
// items in order: the result is bitwise the same for any number of threads.
constexpr int64_t kGramChunk = int64_t(1) << 16;

// ---- the step's decisions, shared by the CPU and CUDA backends -------------------------------

// What a step did. Values are part of the Python API (pub_native.optim.StepOutcome).
enum StepOutcome : int32_t {
  kApplied = 0,            // parameters, state and step counters advanced
  kSkippedFoundInf = 1,    // a torch.amp.GradScaler found inf/NaN: skipped, nothing raised
  kNonFiniteGrad = 2,      // some gradient is NaN/Inf: skipped
  kNonFiniteUpdate = 3,    // gradients finite, but a task update or the Gram overflowed
  kGradEdited = 4,         // a shared .grad was changed in a way that is not a rescaling
};

// Skip rules in order of precedence. Nothing is written unless the result is kApplied. A
// non-finite gradient comes before an edited .grad: a NaN/Inf loss followed by clipping
// leaves a .grad that no factor relates to the task gradients, and the NaN/Inf is the cause.
PN_HD int32_t step_outcome(bool found_inf, bool grad_edited, bool grad_nonfinite,
                           bool update_nonfinite) {
  if (found_inf) return kSkippedFoundInf;
  if (grad_nonfinite) return kNonFiniteGrad;
  if (grad_edited) return kGradEdited;
  if (update_nonfinite) return kNonFiniteUpdate;
  return kApplied;
}

// The weights one step applies: α̂, except that a task absent from this batch (task_scale 0)
// gets 0 and, with normalize_sum, the others are renormalized to sum 1. task_scale may be null.
PN_HD void step_weights(const double* weights, const double* task_scale, int64_t K,
                        bool normalize_sum, double* out) {
  double total = 0.0, kept = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    const bool present = task_scale == nullptr || task_scale[i] != 0.0;
    out[i] = present ? weights[i] : 0.0;
    total += weights[i];
    kept += out[i];
  }
  if (normalize_sum && kept > 0.0 && kept != total)
    for (int64_t i = 0; i < K; ++i) out[i] /= kept;
}

// How far (relative) an element of a rescaled .grad may be from c·s_j and still count as a
// rescaling, and c from its estimate: twice the rounding of one multiplication in the
// gradient's type (float32 and float64: the float64 sums' own noise); see RescaleSlack.
PN_HD double grad_rescale_tolerance(DType d) {
  switch (d) {
    case kBFloat16: return 1.0 / 128.0;
    case kFloat16: return 1.0 / 512.0;
    default: return 1e-6;
  }
}

// The smallest normal number of a gradient's type and its smallest subnormal: a product c·s_j
// rounded below the first has an absolute error of at most half the second.
PN_HD double grad_min_normal(DType d) {
  switch (d) {
    case kFloat16: return 6.103515625e-05;            // 2^-14
    case kFloat64: return 2.2250738585072014e-308;    // 2^-1022
    default: return 1.1754943508222875e-38;           // 2^-126: float32 and bfloat16
  }
}

PN_HD double grad_min_subnormal(DType d) {
  switch (d) {
    case kFloat16: return 5.9604644775390625e-08;     // 2^-24
    case kBFloat16: return 9.183549615799121e-41;     // 2^-133
    case kFloat64: return 4.9406564584124654e-324;    // 2^-1074
    default: return 1.401298464324817e-45;            // 2^-149
  }
}

// What decides whether a tensor's .grad m, Σ_i g_i = s after backward, is now c·s: the sums
// ⟨m, s⟩, ⟨s, s⟩ (c) and ⟨m, m⟩ (whether m = 0 where s = 0), and the factors every element
// allows: the greatest lower bound `lo` and least upper bound `hi` over the elements of the interval of
// factors c for which c·s_j rounds to m_j (an element with s_j = 0 and m_j not about 0 allows
// none: lo = +Inf). A 2-norm test let small edits through: zeroing a few rows of a large
// embedding's .grad, or clip_grad_value_ on a few elements, left a residual under the
// tolerance, and the step applied the unedited task gradients there (Adam normalizes each
// element, so such an element still moved by about lr).
constexpr int kRescaleTerms = 5;  // doubles of a RescaleTerms (the CUDA partials per item)
struct RescaleTerms {
  double ms, ss, mm;
  double lo, hi;
};

PN_HD RescaleTerms rescale_terms_empty() {
  const double inf = pn_bits_double(0x7ff0000000000000ULL);
  return RescaleTerms{0.0, 0.0, 0.0, -inf, inf};
}

PN_HD void merge_rescale_terms(RescaleTerms& a, const RescaleTerms& b) {
  a.ms += b.ms;
  a.ss += b.ss;
  a.mm += b.mm;
  a.lo = pn_max(a.lo, b.lo);
  a.hi = pn_min(a.hi, b.hi);
}

// How far m_j may be from c·s_j: where m_j is normal, tol·|m_j| (rounding c·s_j to the
// gradient's type errs by u relative; tol, grad_rescale_tolerance, is 2u or more); below the
// normal range, four of the smallest subnormals (the rounding there is half of one, and a
// .grad rescaled several times, e.g. divided for accumulation and then clipped, rounds once per
// rescaling). c, measured from the sums, errs by up to u relative itself: rescale_factor widens
// the bounds by tol·|c|.
struct RescaleSlack {
  double tol, min_normal, below;
};

PN_HD RescaleSlack rescale_slack(DType d) {
  return RescaleSlack{grad_rescale_tolerance(d), grad_min_normal(d), 4.0 * grad_min_subnormal(d)};
}

// The factor c = ⟨m, s⟩ / ⟨s, s⟩ with m ≈ c·s for a tensor whose .grad m was Σ_i g_i = s after
// backward, from its RescaleTerms. Sets *edited when m is not a multiple of s at some element
// (c outside [lo, hi], widened by tol·|c|). Element by element is also a 2-norm bound (2·tol
// relative), and it allows what rounds below the normal range, which a 2-norm test does not:
// float16 gradients of 1e-5 are subnormal, and any clip of them rounds far beyond tol. A change of .grad that PUB cannot carry
// over to the task gradients. A tensor whose task gradients cancel (s = 0, m still 0) shows no
// factor: NaN, which share_rescale_factor replaces.
PN_HD double rescale_factor(const RescaleTerms& t, double tol, bool* edited) {
  if (!(t.ss > 0.0)) {  // s = 0: only m = 0 is a rescaling of it, by any factor
    *edited = !(t.mm == 0.0);
    return *edited ? 1.0 : pn_bits_double(0x7ff8000000000000ULL);
  }
  const double c = t.ms / t.ss;
  const double band = tol * pn_abs(c);
  *edited = !pn_isfinite(c) || !(t.lo <= c + band && c - band <= t.hi);
  return c;
}

// The factors of a segment's n tensors from rescale_factor, with those that show none (NaN)
// given the factor the others share to `tol`: GradScaler.unscale_ and clip_grad_norm_ scale
// every .grad by one factor, which the task gradients of a tensor whose .grad is 0 must follow
// too (left at 1, they kept the loss scale). 1 when the others disagree or none shows one.
template <class Flag>
PN_HD void share_rescale_factor(double* ratio, const Flag* edited, int64_t n, double tol) {
  double c0 = 1.0;
  bool have = false, agree = true;
  for (int64_t t = 0; t < n; ++t) {
    const double c = ratio[t];
    if (edited[t] || c != c) continue;
    if (!have) {
      c0 = c;
      have = true;
    } else if (!(pn_abs(c - c0) <= tol * pn_abs(c0))) {
      agree = false;
    }
  }
  const double fill = have && agree ? c0 : 1.0;
  for (int64_t t = 0; t < n; ++t)
    if (ratio[t] != ratio[t]) ratio[t] = fill;
}

// Element j's share of the RescaleTerms: m = .grad and s = Σ_i g_i over the K task rows of g
// (`stride` apart), rounded once to the gradient's type exactly as sum_rows stored it after
// backward.
template <class Tp>
PN_HD void add_rescale_terms(const Tp* g, const Tp* m, int64_t K, int64_t stride, int64_t j,
                             const RescaleSlack& slack, RescaleTerms& t) {
  using T = typename MathType<Tp>::type;
  T sum = T(0);
  for (int64_t i = 0; i < K; ++i) sum += to_math<T>(g[i * stride + j]);
  const double sv = static_cast<double>(to_math<T>(from_math<Tp>(sum)));
  const double mv = static_cast<double>(to_math<T>(m[j]));
  t.ms += mv * sv;
  t.ss += sv * sv;
  t.mm += mv * mv;
  const double am = pn_abs(mv);
  const double w = am >= slack.min_normal ? slack.tol * am : slack.below;
  if (sv == 0.0) {
    if (!(am <= w)) t.lo = pn_bits_double(0x7ff0000000000000ULL);  // no factor gives m_j
    return;
  }
  const double a = (mv - w) / sv, b = (mv + w) / sv;
  t.lo = pn_max(t.lo, pn_min(a, b));
  t.hi = pn_min(t.hi, pn_max(a, b));
}

// α̂ from the solver's α: α/Σα (normalize_sum) or α. When α is unusable (every task update is
// zero, or the solve failed: Σα ≤ 0 or not finite) the weights are uniform 1/K: any weights
// give the same zero update then, and uniform ones keep the state advance that of the base
// optimizer. Returns whether α was usable (it then becomes the next warm start).
PN_HD bool finalize_weights(const double* alpha, int64_t K, bool normalize_sum,
                            double* weights) {
  double total = 0.0;
  for (int64_t i = 0; i < K; ++i) total += alpha[i];
  const bool usable = total > 0.0 && pn_isfinite(total);
  for (int64_t i = 0; i < K; ++i)
    weights[i] = usable ? (normalize_sum ? alpha[i] / total : alpha[i])
                        : 1.0 / static_cast<double>(K);
  return usable;
}

}  // namespace pub_native
