// Framework-free description of one PUB step over many tensors (host C++ and CUDA device code):
// the tensor table Python passes as raw pointers, the step configuration, and the fixed work
// decomposition that makes the Gram sums independent of the number of threads.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "update_rules.h"

namespace pub_native {

// Columns of the tensor table (int64, one row per shared tensor), shared with Python.
// Pointers are addresses; sizes and offsets are 64-bit element counts.
enum TableCol : int32_t {
  kTParam = 0,       // parameter θ (element type of the step)
  kTNumel = 1,       // elements in the tensor
  kTGradOffset = 2,  // offset of the tensor in each row of the K×P gradient buffer
  kTGroup = 3,       // row of the hyper-parameter table
  kTState = 4,       // kMaxStates state tensors (math type), 0 when unused; with AdaTask each is
                     // (K, numel): task i's state starts at i·numel
  kTableCols = kTState + kMaxStates,
};

struct StepConfig {
  Algorithm algo = Algorithm::kAdam;
  bool amsgrad = false;
  bool centered = false;
  bool momentum = false;
  Umm umm = Umm::kNone;
  DType dtype = kFloat32;
  int64_t num_tasks = 0;     // K
  int64_t row_length = 0;    // P: elements per task row of the gradient buffer
  double grad_sign = 1.0;    // −1 with maximize=True
  double clippy_rel = 0.0;   // Clippy λ_rel
  double clippy_abs = 0.0;   // Clippy λ_abs
  bool has_l2 = false;       // some group has L2 weight decay (the Gram pass must read θ)
  PN_HD bool gram_reads_theta() const { return umm == Umm::kClippy || has_l2; }
};

// Host-side construction with validation, shared by the CPU and CUDA bindings
// (std::invalid_argument becomes ValueError in Python).
inline StepConfig make_step_config(int32_t algo, bool amsgrad, bool centered, bool momentum,
                                   int32_t umm, int32_t dtype, int64_t num_tasks,
                                   int64_t row_length, double grad_sign, double clippy_rel,
                                   double clippy_abs, bool has_l2) {
  if (algo < 0 || algo > 2) throw std::invalid_argument("unknown algorithm code");
  if (umm < 0 || umm > 2) throw std::invalid_argument("unknown umm code");
  if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("unknown dtype code");
  if (num_tasks < 1 || row_length < 0)
    throw std::invalid_argument("num_tasks must be >= 1 and row_length >= 0");
  StepConfig c;
  c.algo = static_cast<Algorithm>(algo);
  c.amsgrad = amsgrad;
  c.centered = centered;
  c.momentum = momentum;
  c.umm = static_cast<Umm>(umm);
  c.dtype = static_cast<DType>(dtype);
  c.num_tasks = num_tasks;
  c.row_length = row_length;
  c.grad_sign = grad_sign;
  c.clippy_rel = clippy_rel;
  c.clippy_abs = clippy_abs;
  c.has_l2 = has_l2;
  return c;
}

// One row of the tensor table, decoded (host loops and device kernels alike).
template <class T>
struct TensorView {
  void* param;
  int64_t numel, grad_offset;
  int64_t task_stride;  // state elements between tasks (AdaTask), else 0
  const double* hyper;
  T* state[kMaxStates];
};

template <class T>
PN_HD TensorView<T> tensor_view(const StepConfig& cfg, const int64_t* table, int64_t t,
                                const double* hyper) {
  const int64_t* row = table + t * kTableCols;
  TensorView<T> v;
  v.param = reinterpret_cast<void*>(row[kTParam]);
  v.numel = row[kTNumel];
  v.grad_offset = row[kTGradOffset];
  v.hyper = hyper + row[kTGroup] * kHyperCols;
  for (int s = 0; s < kMaxStates; ++s) v.state[s] = reinterpret_cast<T*>(row[kTState + s]);
  v.task_stride = cfg.umm == Umm::kAdaTask ? v.numel : 0;
  return v;
}

// Elements per work item of the Gram pass. Partial Gram matrices are summed per item, then the
// items in order: the result is bitwise the same for any number of threads.
constexpr int64_t kGramChunk = int64_t(1) << 16;

}  // namespace pub_native
