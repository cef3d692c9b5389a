// CPU loops of the RMSProp PUB step for x86-64 processors without AVX2 and FMA (the tiled loops
// of pub_step_cpu_impl.h, baseline instruction set); rmsprop_cpu.cpp holds the version that
// every other processor runs.
#include "pub_step_cpu_impl.h"

namespace pub_native::cpu::detail {

#if PN_CPU_DISPATCH
void run_rmsprop_base(const PassArgs& a, Pass pass) { run_family<RMSPropFamily, false>(a, pass); }
#endif

}  // namespace pub_native::cpu::detail
