// CUDA backend of the PUB step: the two phases (gram, finish), the small kernels around the
// per-optimizer passes (gradient multipliers, Gram reduction, finiteness, the decision and
// weight solve, step counters) and dispatch to the per-optimizer translation units. Nothing here
// waits for the device.
#include "pub_step_cuda_impl.cuh"

namespace pub_native::cuda {
namespace {

using detail::check;
using detail::kThreads;
using detail::LaunchArgs;
using detail::Pass;

unsigned blocks_for(int64_t n, int64_t per_block, int64_t cap) {
  int64_t b = (n + per_block - 1) / per_block;
  if (b < 1) b = 1;
  if (b > cap) b = cap;
  return static_cast<unsigned>(b);
}

void run(const LaunchArgs& a, Pass pass) {
  switch (a.seg.cfg.algo) {
    case Algorithm::kAdam: return detail::run_adam(a, pass);
    case Algorithm::kAdaGrad: return detail::run_adagrad(a, pass);
    case Algorithm::kRMSProp: return detail::run_rmsprop(a, pass);
  }
}

// gscale[t·K + i] = (1 / grad_scale) · task_scale[i] · ratio[t]: the unscaling of the task
// gradients, absent tasks, and the rescaling of the tensor's .grad since backward.
__global__ void gscale_kernel(int64_t n_tensors, int K, bool shared, const float* grad_scale,
                              const double* task_scale, const double* ratio, double* gscale) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= n_tensors * K) return;
  double s = grad_scale ? 1.0 / static_cast<double>(*grad_scale) : 1.0;
  if (shared && task_scale) s *= task_scale[e % K];
  if (shared) s *= ratio[e / K];
  gscale[e] = s;
}

// One block per work item: the item's RescaleTerms (6 doubles), for a tensor whose table row
// names its .grad m (kTGradSum), with s = Σ_i g_i formed exactly as sum_rows forms it.
template <class Tp>
__global__ void rescale_partial_kernel(const int64_t* table, const int64_t* items, int K,
                                       int64_t task_stride, RescaleSlack slack, double* partial) {
  __shared__ double shared[detail::kWarps];
  const int64_t it = blockIdx.x;
  const int64_t tensor = items[3 * it], begin = items[3 * it + 1], end = items[3 * it + 2];
  const int64_t* row = table + tensor * kTableCols;
  double* out = partial + it * kRescaleTerms;
  if (row[kTGradSum] == 0) {
    if (threadIdx.x == 0) {
      const RescaleTerms none = rescale_terms_empty();
      out[0] = none.ms, out[1] = none.ss, out[2] = none.mm;
      out[3] = none.lo, out[4] = none.hi;
    }
    return;  // uniform over the block
  }
  const Tp* g = reinterpret_cast<const Tp*>(row[kTGrad]);
  const Tp* m = reinterpret_cast<const Tp*>(row[kTGradSum]);
  RescaleTerms t = rescale_terms_empty();
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x)
    add_rescale_terms(g, m, K, task_stride, j, slack, t);
  const double ms = detail::block_sum(t.ms, shared);
  const double ss = detail::block_sum(t.ss, shared);
  const double mm = detail::block_sum(t.mm, shared);
  const double lo = -detail::block_min(-t.lo, shared);
  const double hi = detail::block_min(t.hi, shared);
  if (threadIdx.x == 0) {
    out[0] = ms, out[1] = ss, out[2] = mm;
    out[3] = lo, out[4] = hi;
  }
}

