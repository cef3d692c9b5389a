// CUDA kernels of the PUB step, shared by the per-optimizer translation units (adam_cuda.cu,
// adagrad_cuda.cu, rmsprop_cuda.cu): addressing only; the per-element math is
// pub_native/update_rules.h, the same header the CPU loops use.
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
// Largest K of the CUDA path (per-thread task updates live in registers/local memory).
constexpr int kMaxTasks = 32;
// Gram entries accumulated per sweep of an item; K = 8 (36 entries) takes one sweep.
constexpr int kPairChunk = 36;

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pub_native CUDA: ") + what + ": " +
                             cudaGetErrorString(err));
}

// Sum over the block in a fixed order: shuffle within warps, then warp 0 over the warps.
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

// ---- Gram pass --------------------------------------------------------------------------------

template <class Rule, class Tp, bool kTheta, bool kClippy>
__global__ void __launch_bounds__(kThreads)
    gram_kernel(StepConfig cfg, const int64_t* table, const int64_t* items, const double* hyper,
                const Tp* grads, double* partial) {
  using T = typename MathType<Tp>::type;
  __shared__ double shared[kWarps];
  const int64_t it = blockIdx.x;
  const int64_t tensor = items[3 * it], begin = items[3 * it + 1], end = items[3 * it + 2];
  const TensorView<T> tv = tensor_view<T>(cfg, table, tensor, hyper);
  const Rule rule(tv.hyper);
  const int K = static_cast<int>(cfg.num_tasks);
  const int64_t P = cfg.row_length;
  const T sign = static_cast<T>(cfg.grad_sign);
  const T wd = static_cast<T>(tv.hyper[kHWeightDecay]);
  const T lrel = static_cast<T>(cfg.clippy_rel), labs = static_cast<T>(cfg.clippy_abs);
  const Tp* param = static_cast<const Tp*>(tv.param);
  double* out = partial + it * K * K;
  const int n_pairs = K * (K + 1) / 2;

  for (int p0 = 0; p0 < n_pairs; p0 += kPairChunk) {
    const int p1 = p0 + kPairChunk < n_pairs ? p0 + kPairChunk : n_pairs;
    double acc[kPairChunk];
    for (int q = 0; q < kPairChunk; ++q) acc[q] = 0.0;
    T min_ratio[kClippy ? kMaxTasks : 1];
    if constexpr (kClippy)
      for (int i = 0; i < K; ++i) min_ratio[i] = T(INFINITY);
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
      T u[kMaxTasks];
      T theta = T(0);
      if constexpr (kTheta) theta = to_math<T>(param[j]);
      for (int i = 0; i < K; ++i) {
        T s[kMaxStates], next[kMaxStates];
        for (int k = 0; k < Rule::kStates; ++k) s[k] = tv.state[k][i * tv.task_stride + j];
        T g = sign * to_math<T>(grads[i * P + tv.grad_offset + j]);
        if constexpr (kTheta) g += wd * theta;
        u[i] = rule(g, s, next);
        if constexpr (kClippy) {
          const T a = fabs(u[i]);
          if (a != T(0)) {
            const T r = (lrel * fabs(theta) + labs) / a;
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
    if constexpr (kClippy) {
      if (p0 == 0) {
        double* mins = partial + gridDim.x * static_cast<int64_t>(K) * K + it * K;
        for (int i = 0; i < K; ++i) {
          const double m = block_min(static_cast<double>(min_ratio[i]), shared);
          if (threadIdx.x == 0) mins[i] = m;
        }
      }
    }
  }
}

// One thread per Gram entry (i ≥ k): the items in order, per tensor (Clippy scales each
// tensor's block by σ_i σ_k).
template <bool kClippy>
__global__ void gram_reduce_kernel(int K, const int64_t* items, int64_t n_items,
                                   const double* partial, double* G, double* sigma) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= K * K) return;
  const int i = e / K, k = e % K;
  if (k > i) return;
  const double* mins = partial + n_items * K * K;
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
      const double si = mi < 1.0 ? mi : 1.0, sk = mk < 1.0 ? mk : 1.0;
      if (i == k) sigma[tensor * K + i] = si;
      block *= si * sk;
    }
    total += block;
  }
  G[i * K + k] = total;
  G[k * K + i] = total;
}

// ---- apply pass -------------------------------------------------------------------------------

