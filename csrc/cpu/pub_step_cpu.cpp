// CPU backend of the PUB step: the two phases of Stepper, dispatch to the per-optimizer
// translation units (adam_cpu.cpp, adagrad_cpu.cpp, rmsprop_cpu.cpp) and the finiteness pass.
#include "pub_step_cpu.h"

#include <chrono>

#include "pub_step_cpu_impl.h"

namespace pub_native::cpu {

using detail::Item;
using detail::Pass;
using detail::PassArgs;
using detail::SegmentArgs;

namespace {

void run(const PassArgs& a, Pass pass) {
  switch (a.seg.cfg.algo) {
    case Algorithm::kAdam: return detail::run_adam(a, pass);
    case Algorithm::kAdaGrad: return detail::run_adagrad(a, pass);
    case Algorithm::kRMSProp: return detail::run_rmsprop(a, pass);
  }
}

template <class Tp>
void find_nonfinite_typed(const Segment& seg, const double* gscale, uint8_t* bad) {
  using T = typename MathType<Tp>::type;
  const int64_t K = seg.cfg.num_tasks;
  const std::vector<Item> items = detail::make_items(seg.table, seg.n_tensors);
  const int64_t n_items = static_cast<int64_t>(items.size());
  // One flag per item and task, OR-ed per tensor afterwards: no two threads write one byte.
  std::vector<uint8_t> item_bad(static_cast<size_t>(n_items * K), 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(detail::team_size(items, K))
  for (int64_t it = 0; it < n_items; ++it) {
    const Item item = items[static_cast<size_t>(it)];
    const int64_t* row = seg.table + item.tensor * kTableCols;
    const Tp* g = reinterpret_cast<const Tp*>(row[kTGrad]);
    for (int64_t i = 0; i < K; ++i) {
      const Tp* gi = g + i * seg.cfg.grad_task_stride;
      // The gradient as the passes see it (unscaled, rescaled): a finite value that a
      // multiplier above 1 takes past the largest float is caught too.
      const T mult = static_cast<T>(gscale ? gscale[item.tensor * K + i] : 1.0);
      // x − x is 0 for finite x and NaN otherwise; an integer OR keeps the loop vectorizable.
      int flag = 0;
      for (int64_t j = item.begin; j < item.end; ++j) {
        const T x = mult * to_math<T>(gi[j]);
        const T d = x - x;
        flag |= static_cast<int>(d != d);
      }
      item_bad[static_cast<size_t>(it * K + i)] = flag ? 1 : 0;
    }
  }
  for (int64_t e = 0; e < seg.n_tensors * K; ++e) bad[e] = 0;
  for (int64_t it = 0; it < n_items; ++it)
    for (int64_t i = 0; i < K; ++i)
      bad[items[static_cast<size_t>(it)].tensor * K + i] |= item_bad[static_cast<size_t>(it * K + i)];
}

struct FiniteDispatch {
  const Segment& seg;
  const double* gscale;
  uint8_t* bad;
  template <class Tp>
  void operator()() const {
    find_nonfinite_typed<Tp>(seg, gscale, bad);
  }
};

// Row K = Σ_i row i (rows added in order), and whether every sum is finite: a NaN or Inf in any
// row makes its sum NaN or Inf (the converse may fail: an overflow), and s - s is 0 for a finite
// s and NaN otherwise, so `check`, a sum of those, is 0 exactly when every sum is finite. Blocks
// of kSumBlock elements, a row at a time, so that the element loops vectorize for any K.
constexpr int64_t kSumBlock = 256;

template <class Tp>
bool sum_rows_typed(Tp* buf, int64_t K, int64_t P) {
  using T = typename MathType<Tp>::type;
  Tp* out = buf + K * P;
  T check = T(0);
  // Threads only where there is work for them (waking a team costs more than a small sum).
#pragma omp parallel for schedule(static) num_threads(detail::team_size(K * P, P)) \
    reduction(+ : check)
  for (int64_t j0 = 0; j0 < P; j0 += kSumBlock) {
    const int64_t n = std::min(kSumBlock, P - j0);
    T s[kSumBlock];
    for (int64_t j = 0; j < n; ++j) s[j] = T(0);
    for (int64_t i = 0; i < K; ++i) {
      const Tp* row = buf + i * P + j0;
      for (int64_t j = 0; j < n; ++j) s[j] += to_math<T>(row[j]);
    }
    T c = T(0);
#pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < n; ++j) {
      c += s[j] - s[j];
      out[j0 + j] = from_math<Tp>(s[j]);
    }
    check += c;
  }
  return check == T(0);
}

struct SumDispatch {
  void* buf;
  int64_t K, P;
  bool* finite;
  template <class Tp>
  void operator()() const {
    *finite = sum_rows_typed(static_cast<Tp*>(buf), K, P);
  }
};

template <class Tp>
void rescale_typed(const Segment& seg, double* ratio, uint8_t* edited) {
  const int64_t K = seg.cfg.num_tasks, stride = seg.cfg.grad_task_stride;
  const std::vector<Item> items = detail::make_items(seg.table, seg.n_tensors);
  const int64_t n_items = static_cast<int64_t>(items.size());
  const RescaleSlack slack = rescale_slack(seg.cfg.dtype);
  std::vector<RescaleTerms> partial(static_cast<size_t>(n_items), rescale_terms_empty());
#pragma omp parallel for schedule(dynamic, 1) num_threads(detail::team_size(items, K))
  for (int64_t it = 0; it < n_items; ++it) {
    const Item item = items[static_cast<size_t>(it)];
    const int64_t* row = seg.table + item.tensor * kTableCols;
    if (row[kTGradSum] == 0) continue;
    const Tp* g = reinterpret_cast<const Tp*>(row[kTGrad]);
    const Tp* m = reinterpret_cast<const Tp*>(row[kTGradSum]);
    RescaleTerms terms = rescale_terms_empty();
    for (int64_t j = item.begin; j < item.end; ++j)
      add_rescale_terms(g, m, K, stride, j, slack, terms);
    partial[static_cast<size_t>(it)] = terms;
  }
  const double tol = grad_rescale_tolerance(seg.cfg.dtype);
  int64_t it = 0;
  for (int64_t t = 0; t < seg.n_tensors; ++t) {
    RescaleTerms terms = rescale_terms_empty();
    for (; it < n_items && items[static_cast<size_t>(it)].tensor == t; ++it)
      merge_rescale_terms(terms, partial[static_cast<size_t>(it)]);
    bool ed = false;
    // A row without its .grad to compare (a tensor of no elements, or no rescan) shows no
    // factor: NaN, which share_rescale_factor fills (with 1 where no row shows one).
    ratio[t] = seg.table[t * kTableCols + kTGradSum] != 0
                   ? rescale_factor(terms, tol, &ed)
                   : pn_bits_double(0x7ff8000000000000ULL);
    edited[t] = ed ? 1 : 0;
  }
  share_rescale_factor(ratio, edited, seg.n_tensors, tol);
}

struct RescaleDispatch {
  const Segment& seg;
  double* ratio;
  uint8_t* edited;
  template <class Tp>
  void operator()() const {
    rescale_typed<Tp>(seg, ratio, edited);
  }
};

bool all_finite(const std::vector<double>& v) {
  for (double x : v)
    if (!pn_isfinite(x)) return false;
  return true;
}

}  // namespace

void find_nonfinite(const Segment& seg, const double* gscale, uint8_t* bad) {
  detail::dispatch_dtype(seg.cfg.dtype, FiniteDispatch{seg, gscale, bad});
}

bool sum_rows(DType d, void* buf, int64_t K, int64_t P) {
  bool finite = false;
  detail::dispatch_dtype(d, SumDispatch{buf, K, P, &finite});
  return finite;
}

void rescale_factors(const Segment& seg, double* ratio, uint8_t* edited) {
  detail::dispatch_dtype(seg.cfg.dtype, RescaleDispatch{seg, ratio, edited});
}

Stepper::Stepper(int64_t num_tasks)
    : G(static_cast<size_t>(num_tasks * num_tasks), 0.0),
      bad_task(static_cast<size_t>(num_tasks), 0),
      task_sq(static_cast<size_t>(num_tasks), 0.0),
      weights(static_cast<size_t>(num_tasks), 1.0 / static_cast<double>(num_tasks)),
      alpha(static_cast<size_t>(num_tasks), 0.0),
      K_(num_tasks),
      task_scale_(static_cast<size_t>(num_tasks), 1.0),
      applied_(static_cast<size_t>(num_tasks), 0.0),
      workspace_(static_cast<size_t>(solver_workspace_size(num_tasks))),
      fresh_(static_cast<size_t>(num_tasks)) {
  if (num_tasks < 1) throw std::invalid_argument("num_tasks must be >= 1");
}

void Stepper::gram(const std::vector<Segment>& segs, const double* base, bool solve,
                   double inv_scale, const double* task_scale, bool shared_finite) {
  const size_t n = segs.size();
  sigma_.resize(n);
  gscale_.resize(n);
  bad_tensor.resize(n);
  edited_tensor.resize(n);
  std::fill(G.begin(), G.end(), 0.0);
  std::fill(bad_task.begin(), bad_task.end(), 0);
  std::fill(task_sq.begin(), task_sq.end(), 0.0);
  if (task_scale)
    std::copy(task_scale, task_scale + K_, task_scale_.begin());
  else
    std::fill(task_scale_.begin(), task_scale_.end(), 1.0);
  update_nonfinite = false;
  grad_edited = false;
  std::vector<double> Gs(static_cast<size_t>(K_ * K_)), sq(static_cast<size_t>(K_));
  bool any_gram = false;
  for (size_t s = 0; s < n; ++s) {
    const Segment& seg = segs[s];
    const int64_t K = seg.cfg.num_tasks;
    const bool shared = seg.cfg.kind == SegmentKind::kShared;
    if (shared && K != K_) throw std::invalid_argument("a shared segment has the wrong K");
    std::vector<double>& gs = gscale_[s];
    gs.assign(static_cast<size_t>(seg.n_tensors * K), inv_scale);
    bad_tensor[s].assign(static_cast<size_t>(seg.n_tensors * K), 0);
    edited_tensor[s].assign(static_cast<size_t>(seg.n_tensors), 0);
    if (shared) {
      std::vector<double> ratio(static_cast<size_t>(seg.n_tensors), 1.0);
      rescale_factors(seg, ratio.data(), edited_tensor[s].data());
      for (int64_t t = 0; t < seg.n_tensors; ++t) {
        grad_edited = grad_edited || edited_tensor[s][static_cast<size_t>(t)] != 0;
        for (int64_t i = 0; i < K; ++i)
          gs[static_cast<size_t>(t * K + i)] *= ratio[static_cast<size_t>(t)] *
                                                task_scale_[static_cast<size_t>(i)];
      }
    }
    const SegmentArgs args{seg.cfg, seg.table, seg.n_tensors, base, gs.data(),
                           shared ? task_scale_.data() : nullptr};
    if (shared && (solve || seg.cfg.umm == Umm::kClippy)) {
      sigma_[s].assign(static_cast<size_t>(seg.n_tensors * K), 1.0);
      run(PassArgs{args, Gs.data(), sigma_[s].data(), sq.data(), nullptr}, Pass::kGram);
      for (size_t e = 0; e < Gs.size(); ++e) G[e] += Gs[e];
      for (size_t i = 0; i < sq.size(); ++i) task_sq[i] += sq[i];
      any_gram = true;
    } else {
      sigma_[s].clear();
      // Rows known to be finite stay finite under multipliers ≤ 1 (GradScaler's 1/scale with
      // scale ≥ 1, task scales 0 or 1; a rescaled .grad turns the shortcut off upstream).
      const bool known_finite = shared && shared_finite && inv_scale <= 1.0;
      if (!known_finite) find_nonfinite(seg, gs.data(), bad_tensor[s].data());
    }
  }
  // A task absent from this batch: no row or column in G, so the solver gives it weight 0.
  for (int64_t i = 0; i < K_; ++i)
    if (task_scale_[static_cast<size_t>(i)] == 0.0)
      for (int64_t k = 0; k < K_; ++k) G[i * K_ + k] = G[k * K_ + i] = 0.0;
  if (any_gram && !all_finite(G)) {
    // Attribute the failure: NaN/Inf gradients, or finite gradients whose updates overflow.
    for (size_t s = 0; s < n; ++s)
      if (segs[s].cfg.kind == SegmentKind::kShared && !sigma_[s].empty())
        find_nonfinite(segs[s], gscale_[s].data(), bad_tensor[s].data());
    update_nonfinite = true;
  }
  grad_nonfinite = false;
  for (size_t s = 0; s < n; ++s) {
    for (uint8_t f : bad_tensor[s]) grad_nonfinite = grad_nonfinite || f != 0;
    if (segs[s].cfg.kind != SegmentKind::kShared) continue;
    for (int64_t t = 0; t < segs[s].n_tensors; ++t)
      for (int64_t i = 0; i < K_; ++i)
        bad_task[static_cast<size_t>(i)] |= bad_tensor[s][static_cast<size_t>(t * K_ + i)];
  }
}

int32_t Stepper::finish(const std::vector<Segment>& segs, const double* base, bool solve,
                        const SolveOptions& options, bool normalize_sum, bool found_inf) {
  if (segs.size() != gscale_.size())
    throw std::invalid_argument("finish() needs the segments of the preceding gram()");
  // G may have been summed over processes since phase 1: its finiteness decides again.
  const bool update_bad = (update_nonfinite || (solve && !all_finite(G))) && !grad_nonfinite;
  outcome = step_outcome(found_inf, grad_edited, grad_nonfinite, update_bad);
  if (outcome != kApplied) return outcome;

  if (solve) {
    const auto t0 = std::chrono::steady_clock::now();
    const SolveOutcome out =
        solve_weights(SerialTeam{}, G.data(), has_alpha ? alpha.data() : nullptr, fresh_.data(),
                      K_, options, workspace_.data());
    solve_time = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    status = out.status;
    iterations = out.iterations;
    residual = out.residual;
    if (finalize_weights(fresh_.data(), K_, normalize_sum, weights.data())) {
      alpha = fresh_;
      has_alpha = true;
    }
    has_weights = true;
  }
  bool any_shared = false;
  for (const Segment& seg : segs) any_shared = any_shared || seg.cfg.kind == SegmentKind::kShared;
  if (any_shared && !has_weights) throw std::logic_error("a reuse step before any weight solve");

  step_weights(weights.data(), task_scale_.data(), K_, normalize_sum, applied_.data());
  const double one = 1.0;
  for (size_t s = 0; s < segs.size(); ++s) {
    const Segment& seg = segs[s];
    const bool shared = seg.cfg.kind == SegmentKind::kShared;
    const SegmentArgs args{seg.cfg, seg.table, seg.n_tensors, base, gscale_[s].data(),
                           shared ? task_scale_.data() : nullptr};
    double* sigma = seg.cfg.umm == Umm::kClippy && !sigma_[s].empty() ? sigma_[s].data()
                                                                      : nullptr;
    run(PassArgs{args, nullptr, sigma, nullptr, shared ? applied_.data() : &one}, Pass::kApply);
  }
  for (const Segment& seg : segs)
    for (int64_t t = 0; t < seg.n_tensors; ++t)
      *reinterpret_cast<float*>(seg.table[t * kTableCols + kTStep]) += 1.0f;
  return outcome;
}

}  // namespace pub_native::cpu
