// CPU layer of the PUB step: OpenMP loops over the shared tensors that only do addressing and
// call the per-element rules of pub_native/update_rules.h.
#pragma once

#include <cstdint>

#include "pub_native/step.h"

namespace pub_native::cpu {

// Gram pass: G (K×K, float64, row-major) of the task updates u_i over every shared tensor,
// computed on the fly from the task gradients and the state, without storing any u_i.
// With Clippy, sigma (n_tensors×K) receives each tensor's per-task scale σ and G is the Gram of
// the scaled updates. Reads only; nothing is written but G and sigma.
void pub_gram(const StepConfig& cfg, const int64_t* table, int64_t n_tensors, const double* hyper,
              const void* grads, double* G, double* sigma);

// Apply pass: θ ← decay·θ − Σ_i α̂_i σ_i u_i, then the state advances with g_α = Σ_i α̂_i g_i
// (AdaTask: each task's state with its own g_i). weights: K values α̂; sigma as from pub_gram
// (Clippy) or null.
void pub_apply(const StepConfig& cfg, const int64_t* table, int64_t n_tensors,
               const double* hyper, const void* grads, const double* weights,
               const double* sigma);

// For each of the K rows of the gradient buffer (K×P elements of dtype), whether it holds a
// NaN or Inf: bad[i] = 1 if so.
void rows_finite(DType dtype, const void* grads, int64_t K, int64_t P, uint8_t* bad);

}  // namespace pub_native::cpu