template <class Rule, class Tp, bool kAdaTask>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(StepConfig cfg, const int64_t* table, const int64_t* items, const double* hyper,
                 const Tp* grads, const double* weights, const double* sigma,
                 const int32_t* skip) {
  using T = typename MathType<Tp>::type;
  if (*skip) return;
  __shared__ T w_s[kMaxTasks], c_s[kMaxTasks];
  const int64_t it = blockIdx.x;
  const int64_t tensor = items[3 * it], begin = items[3 * it + 1], end = items[3 * it + 2];
  const int K = static_cast<int>(cfg.num_tasks);
  if (threadIdx.x < K) {
    const double w = weights[threadIdx.x];
    w_s[threadIdx.x] = static_cast<T>(w);
    c_s[threadIdx.x] = static_cast<T>(sigma ? w * sigma[tensor * K + threadIdx.x] : w);
  }
  __syncthreads();
  const TensorView<T> tv = tensor_view<T>(cfg, table, tensor, hyper);
  const Rule rule(tv.hyper);
  const int64_t P = cfg.row_length;
  const T sign = static_cast<T>(cfg.grad_sign);
  const T wd = static_cast<T>(tv.hyper[kHWeightDecay]);
  const T decay = static_cast<T>(tv.hyper[kHDecay]);
  Tp* param = static_cast<Tp*>(tv.param);
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const T theta = to_math<T>(param[j]);
    T upd = T(0), g_alpha = T(0);
    T s[kMaxStates], next[kMaxStates];
    if constexpr (!kAdaTask)
      for (int k = 0; k < Rule::kStates; ++k) s[k] = tv.state[k][j];
    for (int i = 0; i < K; ++i) {
      const T gi = sign * to_math<T>(grads[i * P + tv.grad_offset + j]) + wd * theta;
      if constexpr (kAdaTask) {
        T* const* st = tv.state;
        for (int k = 0; k < Rule::kStates; ++k) s[k] = st[k][i * tv.task_stride + j];
        upd += c_s[i] * rule(gi, s, next);
        for (int k = 0; k < Rule::kStates; ++k) st[k][i * tv.task_stride + j] = next[k];
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

template <class Tp>
struct GramLaunch {
  const StepConfig& cfg;
  const StepBuffers& b;
  cudaStream_t stream;
  template <class Rule>
  void operator()() const {
    const unsigned grid = grid_of(b.n_items);
    const Tp* g = static_cast<const Tp*>(b.grads);
    if (cfg.umm == Umm::kClippy)
      gram_kernel<Rule, Tp, true, true><<<grid, kThreads, 0, stream>>>(cfg, b.table, b.items,
                                                                        b.hyper, g, b.partial);
    else if (cfg.gram_reads_theta())
      gram_kernel<Rule, Tp, true, false><<<grid, kThreads, 0, stream>>>(cfg, b.table, b.items,
                                                                         b.hyper, g, b.partial);
    else
      gram_kernel<Rule, Tp, false, false><<<grid, kThreads, 0, stream>>>(cfg, b.table, b.items,
                                                                          b.hyper, g, b.partial);
  }
};

template <class Tp>
struct ApplyLaunch {
  const StepConfig& cfg;
  const StepBuffers& b;
  cudaStream_t stream;
  template <class Rule>
  void operator()() const {
    const unsigned grid = grid_of(b.n_items);
    const Tp* g = static_cast<const Tp*>(b.grads);
    const double* sigma = cfg.umm == Umm::kClippy ? b.sigma : nullptr;
    if (cfg.umm == Umm::kAdaTask)
      apply_kernel<Rule, Tp, true><<<grid, kThreads, 0, stream>>>(
          cfg, b.table, b.items, b.hyper, g, b.weights, sigma, b.skip);
    else
      apply_kernel<Rule, Tp, false><<<grid, kThreads, 0, stream>>>(
          cfg, b.table, b.items, b.hyper, g, b.weights, sigma, b.skip);
  }
};

template <class Family>
void run_family(const StepConfig& cfg, const StepBuffers& b, bool gram, cudaStream_t stream) {
  auto by_dtype = [&](auto tag) {
    using Tp = decltype(tag);
    using T = typename MathType<Tp>::type;
    if (gram)
      Family::template dispatch<T>(cfg, GramLaunch<Tp>{cfg, b, stream});
    else
      Family::template dispatch<T>(cfg, ApplyLaunch<Tp>{cfg, b, stream});
  };
  switch (cfg.dtype) {
    case kFloat32: by_dtype(float{}); break;
    case kBFloat16: by_dtype(bf16_t{}); break;
    case kFloat16: by_dtype(half_t{}); break;
    default: throw std::invalid_argument("pub_native CUDA: parameters must be float32, bfloat16 or float16");
  }
}

void run_adam(const StepConfig& cfg, const StepBuffers& b, bool gram, cudaStream_t stream);
void run_adagrad(const StepConfig& cfg, const StepBuffers& b, bool gram, cudaStream_t stream);
void run_rmsprop(const StepConfig& cfg, const StepBuffers& b, bool gram, cudaStream_t stream);

}  // namespace pub_native::cuda::detail
