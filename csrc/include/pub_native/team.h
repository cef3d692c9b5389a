// Execution "teams" for the framework-free solver: the same algorithm runs on one host thread
// (SerialTeam), on one CUDA warp (WarpTeam), or on emulated lanes in a host test.
// A team's collective operations return bit-identical values on every lane, so branches that
// depend on them stay uniform across the team.
#pragma once

#include "pub_native/common.h"

namespace pub_native {

struct SerialTeam {
  PN_HD int rank() const { return 0; }
  PN_HD int size() const { return 1; }
  PN_HD void sync() const {}
  PN_HD double sum(double v) const { return v; }
  PN_HD double min(double v) const { return v; }
  PN_HD double max(double v) const { return v; }
};

#if defined(__CUDACC__)
// One warp solves one problem. Butterfly reductions followed by a broadcast from lane 0, so
// every lane holds the same bits. __syncwarp orders the workspace writes of the warp.
struct WarpTeam {
  __device__ __forceinline__ int rank() const { return static_cast<int>(threadIdx.x & 31u); }
  __device__ __forceinline__ int size() const { return 32; }
  __device__ __forceinline__ void sync() const { __syncwarp(); }
  __device__ __forceinline__ double sum(double v) const {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return __shfl_sync(0xffffffffu, v, 0);
  }
  __device__ __forceinline__ double min(double v) const {
    for (int o = 16; o > 0; o >>= 1) v = pn_min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return __shfl_sync(0xffffffffu, v, 0);
  }
  __device__ __forceinline__ double max(double v) const {
    for (int o = 16; o > 0; o >>= 1) v = pn_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return __shfl_sync(0xffffffffu, v, 0);
  }
};
#endif

}  // namespace pub_native