// One thread: the items in order, per tensor: the rescale factor and the edited flags.
__global__ void rescale_reduce_kernel(const int64_t* table, const int64_t* items,
                                      int64_t n_items, int64_t n_tensors, double tol,
                                      const double* partial, double* ratio,
                                      int32_t* edited, int32_t* flags) {
  int64_t it = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    RescaleTerms terms = rescale_terms_empty();
    for (; it < n_items && items[3 * it] == t; ++it) {
      const double* p = partial + it * kRescaleTerms;
      merge_rescale_terms(terms, RescaleTerms{p[0], p[1], p[2], p[3], p[4]});
    }
    bool ed = false;
    // A row without its .grad to compare (a tensor of no elements, or no rescan) shows no
    // factor: NaN, which share_rescale_factor fills (with 1 where no row shows one).
    ratio[t] = table[t * kTableCols + kTGradSum] != 0
                   ? rescale_factor(terms, tol, &ed)
                   : pn_bits_double(0x7ff8000000000000ULL);
    edited[t] = ed ? 1 : 0;
    if (ed) flags[kFlagGradEdited] = 1;
  }
  share_rescale_factor(ratio, edited, n_tensors, tol);
}

// A task absent from this batch: no row or column in G, so its weight is 0.
__global__ void absent_kernel(int K, const double* task_scale, double* G) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= K * K) return;
  if (task_scale[e / K] == 0.0 || task_scale[e % K] == 0.0) G[e] = 0.0;
}

template <class Tp>
__global__ void sum_rows_kernel(Tp* buf, int64_t K, int64_t P) {
  using T = typename MathType<Tp>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < P;
       j += stride) {
    T s = T(0);
    for (int64_t i = 0; i < K; ++i) s += to_math<T>(buf[i * P + j]);
    buf[K * P + j] = from_math<Tp>(s);
  }
}

// One thread per Gram entry (i ≥ k): the segment's items in order, per tensor (Clippy scales
// each tensor's block by σ_i σ_k); the total is added to G (segments accumulate).
template <bool kClippy>
__global__ void gram_reduce_kernel(int K, const int64_t* items, int64_t n_items,
                                   const double* partial, double* G, double* sigma,
                                   double* task_sq) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= K * K) return;
  const int i = e / K, k = e % K;
  if (k > i) return;
  const double* mins = partial + n_items * K * K;
  if (i == k) {
    const double* sqs = partial + n_items * (K * K + K);
    double sq = 0.0;
    for (int64_t it = 0; it < n_items; ++it) sq += sqs[it * K + i];
    task_sq[i] += sq;
  }
  double total = 0.0;
  int64_t it = 0;
  while (it < n_items) {
    const int64_t tensor = items[3 * it];
    double block = 0.0, mi = INFINITY, mk = INFINITY;
    for (; it < n_items && items[3 * it] == tensor; ++it) {
      block += partial[it * K * K + i * K + k];
      if constexpr (kClippy) {
        mi = pn_min(mi, mins[it * K + i]);
        mk = pn_min(mk, mins[it * K + k]);
      }
    }
    if constexpr (kClippy) {
      // σ = min(1, min ratio); a NaN ratio stays NaN so the Gram stays non-finite.
      const double si = mi < 1.0 ? mi : (mi >= 1.0 ? 1.0 : mi);
      const double sk = mk < 1.0 ? mk : (mk >= 1.0 ? 1.0 : mk);
      if (i == k) sigma[tensor * K + i] = si;
      block *= si * sk;
    }
    total += block;
  }
  G[i * K + k] += total;
  if (i != k) G[k * K + i] = G[i * K + k];
}

// One block per work item: bad[t·K + i] = 1 when task i's gradient of the item's tensor, times
// its multiplier gscale[t·K + i] (as the passes see it), holds a NaN or Inf, and the step's grad
// flag. With `gate`, only when the K×K gate is non-finite (the attribution pass after a
// non-finite Gram matrix costs nothing otherwise).
template <class Tp>
__global__ void check_kernel(const int64_t* table, const int64_t* items, int K,
                             int64_t task_stride, const double* gscale, const double* gate,
                             int32_t* bad, int32_t* flags) {
  using T = typename MathType<Tp>::type;
  if (gate) {
    bool finite = true;
    for (int e = 0; e < K * K; ++e) finite = finite && pn_isfinite(gate[e]);
    if (finite) return;  // uniform over the block
  }
  const int64_t it = blockIdx.x;
  const int64_t tensor = items[3 * it], begin = items[3 * it + 1], end = items[3 * it + 2];
  const Tp* g = reinterpret_cast<const Tp*>(table[tensor * kTableCols + kTGrad]);
  for (int i = 0; i < K; ++i) {
    const T mult = static_cast<T>(gscale[tensor * K + i]);
    bool nonfinite = false;
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x)
      nonfinite |= !pn_isfinite_t(mult * to_math<T>(g[i * task_stride + j]));
    if (__syncthreads_or(nonfinite) && threadIdx.x == 0) {
      bad[tensor * K + i] = 1;
      flags[kFlagGradNonFinite] = 1;
    }
  }
}

