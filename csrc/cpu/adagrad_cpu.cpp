// CPU loops of the AdaGrad PUB step (every element type and option set); the math is in
// pub_native/update_rules.h, the loops in pub_step_cpu_impl.h. This is the x86-64-v3 version
// (the only one on other architectures); adagrad_base_cpu.cpp holds the x86-64 baseline one.
#include "pub_step_cpu_impl.h"

namespace pub_native::cpu::detail {

void run_adagrad_v3(const PassArgs& a, Pass pass) { run_family<AdaGradFamily, true>(a, pass); }

}  // namespace pub_native::cpu::detail
