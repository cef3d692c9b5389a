// Small dense linear algebra for the K x K weight solver, written once for any team
// (see team.h). Matrices are row-major n x n in double; n is small (K tasks), so these
// are plain loops: the work is O(n^3) per Newton step and n rarely exceeds 64.
#pragma once

#include "pub_native/team.h"

namespace pub_native {

// x . y, identical on every lane.
template <class Team>
PN_HD double team_dot(const Team& tm, const double* x, const double* y, int64_t n) {
  double s = 0.0;
  for (int64_t i = tm.rank(); i < n; i += tm.size()) s += x[i] * y[i];
  return tm.sum(s);
}

// min_i x[i] + t * d[i], identical on every lane.
template <class Team>
PN_HD double team_min_axpy(const Team& tm, const double* x, double t, const double* d,
                           int64_t n) {
  double m = 1.0 / 0.0;
  for (int64_t i = tm.rank(); i < n; i += tm.size()) m = pn_min(m, x[i] + t * d[i]);
  return tm.min(m);
}

// y = A x. y must not alias x.
template <class Team>
PN_HD void team_matvec(const Team& tm, const double* A, const double* x, double* y, int64_t n) {
  for (int64_t i = tm.rank(); i < n; i += tm.size()) {
    double s = 0.0;
    const double* row = A + i * n;
    for (int64_t k = 0; k < n; ++k) s += row[k] * x[k];
    y[i] = s;
  }
  tm.sync();
}

// In-place lower Cholesky factor of the symmetric matrix A (only the lower triangle is read
// and written). Returns false, on every lane, if A is not numerically positive definite.
template <class Team>
PN_HD bool team_cholesky(const Team& tm, double* A, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double* rj = A + j * n;
    double s = 0.0;
    for (int64_t k = tm.rank(); k < j; k += tm.size()) s += rj[k] * rj[k];
    const double ajj = rj[j];  // read by every lane before the collective sum
    const double d = ajj - tm.sum(s);
    if (!(d > 0.0) || !pn_isfinite(d)) {  // (d is the same on every lane)
      tm.sync();  // every lane's reads of A are done before a caller writes it again
      return false;
    }
    const double ljj = pn_sqrt(d);
    tm.sync();  // (a shuffle is no memory fence: every lane's read is done before the write)
    if (tm.rank() == 0) rj[j] = ljj;
    for (int64_t i = j + 1 + tm.rank(); i < n; i += tm.size()) {
      double* ri = A + i * n;
      double t = ri[j];
      for (int64_t k = 0; k < j; ++k) t -= ri[k] * rj[k];
      ri[j] = t / ljj;
    }
    tm.sync();
  }
  return true;
}

// Solves (L L^T) x = b with the factor from team_cholesky. x may alias b.
template <class Team>
PN_HD void team_cholesky_solve(const Team& tm, const double* L, const double* b, double* x,
                               int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double* ri = L + i * n;
    double s = 0.0;
    for (int64_t k = tm.rank(); k < i; k += tm.size()) s += ri[k] * x[k];
    const double v = (b[i] - tm.sum(s)) / ri[i];
    tm.sync();
    if (tm.rank() == 0) x[i] = v;
    tm.sync();
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    double s = 0.0;
    for (int64_t k = i + 1 + tm.rank(); k < n; k += tm.size()) s += L[k * n + i] * x[k];
    const double v = (x[i] - tm.sum(s)) / L[i * n + i];
    tm.sync();
    if (tm.rank() == 0) x[i] = v;
    tm.sync();
  }
}

}  // namespace pub_native
