// CUDA kernels of the RMSProp PUB step (every element type and option set); the math is in
// pub_native/update_rules.h, the kernels in pub_step_cuda_impl.cuh. One file per optimizer keeps
// the template instantiations in parallel translation units.
#include "pub_step_cuda_impl.cuh"

namespace pub_native::cuda::detail {

void run_rmsprop(const LaunchArgs& a, Pass pass) { run_family<RMSPropFamily>(a, pass); }

}  // namespace pub_native::cuda::detail
