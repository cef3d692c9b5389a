// The K x K balancing-weight solver of SPEC section 4, framework-free and usable from host
// and device code: find alpha > 0 with G alpha = 1 / alpha (the Nash bargaining solution).
//   "newton": damped Newton on the strictly convex f(a) = 1/2 a'Ga - sum log a_i.
//   "ccp":    the paper's concave-convex procedure; each convex subproblem is solved by a small
//             log-barrier interior-point method.
// One call solves one problem with one team (team.h) and a caller-provided workspace.
#pragma once

#include "pub_native/linalg.h"

namespace pub_native {

struct SolveOptions {
  int32_t method = kNewton;
  double ridge = 1e-8;  // G + ridge * diag(G) on the m active tasks
  double tol = 1e-12;   // newton: lambda^2 / 2 <= tol * m; ccp: relative residual <= tol
  int32_t max_iter = 50;  // newton: Newton steps; ccp: outer (convexified) iterations
};

struct SolveOutcome {
  int32_t status = kConverged;
  int32_t iterations = 0;
  double residual = 0.0;  // ||G a - 1/a|| / ||1/a|| on the active, ridged problem
};

// A task whose update norm sqrt(G_ii) is at most this fraction of the largest is excluded.
constexpr double kZeroTaskRelTol = 1e-12;

// G counts as symmetric when max |G - G^T| <= tol * max |G|: the rounding of a Gram matrix
// summed in another order, for float64 and float32 input.
constexpr double kSymmetryTolF64 = 1.5e-8;
constexpr double kSymmetryTolF32 = 3.5e-4;
template <class T>
PN_HD double symmetry_tolerance() {
  return sizeof(T) >= 8 ? kSymmetryTolF64 : kSymmetryTolF32;
}

// Number of doubles of workspace one problem of size K needs.
PN_HD int64_t solver_workspace_size(int64_t K) { return 3 * K * K + 14 * K; }

namespace detail {

// Named slices of one problem's workspace, for n tasks. The solver first slices it for all K
// tasks (to hold the active-task indices), then again for the m <= K active ones: every vector
// of the second slicing ends before `idx` of the first (3m^2 + 13m <= 3K^2 + 13K).
struct Workspace {
  double* G;    // n x n active, symmetrized, ridged, equilibrated Gram
  double* H;    // n x n Hessian, factored in place
  double* W;    // n x n scratch
  double* a;    // current weights
  double* Ga;   // G a
  double* g;    // gradient
  double* d;    // Newton direction
  double* Gd;   // G d
  double* x;    // CCP subproblem iterate
  double* Gx;   // G x
  double* xt;   // trial point of a line search
  double* Gxt;  // G xt
  double* c;    // linear cost of the CCP subproblem
  double* q;    // scratch vectors
  double* r;
  double* scale;  // diagonal equilibration: sqrt(G_ii) of the active tasks
  double* idx;  // active task indices (small integers, exact in double)
  PN_HD Workspace(double* ws, int64_t n) {
    G = ws;
    H = G + n * n;
    W = H + n * n;
    double* v = W + n * n;
    a = v; Ga = v + n; g = v + 2 * n; d = v + 3 * n; Gd = v + 4 * n; x = v + 5 * n;
    Gx = v + 6 * n; xt = v + 7 * n; Gxt = v + 8 * n; c = v + 9 * n; q = v + 10 * n;
    r = v + 11 * n; scale = v + 12 * n; idx = v + 13 * n;
  }
};

// f(a) = 1/2 a'Ga - sum log a given Ga = G a.
template <class Team>
PN_HD double nash_objective(const Team& tm, const double* a, const double* Ga, int64_t m) {
  double s = 0.0;
  for (int64_t i = tm.rank(); i < m; i += tm.size()) s += 0.5 * a[i] * Ga[i] - pn_log(a[i]);
  return tm.sum(s);
}

// ||G a - 1/a|| / ||1/a||.
// v <- s v for the s that minimizes f along the ray (s = sqrt(m / v'Gv)), with Gv = G v; false
// (v left as it was, Gv = G v) where v'Gv is not positive and finite.
template <class Team>
PN_HD bool best_multiple(const Team& tm, const double* G, double* v, double* Gv, int64_t m) {
  team_matvec(tm, G, v, Gv, m);
  const double q = team_dot(tm, v, Gv, m);
  if (!(q > 0.0 && pn_isfinite(q))) return false;
  const double s = pn_sqrt(static_cast<double>(m) / q);
  for (int64_t i = tm.rank(); i < m; i += tm.size()) {
    v[i] *= s;
    Gv[i] *= s;
  }
  tm.sync();
  return true;
}

// Both norms are taken of the vectors divided by c = max_i 1/a_i, so that weights far from 1
// (a Gram of subnormal entries gives weights of 1e155) do not overflow their squares.
template <class Team>
PN_HD double relative_residual(const Team& tm, const double* a, const double* Ga, int64_t m) {
  double c = 0.0;
  for (int64_t i = tm.rank(); i < m; i += tm.size()) c = pn_max(c, 1.0 / a[i]);
  c = tm.max(c);
  double num = 0.0, den = 0.0;
  for (int64_t i = tm.rank(); i < m; i += tm.size()) {
    const double inv = (1.0 / a[i]) / c;
    const double r = Ga[i] / c - inv;
    num += r * r;
    den += inv * inv;
  }
  num = tm.sum(num);
  den = tm.sum(den);
  return pn_sqrt(num) / pn_sqrt(den);
}

// One damped Newton step on f from w.a (w.Ga must hold G a). Returns the status of the step and
// writes lambda^2 (the squared Newton decrement, measured before the step) to *lambda2.
// When lambda^2 / 2 <= stop_below the full step is taken and *done is set: inside the region of
// quadratic convergence the full step is both feasible and a descent step.
template <class Team>
PN_HD_CALLED int32_t newton_step(const Team& tm, Workspace& w, int64_t m, double stop_below,
                                 double* lambda2, bool* done) {
  for (int64_t i = tm.rank(); i < m; i += tm.size()) w.g[i] = w.Ga[i] - 1.0 / w.a[i];
  for (int64_t i = tm.rank(); i < m; i += tm.size()) {
    for (int64_t j = 0; j <= i; ++j) w.H[i * m + j] = w.G[i * m + j];
    w.H[i * m + i] += 1.0 / (w.a[i] * w.a[i]);
  }
  tm.sync();
  if (!team_cholesky(tm, w.H, m)) return kNotPositiveDefinite;
  for (int64_t i = tm.rank(); i < m; i += tm.size()) w.d[i] = -w.g[i];
  tm.sync();
  team_cholesky_solve(tm, w.H, w.d, w.d, m);
  const double slope = team_dot(tm, w.g, w.d, m);  // = -lambda^2
  *lambda2 = -slope;
  *done = (-slope) * 0.5 <= stop_below;
  team_matvec(tm, w.G, w.d, w.Gd, m);
  double t = 1.0;
  // f is self-concordant, so lambda <= 1/4 guarantees the full step stays feasible and descends.
  if (!*done && -slope > 0.0625) {
    while (team_min_axpy(tm, w.a, t, w.d, m) <= 0.0) {
      t *= 0.5;
      if (t < 1e-30) return kLineSearchFailed;
    }
    const double f0 = nash_objective(tm, w.a, w.Ga, m);
    for (;;) {
      for (int64_t i = tm.rank(); i < m; i += tm.size()) {
        w.xt[i] = w.a[i] + t * w.d[i];
        w.Gxt[i] = w.Ga[i] + t * w.Gd[i];
      }
      tm.sync();
      if (nash_objective(tm, w.xt, w.Gxt, m) <= f0 + 0.25 * t * slope) break;
      t *= 0.5;
      if (t < 1e-30) return kLineSearchFailed;
    }
  }
  for (int64_t i = tm.rank(); i < m; i += tm.size()) {
    w.a[i] += t * w.d[i];
    w.Ga[i] += t * w.Gd[i];
  }
  tm.sync();
  return kConverged;
}

template <class Team>
PN_HD_CALLED SolveOutcome newton_solve(const Team& tm, Workspace& w, int64_t m,
                                       const SolveOptions& o) {
  SolveOutcome out;
  out.status = kMaxIter;
  for (int32_t it = 0; it < o.max_iter; ++it) {
    double lambda2 = 0.0;
    bool done = false;
    const int32_t st = newton_step(tm, w, m, o.tol * static_cast<double>(m), &lambda2, &done);
    if (st != kConverged) {
      out.status = st;
      break;
    }
    out.iterations = it + 1;
    if (done) {
      out.status = kConverged;
      break;
    }
  }
  // Recompute G a from scratch: the running update accumulates rounding.
  team_matvec(tm, w.G, w.a, w.Ga, m);
  return out;
}

// h_i(x) = log x_i + log (G x)_i for the CCP constraints h_i >= 0; min_i h_i on every lane, or
// -inf when x or G x leaves the positive orthant.
template <class Team>
PN_HD double ccp_min_constraint(const Team& tm, const double* x, const double* Gx, int64_t m) {
  double h = 1.0 / 0.0;
  for (int64_t i = tm.rank(); i < m; i += tm.size()) {
    if (!(x[i] > 0.0) || !(Gx[i] > 0.0)) {
      h = -1.0 / 0.0;
    } else {
      h = pn_min(h, pn_log(x[i]) + pn_log(Gx[i]));
    }
  }
  return tm.min(h);
}

// Barrier objective t c'x - sum log h_i(x); requires min h > 0.
template <class Team>
PN_HD double ccp_barrier(const Team& tm, double t, const double* c, const double* x,
                         const double* Gx, int64_t m) {
  double s = 0.0;
  for (int64_t i = tm.rank(); i < m; i += tm.size())
    s += t * c[i] * x[i] - pn_log(pn_log(x[i]) + pn_log(Gx[i]));
  return tm.sum(s);
}

// Log-barrier parameters of the CCP subproblem. The barrier's Hessian grows as t^2 near active
// constraints, so the gap is closed only to 1e-9 (relative); the active-set polish in ccp_solve
// then brings the answer to full precision where the solution is the all-active point.
constexpr double kBarrierGapTol = 1e-9;
// Start where the gap m/t is 1e-3 |c'x| and grow t 20-fold per centering: measured over
// K = 2..64 this takes the fewest Newton steps (about 35 in all) of the settings tried.
constexpr double kBarrierGrowth = 20.0;
constexpr double kBarrierStart = 1e3;
constexpr double kCenteringTol = 1e-10;
// A constraint h_i = log(x_i (G x)_i) >= 0 with slack below this counts as active.
constexpr double kActiveSlack = 1e-4;
// The polish stops where Newton's default rule does: lambda^2 / 2 <= 1e-12 m.
constexpr double kPolishTol = 1e-12;

// Solves the convex CCP subproblem  min c'x  s.t.  log x_i + log (G x)_i >= 0  by the log-barrier
// method, from the strictly feasible w.x (with w.Gx = G x). Leaves the solution in w.x, w.Gx.
template <class Team>
PN_HD_CALLED int32_t ccp_subproblem(const Team& tm, Workspace& w, int64_t m) {
  const double md = static_cast<double>(m);
  // The barrier problem's duality gap is m / t: stop once it is negligible next to |c'x|.
  double t = kBarrierStart * md / pn_max(pn_abs(team_dot(tm, w.c, w.x, m)), 1e-300);
  for (int level = 0; level < 64; ++level) {
    for (int it = 0; it < 50; ++it) {
      // With a_i = 1/x_i, b_i = 1/(Gx)_i, q_i = 1/h_i:
      //   gradient  t c - q a - G (q b)
      //   Hessian   diag(a^2 (q^2+q)) + G diag(b^2 (q^2+q)) G + diag(q^2 a b) G + G diag(q^2 a b)
      double* qb = w.q;  // q b
      double* e = w.r;   // q^2 a b
      for (int64_t i = tm.rank(); i < m; i += tm.size()) {
        const double ai = 1.0 / w.x[i], bi = 1.0 / w.Gx[i];
        const double qi = 1.0 / (pn_log(w.x[i]) + pn_log(w.Gx[i]));
        w.g[i] = t * w.c[i] - qi * ai;
        qb[i] = qi * bi;
        e[i] = qi * qi * ai * bi;
        // d and xt hold b^2 (q^2 + q) and a^2 (q^2 + q) until the Hessian is built.
        w.d[i] = bi * bi * (qi * qi + qi);
        w.xt[i] = ai * ai * (qi * qi + qi);
      }
      tm.sync();
      for (int64_t i = tm.rank(); i < m; i += tm.size()) {
        double s = 0.0;
        for (int64_t k = 0; k < m; ++k) s += w.G[i * m + k] * qb[k];
        w.g[i] -= s;
      }
      tm.sync();
      // W = G diag(b^2 (q^2 + q)).
      for (int64_t i = tm.rank(); i < m; i += tm.size())
        for (int64_t k = 0; k < m; ++k) w.W[i * m + k] = w.G[i * m + k] * w.d[k];
      tm.sync();
      // Row i of the lower triangle as a sum of scaled rows of G (contiguous, vectorizable).
      for (int64_t i = tm.rank(); i < m; i += tm.size()) {
        double* Hi = w.H + i * m;
        const double* Gi = w.G + i * m;
        for (int64_t j = 0; j <= i; ++j) Hi[j] = (e[i] + e[j]) * Gi[j];
        Hi[i] += w.xt[i];
        for (int64_t k = 0; k < m; ++k) {
          const double wik = w.W[i * m + k];
          const double* Gk = w.G + k * m;
          for (int64_t j = 0; j <= i; ++j) Hi[j] += wik * Gk[j];
        }
      }
      tm.sync();
      // The barrier Hessian is positive definite in exact arithmetic, but its G diag(.) G term
      // is huge next to its smallest eigenvalue when G is nearly singular (opposing tasks) or
      // when task scales differ widely, and rounding can leave it indefinite. Then factor
      // H + delta diag(H) instead, with the smallest delta that works: still a descent direction.
      for (int64_t i = tm.rank(); i < m; i += tm.size())
        for (int64_t j = 0; j <= i; ++j) w.W[i * m + j] = w.H[i * m + j];
      tm.sync();
      bool factored = team_cholesky(tm, w.H, m);
      for (double delta = 1e-14; !factored && delta <= 1e-1; delta *= 100.0) {
        for (int64_t i = tm.rank(); i < m; i += tm.size()) {
          for (int64_t j = 0; j < i; ++j) w.H[i * m + j] = w.W[i * m + j];
          w.H[i * m + i] = w.W[i * m + i] * (1.0 + delta);
        }
        tm.sync();
        factored = team_cholesky(tm, w.H, m);
      }
      if (!factored) return level > 0 ? kConverged : kNotPositiveDefinite;
      for (int64_t i = tm.rank(); i < m; i += tm.size()) w.d[i] = -w.g[i];
      tm.sync();
      team_cholesky_solve(tm, w.H, w.d, w.d, m);
      const double slope = team_dot(tm, w.g, w.d, m);  // -lambda^2
      // Centered enough: the barrier's accuracy is set by the gap m/t, not by this.
      if (-slope * 0.5 <= kCenteringTol) break;
      team_matvec(tm, w.G, w.d, w.Gd, m);
      // Backtrack into the domain (x > 0, G x > 0, h > 0), then to sufficient decrease.
      const double F0 = ccp_barrier(tm, t, w.c, w.x, w.Gx, m);
      double s = 1.0;
      bool accepted = false;
      while (s >= 1e-20) {
        for (int64_t i = tm.rank(); i < m; i += tm.size()) {
          w.xt[i] = w.x[i] + s * w.d[i];
          w.Gxt[i] = w.Gx[i] + s * w.Gd[i];
        }
        tm.sync();
        if (ccp_min_constraint(tm, w.xt, w.Gxt, m) > 0.0 &&
            ccp_barrier(tm, t, w.c, w.xt, w.Gxt, m) <= F0 + 0.25 * s * slope) {
          accepted = true;
          break;
        }
        s *= 0.5;
      }
      // No decrease left above the rounding floor of the barrier value: x is centered.
      if (!accepted) break;
      for (int64_t i = tm.rank(); i < m; i += tm.size()) {
        w.x[i] = w.xt[i];
        w.Gx[i] = w.Gxt[i];
      }
      tm.sync();
    }
    if (md / t <= kBarrierGapTol * pn_abs(team_dot(tm, w.c, w.x, m))) break;
    t *= kBarrierGrowth;
  }
  return kConverged;
}

template <class Team>
PN_HD_CALLED SolveOutcome ccp_solve(const Team& tm, Workspace& w, int64_t m,
                                    const SolveOptions& o) {
  SolveOutcome out;
  out.status = kMaxIter;
  for (int32_t it = 0; it < o.max_iter; ++it) {
    // The linearization point must have G a > 0 (phi is undefined otherwise). Damped Newton
    // steps on the Nash objective reach such a point, since its solution has G a = 1/a > 0.
    for (int k = 0; k < 100; ++k) {
      double mn = 1.0 / 0.0;
      for (int64_t i = tm.rank(); i < m; i += tm.size()) mn = pn_min(mn, w.Ga[i]);
      if (tm.min(mn) > 0.0) break;
      double lambda2 = 0.0;
      bool done = false;
      const int32_t st = newton_step(tm, w, m, 0.0, &lambda2, &done);
      if (st != kConverged) {
        out.status = st;
        return out;
      }
    }
    // c = G 1 + grad phi(a_k),  grad phi(a) = 1/a + G (1 / (G a)).
    for (int64_t i = tm.rank(); i < m; i += tm.size()) w.q[i] = 1.0 + 1.0 / w.Ga[i];
    tm.sync();
    for (int64_t i = tm.rank(); i < m; i += tm.size()) {
      double s = 0.0;
      for (int64_t k = 0; k < m; ++k) s += w.G[i * m + k] * w.q[k];
      w.c[i] = s + 1.0 / w.a[i];
    }
    // Strictly feasible start: scale a_k so that min_i h_i(s a_k) = min_i h_i(a_k) + 2 log s > 0.
    const double hmin = ccp_min_constraint(tm, w.a, w.Ga, m);
    const double log_s = (hmin < 0.0 ? -0.5 * hmin : 0.0) + 0.05;
    const double sc = pn_exp(log_s);
    for (int64_t i = tm.rank(); i < m; i += tm.size()) {
      w.x[i] = sc * w.a[i];
      w.Gx[i] = sc * w.Ga[i];
    }
    tm.sync();
    const int32_t st = ccp_subproblem(tm, w, m);
    if (st != kConverged) {
      out.status = st;
      break;
    }
    for (int64_t i = tm.rank(); i < m; i += tm.size()) w.a[i] = w.x[i];
    tm.sync();
    // Recompute G a from scratch rather than trusting the line searches' running update.
    team_matvec(tm, w.G, w.a, w.Ga, m);
    out.iterations = it + 1;
    // Active-set polish: when every constraint is active at the barrier solution, the exact
    // subproblem solution is the unique point with all h_i = 0, i.e. a (G a) = 1; Newton steps
    // on f from the barrier point (already in its quadratic region) reach it to rounding.
    double hmax = -1.0 / 0.0;
    for (int64_t i = tm.rank(); i < m; i += tm.size())
      hmax = pn_max(hmax, pn_abs(pn_log(w.a[i]) + pn_log(w.Ga[i])));
    if (tm.max(hmax) <= kActiveSlack) {
      bool done = false;
      for (int k = 0; k < 8 && !done; ++k) {
        double lambda2 = 0.0;
        if (newton_step(tm, w, m, kPolishTol * static_cast<double>(m), &lambda2, &done) !=
            kConverged)
          break;
      }
      team_matvec(tm, w.G, w.a, w.Ga, m);
      // The polished point is the CCP's fixed point (the root): nothing is left to iterate.
      // Its residual can sit above a tight `tol` by eps * cond(G), so the decrement decides.
      if (done) {
        out.status = kConverged;
        break;
      }
    }
    if (relative_residual(tm, w.a, w.Ga, m) <= o.tol) {
      out.status = kConverged;
      break;
    }
  }
  return out;
}

// G_out = the symmetrized Gram of the m active tasks, ridged relative to each task's own
// squared update norm, (G + ridge * diag G), in coordinates scaled by 1/scale:
// G_out_ij = G_ij / (scale_i scale_j). With scale_i = sqrt(G_ii) the result has a unit diagonal
// (plus the ridge), which is what makes the solve equivariant to per-task scaling; with
// scale = 1 it is the ridged Gram itself.
template <class Team, class T>
PN_HD void gather_gram(const Team& tm, const T* Gin, int64_t K, const double* idx, int64_t m,
                       double ridge, const double* scale, double* G_out) {
  for (int64_t i = tm.rank(); i < m; i += tm.size()) {
    const int64_t gi = static_cast<int64_t>(idx[i]);
    const double si = scale ? scale[i] : 1.0;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t gj = static_cast<int64_t>(idx[j]);
      const double sj = scale ? scale[j] : 1.0;
      // Halved before the sum, which would overflow near the largest double (the same value
      // otherwise: halving is exact).
      const double gij = 0.5 * static_cast<double>(Gin[gi * K + gj]) +
                         0.5 * static_cast<double>(Gin[gj * K + gi]);
      G_out[i * m + j] = gij / (si * sj);
    }
    G_out[i * m + i] *= 1.0 + ridge;
  }
  tm.sync();
}

}  // namespace detail