// One warp: the outcome, then on applied solve steps α (warm-started) and α̂.
__global__ void finish_kernel(int K, bool solve, SolveOptions options, bool normalize_sum,
                              DeviceStep d) {
  const WarpTeam team;
  const bool found = d.found_inf && *d.found_inf != 0.0f;
  const bool grad_bad = d.flags[kFlagGradNonFinite] != 0;
  const bool edited = d.flags[kFlagGradEdited] != 0;
  // G is checked on every step, also where this process formed none of it (an empty shard
  // under data parallelism: the all-reduced G of the others decides here too, as on the CPU;
  // G is zeroed at each step, so a step without a Gram pass finds it finite).
  bool gram_bad = false;
  for (int e = 0; e < K * K; ++e) gram_bad = gram_bad || !pn_isfinite(d.G[e]);
  const int32_t outcome = step_outcome(found, edited, grad_bad, gram_bad && !grad_bad);
  if (team.rank() == 0) {
    d.flags[kFlagOutcome] = outcome;
    // Under a GradScaler a non-finite gradient is the scaler's overflow: skipped, not an error.
    if (d.found_inf && outcome == kNonFiniteGrad) *d.found_inf = 1.0f;
    // An error the host must report when it next reads (no synchronization here); an update
    // that overflows from finite gradients is one under a GradScaler too, as on the CPU.
    if (outcome == kGradEdited || outcome == kNonFiniteUpdate ||
        (!d.found_inf && outcome == kNonFiniteGrad))
      d.flags[kFlagStickyError] = outcome;
  }
  if (outcome != kApplied) return;  // uniform over the warp
  if (!solve) {
    if (team.rank() == 0) step_weights(d.weights, d.task_scale, K, normalize_sum, d.applied);
    return;
  }
  double* fresh = d.workspace + solver_workspace_size(K);
  const double* warm = d.flags[kFlagHasAlpha] ? d.alpha : nullptr;
  const SolveOutcome out = solve_weights(team, d.G, warm, fresh, K, options, d.workspace);
  team.sync();
  if (team.rank() == 0) {
    d.flags[kFlagStatus] = out.status;
    d.flags[kFlagIterations] = out.iterations;
    *d.residual = out.residual;
    if (finalize_weights(fresh, K, normalize_sum, d.weights)) {
      for (int i = 0; i < K; ++i) d.alpha[i] = fresh[i];
      d.flags[kFlagHasAlpha] = 1;
    }
    d.flags[kFlagHasWeights] = 1;
    step_weights(d.weights, d.task_scale, K, normalize_sum, d.applied);
  }
}

__global__ void steps_kernel(const int64_t* table, int64_t n_tensors, const int32_t* flags) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n_tensors || flags[kFlagOutcome] != kApplied) return;
  *reinterpret_cast<float*>(table[t * kTableCols + kTStep]) += 1.0f;
}

void check_segment(const DeviceSegment& s, const DeviceStep& d) {
  if (s.cfg.kind == SegmentKind::kShared && s.cfg.num_tasks != d.num_tasks)
    throw std::invalid_argument("pub_native CUDA: a shared segment has the wrong K");
  if (s.cfg.num_tasks > kCudaMaxTasks)
    throw std::invalid_argument("pub_native CUDA: at most 32 tasks");
  if (s.cfg.dtype == kFloat64)
    throw std::invalid_argument("pub_native CUDA: parameters must be float32, bfloat16 or "
                                "float16");
}

