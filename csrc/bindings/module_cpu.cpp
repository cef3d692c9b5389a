// pybind11 module pub_native._C (always built): the CPU entry points and the build report.
// It takes numpy arrays only; pub_native/solver.py turns torch tensors into views of them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <sstream>
#include <string>

#include "../cpu/pub_step_cpu.h"
#include "../cpu/solve_weights_cpu.h"
#include "build_config.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace pub_native;

namespace {

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

// Host-side checks with messages that name the argument; the header repeats the value checks
// for device callers, where nothing can throw.
template <class T>
void check_gram(const T* G, int64_t batch, int64_t K) {
  const double sym_tol = sizeof(T) >= 8 ? 1.5e-8 : 3.5e-4;
  for (int64_t b = 0; b < batch; ++b) {
    const T* g = G + b * K * K;
    double gmax = 0.0, asym = 0.0;
    for (int64_t i = 0; i < K * K; ++i) {
      if (!std::isfinite(static_cast<double>(g[i]))) {
        std::ostringstream s;
        s << "G contains NaN or Inf" << (batch > 1 ? " (problem " + std::to_string(b) + ")" : "")
          << " at entry (" << i / K << ", " << i % K << ")";
        throw py::value_error(s.str());
      }
      gmax = std::max(gmax, std::abs(static_cast<double>(g[i])));
    }
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < i; ++j)
        asym = std::max(asym, std::abs(static_cast<double>(g[i * K + j]) -
                                       static_cast<double>(g[j * K + i])));
    if (asym > sym_tol * gmax) {
      std::ostringstream s;
      s << "G must be symmetric" << (batch > 1 ? " (problem " + std::to_string(b) + ")" : "")
        << ": max |G - G^T| = " << asym << " exceeds " << sym_tol << " * max |G|";
      throw py::value_error(s.str());
    }
  }
}

template <class T>
py::tuple solve_typed(const py::array& G_any, const py::object& warm_obj, int64_t batch,
                      int64_t K, bool batched, const SolveOptions& o) {
  using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;
  Arr G = Arr::ensure(G_any);
  Arr warm;
  const T* warm_ptr = nullptr;
  if (!warm_obj.is_none()) {
    warm = Arr::ensure(warm_obj);
    if (!warm) throw py::type_error("warm_start must be an array of weights");
    const bool ok = batched ? (warm.ndim() == 2 && warm.shape(0) == batch && warm.shape(1) == K)
                            : (warm.ndim() == 1 && warm.shape(0) == K);
    if (!ok) {
      std::ostringstream s;
      s << "warm_start must have shape " << (batched ? "(B, K) = (" + std::to_string(batch) + ", " : "(")
        << K << (batched ? ")" : ",)") << ", got " << shape_str(warm);
      throw py::value_error(s.str());
    }
    warm_ptr = warm.data();
    for (int64_t i = 0; i < batch * K; ++i) {
      const double v = static_cast<double>(warm_ptr[i]);
      if (!(v >= 0.0) || !std::isfinite(v))
        throw py::value_error("warm_start must be finite and non-negative (0 marks an excluded "
                              "task), got " + std::to_string(v));
    }
  }
  check_gram(G.data(), batch, K);
  if (!batched) {
    py::array_t<T> alpha(K);
    int32_t status = 0, iterations = 0;
    double residual = 0.0;
    // Releasing the GIL costs about as much as solving a small problem.
    if (K >= 16) {
      py::gil_scoped_release release;
      cpu::solve_weights_batch<T>(G.data(), warm_ptr, alpha.mutable_data(), &status, &iterations,
                                  &residual, 1, K, o);
    } else {
      cpu::solve_weights_batch<T>(G.data(), warm_ptr, alpha.mutable_data(), &status, &iterations,
                                  &residual, 1, K, o);
    }
    return py::make_tuple(alpha, status, iterations, residual);
  }
  py::array_t<T> alpha(std::vector<py::ssize_t>{batch, K});
  py::array_t<int32_t> status(batch), iterations(batch);
  py::array_t<double> residual(batch);
  {
    py::gil_scoped_release release;
    cpu::solve_weights_batch<T>(G.data(), warm_ptr, alpha.mutable_data(), status.mutable_data(),
                                iterations.mutable_data(), residual.mutable_data(), batch, K, o);
  }
  return py::make_tuple(alpha, status, iterations, residual);
}