// Solves one problem. Gin: K x K row-major (any float type T), warm: K initial weights or null,
// alpha_out: K weights (0 for excluded tasks), ws: solver_workspace_size(K) doubles.
template <class Team, class T>
PN_HD SolveOutcome solve_weights(const Team& tm, const T* Gin, const T* warm, T* alpha_out,
                                 int64_t K, const SolveOptions& o, double* ws) {
  SolveOutcome out;
  detail::Workspace w(ws, K);
  // Validate: finite and symmetric up to the rounding of the input type.
  const double sym_tol = symmetry_tolerance<T>();
  double gmax = 0.0, asym = 0.0;
  bool finite = true;
  for (int64_t i = tm.rank(); i < K; i += tm.size()) {
    for (int64_t j = 0; j < K; ++j) {
      const double gij = static_cast<double>(Gin[i * K + j]);
      finite = finite && pn_isfinite(gij);
      gmax = pn_max(gmax, pn_abs(gij));
      asym = pn_max(asym, pn_abs(gij - static_cast<double>(Gin[j * K + i])));
    }
  }
  finite = tm.min(finite ? 1.0 : 0.0) > 0.0;
  gmax = tm.max(gmax);
  asym = tm.max(asym);
  if (!finite || asym > sym_tol * gmax) {
    for (int64_t i = tm.rank(); i < K; i += tm.size()) alpha_out[i] = static_cast<T>(0.0 / 0.0);
    out.status = kInvalidInput;
    out.residual = 0.0 / 0.0;
    return out;
  }
  // Active set: tasks whose update is not negligible next to the largest one.
  double dmax = 0.0, dmin = 0.0;
  for (int64_t i = tm.rank(); i < K; i += tm.size()) {
    const double gii = static_cast<double>(Gin[i * K + i]);
    dmax = pn_max(dmax, gii);
    dmin = pn_min(dmin, gii);
  }
  dmax = tm.max(dmax);
  dmin = tm.min(dmin);
  if (dmin < 0.0) {
    for (int64_t i = tm.rank(); i < K; i += tm.size()) alpha_out[i] = static_cast<T>(0.0 / 0.0);
    out.status = kNotPositiveDefinite;
    out.residual = 0.0 / 0.0;
    return out;
  }
  const double norm_floor = kZeroTaskRelTol * pn_sqrt(dmax);
  int64_t m = 0;
  if (tm.rank() == 0) {
    for (int64_t i = 0; i < K; ++i) {
      if (dmax > 0.0 && pn_sqrt(static_cast<double>(Gin[i * K + i])) > norm_floor) {
        w.idx[m++] = static_cast<double>(i);
      }
    }
    w.q[0] = static_cast<double>(m);
  }
  tm.sync();
  m = static_cast<int64_t>(w.q[0]);
  tm.sync();
  for (int64_t i = tm.rank(); i < K; i += tm.size()) alpha_out[i] = static_cast<T>(0.0);
  if (m == 0) {
    out.status = kAllZero;
    return out;
  }
  // Re-slice the workspace for the m active tasks. Both methods run on the equilibrated Gram
  // D G D, d_i = 1 / sqrt(G_ii): the Nash root is equivariant under diagonal scaling
  // (D G D b = 1/b for b = a / d), so tasks whose update norms differ by orders of magnitude
  // converge like equal ones, and scaling one task's update scales its weight by exactly the
  // inverse (up to rounding of the equilibration).
  detail::Workspace wm(ws, m);
  const double* idx = w.idx;
  for (int64_t i = tm.rank(); i < m; i += tm.size())
    wm.scale[i] = pn_sqrt(static_cast<double>(Gin[static_cast<int64_t>(idx[i]) * (K + 1)]));
  tm.sync();
  detail::gather_gram(tm, Gin, K, idx, m, o.ridge, wm.scale, wm.G);
  // Start: the warm start if it is usable, else b_i = 1 (a_i = 1/sqrt(G_ii)); then the best
  // multiple of it, s = sqrt(m / b'Gb), which minimizes f along the ray and makes the start
  // scale-covariant.
  bool use_warm = warm != nullptr;
  if (use_warm) {
    double ok = 1.0;
    for (int64_t i = tm.rank(); i < m; i += tm.size()) {
      const double v = static_cast<double>(warm[static_cast<int64_t>(idx[i])]);
      if (!(v > 0.0) || !pn_isfinite(v)) ok = 0.0;
    }
    use_warm = tm.min(ok) > 0.0;
  }
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t i = tm.rank(); i < m; i += tm.size()) {
      wm.a[i] = use_warm ? static_cast<double>(warm[static_cast<int64_t>(idx[i])]) * wm.scale[i]
                         : 1.0;
    }
    tm.sync();
    if (detail::best_multiple(tm, wm.G, wm.a, wm.Ga, m)) break;
    if (!use_warm) {
      out.status = kNotPositiveDefinite;
      out.residual = 0.0 / 0.0;
      return out;
    }
    use_warm = false;
  }
  if (use_warm) {
    // A warm start worse than the cold one (f larger at the best multiple of each: a start
    // with entries 1e-16 of the others', from a task whose update changed that much) is
    // dropped: Newton would spend its iterations coming back from it.
    const double f_warm = detail::nash_objective(tm, wm.a, wm.Ga, m);
    for (int64_t i = tm.rank(); i < m; i += tm.size()) wm.x[i] = 1.0;
    tm.sync();
    if (detail::best_multiple(tm, wm.G, wm.x, wm.Gx, m)) {
      const double f_cold = detail::nash_objective(tm, wm.x, wm.Gx, m);
      if (!(f_warm <= f_cold)) {
        for (int64_t i = tm.rank(); i < m; i += tm.size()) {
          wm.a[i] = wm.x[i];
          wm.Ga[i] = wm.Gx[i];
        }
        tm.sync();
      }
    }
  }
  out = o.method == kCcp ? detail::ccp_solve(tm, wm, m, o) : detail::newton_solve(tm, wm, m, o);
  // Back to the original coordinates; the weights are rounded to T, and the residual reported
  // is that of the rounded weights on the ridged (unequilibrated) problem.
  for (int64_t i = tm.rank(); i < m; i += tm.size()) {
    const T rounded = static_cast<T>(wm.a[i] / wm.scale[i]);
    alpha_out[static_cast<int64_t>(idx[i])] = rounded;
    wm.a[i] = static_cast<double>(rounded);
  }
  tm.sync();
  detail::gather_gram(tm, Gin, K, idx, m, o.ridge, static_cast<const double*>(nullptr), wm.G);
  team_matvec(tm, wm.G, wm.a, wm.Ga, m);
  out.residual = detail::relative_residual(tm, wm.a, wm.Ga, m);
  return out;
}

}  // namespace pub_native
