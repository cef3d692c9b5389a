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
// of tensor t, times its multiplier gscale[t·K + i] (null: 1), holds a NaN or Inf.
void find_nonfinite(const Segment& seg, const double* gscale, uint8_t* bad);

// Row K of the (K + 1) × P buffer `buf` (element type d) = Σ_i row i, summed in the math type in
// task order and rounded once: what a shared parameter's .grad holds after backward. Returns
// whether every sum was finite, which proves rows 0..K-1 finite (a NaN or Inf in a row makes
// its sum NaN or Inf); false may also mean a sum overflowed.
bool sum_rows(DType d, void* buf, int64_t K, int64_t P);

// For each tensor of a shared segment whose kTGradSum is set: the factor c with
// .grad ≈ c·Σ_i g_i (the sum recomputed exactly as sum_rows forms it), and whether .grad is no
// rescaling of it (edited). Tensors without kTGradSum get c = 1.
void rescale_factors(const Segment& seg, double* ratio, uint8_t* edited);

class Stepper {
 public:
  explicit Stepper(int64_t num_tasks);

  // Phase 1 (reads only). The per-tensor, per-task gradient multipliers: inv_scale ·
  // task_scale[i] · the rescale factor of the tensor's .grad (rescale_factors, for rows that name
  // their .grad); then, when `solve` or Clippy needs it, the Gram matrix G of the shared
  // segments' task updates (with Clippy's σ and the task gradients' squared norms), else a
  // finiteness pass over the task gradients; and a finiteness pass over the plain segments'
  // gradients. A task with task_scale 0 is absent from this batch: its row and column of G are
  // zero (so its weight is 0).
  // shared_finite: the shared segments' task gradients are known to be finite (sum_rows said so
  // and nothing wrote them since), so a step without a Gram pass skips their finiteness pass.
  void gram(const std::vector<Segment>& segs, const double* base, bool solve, double inv_scale,
            const double* task_scale, bool shared_finite = false);

  // Phase 2. Decides the outcome from found_inf and the flags of phase 1 (step_outcome); if the
  // step is applied: solves for α on solve steps (warm-started) and forms α̂, runs the apply
  // pass of every segment and advances the step counters. Returns the outcome; nothing is
  // written unless it is kApplied.
  int32_t finish(const std::vector<Segment>& segs, const double* base, bool solve,
                 const SolveOptions& options, bool normalize_sum, bool found_inf);

  int64_t num_tasks() const { return K_; }
  // The weights the last applied step used: α̂, with a task absent from its batch at 0 (and the
  // others renormalized). Meaningful once a step with shared segments was applied.
  const std::vector<double>& applied() const { return applied_; }

  // Phase 1 outputs (G may be replaced by a sum over processes before phase 2).
  std::vector<double> G;                     // K × K
  std::vector<uint8_t> bad_task;             // K: task gradient non-finite (shared segments)
  std::vector<std::vector<uint8_t>> bad_tensor;  // per segment: n_tensors × K flags
  std::vector<std::vector<uint8_t>> edited_tensor;  // per segment: n_tensors flags
  std::vector<double> task_sq;               // K: Σ ‖g_i‖² over the shared tensors (Gram steps)
  bool grad_nonfinite = false;               // some gradient is NaN/Inf
  bool update_nonfinite = false;             // G non-finite although the gradients are finite
  bool grad_edited = false;                  // some shared .grad was changed, not rescaled
  // Phase 1's outputs may be summed over processes before phase 2 (data parallelism: each
  // process saw a shard): G, task_sq, bad_task and the three flags above.

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
  std::vector<double> task_scale_;           // K, 1 when none was given
  std::vector<double> applied_;              // K: the weights the apply pass uses
  std::vector<double> workspace_;
  std::vector<double> fresh_;
};

}  // namespace pub_native::cpu
