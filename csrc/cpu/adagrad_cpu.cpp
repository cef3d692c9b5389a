// CPU loops of the AdaGrad PUB step (every element type and option set); the math is in
// pub_native/update_rules.h, the loops in pub_step_cpu_impl.h. One file per optimizer keeps the
// template instantiations in parallel translation units.
#include "pub_step_cpu_impl.h"

namespace pub_native::cpu::detail {

void run_adagrad(const PassArgs& a, Pass pass) { run_family<AdaGradFamily>(a, pass); }

}  // namespace pub_native::cpu::detail
