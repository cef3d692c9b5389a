// Framework-free description of one PUB step over many tensors (host C++ and CUDA device code):
// the tensor table Python passes as raw pointers, the step configuration, and the fixed work
// decomposition that makes the Gram sums independent of the number of threads.
#pragma once

#include <cstdint>

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

// Elements per work item of the Gram pass. Partial Gram matrices are summed per item, then the
// items in order: the result is bitwise the same for any number of threads.
constexpr int64_t kGramChunk = int64_t(1) << 16;

}  // namespace pub_native
