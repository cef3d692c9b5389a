// CUDA layer of the PUB step: entry points, the hyper-parameter, solve, finiteness and step
// counter kernels, and dispatch to the per-optimizer translation units. Nothing here waits for
// the device.
#include "pub_step_cuda_impl.cuh"

namespace pub_native::cuda {
namespace {

using detail::check;
using detail::kThreads;

// Bias corrections from the device step counters (capturable: nothing comes from the host).
__global__ void hyper_kernel(int32_t algo, const int64_t* step_ptrs, const double* base,
                             int64_t n_rows, double* hyper) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= n_rows) return;
  const double t = static_cast<double>(*reinterpret_cast<const float*>(step_ptrs[r])) + 1.0;
  const double* c = base + r * kBaseCols;
  const double lr = c[0], b1 = c[1], b2 = c[2], eps = c[3], wd = c[4];
  const bool decoupled = c[5] != 0.0;
  double* h = hyper + r * kHyperCols;
  for (int k = 0; k < kHyperCols; ++k) h[k] = 0.0;
  h[kHEps] = eps;
  h[kHDecay] = 1.0;
  if (algo == static_cast<int32_t>(Algorithm::kAdam)) {
    h[kHStepSize] = lr / (1.0 - pow(b1, t));
    h[kHBeta1] = b1;
    h[kHBeta2] = b2;
    h[kHWeightDecay] = decoupled ? 0.0 : wd;
    h[kHDecay] = decoupled ? 1.0 - lr * wd : 1.0;
    h[kHBc2Sqrt] = 1.0 / sqrt(1.0 - pow(b2, t));
    h[kHOneMinusBeta1] = 1.0 - b1;
    h[kHOneMinusBeta2] = 1.0 - b2;
  } else if (algo == static_cast<int32_t>(Algorithm::kAdaGrad)) {
    h[kHStepSize] = lr / (1.0 + (t - 1.0) * c[6]);
    h[kHWeightDecay] = wd;
  } else {
    h[kHStepSize] = lr;
    h[kHBeta1] = b1;  // momentum
    h[kHBeta2] = b2;  // α
    h[kHWeightDecay] = wd;
    h[kHOneMinusBeta2] = 1.0 - b2;
  }
}

// One warp: α from the Gram matrix, warm-started from the previous α, then α̂.
__global__ void solve_kernel(int K, SolveOptions options, bool normalize_sum, const double* G,
                             double* alpha, double* weights, int32_t* status,
                             int32_t* iterations, double* residual, int32_t* skip,
                             double* ws) {
  const WarpTeam team;
  double* fresh = ws + solver_workspace_size(K);
  const SolveOutcome out = solve_weights(team, G, alpha, fresh, K, options, ws);
  team.sync();
  if (team.rank() == 0) {
    *status = out.status;
    *iterations = out.iterations;
    *residual = out.residual;
    if (out.status == kInvalidInput) *skip = 1;
  }
  if (out.status == kInvalidInput) return;  // uniform over the warp
  double total = 0.0;
  for (int i = 0; i < K; ++i) total += fresh[i];
  const bool usable = total > 0.0 && pn_isfinite(total);
  for (int i = team.rank(); i < K; i += 32) {
    if (usable) {
      alpha[i] = fresh[i];
      weights[i] = normalize_sum ? fresh[i] / total : fresh[i];
    } else {
      weights[i] = 1.0 / K;  // every update is zero: uniform weights, as on the CPU
    }
  }
}

template <class Tp>
__global__ void check_rows_kernel(const Tp* grads, int64_t n, int32_t* skip) {
  using T = typename MathType<Tp>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  bool bad = false;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += stride) {
    const T x = to_math<T>(grads[j]);
    bad |= !pn_isfinite_t(x);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *skip = 1;
}

__global__ void steps_kernel(const int64_t* step_ptrs, int64_t n, const int32_t* skip) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n || *skip) return;
  *reinterpret_cast<float*>(step_ptrs[i]) += 1.0f;
}

unsigned blocks_for(int64_t n, int64_t per_block, int64_t cap) {
  int64_t b = (n + per_block - 1) / per_block;
  if (b < 1) b = 1;
  return static_cast<unsigned>(b < cap ? b : cap);
}

