// CUDA layer of the weight solver: one warp per K x K problem, the math from the same
// framework-free header as the CPU path (pub_native/solver.h with WarpTeam).
// Launches on the caller's stream and never synchronizes.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "solve_weights_cuda.h"
#include "pub_native/solver.h"

namespace pub_native::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

template <class T>
__global__ void solve_weights_kernel(const T* G, const T* warm, T* alpha, int32_t* status,
                                     int32_t* iterations, double* residual, int64_t batch,
                                     int64_t K, SolveOptions options, double* ws) {
  const int64_t problem =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + static_cast<int64_t>(threadIdx.x / 32);
  if (problem >= batch) return;  // uniform over the warp
  const WarpTeam team;
  const SolveOutcome out =
      solve_weights(team, G + problem * K * K, warm ? warm + problem * K : nullptr,
                    alpha + problem * K, K, options, ws + problem * solver_workspace_size(K));
  if (team.rank() == 0) {
    status[problem] = out.status;
    iterations[problem] = out.iterations;
    residual[problem] = out.residual;
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pub_native CUDA: ") + what + ": " +
                             cudaGetErrorString(err));
}

}  // namespace

template <class T>
void solve_weights_batch(const T* G, const T* warm, T* alpha, int32_t* status,
                         int32_t* iterations, double* residual, double* workspace, int64_t batch,
                         int64_t K, const SolveOptions& options, cudaStream_t stream) {
  if (batch == 0) return;
  const int64_t blocks = (batch + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("pub_native CUDA: batch too large");
  solve_weights_kernel<T><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0, stream>>>(
      G, warm, alpha, status, iterations, residual, batch, K, options, workspace);
  check(cudaGetLastError(), "solve_weights kernel launch");
}

template void solve_weights_batch<float>(const float*, const float*, float*, int32_t*, int32_t*,
                                         double*, double*, int64_t, int64_t, const SolveOptions&,
                                         cudaStream_t);
template void solve_weights_batch<double>(const double*, const double*, double*, int32_t*,
                                          int32_t*, double*, double*, int64_t, int64_t,
                                          const SolveOptions&, cudaStream_t);

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

}  // namespace pub_native::cuda
