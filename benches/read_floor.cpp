// Memory floor of the CPU step: how long two OpenMP threads take to read four float32 arrays of
// 16M elements (what a K = 2 Gram pass must read), and to read them and write three of them back
// in place (what an Adam step does). Standalone, no torch:
//
//   g++ -O2 -march=x86-64-v3 -fopenmp benches/read_floor.cpp -o /tmp/read_floor
//   OMP_NUM_THREADS=2 /tmp/read_floor
//
// Prints the median of 15 rounds of each, timed in turn.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

int main() {
  const long n = 16L << 20;
  std::vector<float> g(n), p(n), m(n), v(n);
  for (long j = 0; j < n; ++j) {
    g[j] = 1e-3f * static_cast<float>(j % 97);
    p[j] = 1.0f;
    m[j] = 0.0f;
    v[j] = 0.0f;
  }
  float* __restrict G = g.data();
  float* __restrict P = p.data();
  float* __restrict M = m.data();
  float* __restrict V = v.data();
  std::vector<double> read_t, rw_t;
  double sink = 0.0;
  for (int round = 0; round < 16; ++round) {
    auto t0 = std::chrono::steady_clock::now();
    float total = 0.0f;
#pragma omp parallel for simd reduction(+ : total) schedule(static)
    for (long j = 0; j < n; ++j) total += G[j] + P[j] + M[j] + V[j];
    auto t1 = std::chrono::steady_clock::now();
#pragma omp parallel for simd schedule(static)
    for (long j = 0; j < n; ++j) {
      const float gj = G[j];
      const float mj = 0.9f * M[j] + 0.1f * gj;
      const float vj = 0.999f * V[j] + 0.001f * gj * gj;
      M[j] = mj;
      V[j] = vj;
      P[j] -= 1e-3f * mj;
    }
    auto t2 = std::chrono::steady_clock::now();
    sink += total;
    if (round == 0) continue;  // warm-up
    read_t.push_back(std::chrono::duration<double>(t1 - t0).count());
    rw_t.push_back(std::chrono::duration<double>(t2 - t1).count());
  }
  auto median = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x[x.size() / 2];
  };
  const double r = median(read_t), w = median(rw_t), bytes = 4.0 * 4 * n;
  std::printf("%d threads, 4 arrays of %ld float32\n", omp_get_max_threads(), n);
  std::printf("read 4:                     %6.2f ms  (%5.1f GB/s read)\n", r * 1e3,
              bytes / r / 1e9);
  std::printf("read 4, write 3 in place:   %6.2f ms  (%5.2fx the read alone)\n", w * 1e3, w / r);
  std::printf("(checksum %g)\n", sink);
  return 0;
}