py::tuple solve_weights_py(const py::array& G, const py::object& warm, int32_t method,
                           double ridge, double tol, int32_t max_iter) {
  const bool batched = G.ndim() == 3;
  if (G.ndim() != 2 && G.ndim() != 3)
    throw py::value_error("G must be a (K, K) matrix or a (B, K, K) batch of them, got shape " +
                          shape_str(G));
  const int64_t K = G.shape(G.ndim() - 1);
  if (G.shape(G.ndim() - 2) != K)
    throw py::value_error("G must be square (K, K), got shape " + shape_str(G));
  if (K == 0) throw py::value_error("G must have at least one task (K >= 1), got shape " + shape_str(G));
  const int64_t batch = batched ? G.shape(0) : 1;
  SolveOptions o;
  o.method = method;
  o.ridge = ridge;
  o.tol = tol;
  o.max_iter = max_iter;
  const char kind = G.dtype().kind();
  const auto itemsize = G.dtype().itemsize();
  if (kind == 'f' && itemsize == 8) return solve_typed<double>(G, warm, batch, K, batched, o);
  if (kind == 'f' && itemsize == 4) return solve_typed<float>(G, warm, batch, K, batched, o);
  throw py::type_error("G must be float32 or float64, got dtype " +
                       std::string(py::str(G.dtype())));
}

py::dict build_info() {
  py::dict d;
  d["version"] = PN_VERSION;
  d["build_type"] = PN_BUILD_TYPE;
  d["cxx_compiler"] = PN_CXX_COMPILER;
  d["cxx_flags"] = PN_CXX_FLAGS;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cuda_option"] = PN_CUDA_OPTION;
  return d;
}

int omp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// ---- PUB step ------------------------------------------------------------------------------

using Int64Array = py::array_t<int64_t, py::array::c_style>;
using DoubleArray = py::array_t<double, py::array::c_style>;

// The tables are read through raw pointers, so they must already have the exact layout:
// a silent conversion would hand the kernels a temporary.
void check_tables(const StepConfig& cfg, const Int64Array& table, const DoubleArray& hyper) {
  if (table.ndim() != 2 || table.shape(1) != kTableCols)
    throw py::value_error("table must be an int64 array of shape (n_tensors, " +
                          std::to_string(kTableCols) + "), got " + shape_str(table));
  if (hyper.ndim() != 2 || hyper.shape(1) != kHyperCols)
    throw py::value_error("hyper must be a float64 array of shape (n_groups, " +
                          std::to_string(kHyperCols) + "), got " + shape_str(hyper));
  const int64_t n = table.shape(0), groups = hyper.shape(0);
  const int64_t* t = table.data();
  int64_t total = 0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t* row = t + r * kTableCols;
    if (row[kTParam] == 0 || row[kTNumel] < 0 || row[kTGroup] < 0 || row[kTGroup] >= groups ||
        row[kTGradOffset] < 0 || row[kTGradOffset] + row[kTNumel] > cfg.row_length)
      throw py::value_error("table row " + std::to_string(r) + " is inconsistent");
    total += row[kTNumel];
  }
  if (cfg.num_tasks < 1) throw py::value_error("num_tasks must be >= 1");
  (void)total;
}

py::tuple pub_gram_py(const StepConfig& cfg, const Int64Array& table, const DoubleArray& hyper,
                      uintptr_t grads) {
  check_tables(cfg, table, hyper);
  const int64_t K = cfg.num_tasks, n = table.shape(0);
  DoubleArray G(std::vector<py::ssize_t>{K, K});
  py::object sigma_obj = py::none();
  double* sigma = nullptr;
  if (cfg.umm == Umm::kClippy) {
    DoubleArray s(std::vector<py::ssize_t>{n, K});
    sigma = s.mutable_data();
    sigma_obj = s;
  }
  {
    py::gil_scoped_release release;
    cpu::pub_gram(cfg, table.data(), n, hyper.data(), reinterpret_cast<const void*>(grads),
                  G.mutable_data(), sigma);
  }
  return py::make_tuple(G, sigma_obj);
}

