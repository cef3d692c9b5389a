// CUDA layer of the PUB step, as seen from the host-compiled binding: device pointers, sizes
// and the stream; no framework type. Every call is asynchronous on `stream` and never
// synchronizes, so a whole step (hyper-parameters, Gram, solve, apply) can be captured in a
// CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pub_native/solver.h"
#include "pub_native/step.h"

namespace pub_native::cuda {

// Device buffers of one optimizer's shared part. Sizes: table n_tensors × kTableCols, items
// n_items × 3 (tensor, begin, end; ordered by tensor), hyper n_rows × kHyperCols, partial
// n_items × K·K (+ n_items × K for Clippy), sigma n_tensors × K, workspace
// solver_workspace_size(K) + K.
struct StepBuffers {
  const int64_t* table = nullptr;
  int64_t n_tensors = 0;
  const int64_t* items = nullptr;
  int64_t n_items = 0;
  double* hyper = nullptr;
  const void* grads = nullptr;
  double* partial = nullptr;
  double* G = nullptr;
  double* sigma = nullptr;
  double* alpha = nullptr;    // raw α of the last solve (warm start; zeros = cold)
  double* weights = nullptr;  // α̂ applied
  int32_t* status = nullptr;
  int32_t* iterations = nullptr;
  double* residual = nullptr;
  int32_t* skip = nullptr;    // set to 1 when the step must not be applied (non-finite input)
  double* workspace = nullptr;
};

// Per hyper row: the step counter it reads (float32 device scalar, before this step's
// increment) and its constants: lr, β1 (or momentum), β2 (or α), eps, weight decay,
// decoupled flag, lr_decay (8 doubles).
constexpr int kBaseCols = 8;
void pub_hyper(int32_t algo, const int64_t* step_ptrs, const double* base, int64_t n_rows,
               double* hyper, cudaStream_t stream);

// Resets skip, then the Gram pass and its deterministic reduction into G (and sigma).
void pub_gram(const StepConfig& cfg, const StepBuffers& b, cudaStream_t stream);
// Solves for α (warm-started from alpha) and writes α̂ to weights, on one warp; sets skip on a
// non-finite G and then leaves alpha and weights as they were.
void pub_solve(const StepConfig& cfg, const SolveOptions& options, bool normalize_sum,
               const StepBuffers& b, cudaStream_t stream);
// Reuse steps: resets skip, then sets it if any task gradient is non-finite.
void pub_check_rows(const StepConfig& cfg, const StepBuffers& b, cudaStream_t stream);
// Apply pass (skipped on the device when skip is set), then the per-tensor step counters
// (float32 device scalars at step_ptrs) advance by one unless skipped.
void pub_apply(const StepConfig& cfg, const StepBuffers& b, const int64_t* step_ptrs,
               cudaStream_t stream);

}  // namespace pub_native::cuda
