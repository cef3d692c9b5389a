// Framework-free home of the per-step hyper-parameters (host C++ and CUDA device code): the
// constants of a param group ("base row", written by Python once per change of lr & co.) and
// the row of step-dependent values the update rules read, bias corrections included, computed
// from the parameter's step counter. The CPU loops and the CUDA kernels both call hyper_row,
// so the bias corrections exist in one place.
#pragma once

#include <cstdint>

#include "update_rules.h"

namespace pub_native {

// Columns of the base table (float64, one row per param group), shared with Python.
enum BaseCol : int32_t {
  kBLr = 0,           // learning rate
  kBBeta1 = 1,        // Adam: β1; RMSProp: momentum μ
  kBBeta2 = 2,        // Adam: β2; RMSProp: α (smoothing constant)
  kBEps = 3,          // ε
  kBWeightDecay = 4,  // weight decay
  kBDecoupled = 5,    // 1 for decoupled (AdamW) weight decay, else 0
  kBLrDecay = 6,      // AdaGrad: lr_decay
  kBaseCols = 7,
};

PN_HD double pn_pow(double x, double y) {
#if defined(__CUDA_ARCH__)
  return ::pow(x, y);
#else
  return __builtin_pow(x, y);
#endif
}

// The hyper-parameter row (HyperCol of update_rules.h) of step t (1-based, after this step's
// increment) from a base row. Bias corrections in float64, as torch computes them on the host.
PN_HD void hyper_row(Algorithm algo, const double* b, double t, double* h) {
  for (int k = 0; k < kHyperCols; ++k) h[k] = 0.0;
  const double lr = b[kBLr], wd = b[kBWeightDecay];
  h[kHEps] = b[kBEps];
  h[kHDecay] = 1.0;
  h[kHWeightDecay] = wd;
  switch (algo) {
    case Algorithm::kAdam: {
      const double beta1 = b[kBBeta1], beta2 = b[kBBeta2];
      const bool decoupled = b[kBDecoupled] != 0.0;
      h[kHStepSize] = lr / (1.0 - pn_pow(beta1, t));
      h[kHBeta1] = beta1;
      h[kHBeta2] = beta2;
      h[kHWeightDecay] = decoupled ? 0.0 : wd;
      h[kHDecay] = decoupled ? 1.0 - lr * wd : 1.0;
      h[kHBc2Sqrt] = 1.0 / pn_sqrt(1.0 - pn_pow(beta2, t));
      h[kHOneMinusBeta1] = 1.0 - beta1;
      h[kHOneMinusBeta2] = 1.0 - beta2;
      break;
    }
    case Algorithm::kAdaGrad:
      h[kHStepSize] = lr / (1.0 + (t - 1.0) * b[kBLrDecay]);
      break;
    case Algorithm::kRMSProp:
      h[kHStepSize] = lr;
      h[kHBeta1] = b[kBBeta1];
      h[kHBeta2] = b[kBBeta2];
      h[kHOneMinusBeta2] = 1.0 - b[kBBeta2];
      break;
  }
}

}  // namespace pub_native
