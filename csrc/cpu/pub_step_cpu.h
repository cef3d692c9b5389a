// CPU backend of the PUB step: the whole step of one optimizer in two calls (the Gram phase,
// then the decision, weight solve and apply phase), so that a caller can sum the Gram over
// processes in between. The loops only do addressing; the math is in the framework-free
// headers (update_rules.h, hyper.h, solver.h) and the decisions in step.h.
#pragma once

#include <cstdint>
#include <vector>

#include "pub_native/solver.h"
#include "pub_native/step.h"

namespace pub_native::cpu {

// One segment of the plan: tensors that share a kernel configuration.
struct Segment {
  StepConfig cfg;
  const int64_t* table;  // n_tensors × kTableCols
  int64_t n_tensors;
};

// A finiteness pass over the gradients of a segment: bad[t·K + i] = 1 when task i's gradient
// of tensor t holds a NaN or Inf.
void find_nonfinite(const Segment& seg, uint8_t* bad);

class Stepper {
 public:
  explicit Stepper(int64_t num_tasks);

  // Phase 1 (reads only). The per-tensor, per-task gradient multipliers (inv_scale · task_scale
  // [i]); then, when `solve` or Clippy needs it, the Gram matrix G of the shared segments' task
  // updates (with Clippy's σ), else a finiteness pass over the task gradients; and a finiteness
  // pass over the plain segments' gradients.
  void gram(const std::vector<Segment>& segs, const double* base, bool solve, double inv_scale,
            const double* task_scale);

  // Phase 2. Decides the outcome from found_inf and the flags of phase 1 (step_outcome); if the
  // step is applied: solves for α on solve steps (warm-started) and forms α̂, runs the apply
  // pass of every segment and advances the step counters. Returns the outcome; nothing is
  // written unless it is kApplied.
  int32_t finish(const std::vector<Segment>& segs, const double* base, bool solve,
                 const SolveOptions& options, bool normalize_sum, bool found_inf);

  int64_t num_tasks() const { return K_; }

  // Phase 1 outputs (G may be replaced by a sum over processes before phase 2).
  std::vector<double> G;                     // K × K
  std::vector<uint8_t> bad_task;             // K: task gradient non-finite (shared segments)
  std::vector<std::vector<uint8_t>> bad_tensor;  // per segment: n_tensors × K flags
  bool update_nonfinite = false;             // G non-finite although the gradients are finite

  // Weights: α̂ in use and the raw α of the last usable solve (warm start).
  std::vector<double> weights;
  std::vector<double> alpha;
  bool has_weights = false;
  bool has_alpha = false;

  // Last solve and last step.
  int32_t status = kConverged;
  int32_t iterations = 0;
  double residual = 0.0;
  double solve_time = 0.0;  // seconds
  int32_t outcome = kApplied;

 private:
  int64_t K_;
  std::vector<std::vector<double>> sigma_;   // per segment: Clippy σ, n_tensors × K
  std::vector<std::vector<double>> gscale_;  // per segment: gradient multipliers, n_tensors × K
  std::vector<double> workspace_;
  std::vector<double> fresh_;
};

}  // namespace pub_native::cpu