void launch_check(const DeviceSegment& s, const double* gate, const DeviceStep& d,
                  cudaStream_t stream) {
  const int K = static_cast<int>(s.cfg.num_tasks);
  const unsigned grid = detail::grid_of(s.n_items);
  switch (s.cfg.dtype) {
    case kFloat32:
      check_kernel<float><<<grid, kThreads, 0, stream>>>(s.table, s.items, K,
                                                         s.cfg.grad_task_stride, s.gscale, gate, s.bad,
                                                         d.flags);
      break;
    case kBFloat16:
      check_kernel<bf16_t><<<grid, kThreads, 0, stream>>>(s.table, s.items, K,
                                                          s.cfg.grad_task_stride, s.gscale, gate, s.bad,
                                                          d.flags);
      break;
    case kFloat16:
      check_kernel<half_t><<<grid, kThreads, 0, stream>>>(s.table, s.items, K,
                                                          s.cfg.grad_task_stride, s.gscale, gate, s.bad,
                                                          d.flags);
      break;
    default:
      throw std::invalid_argument("pub_native CUDA: unsupported gradient dtype");
  }
  check(cudaGetLastError(), "finiteness check launch");
}

void launch_rescale(const DeviceSegment& s, cudaStream_t stream) {
  const int K = static_cast<int>(s.cfg.num_tasks);
  const RescaleSlack slack = rescale_slack(s.cfg.dtype);
  // s.partial holds K·K + 2K + 3 ≥ kRescaleTerms doubles per item (K ≥ 1).
  const unsigned grid = detail::grid_of(s.n_items);
  switch (s.cfg.dtype) {
    case kFloat32:
      rescale_partial_kernel<float><<<grid, kThreads, 0, stream>>>(
          s.table, s.items, K, s.cfg.grad_task_stride, slack, s.partial);
      break;
    case kBFloat16:
      rescale_partial_kernel<bf16_t><<<grid, kThreads, 0, stream>>>(
          s.table, s.items, K, s.cfg.grad_task_stride, slack, s.partial);
      break;
    case kFloat16:
      rescale_partial_kernel<half_t><<<grid, kThreads, 0, stream>>>(
          s.table, s.items, K, s.cfg.grad_task_stride, slack, s.partial);
      break;
    default:
      throw std::invalid_argument("pub_native CUDA: unsupported gradient dtype");
  }
  check(cudaGetLastError(), "rescale launch");
}

bool gram_runs(const DeviceSegment& s, bool solve) {
  return s.cfg.kind == SegmentKind::kShared && (solve || s.cfg.umm == Umm::kClippy);
}

}  // namespace

