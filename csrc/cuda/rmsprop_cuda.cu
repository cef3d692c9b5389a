// CUDA kernels of the RMSProp PUB step (every element type and option set); the math is in
// pub_native/update_rules.h, the kernels in pub_step_cuda_impl.cuh. One file per optimizer keeps
// the template instantiations in parallel translation units.
#include "pub_step_cuda_impl.cuh"

namespace pub_native::cuda::detail {

void run_rmsprop(const StepConfig& cfg, const StepBuffers& b, bool gram, cudaStream_t stream) {
  run_family<RMSPropFamily>(cfg, b, gram, stream);
}

}  // namespace pub_native::cuda::detail
