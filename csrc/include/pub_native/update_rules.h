// Framework-free per-element math of the base optimizers (host C++ and CUDA device code):
// for one coordinate, the state a gradient g would produce and the update u = θ − θ_new that
// the optimizer would apply with it (SPEC section 3). The PUB kernels call a rule K times per
// coordinate with the task gradients (Gram and apply passes) and once with the balanced gradient
// g_α (state advance); the rules never see memory layouts.
#pragma once

#include <cstdint>

#include "numeric.h"

namespace pub_native {

enum class Algorithm : int32_t { kAdam = 0, kAdaGrad = 1, kRMSProp = 2 };
enum class Umm : int32_t { kNone = 0, kClippy = 1, kAdaTask = 2 };

// Columns of the hyper-parameter row a rule reads: float64 values of the current step, bias
// corrections included, made from a param group's constants by hyper_row (hyper.h).
enum HyperCol : int32_t {
  kHStepSize = 0,    // Adam: lr / (1 − β1^t); AdaGrad: lr / (1 + (t − 1)·lr_decay); RMSProp: lr
  kHBeta1 = 1,       // Adam: β1; RMSProp: momentum μ
  kHBeta2 = 2,       // Adam: β2; RMSProp: α (smoothing constant)
  kHEps = 3,         // ε
  kHWeightDecay = 4, // L2 weight decay added to every task gradient (0 when decoupled)
  kHDecay = 5,       // decoupled weight decay factor 1 − lr·wd (1 otherwise)
  kHBc2Sqrt = 6,     // Adam: 1 / sqrt(1 − β2^t)
  kHOneMinusBeta1 = 7,  // 1 − β1, rounded once from float64 as torch does
  kHOneMinusBeta2 = 8,  // Adam: 1 − β2; RMSProp: 1 − α
  kHyperCols = 9,
};

// Largest number of state tensors of any rule.
constexpr int kMaxStates = 3;

// a + w·(b − a): torch's lerp for |w| < 1/2, the case of the default β1 = 0.9 and α = 0.99
// (torch switches to b − (b − a)·(1 − w) above; the two differ by rounding only, and a
// branch here would keep the element loops from vectorizing).
template <class T>
PN_HD T pn_lerp(T a, T b, T w) {
  return a + w * (b - a);
}

// g + wd·θ, the L2 term, which torch adds only for wd ≠ 0: otherwise g is left exactly as it is
// (g + (−0) = g, also for g = −0), so that an infinite or NaN θ does not turn it into NaN
// (0·Inf), as in torch.
template <class T>
PN_HD T pn_add_l2(T g, T wd, T theta) {
  return g + pn_keep(wd * theta, wd != T(0));
}

// Clippy's bound on |u| at θ (SPEC section 5): λ_rel·|θ| + λ_abs, and λ_abs alone for λ_rel = 0,
// also for an infinite or NaN θ (0·Inf would be NaN, a bound the minimum ignores).
template <class T>
PN_HD T pn_clippy_bound(T lrel, T labs, T abs_theta) {
  return pn_keep(lrel * abs_theta, lrel != T(0)) + labs;
}

// Adam (torch.optim.Adam): state exp_avg, exp_avg_sq[, max_exp_avg_sq].
template <class T, bool kAmsgrad>
struct AdamRule {
  static constexpr int kStates = kAmsgrad ? 3 : 2;
  enum : int { kExpAvg = 0, kExpAvgSq = 1, kMaxExpAvgSq = 2 };
  T step_size, one_minus_beta1, beta2, one_minus_beta2, eps, inv_bc2_sqrt;

  PN_HD explicit AdamRule(const double* h)
      : step_size(static_cast<T>(h[kHStepSize])),
        one_minus_beta1(static_cast<T>(h[kHOneMinusBeta1])),
        beta2(static_cast<T>(h[kHBeta2])),
        one_minus_beta2(static_cast<T>(h[kHOneMinusBeta2])),
        eps(static_cast<T>(h[kHEps])),
        inv_bc2_sqrt(static_cast<T>(h[kHBc2Sqrt])) {}