void gram(const std::vector<DeviceSegment>& segs, const DeviceStep& d, bool solve,
          cudaStream_t stream) {
  const int64_t K = d.num_tasks;
  check(cudaMemsetAsync(d.G, 0, sizeof(double) * K * K, stream), "zero G");
  check(cudaMemsetAsync(d.task_sq, 0, sizeof(double) * K, stream), "zero task norms");
  check(cudaMemsetAsync(d.flags + kFlagGradNonFinite, 0, 2 * sizeof(int32_t), stream),
        "reset flags");
  for (const DeviceSegment& s : segs) {
    check_segment(s, d);
    const int Ks = static_cast<int>(s.cfg.num_tasks);
    const bool shared = s.cfg.kind == SegmentKind::kShared;
    check(cudaMemsetAsync(s.bad, 0, sizeof(int32_t) * s.n_tensors * Ks, stream), "zero flags");
    if (s.n_tensors == 0) continue;
    if (shared) {
      if (s.n_items > 0) launch_rescale(s, stream);
      rescale_reduce_kernel<<<1, 1, 0, stream>>>(s.table, s.items, s.n_items, s.n_tensors,
                                                 grad_rescale_tolerance(s.cfg.dtype), s.partial,
                                                 s.ratio, s.edited, d.flags);
      check(cudaGetLastError(), "rescale reduction launch");
    }
    gscale_kernel<<<blocks_for(s.n_tensors * Ks, 256, 1 << 20), 256, 0, stream>>>(
        s.n_tensors, Ks, shared, d.grad_scale, d.task_scale, s.ratio, s.gscale);
    check(cudaGetLastError(), "gscale launch");
    if (s.n_items == 0) continue;
    if (gram_runs(s, solve)) {
      run(LaunchArgs{s, d, stream}, Pass::kGram);
      check(cudaGetLastError(), "Gram kernel launch");
      const unsigned rb = static_cast<unsigned>((Ks * Ks + 63) / 64);
      if (s.cfg.umm == Umm::kClippy)
        gram_reduce_kernel<true><<<rb, 64, 0, stream>>>(Ks, s.items, s.n_items, s.partial, d.G,
                                                        s.sigma, d.task_sq);
      else
        gram_reduce_kernel<false><<<rb, 64, 0, stream>>>(Ks, s.items, s.n_items, s.partial,
                                                         d.G, s.sigma, d.task_sq);
      check(cudaGetLastError(), "Gram reduction launch");
    } else {
      launch_check(s, nullptr, d, stream);
    }
  }
  if (d.task_scale) {
    absent_kernel<<<static_cast<unsigned>((K * K + 63) / 64), 64, 0, stream>>>(
        static_cast<int>(K), d.task_scale, d.G);
    check(cudaGetLastError(), "absent tasks launch");
  }
  // After a non-finite Gram matrix: which task gradients were NaN/Inf (else the updates
  // overflowed). The kernels return at once when G is finite.
  for (const DeviceSegment& s : segs)
    if (gram_runs(s, solve) && s.n_items > 0) launch_check(s, d.G, d, stream);
}

void finish(const std::vector<DeviceSegment>& segs, const DeviceStep& d, bool solve,
            const SolveOptions& options, bool normalize_sum, cudaStream_t stream) {
  for (const DeviceSegment& s : segs) check_segment(s, d);
  finish_kernel<<<1, 32, 0, stream>>>(static_cast<int>(d.num_tasks), solve, options,
                                      normalize_sum, d);
  check(cudaGetLastError(), "solve kernel launch");
  for (const DeviceSegment& s : segs) {
    if (s.n_items == 0) continue;
    run(LaunchArgs{s, d, stream}, Pass::kApply);
    check(cudaGetLastError(), "apply kernel launch");
  }
  for (const DeviceSegment& s : segs) {
    if (s.n_tensors == 0) continue;
    steps_kernel<<<blocks_for(s.n_tensors, 128, 1 << 20), 128, 0, stream>>>(s.table, s.n_tensors,
                                                                            d.flags);
    check(cudaGetLastError(), "step counter launch");
  }
}

void sum_rows(DType d, void* buf, int64_t K, int64_t P, cudaStream_t stream) {
  if (P == 0) return;
  const unsigned grid = blocks_for(P, 256 * 4, 4096);
  switch (d) {
    case kFloat32:
      sum_rows_kernel<<<grid, 256, 0, stream>>>(static_cast<float*>(buf), K, P);
      break;
    case kBFloat16:
      sum_rows_kernel<<<grid, 256, 0, stream>>>(static_cast<bf16_t*>(buf), K, P);
      break;
    case kFloat16:
      sum_rows_kernel<<<grid, 256, 0, stream>>>(static_cast<half_t*>(buf), K, P);
      break;
    default:
      throw std::invalid_argument("pub_native CUDA: parameters must be float32, bfloat16 or "
                                  "float16");
  }
  check(cudaGetLastError(), "sum_rows launch");
}

}  // namespace pub_native::cuda
