// CPU layer of the weight solver: addressing and OpenMP over the problems of a batch; the math
// is in pub_native/solver.h.
#include "solve_weights_cpu.h"

#include <cstddef>
#include <vector>

namespace pub_native::cpu {

constexpr int64_t kStackWorkspace = 3 * 16 * 16 + 14 * 16;

template <class T>
void solve_weights_batch(const T* G, const T* warm, T* alpha, int32_t* status,
                         int32_t* iterations, double* residual, int64_t batch, int64_t K,
                         const SolveOptions& options) {
  const int64_t ws_size = solver_workspace_size(K);
  if (batch == 1) {
    // The common call (one small problem per training step) runs without a thread team and,
    // up to K = 16, without a heap allocation: either would cost more than the solve.
    double stack_ws[kStackWorkspace];
    std::vector<double> heap_ws;
    double* ws = stack_ws;
    if (ws_size > kStackWorkspace) {
      heap_ws.resize(static_cast<std::size_t>(ws_size));
      ws = heap_ws.data();
    }
    const SolveOutcome out = solve_weights(SerialTeam{}, G, warm, alpha, K, options, ws);
    *status = out.status;
    *iterations = out.iterations;
    *residual = out.residual;
    return;
  }
  const bool parallel = batch * K * K * K >= 4096;
#pragma omp parallel if (parallel)
  {
    std::vector<double> ws(static_cast<std::size_t>(ws_size));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const SolveOutcome out =
          solve_weights(SerialTeam{}, G + b * K * K, warm ? warm + b * K : nullptr,
                        alpha + b * K, K, options, ws.data());
      status[b] = out.status;
      iterations[b] = out.iterations;
      residual[b] = out.residual;
    }
  }
}

template void solve_weights_batch<float>(const float*, const float*, float*, int32_t*, int32_t*,
                                         double*, int64_t, int64_t, const SolveOptions&);
template void solve_weights_batch<double>(const double*, const double*, double*, int32_t*,
                                          int32_t*, double*, int64_t, int64_t,
                                          const SolveOptions&);

}  // namespace pub_native::cpu
