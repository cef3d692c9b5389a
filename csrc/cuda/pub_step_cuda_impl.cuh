// CUDA kernels of the PUB step, shared by the per-optimizer translation units (adam_cuda.cu,
// adagrad_cuda.cu, rmsprop_cuda.cu): addressing only; the per-element math is
// pub_native/update_rules.h and the hyper-parameters pub_native/hyper.h, the headers the CPU
// loops use.
//
// Determinism: one block per work item (a chunk of one tensor, fixed on the host), a fixed
// element-to-thread mapping, a fixed reduction tree inside the block and a serial reduction over
// the items in order: two runs give bitwise-equal Gram matrices.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "pub_step_cuda.h"

namespace pub_native::cuda::detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Gram entries accumulated per sweep of an item; K = 8 (36 entries) takes one sweep.
constexpr int kPairChunk = 36;

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pub_native CUDA: ") + what + ": " +
                             cudaGetErrorString(err));
}

// Sum over the block in a fixed order: shuffle within warps, then thread 0 over the warps.
__device__ __forceinline__ double block_sum(double v, double* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) total += shared[w];
  return total;  // valid in thread 0
}

__device__ __forceinline__ double block_min(double v, double* shared) {
  for (int o = 16; o > 0; o >>= 1) v = pn_min(v, __shfl_down_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double m = shared[0];
  if (threadIdx.x == 0)
    for (int w = 1; w < kWarps; ++w) m = pn_min(m, shared[w]);
  return m;
}

// The block's work item, its tensor and that tensor's hyper-parameter row (computed once by
// thread 0 from the step counter).
template <class T>
struct BlockItem {
  int64_t tensor, begin, end;
  TensorView<T> tv;
};

template <class T>
__device__ __forceinline__ BlockItem<T> block_item(const StepConfig& cfg, const int64_t* table,
                                                   const int64_t* items, const double* base,
                                                   double* h) {
  const int64_t it = blockIdx.x;
  BlockItem<T> b;
  b.tensor = items[3 * it];
  b.begin = items[3 * it + 1];
  b.end = items[3 * it + 2];
  b.tv = tensor_view<T>(cfg, table, b.tensor, base);
  if (threadIdx.x == 0) tensor_hyper(cfg, b.tv, h);
  __syncthreads();
  return b;
}

// ---- Gram pass --------------------------------------------------------------------------------

template <class Rule, class Tp, bool kTheta, bool kClippy>
__global__ void __launch_bounds__(kThreads)
    gram_kernel(StepConfig cfg, const int64_t* table, const int64_t* items, int64_t n_items,
                const double* base, const double* gscale, double* partial) {
  using T = typename MathType<Tp>::type;
  __shared__ double shared[kWarps];
  __shared__ double h[kHyperCols];
  const BlockItem<T> b = block_item<T>(cfg, table, items, base, h);
  const TensorView<T>& tv = b.tv;
  const Rule rule(h);
  const int K = static_cast<int>(cfg.num_tasks);
  T mult[kCudaMaxTasks];
  for (int i = 0; i < K; ++i) mult[i] = static_cast<T>(cfg.grad_sign * gscale[b.tensor * K + i]);
  const T wd = static_cast<T>(h[kHWeightDecay]);
  const T lrel = static_cast<T>(cfg.clippy_rel), labs = static_cast<T>(cfg.clippy_abs);
  const Tp* param = static_cast<const Tp*>(tv.param);
  const Tp* grads = static_cast<const Tp*>(tv.grad);
  double* out = partial + static_cast<int64_t>(blockIdx.x) * K * K;
  const int n_pairs = K * (K + 1) / 2;

  for (int p0 = 0; p0 < n_pairs; p0 += kPairChunk) {
    const int p1 = p0 + kPairChunk < n_pairs ? p0 + kPairChunk : n_pairs;
    double acc[kPairChunk];
    for (int q = 0; q < kPairChunk; ++q) acc[q] = 0.0;
    T min_ratio[kClippy ? kCudaMaxTasks : 1];
    if constexpr (kClippy)
      for (int i = 0; i < K; ++i) min_ratio[i] = T(INFINITY);
    // ‖g_i‖² of the item (first sweep only), for the task gradient norms.
    double sq[kCudaMaxTasks];
    for (int i = 0; i < K; ++i) sq[i] = 0.0;
    for (int64_t j = b.begin + threadIdx.x; j < b.end; j += kThreads) {
      T u[kCudaMaxTasks];
      T theta = T(0);
      if constexpr (kTheta) theta = to_math<T>(param[j]);
      for (int i = 0; i < K; ++i) {
        T s[kMaxStates], next[kMaxStates];
        for (int k = 0; k < Rule::kStates; ++k) s[k] = tv.state[k][i * tv.state_stride + j];
        T g = mult[i] * to_math<T>(grads[i * tv.grad_stride + j]);
        if (p0 == 0) sq[i] += static_cast<double>(g) * static_cast<double>(g);
        if constexpr (kTheta) g = pn_add_l2(g, wd, theta);
        u[i] = rule(g, s, next);
        if constexpr (kClippy) {
          const T a = fabs(u[i]);
          if (a != T(0)) {
            const T r = pn_clippy_bound(lrel, labs, static_cast<T>(fabs(theta))) / a;
            min_ratio[i] = r < min_ratio[i] ? r : min_ratio[i];
          }
        }
      }
      // Pairs p0..p1 of the lower triangle, row by row.
      int p = 0;
      for (int i = 0; i < K && p < p1; ++i)
        for (int k = 0; k <= i && p < p1; ++k, ++p)
          if (p >= p0) acc[p - p0] += static_cast<double>(u[i]) * static_cast<double>(u[k]);
    }
    int p = 0;
    for (int i = 0; i < K && p < p1; ++i)
      for (int k = 0; k <= i && p < p1; ++k, ++p)
        if (p >= p0) {
          const double total = block_sum(acc[p - p0], shared);
          if (threadIdx.x == 0) out[i * K + k] = total;
        }
    if (p0 == 0) {
      double* sqs = partial + n_items * (K * K + K) + static_cast<int64_t>(blockIdx.x) * K;
      for (int i = 0; i < K; ++i) {
        const double total = block_sum(sq[i], shared);
        if (threadIdx.x == 0) sqs[i] = total;
      }
    }
    if constexpr (kClippy) {
      if (p0 == 0) {
        double* mins = partial + n_items * K * K + static_cast<int64_t>(blockIdx.x) * K;
        for (int i = 0; i < K; ++i) {
          const double m = block_min(static_cast<double>(min_ratio[i]), shared);
          if (threadIdx.x == 0) mins[i] = m;
        }
      }
    }
  }
}

// ---- apply pass -------------------------------------------------------------------------------

// θ ← decay·θ − Σ_i α̂_i σ_i u_i and the state advance with g_α (AdaTask: each task's own),
// unless the step's outcome (flags) says skip. weights: K values, or null for weight 1 (K = 1).
template <class Rule, class Tp, bool kAdaTask>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(StepConfig cfg, const int64_t* table, const int64_t* items, const double* base,
                 const double* gscale, const double* weights, const double* sigma,
                 const double* task_scale, const int32_t* flags) {
  using T = typename MathType<Tp>::type;
  if (flags[kFlagOutcome] != kApplied) return;
  __shared__ double h[kHyperCols];
  __shared__ T w_s[kCudaMaxTasks], c_s[kCudaMaxTasks], m_s[kCudaMaxTasks];
  const BlockItem<T> b = block_item<T>(cfg, table, items, base, h);
  const TensorView<T>& tv = b.tv;
  const int K = static_cast<int>(cfg.num_tasks);
  if (threadIdx.x < K) {
    const double w = weights ? weights[threadIdx.x] : 1.0;
    w_s[threadIdx.x] = static_cast<T>(w);
    c_s[threadIdx.x] = static_cast<T>(sigma ? w * sigma[b.tensor * K + threadIdx.x] : w);
    m_s[threadIdx.x] = static_cast<T>(cfg.grad_sign * gscale[b.tensor * K + threadIdx.x]);
  }
  __syncthreads();
  const Rule rule(h);
  const T wd = static_cast<T>(h[kHWeightDecay]);
  const T decay = static_cast<T>(h[kHDecay]);
  Tp* param = static_cast<Tp*>(tv.param);
  const Tp* grads = static_cast<const Tp*>(tv.grad);
  for (int64_t j = b.begin + threadIdx.x; j < b.end; j += kThreads) {
    const T theta = to_math<T>(param[j]);
    T upd = -T(0), g_alpha = -T(0);  // −0 adds nothing to any term (see the CPU's apply_fixed)
    T s[kMaxStates], next[kMaxStates];
    if constexpr (!kAdaTask)
      for (int k = 0; k < Rule::kStates; ++k) s[k] = tv.state[k][j];
    for (int i = 0; i < K; ++i) {
      const T gi = pn_add_l2(m_s[i] * to_math<T>(grads[i * tv.grad_stride + j]), wd, theta);
      if constexpr (kAdaTask) {
        if (task_scale && task_scale[i] == 0.0) continue;  // absent: its state stays as it was
        T* const* st = tv.state;
        for (int k = 0; k < Rule::kStates; ++k) s[k] = st[k][i * tv.state_stride + j];
        upd += c_s[i] * rule(gi, s, next);
        for (int k = 0; k < Rule::kStates; ++k) st[k][i * tv.state_stride + j] = next[k];
      } else {
        upd += c_s[i] * rule(gi, s, next);
        g_alpha += w_s[i] * gi;
      }
    }
    if constexpr (!kAdaTask) {
      rule(g_alpha, s, next);
      for (int k = 0; k < Rule::kStates; ++k) tv.state[k][j] = next[k];
    }
    param[j] = from_math<Tp>(theta * decay - upd);
  }
}

// ---- launchers --------------------------------------------------------------------------------

inline unsigned grid_of(int64_t n_items) {
  if (n_items > 0x7fffffffLL) throw std::invalid_argument("pub_native CUDA: too many work items");
  return static_cast<unsigned>(n_items);
}

// What one launch of a family's entry point runs.
enum class Pass { kGram, kApply };

struct LaunchArgs {
  const DeviceSegment& seg;
  const DeviceStep& step;
  cudaStream_t stream;
};

template <class Tp>
struct GramLaunch {
  const LaunchArgs& a;
  template <class Rule>
  void operator()() const {
    const DeviceSegment& s = a.seg;
    const unsigned grid = grid_of(s.n_items);
    const StepConfig& c = s.cfg;
    if (c.umm == Umm::kClippy)
      gram_kernel<Rule, Tp, true, true><<<grid, kThreads, 0, a.stream>>>(
          c, s.table, s.items, s.n_items, a.step.base, s.gscale, s.partial);
    else if (c.gram_reads_theta())
      gram_kernel<Rule, Tp, true, false><<<grid, kThreads, 0, a.stream>>>(
          c, s.table, s.items, s.n_items, a.step.base, s.gscale, s.partial);
    else
      gram_kernel<Rule, Tp, false, false><<<grid, kThreads, 0, a.stream>>>(
          c, s.table, s.items, s.n_items, a.step.base, s.gscale, s.partial);
  }
};

template <class Tp>
struct ApplyLaunch {
  const LaunchArgs& a;
  template <class Rule>
  void operator()() const {
    const DeviceSegment& s = a.seg;
    const unsigned grid = grid_of(s.n_items);
    const StepConfig& c = s.cfg;
    const bool shared = c.kind == SegmentKind::kShared;
    const double* weights = shared ? a.step.applied : nullptr;
    const double* sigma = c.umm == Umm::kClippy ? s.sigma : nullptr;
    const double* task_scale = shared ? a.step.task_scale : nullptr;
    if (c.adatask())
      apply_kernel<Rule, Tp, true><<<grid, kThreads, 0, a.stream>>>(
          c, s.table, s.items, a.step.base, s.gscale, weights, sigma, task_scale, a.step.flags);
    else
      apply_kernel<Rule, Tp, false><<<grid, kThreads, 0, a.stream>>>(
          c, s.table, s.items, a.step.base, s.gscale, weights, sigma, task_scale, a.step.flags);
  }
};

template <class Family>
void run_family(const LaunchArgs& a, Pass pass) {
  auto by_dtype = [&](auto tag) {
    using Tp = decltype(tag);
    using T = typename MathType<Tp>::type;
    if (pass == Pass::kGram)
      Family::template dispatch<T>(a.seg.cfg, GramLaunch<Tp>{a});
    else
      Family::template dispatch<T>(a.seg.cfg, ApplyLaunch<Tp>{a});
  };
  switch (a.seg.cfg.dtype) {
    case kFloat32: by_dtype(float{}); break;
    case kBFloat16: by_dtype(bf16_t{}); break;
    case kFloat16: by_dtype(half_t{}); break;
    default:
      throw std::invalid_argument(
          "pub_native CUDA: parameters must be float32, bfloat16 or float16");
  }
}

void run_adam(const LaunchArgs& a, Pass pass);
void run_adagrad(const LaunchArgs& a, Pass pass);
void run_rmsprop(const LaunchArgs& a, Pass pass);

}  // namespace pub_native::cuda::detail
