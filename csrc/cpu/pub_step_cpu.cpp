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
void find_nonfinite_typed(const Segment& seg, uint8_t* bad) {
  using T = typename MathType<Tp>::type;
  const int64_t K = seg.cfg.num_tasks;
  const std::vector<Item> items = detail::make_items(seg.table, seg.n_tensors);
  const int64_t n_items = static_cast<int64_t>(items.size());
  // One flag per item and task, OR-ed per tensor afterwards: no two threads write one byte.
  std::vector<uint8_t> item_bad(static_cast<size_t>(n_items * K), 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(detail::team_size(n_items))
  for (int64_t it = 0; it < n_items; ++it) {
    const Item item = items[static_cast<size_t>(it)];
    const int64_t* row = seg.table + item.tensor * kTableCols;
    const Tp* g = reinterpret_cast<const Tp*>(row[kTGrad]);
    for (int64_t i = 0; i < K; ++i) {
      const Tp* gi = g + i * seg.cfg.grad_task_stride;
      // x − x is 0 for finite x and NaN otherwise; an integer OR keeps the loop vectorizable.
      int flag = 0;
      for (int64_t j = item.begin; j < item.end; ++j) {
        const T x = to_math<T>(gi[j]);
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
  uint8_t* bad;
  template <class Tp>
  void operator()() const {
    find_nonfinite_typed<Tp>(seg, bad);
  }
};

bool all_finite(const std::vector<double>& v) {
  for (double x : v)
    if (!pn_isfinite(x)) return false;
  return true;
}

}  // namespace

void find_nonfinite(const Segment& seg, uint8_t* bad) {
  detail::dispatch_dtype(seg.cfg.dtype, FiniteDispatch{seg, bad});
}

Stepper::Stepper(int64_t num_tasks)
    : G(static_cast<size_t>(num_tasks * num_tasks), 0.0),
      bad_task(static_cast<size_t>(num_tasks), 0),
      weights(static_cast<size_t>(num_tasks), 1.0 / static_cast<double>(num_tasks)),
      alpha(static_cast<size_t>(num_tasks), 0.0),
      K_(num_tasks),
      workspace_(static_cast<size_t>(solver_workspace_size(num_tasks))),
      fresh_(static_cast<size_t>(num_tasks)) {
  if (num_tasks < 1) throw std::invalid_argument("num_tasks must be >= 1");
}

void Stepper::gram(const std::vector<Segment>& segs, const double* base, bool solve,
                   double inv_scale, const double* task_scale) {
  const size_t n = segs.size();
  sigma_.resize(n);
  gscale_.resize(n);
  bad_tensor.resize(n);
  std::fill(G.begin(), G.end(), 0.0);
  std::fill(bad_task.begin(), bad_task.end(), 0);
  update_nonfinite = false;
  std::vector<double> Gs(static_cast<size_t>(K_ * K_));
  bool any_gram = false;
  for (size_t s = 0; s < n; ++s) {
    const Segment& seg = segs[s];
    const int64_t K = seg.cfg.num_tasks;
    const bool shared = seg.cfg.kind == SegmentKind::kShared;
    if (shared && K != K_) throw std::invalid_argument("a shared segment has the wrong K");
    std::vector<double>& gs = gscale_[s];
    gs.assign(static_cast<size_t>(seg.n_tensors * K), inv_scale);
    if (shared && task_scale)
      for (int64_t t = 0; t < seg.n_tensors; ++t)
        for (int64_t i = 0; i < K; ++i) gs[static_cast<size_t>(t * K + i)] *= task_scale[i];
    bad_tensor[s].assign(static_cast<size_t>(seg.n_tensors * K), 0);
    const SegmentArgs args{seg.cfg, seg.table, seg.n_tensors, base, gs.data()};
    if (shared && (solve || seg.cfg.umm == Umm::kClippy)) {
      sigma_[s].assign(static_cast<size_t>(seg.n_tensors * K), 1.0);
      run(PassArgs{args, Gs.data(), sigma_[s].data(), nullptr}, Pass::kGram);
      for (size_t e = 0; e < Gs.size(); ++e) G[e] += Gs[e];
      any_gram = true;
    } else {
      sigma_[s].clear();
      find_nonfinite(seg, bad_tensor[s].data());
    }
  }
  if (any_gram && !all_finite(G)) {
    // Attribute the failure: NaN/Inf gradients, or finite gradients whose updates overflow.
    for (size_t s = 0; s < n; ++s)
      if (segs[s].cfg.kind == SegmentKind::kShared && !sigma_[s].empty())
        find_nonfinite(segs[s], bad_tensor[s].data());
    update_nonfinite = true;
  }
  for (size_t s = 0; s < n; ++s) {
    if (segs[s].cfg.kind != SegmentKind::kShared) continue;
    for (int64_t t = 0; t < segs[s].n_tensors; ++t)
      for (int64_t i = 0; i < K_; ++i) bad_task[static_cast<size_t>(i)] |= bad_tensor[s][static_cast<size_t>(t * K_ + i)];
  }
}

int32_t Stepper::finish(const std::vector<Segment>& segs, const double* base, bool solve,
                        const SolveOptions& options, bool normalize_sum, bool found_inf) {
  if (segs.size() != gscale_.size())
    throw std::invalid_argument("finish() needs the segments of the preceding gram()");
  bool grad_nonfinite = false;
  for (const auto& flags : bad_tensor)
    for (uint8_t f : flags) grad_nonfinite = grad_nonfinite || f != 0;
  // G may have been summed over processes since phase 1: its finiteness decides again.
  const bool update_bad = (update_nonfinite || (solve && !all_finite(G))) && !grad_nonfinite;
  outcome = step_outcome(found_inf, false, grad_nonfinite, update_bad);
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

  const double one = 1.0;
  for (size_t s = 0; s < segs.size(); ++s) {
    const Segment& seg = segs[s];
    const bool shared = seg.cfg.kind == SegmentKind::kShared;
    const SegmentArgs args{seg.cfg, seg.table, seg.n_tensors, base, gscale_[s].data()};
    const double* sigma = seg.cfg.umm == Umm::kClippy && !sigma_[s].empty() ? sigma_[s].data()
                                                                            : nullptr;
    run(PassArgs{args, nullptr, const_cast<double*>(sigma), shared ? weights.data() : &one},
        Pass::kApply);
  }
  for (const Segment& seg : segs)
    for (int64_t t = 0; t < seg.n_tensors; ++t)
      *reinterpret_cast<float*>(seg.table[t * kTableCols + kTStep]) += 1.0f;
  return outcome;
}

}  // namespace pub_native::cpu
