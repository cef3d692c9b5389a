// CUDA backend of the PUB step, as seen from the host-compiled binding: device pointers, sizes
// and the stream; no framework type. The step has the CPU backend's two phases (gram, then
// finish), every call is asynchronous on `stream` and nothing waits for the device, so a whole
// step can be captured in a CUDA graph. The decisions (skip, solve, weights) are taken on the
// device by the same header functions as on the CPU (step.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "pub_native/solver.h"
#include "pub_native/step.h"

namespace pub_native::cuda {

// Device buffers of one segment. table: n_tensors × kTableCols; items: n_items × 3 (tensor,
// begin, end), ordered by tensor, chunks of at most kGramChunk elements; partial: n_items ×
// (K·K + 2K + 3); sigma, gscale, bad: n_tensors × K; ratio, edited: n_tensors.
struct DeviceSegment {
  StepConfig cfg;
  const int64_t* table = nullptr;
  int64_t n_tensors = 0;
  const int64_t* items = nullptr;
  int64_t n_items = 0;
  double* partial = nullptr;
  double* sigma = nullptr;
  double* gscale = nullptr;
  int32_t* bad = nullptr;
  double* ratio = nullptr;   // rescale factor of each tensor's .grad (shared segments)
  int32_t* edited = nullptr; // 1 where a shared .grad was changed, not rescaled
};

// Indices into DeviceStep::flags.
enum StepFlag : int32_t {
  kFlagHasWeights = 0,    // weights hold an α̂ (a solve was applied)
  kFlagHasAlpha = 1,      // alpha holds a usable α (the warm start)
  kFlagOutcome = 2,       // StepOutcome of the last step
  kFlagStatus = 3,        // SolveStatus of the last solve
  kFlagIterations = 4,    // iterations of the last solve
  kFlagGradNonFinite = 5, // phase 1 found a NaN/Inf gradient
  kFlagGradEdited = 6,    // phase 1 found a shared .grad changed in a way that is no rescaling
  kFlagStickyError = 7,   // the outcome of a step skipped for an error since the host last
                          // read it (not GradScaler skips): kept until the host resets it
  kFlagCount = 8,
};

// Device buffers of one optimizer's step.
struct DeviceStep {
  int64_t num_tasks = 0;
  const double* base = nullptr;      // n_groups × kBaseCols
  double* G = nullptr;               // K × K
  double* alpha = nullptr;           // K
  double* weights = nullptr;         // K (α̂ in use; 1/K before the first solve)
  double* applied = nullptr;         // K: the weights this step applies (absent tasks 0)
  double* task_sq = nullptr;         // K: Σ ‖g_i‖² over the shared tensors (Gram steps)
  int32_t* flags = nullptr;          // kFlagCount
  double* residual = nullptr;        // 1
  double* workspace = nullptr;       // solver_workspace_size(K) + K
  const float* grad_scale = nullptr;   // GradScaler's scale (device scalar), or null
  const double* task_scale = nullptr; // K: 0 marks a task absent from this batch; or null
  float* found_inf = nullptr;        // GradScaler's found_inf (device scalar), or null: read to
                                     // skip, and set when this step finds a NaN/Inf itself
};

// Phase 1 (reads only): the rescale factors of the shared tensors whose .grad the table names,
// gradient multipliers, the Gram matrix of the shared segments on solve steps (or with Clippy;
// absent tasks' rows and columns zero) else a finiteness pass over their task gradients, and a
// finiteness pass over the plain segments' gradients.
void gram(const std::vector<DeviceSegment>& segs, const DeviceStep& d, bool solve,
          cudaStream_t stream);

// Phase 2: the outcome (step_outcome), on solve steps the weights (one warp), then the apply
// pass of every segment and the step counters, all skipped on the device unless applied.
void finish(const std::vector<DeviceSegment>& segs, const DeviceStep& d, bool solve,
            const SolveOptions& options, bool normalize_sum, cudaStream_t stream);

// Row K of the (K + 1) × P device buffer = Σ_i row i (math type, task order, one rounding).
void sum_rows(DType d, void* buf, int64_t K, int64_t P, cudaStream_t stream);

}  // namespace pub_native::cuda