void run(const StepConfig& cfg, const StepBuffers& b, bool gram, cudaStream_t stream) {
  switch (cfg.algo) {
    case Algorithm::kAdam: return detail::run_adam(cfg, b, gram, stream);
    case Algorithm::kAdaGrad: return detail::run_adagrad(cfg, b, gram, stream);
    case Algorithm::kRMSProp: return detail::run_rmsprop(cfg, b, gram, stream);
  }
}

void check_config(const StepConfig& cfg) {
  if (cfg.num_tasks < 1 || cfg.num_tasks > detail::kMaxTasks)
    throw std::invalid_argument("pub_native CUDA: the number of tasks must be in 1.." +
                                std::to_string(detail::kMaxTasks));
}

}  // namespace

void pub_hyper(int32_t algo, const int64_t* step_ptrs, const double* base, int64_t n_rows,
               double* hyper, cudaStream_t stream) {
  if (n_rows == 0) return;
  hyper_kernel<<<blocks_for(n_rows, 128, 1 << 20), 128, 0, stream>>>(algo, step_ptrs, base,
                                                                      n_rows, hyper);
  check(cudaGetLastError(), "hyper kernel launch");
}

void pub_gram(const StepConfig& cfg, const StepBuffers& b, cudaStream_t stream) {
  check_config(cfg);
  check(cudaMemsetAsync(b.skip, 0, sizeof(int32_t), stream), "reset skip flag");
  const int K = static_cast<int>(cfg.num_tasks);
  if (b.n_items > 0) {
    run(cfg, b, true, stream);
    check(cudaGetLastError(), "Gram kernel launch");
    const int threads = 128;
    const unsigned grid = static_cast<unsigned>((K * K + threads - 1) / threads);
    if (cfg.umm == Umm::kClippy)
      detail::gram_reduce_kernel<true><<<grid, threads, 0, stream>>>(K, b.items, b.n_items,
                                                                      b.partial, b.G, b.sigma);
    else
      detail::gram_reduce_kernel<false><<<grid, threads, 0, stream>>>(K, b.items, b.n_items,
                                                                       b.partial, b.G, b.sigma);
    check(cudaGetLastError(), "Gram reduction launch");
  } else {
    check(cudaMemsetAsync(b.G, 0, sizeof(double) * K * K, stream), "zero G");
  }
}

void pub_solve(const StepConfig& cfg, const SolveOptions& options, bool normalize_sum,
               const StepBuffers& b, cudaStream_t stream) {
  check_config(cfg);
  solve_kernel<<<1, 32, 0, stream>>>(static_cast<int>(cfg.num_tasks), options, normalize_sum,
                                     b.G, b.alpha, b.weights, b.status, b.iterations,
                                     b.residual, b.skip, b.workspace);
  check(cudaGetLastError(), "solve kernel launch");
}

void pub_check_rows(const StepConfig& cfg, const StepBuffers& b, cudaStream_t stream) {
  check_config(cfg);
  check(cudaMemsetAsync(b.skip, 0, sizeof(int32_t), stream), "reset skip flag");
  const int64_t n = cfg.num_tasks * cfg.row_length;
  if (n == 0) return;
  const unsigned grid = blocks_for(n, kThreads * 8, 4096);
  switch (cfg.dtype) {
    case kFloat32:
      check_rows_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(b.grads), n,
                                                        b.skip);
      break;
    case kBFloat16:
      check_rows_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const bf16_t*>(b.grads), n,
                                                        b.skip);
      break;
    case kFloat16:
      check_rows_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const half_t*>(b.grads), n,
                                                        b.skip);
      break;
    default:
      throw std::invalid_argument("pub_native CUDA: unsupported gradient dtype");
  }
  check(cudaGetLastError(), "finiteness check launch");
}

void pub_apply(const StepConfig& cfg, const StepBuffers& b, const int64_t* step_ptrs,
               cudaStream_t stream) {
  check_config(cfg);
  if (b.n_items > 0) {
    run(cfg, b, false, stream);
    check(cudaGetLastError(), "apply kernel launch");
  }
  if (step_ptrs != nullptr && b.n_tensors > 0) {
    steps_kernel<<<blocks_for(b.n_tensors, 128, 1 << 20), 128, 0, stream>>>(step_ptrs,
                                                                            b.n_tensors, b.skip);
    check(cudaGetLastError(), "step counter launch");
  }
}

}  // namespace pub_native::cuda