  PN_HD T operator()(T g, const T* s, T* next) const {
    const T m = pn_lerp(s[kExpAvg], g, one_minus_beta1);
    const T v = s[kExpAvgSq] * beta2 + one_minus_beta2 * g * g;
    T v_hat = v;
    if constexpr (kAmsgrad) {
      v_hat = s[kMaxExpAvgSq] > v ? s[kMaxExpAvgSq] : v;
      next[kMaxExpAvgSq] = v_hat;
    }
    next[kExpAvg] = m;
    next[kExpAvgSq] = v;
    // torch divides by sqrt(1 − β2^t); multiplying by its inverse (one rounding apart) keeps
    // the divider, the bottleneck of these loops, to one division per update.
    return step_size * m / (pn_sqrt_t(v_hat) * inv_bc2_sqrt + eps);
  }
};

// AdaGrad (torch.optim.Adagrad): state sum. step_size is the decayed clr.
template <class T>
struct AdaGradRule {
  static constexpr int kStates = 1;
  enum : int { kSum = 0 };
  T clr, eps;

  PN_HD explicit AdaGradRule(const double* h)
      : clr(static_cast<T>(h[kHStepSize])), eps(static_cast<T>(h[kHEps])) {}

  PN_HD T operator()(T g, const T* s, T* next) const {
    const T sum = s[kSum] + g * g;
    next[kSum] = sum;
    return clr * g / (pn_sqrt_t(sum) + eps);
  }
};

// RMSProp (torch.optim.RMSprop): state square_avg[, grad_avg][, momentum_buffer].
template <class T, bool kCentered, bool kMomentum>
struct RMSPropRule {
  static constexpr int kStates = 1 + (kCentered ? 1 : 0) + (kMomentum ? 1 : 0);
  enum : int { kSquareAvg = 0, kGradAvg = 1, kMomentumBuffer = kCentered ? 2 : 1 };
  T lr, momentum, alpha, one_minus_alpha, eps;

  PN_HD explicit RMSPropRule(const double* h)
      : lr(static_cast<T>(h[kHStepSize])),
        momentum(static_cast<T>(h[kHBeta1])),
        alpha(static_cast<T>(h[kHBeta2])),
        one_minus_alpha(static_cast<T>(h[kHOneMinusBeta2])),
        eps(static_cast<T>(h[kHEps])) {}

  PN_HD T operator()(T g, const T* s, T* next) const {
    const T v = s[kSquareAvg] * alpha + one_minus_alpha * g * g;
    next[kSquareAvg] = v;
    T denom;
    if constexpr (kCentered) {
      const T a = pn_lerp(s[kGradAvg], g, one_minus_alpha);
      next[kGradAvg] = a;
      denom = pn_sqrt_t(v - a * a) + eps;
    } else {
      denom = pn_sqrt_t(v) + eps;
    }
    if constexpr (kMomentum) {
      const T b = s[kMomentumBuffer] * momentum + g / denom;
      next[kMomentumBuffer] = b;
      return lr * b;
    } else {
      return lr * g / denom;
    }
  }
};

// Rule families: the rules of one base optimizer, one per option set. dispatch calls
// f.template operator()<Rule>() with the rule the step's options select; the CPU and CUDA
// layers both go through these, so they support the same set.
struct AdamFamily {
  template <class T, class Config, class F>
  static void dispatch(const Config& c, F&& f) {
    if (c.amsgrad) return f.template operator()<AdamRule<T, true>>();
    return f.template operator()<AdamRule<T, false>>();
  }
};
struct AdaGradFamily {
  template <class T, class Config, class F>
  static void dispatch(const Config&, F&& f) {
    return f.template operator()<AdaGradRule<T>>();
  }
};
struct RMSPropFamily {
  template <class T, class Config, class F>
  static void dispatch(const Config& c, F&& f) {
    if (c.centered && c.momentum) return f.template operator()<RMSPropRule<T, true, true>>();
    if (c.centered) return f.template operator()<RMSPropRule<T, true, false>>();
    if (c.momentum) return f.template operator()<RMSPropRule<T, false, true>>();
    return f.template operator()<RMSPropRule<T, false, false>>();
  }
};

}  // namespace pub_native
