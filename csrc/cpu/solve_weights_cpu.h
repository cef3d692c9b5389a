// CPU layer of the weight solver: a batch of independent K x K problems, one per OpenMP
// iteration, each solved by the framework-free header on one thread.
#pragma once

#include <cstdint>

#include "pub_native/solver.h"

namespace pub_native::cpu {

template <class T>
void solve_weights_batch(const T* G, const T* warm, T* alpha, int32_t* status,
                         int32_t* iterations, double* residual, int64_t batch, int64_t K,
                         const SolveOptions& options);

}  // namespace pub_native::cpu
