// CUDA layer of the weight solver, as seen from the host-compiled binding: plain pointers,
// sizes and the stream; no CUDA type beyond cudaStream_t and no framework type.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pub_native/solver.h"

namespace pub_native::cuda {

// Solves `batch` problems of size K in device memory. `workspace` holds
// batch * solver_workspace_size(K) doubles. Asynchronous on `stream`.
template <class T>
void solve_weights_batch(const T* G, const T* warm, T* alpha, int32_t* status,
                         int32_t* iterations, double* residual, double* workspace, int64_t batch,
                         int64_t K, const SolveOptions& options, cudaStream_t stream);

int device_count();

}  // namespace pub_native::cuda