void pub_apply_py(const StepConfig& cfg, const Int64Array& table, const DoubleArray& hyper,
                  uintptr_t grads, const DoubleArray& weights, const py::object& sigma_obj) {
  check_tables(cfg, table, hyper);
  const int64_t K = cfg.num_tasks, n = table.shape(0);
  if (weights.ndim() != 1 || weights.shape(0) != K)
    throw py::value_error("weights must be a float64 array of shape (K,)");
  const double* sigma = nullptr;
  DoubleArray sig;
  if (!sigma_obj.is_none()) {
    sig = sigma_obj.cast<DoubleArray>();
    if (sig.ndim() != 2 || sig.shape(0) != n || sig.shape(1) != K)
      throw py::value_error("sigma must be a float64 array of shape (n_tensors, K)");
    sigma = sig.data();
  } else if (cfg.umm == Umm::kClippy) {
    throw py::value_error("sigma is required with Clippy");
  }
  py::gil_scoped_release release;
  cpu::pub_apply(cfg, table.data(), n, hyper.data(), reinterpret_cast<const void*>(grads),
                 weights.data(), sigma);
}

py::array_t<uint8_t> rows_finite_py(int32_t dtype, uintptr_t grads, int64_t K, int64_t P) {
  if (dtype < kFloat32 || dtype > kFloat16) throw py::value_error("unknown dtype code");
  py::array_t<uint8_t> bad(K);
  {
    py::gil_scoped_release release;
    cpu::rows_finite(static_cast<DType>(dtype), reinterpret_cast<const void*>(grads), K, P,
                     bad.mutable_data());
  }
  return bad;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pub_native CPU core (framework-free; takes numpy arrays and raw pointers).";
  m.def("solve_weights", &solve_weights_py, py::arg("G"), py::arg("warm_start"),
        py::arg("method"), py::arg("ridge"), py::arg("tol"), py::arg("max_iter"),
        "Solve G a = 1/a for one (K, K) or a batch (B, K, K) of Gram matrices. Returns "
        "(weights, status, iterations, residual).");
  m.def("build_info", &build_info);
  m.def("omp_max_threads", &omp_threads);
  m.def("workspace_size", [](int64_t K) { return solver_workspace_size(K); },
        "Doubles of solver workspace one problem with K tasks needs.");

  py::class_<StepConfig>(m, "StepConfig", "Options of one PUB step (see pub_native/step.h).")
      .def(py::init(&make_step_config),
           py::arg("algo"), py::arg("amsgrad"), py::arg("centered"), py::arg("momentum"),
           py::arg("umm"), py::arg("dtype"), py::arg("num_tasks"), py::arg("row_length"),
           py::arg("grad_sign"), py::arg("clippy_rel"), py::arg("clippy_abs"), py::arg("has_l2"))
      .def_readonly("num_tasks", &StepConfig::num_tasks)
      .def_readonly("row_length", &StepConfig::row_length);
  m.attr("TABLE_COLS") = static_cast<int>(kTableCols);
  m.attr("HYPER_COLS") = static_cast<int>(kHyperCols);
  m.def("pub_gram", &pub_gram_py, py::arg("config"), py::arg("table").noconvert(),
        py::arg("hyper").noconvert(), py::arg("grads"),
        "Gram pass: returns (G (K, K) float64, sigma (n_tensors, K) with Clippy else None).");
  m.def("pub_apply", &pub_apply_py, py::arg("config"), py::arg("table").noconvert(),
        py::arg("hyper").noconvert(), py::arg("grads"), py::arg("weights").noconvert(),
        py::arg("sigma"), "Apply pass: writes the parameters and advances the state in place.");
  m.def("rows_finite", &rows_finite_py, py::arg("dtype"), py::arg("grads"), py::arg("num_tasks"),
        py::arg("row_length"), "Per task row of the gradient buffer: 1 if it holds NaN/Inf.");
}
