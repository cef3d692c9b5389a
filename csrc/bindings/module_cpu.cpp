// pybind11 module pub_native._C (always built): the CPU entry points and the build report.
// It is never linked against torch: it takes numpy arrays and raw pointers, and reads the one
// CPU tensor of solve_weights' default call through torch's own descriptors, given at import.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

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
  const double sym_tol = symmetry_tolerance<T>();
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

// One checked (K, K) problem, C-contiguous: (weights, status, iterations, residual).
template <class T>
py::tuple solve_one(const T* G, const T* warm, int64_t K, const SolveOptions& o) {
  py::array_t<T> alpha(K);
  int32_t status = 0, iterations = 0;
  double residual = 0.0;
  // Releasing the GIL costs about as much as solving a small problem.
  if (K >= 16) {
    py::gil_scoped_release release;
    cpu::solve_weights_batch<T>(G, warm, alpha.mutable_data(), &status, &iterations, &residual,
                                1, K, o);
  } else {
    cpu::solve_weights_batch<T>(G, warm, alpha.mutable_data(), &status, &iterations, &residual,
                                1, K, o);
  }
  return py::make_tuple(alpha, status, iterations, residual);
}

// One (K, K) problem read from memory the caller owns: element (i, j) at address +
// (i·stride0 + j·stride1) elements (a CPU tensor's data pointer and strides, which
// readable_matrix has checked to lie inside its storage), gathered into a contiguous copy first.
template <class T>
py::tuple solve_at_typed(uintptr_t address, int64_t K, int64_t stride0, int64_t stride1,
                         const SolveOptions& o) {
  const T* src = reinterpret_cast<const T*>(address);
  std::vector<T> G(static_cast<size_t>(K * K));
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j)
      G[static_cast<size_t>(i * K + j)] = src[i * stride0 + j * stride1];
  check_gram(G.data(), 1, K);
  return solve_one<T>(G.data(), nullptr, K, o);
}

// torch's objects that the tensor fast path compares with and calls, given once by Python (the
// module is never linked against torch). The tensor's attributes are read through torch's own
// C descriptors (TensorBase and StorageBase), not by name: an attribute set on the tensor or a
// patch of torch.Tensor cannot hand the native side another address or other bounds. Never
// released: a static py::object would be destroyed after the interpreter.
struct TorchRefs {
  PyObject* float32 = nullptr;
  PyObject* float64 = nullptr;
  PyObject* strided = nullptr;
  PyObject* tensor = nullptr;  // torch.Tensor: only this exact type takes the fast path
  PyObject* from_numpy = nullptr;
  PyObject* mode_enabled = nullptr;  // torch._C._is_torch_function_mode_enabled
  // TensorBase's getset descriptors and method descriptors, StorageBase's methods.
  PyObject *dtype, *layout, *is_cpu, *shape, *is_neg, *stride, *untyped_storage, *data_ptr,
      *storage_data_ptr, *storage_nbytes;
};
TorchRefs& torch_refs() {
  static TorchRefs refs;
  return refs;
}

void set_torch_refs(const py::dict& refs) {
  TorchRefs r;
  const std::pair<const char*, PyObject**> names[] = {
      {"float32", &r.float32},
      {"float64", &r.float64},
      {"strided", &r.strided},
      {"Tensor", &r.tensor},
      {"from_numpy", &r.from_numpy},
      {"mode_enabled", &r.mode_enabled},
      {"dtype", &r.dtype},
      {"layout", &r.layout},
      {"is_cpu", &r.is_cpu},
      {"shape", &r.shape},
      {"is_neg", &r.is_neg},
      {"stride", &r.stride},
      {"untyped_storage", &r.untyped_storage},
      {"data_ptr", &r.data_ptr},
      {"storage_data_ptr", &r.storage_data_ptr},
      {"storage_nbytes", &r.storage_nbytes}};
  for (const auto& [name, slot] : names) *slot = py::object(refs[name]).release().ptr();
  for (PyObject* d : {r.dtype, r.layout, r.is_cpu, r.shape})
    if (Py_TYPE(d)->tp_descr_get == nullptr)
      throw py::type_error("set_torch_refs: tensor attributes must be descriptors");
  if (!PyType_Check(r.tensor)) throw py::type_error("set_torch_refs: Tensor must be a type");
  torch_refs() = r;
}

// descr.__get__(obj) (a getset descriptor) and descr(obj) (a method descriptor): a new
// reference, or null with the Python error cleared.
py::object get(PyObject* descr, py::handle obj) {
  PyObject* v = Py_TYPE(descr)->tp_descr_get(descr, obj.ptr(),
                                             reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr())));
  if (v == nullptr) PyErr_Clear();
  return py::reinterpret_steal<py::object>(v);
}
py::object call(PyObject* descr, py::handle obj) {
  PyObject* v = PyObject_CallOneArg(descr, obj.ptr());
  if (v == nullptr) PyErr_Clear();
  return py::reinterpret_steal<py::object>(v);
}

// An int64 (-1 when `o` is not an int that fits), and a two-item tuple's items.
int64_t as_int64(PyObject* o) {
  if (o == nullptr || !PyLong_Check(o)) return -1;
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) PyErr_Clear();
  return static_cast<int64_t>(v);
}
bool pair_of(const py::object& t, int64_t& a, int64_t& b) {
  if (!t || !PyTuple_Check(t.ptr()) || PyTuple_GET_SIZE(t.ptr()) != 2) return false;
  a = as_int64(PyTuple_GET_ITEM(t.ptr(), 0));
  b = as_int64(PyTuple_GET_ITEM(t.ptr(), 1));
  return true;
}

// Where one CPU tensor's K×K values lie, when they can be read here: a square float32/float64
// strided CPU tensor without the negative bit whose storage has memory covering its view (not
// freed, shrunk or a placeholder, as ZeroTensors and wrappers of torch.func are). False for
// anything else; solver.py's general path then checks the tensor and raises (its _unreadable
// applies the same storage rule, to name what is wrong).
struct TensorMatrix {
  uintptr_t address = 0;
  int64_t K = 0, stride0 = 0, stride1 = 0;
  bool is_double = false;
};
bool readable_matrix(py::handle G, TensorMatrix& m) {
  const TorchRefs& r = torch_refs();
  if (r.float32 == nullptr) return false;
  // Under a torch function mode the tensor's methods answer what the mode makes them answer.
  const py::object mode = py::reinterpret_steal<py::object>(PyObject_CallNoArgs(r.mode_enabled));
  if (mode.ptr() != Py_False) {
    if (!mode) PyErr_Clear();
    return false;
  }
  const py::object dtype = get(r.dtype, G);
  m.is_double = dtype.ptr() == r.float64;
  if (!m.is_double && dtype.ptr() != r.float32) return false;
  if (get(r.layout, G).ptr() != r.strided || get(r.is_cpu, G).ptr() != Py_True ||
      call(r.is_neg, G).ptr() != Py_False)
    return false;
  int64_t k1 = 0;
  if (!pair_of(get(r.shape, G), m.K, k1) || !pair_of(call(r.stride, G), m.stride0, m.stride1))
    return false;
  // Bounds that keep the extent's arithmetic far from overflow and the gathered copy small;
  // larger views go the general way.
  constexpr int64_t kMaxStride = int64_t(1) << 36;
  if (m.K < 1 || m.K > 4096 || k1 != m.K || m.stride0 < 0 || m.stride1 < 0 ||
      m.stride0 > kMaxStride || m.stride1 > kMaxStride)
    return false;
  // Wrappers of torch.func have no storage, a ZeroTensor's storage no address (both raise).
  const py::object storage = call(r.untyped_storage, G);
  if (!storage) return false;
  const int64_t base = as_int64(call(r.storage_data_ptr, storage).ptr());
  const int64_t nbytes = as_int64(call(r.storage_nbytes, storage).ptr());
  const int64_t address = as_int64(call(r.data_ptr, G).ptr());
  const int64_t extent = ((m.K - 1) * (m.stride0 + m.stride1) + 1) * (m.is_double ? 8 : 4);
  m.address = static_cast<uintptr_t>(address);
  return base > 0 && address >= base && address - base <= nbytes - extent;
}

template <class T>
py::tuple solve_typed(const py::array& G_any, const py::object& warm_obj, int64_t batch,
                      int64_t K, bool batched, const SolveOptions& o) {
  using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;
  Arr G = Arr::ensure(G_any);
  if (!G) {
    // A copy (of a non-contiguous or broadcast array) that could not be made.
    PyErr_SetString(PyExc_MemoryError, ("G could not be copied into a contiguous array of " +
                                        std::to_string(G_any.size()) + " values").c_str());
    throw py::error_already_set();
  }
  Arr warm;
  const T* warm_ptr = nullptr;
  if (!warm_obj.is_none()) {
    if (py::isinstance<py::array>(warm_obj) &&
        py::reinterpret_borrow<py::array>(warm_obj).dtype().kind() == 'c') {
      throw py::type_error("warm_start must be real weights, got a complex array");
    }
    warm = Arr::ensure(warm_obj);
    if (!warm) throw py::type_error("warm_start must be an array of weights");
    const bool ok = batched ? (warm.ndim() == 2 && warm.shape(0) == batch && warm.shape(1) == K)
                            : (warm.ndim() == 1 && warm.shape(0) == K);
    if (!ok) {
      std::ostringstream s;
      s << "warm_start must have shape "
        << (batched ? "(B, K) = (" + std::to_string(batch) + ", " : "(")
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
  if (!batched) return solve_one<T>(G.data(), warm_ptr, K, o);
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
  if (K == 0)
    throw py::value_error("G must have at least one task (K >= 1), got shape " + shape_str(G));
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

// ---- solve_weights' default call -----------------------------------------------------------

// What the default call returns, given once by pub_native/solver.py: the SolveResult class (a
// NamedTuple), the SolveStatus members by code, and Newton's default tolerance and step limit.
// Never released, like TorchRefs.
struct ResultRefs {
  PyTypeObject* cls = nullptr;
  PyObject* statuses = nullptr;
  double tol = 0.0;
  int32_t max_iter = 0;
};
ResultRefs& result_refs() {
  static ResultRefs refs;
  return refs;
}

void set_result_refs(const py::type& cls, const py::tuple& statuses, double tol,
                     int32_t max_iter) {
  // make_result fills the four items of a tuple subclass made by a class statement, with no
  // storage of its own (a NamedTuple); struct sequences such as os.stat_result keep hidden
  // items that it would leave unset.
  auto* type = reinterpret_cast<PyTypeObject*>(cls.ptr());
  const bool named_tuple =
      (type->tp_flags & Py_TPFLAGS_HEAPTYPE) && type->tp_base == &PyTuple_Type &&
      type->tp_basicsize == PyTuple_Type.tp_basicsize &&
      type->tp_itemsize == PyTuple_Type.tp_itemsize && type->tp_alloc != nullptr &&
      py::hasattr(cls, "_fields") &&
      py::tuple(cls.attr("_fields")).equal(
          py::make_tuple("weights", "status", "iterations", "residual"));
  if (!named_tuple)
    throw py::type_error("set_result_refs: the result class must be a NamedTuple of (weights, "
                         "status, iterations, residual)");
  ResultRefs r;
  r.cls = reinterpret_cast<PyTypeObject*>(py::object(cls).release().ptr());
  r.statuses = py::object(statuses).release().ptr();
  r.tol = tol;
  r.max_iter = max_iter;
  result_refs() = r;
}

// SolveResult(weights, SolveStatus(status), iterations, residual) from the solver's tuple
// (weights, status code, iterations, residual), built as tuple.__new__ builds a tuple subclass.
PyObject* make_result(const py::object& weights, const py::tuple& out) {
  const ResultRefs& r = result_refs();
  const int64_t code = as_int64(out[1].ptr());
  if (code < 0 || code >= PyTuple_GET_SIZE(r.statuses))
    throw py::value_error("solver returned an unknown status " + std::to_string(code));
  PyObject* result = r.cls->tp_alloc(r.cls, 4);
  if (result == nullptr) throw py::error_already_set();
  PyObject* items[4] = {weights.ptr(), PyTuple_GET_ITEM(r.statuses, code), out[2].ptr(),
                        out[3].ptr()};
  for (Py_ssize_t i = 0; i < 4; ++i) {
    Py_INCREF(items[i]);
    PyTuple_SET_ITEM(result, i, items[i]);
  }
  return result;
}

// The options are solve_weights' defaults (method "newton" as a str, ridge 1e-8 as a float, no
// warm start, tol or max_iter), compared as solver.py's general path would see them.
bool default_options(PyObject* const* args) {
  PyObject *method = args[1], *ridge = args[3];
  return args[2] == Py_None && args[4] == Py_None && args[5] == Py_None &&
         PyUnicode_CheckExact(method) && PyUnicode_CompareWithASCIIString(method, "newton") == 0 &&
         PyFloat_CheckExact(ridge) && PyFloat_AS_DOUBLE(ridge) == 1e-8;
}

// The call a training step makes: one (K, K) numpy array, or one CPU tensor that
// readable_matrix can read, with the default options; the SolveResult, or None for anything
// else (solver.py's general path then checks the arguments and says what is wrong). The
// weights of a tensor come back as a tensor over the solver's array.
py::object solve_default_impl(PyObject* const* args) {
  const ResultRefs& rr = result_refs();
  if (rr.cls == nullptr || !default_options(args)) return py::none();
  PyObject* G = args[0];
  SolveOptions o;
  o.method = kNewton;
  o.ridge = PyFloat_AS_DOUBLE(args[3]);  // 1e-8, as default_options found
  o.tol = rr.tol;
  o.max_iter = rr.max_iter;
  if (Py_TYPE(G) == py::detail::npy_api::get().PyArray_Type_) {
    const auto a = py::reinterpret_borrow<py::array>(G);
    if (a.ndim() != 2) return py::none();
    const py::tuple out = solve_weights_py(a, py::none(), o.method, o.ridge, o.tol, o.max_iter);
    return py::reinterpret_steal<py::object>(make_result(out[0], out));
  }
  const TorchRefs& tr = torch_refs();
  TensorMatrix m;
  // (tr.tensor is null until torch's refs are given: nothing matches it then.)
  if (reinterpret_cast<PyObject*>(Py_TYPE(G)) != tr.tensor || !readable_matrix(G, m))
    return py::none();
  const py::tuple out = m.is_double
                            ? solve_at_typed<double>(m.address, m.K, m.stride0, m.stride1, o)
                            : solve_at_typed<float>(m.address, m.K, m.stride0, m.stride1, o);
  const py::object weights = py::reinterpret_borrow<py::object>(tr.from_numpy)(out[0]);
  return py::reinterpret_steal<py::object>(make_result(weights, out));
}

// solve_default(G, method, warm_start, ridge, tol, max_iter), a plain CPython function: one
// call from solver.solve_weights without pybind11's argument conversion, which costs about a
// fifth of a K = 2 solve.
PyObject* solve_default(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError,
                    "solve_default takes (G, method, warm_start, ridge, tol, max_iter)");
    return nullptr;
  }
  try {
    return solve_default_impl(args).release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// Added with PyModule_AddFunctions, so that the function's __module__ is the module's name, as
// for any builtin (torch.compile and pickle look it up by that name).
PyMethodDef plain_functions[] = {
    {"solve_default", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(solve_default)),
     METH_FASTCALL,
     "solve_default(G, method, warm_start, ridge, tol, max_iter): solve_weights' result for one "
     "(K, K) numpy array or readable CPU tensor with the default options, else None."},
    {nullptr, nullptr, 0, nullptr}};

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

// Number of state tensors the rule of a configuration reads and writes.
int states_needed(const StepConfig& c) {
  switch (c.algo) {
    case Algorithm::kAdam: return c.amsgrad ? 3 : 2;
    case Algorithm::kAdaGrad: return 1;
    case Algorithm::kRMSProp: return 1 + (c.centered ? 1 : 0) + (c.momentum ? 1 : 0);
  }
  return kMaxStates;
}

// The segments of a plan: (StepConfig, int64 table) pairs. The tables are read through raw
// pointers, so they must already have the exact layout (a silent conversion would hand the
// kernels a temporary), and every row must name every pointer its rule reads. Python has
// checked each tensor's dtype, device, contiguity and size when it wrote the row.
std::vector<cpu::Segment> to_segments(const py::list& segments, int64_t n_base) {
  std::vector<cpu::Segment> out;
  for (size_t s = 0; s < segments.size(); ++s) {
    const auto pair = segments[s].cast<py::tuple>();
    if (pair.size() != 2) throw py::value_error("each segment is a (config, table) pair");
    const StepConfig& cfg = pair[0].cast<const StepConfig&>();
    py::array arr = pair[1].cast<py::array>();
    if (!py::isinstance<Int64Array>(arr) || !(arr.flags() & py::array::c_style) ||
        arr.ndim() != 2 || arr.shape(1) != kTableCols)
      throw py::value_error("segment " + std::to_string(s) +
                            ": the table must be a C-contiguous int64 array of shape (n, " +
                            std::to_string(kTableCols) + ")");
    const int64_t n = arr.shape(0);
    const int64_t* t = static_cast<const int64_t*>(arr.data());
    const int need = states_needed(cfg);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t* row = t + r * kTableCols;
      bool ok = row[kTParam] != 0 && row[kTGrad] != 0 && row[kTStep] != 0 && row[kTNumel] >= 0 &&
                row[kTBase] >= 0 && row[kTBase] < n_base;
      for (int k = 0; k < need; ++k) ok = ok && row[kTState + k] != 0;
      if (!ok)
        throw py::value_error("segment " + std::to_string(s) + ": table row " +
                              std::to_string(r) + " is incomplete");
    }
    out.push_back(cpu::Segment{cfg, t, n});
  }
  return out;
}

void check_base(const DoubleArray& base) {
  if (base.ndim() != 2 || base.shape(1) != kBaseCols)
    throw py::value_error("base must be a float64 array of shape (n_groups, " +
                          std::to_string(kBaseCols) + "), got " + shape_str(base));
}

DoubleArray copy_out(const std::vector<double>& v, std::vector<py::ssize_t> shape) {
  DoubleArray a(shape);
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

void copy_in(std::vector<double>& v, const py::array& src, const char* name) {
  DoubleArray a = DoubleArray::ensure(src);
  if (!a || a.size() != static_cast<py::ssize_t>(v.size()))
    throw py::value_error(std::string(name) + " must hold " + std::to_string(v.size()) +
                          " float64 values");
  std::copy(a.data(), a.data() + v.size(), v.begin());
}

void stepper_gram(cpu::Stepper& st, const py::list& segments, const DoubleArray& base,
                  bool solve, double inv_scale, const py::object& task_scale,
                  bool shared_finite) {
  check_base(base);
  const std::vector<cpu::Segment> segs = to_segments(segments, base.shape(0));
  DoubleArray ts;
  const double* ts_ptr = nullptr;
  if (!task_scale.is_none()) {
    ts = DoubleArray::ensure(task_scale);
    if (!ts || ts.ndim() != 1 || ts.shape(0) != st.num_tasks())
      throw py::value_error("task_scale must be a float64 array of shape (K,)");
    ts_ptr = ts.data();
  }
  py::gil_scoped_release release;
  st.gram(segs, base.data(), solve, inv_scale, ts_ptr, shared_finite);
}

int32_t stepper_finish(cpu::Stepper& st, const py::list& segments, const DoubleArray& base,
                       bool solve, int32_t method, double ridge, double tol, int32_t max_iter,
                       bool normalize_sum, bool found_inf) {
  check_base(base);
  const std::vector<cpu::Segment> segs = to_segments(segments, base.shape(0));
  SolveOptions o;
  o.method = method;
  o.ridge = ridge;
  o.tol = tol;
  o.max_iter = max_iter;
  py::gil_scoped_release release;
  return st.finish(segs, base.data(), solve, o, normalize_sum, found_inf);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pub_native CPU core (framework-free; takes numpy arrays and raw pointers).";
  m.def("solve_weights", &solve_weights_py, py::arg("G"), py::arg("warm_start"),
        py::arg("method"), py::arg("ridge"), py::arg("tol"), py::arg("max_iter"),
        "Solve G a = 1/a for one (K, K) or a batch (B, K, K) of Gram matrices. Returns "
        "(weights, status, iterations, residual).");
  m.def("set_torch_refs", &set_torch_refs, py::arg("refs"),
        "torch's Tensor type, dtypes, layout, from_numpy, mode query and tensor and storage "
        "descriptors, for solve_default.");
  m.def("set_result_refs", &set_result_refs, py::arg("cls"), py::arg("statuses"),
        py::arg("tol"), py::arg("max_iter"),
        "The SolveResult class, the SolveStatus members by code and Newton's defaults, for "
        "solve_default.");
  if (PyModule_AddFunctions(m.ptr(), plain_functions) != 0) throw py::error_already_set();
  m.def("build_info", &build_info);
  m.def("omp_max_threads", &omp_threads);
  m.def("workspace_size", [](int64_t K) { return solver_workspace_size(K); },
        "Doubles of solver workspace one problem with K tasks needs.");

  py::class_<StepConfig>(m, "StepConfig", "Options of one segment of a PUB step (step.h).")
      .def(py::init(&make_step_config), py::arg("algo"), py::arg("amsgrad"), py::arg("centered"),
           py::arg("momentum"), py::arg("umm"), py::arg("dtype"), py::arg("kind"),
           py::arg("num_tasks"), py::arg("grad_task_stride"), py::arg("grad_sign"),
           py::arg("clippy_rel"), py::arg("clippy_abs"), py::arg("has_l2"))
      .def_readonly("num_tasks", &StepConfig::num_tasks)
      .def_readonly("grad_task_stride", &StepConfig::grad_task_stride);

  py::class_<cpu::Stepper>(m, "Stepper", "The CPU PUB step of one optimizer (pub_step_cpu.h).")
      .def(py::init<int64_t>(), py::arg("num_tasks"))
      .def("gram", &stepper_gram, py::arg("segments"), py::arg("base").noconvert(),
           py::arg("solve"), py::arg("inv_scale"), py::arg("task_scale"),
           py::arg("shared_finite") = false)
      .def("finish", &stepper_finish, py::arg("segments"), py::arg("base").noconvert(),
           py::arg("solve"), py::arg("method"), py::arg("ridge"), py::arg("tol"),
           py::arg("max_iter"), py::arg("normalize_sum"), py::arg("found_inf"))
      .def_property_readonly("num_tasks", &cpu::Stepper::num_tasks)
      .def_property(
          "G", [](const cpu::Stepper& s) {
            return copy_out(s.G, {s.num_tasks(), s.num_tasks()}); },
          [](cpu::Stepper& s, const py::array& a) { copy_in(s.G, a, "G"); })
      .def_property(
          "weights", [](const cpu::Stepper& s) { return copy_out(s.weights, {s.num_tasks()}); },
          [](cpu::Stepper& s, const py::array& a) { copy_in(s.weights, a, "weights"); })
      .def_property(
          "alpha", [](const cpu::Stepper& s) { return copy_out(s.alpha, {s.num_tasks()}); },
          [](cpu::Stepper& s, const py::array& a) { copy_in(s.alpha, a, "alpha"); })
      .def_property_readonly(
          "applied", [](const cpu::Stepper& s) { return copy_out(s.applied(), {s.num_tasks()}); })
      .def_readwrite("has_weights", &cpu::Stepper::has_weights)
      .def_readwrite("has_alpha", &cpu::Stepper::has_alpha)
      .def_property_readonly("bad_task",
                             [](const cpu::Stepper& s) {
                               py::array_t<uint8_t> a(s.num_tasks());
                               std::copy(s.bad_task.begin(), s.bad_task.end(), a.mutable_data());
                               return a;
                             })
      .def("bad_tensors",
           [](const cpu::Stepper& s, size_t seg) {
             if (seg >= s.bad_tensor.size()) throw py::index_error("segment out of range");
             const auto& v = s.bad_tensor[seg];
             py::array_t<uint8_t> a(static_cast<py::ssize_t>(v.size()));
             std::copy(v.begin(), v.end(), a.mutable_data());
             return a;
           })
      .def("edited_tensors",
           [](const cpu::Stepper& s, size_t seg) {
             if (seg >= s.edited_tensor.size()) throw py::index_error("segment out of range");
             const auto& v = s.edited_tensor[seg];
             py::array_t<uint8_t> a(static_cast<py::ssize_t>(v.size()));
             std::copy(v.begin(), v.end(), a.mutable_data());
             return a;
           })
      .def_property(
          "task_sq", [](const cpu::Stepper& s) { return copy_out(s.task_sq, {s.num_tasks()}); },
          [](cpu::Stepper& s, const py::array& a) { copy_in(s.task_sq, a, "task_sq"); })
      .def("set_bad_task",
           [](cpu::Stepper& s, const py::array_t<uint8_t>& a) {
             if (a.size() != s.num_tasks()) throw py::value_error("bad_task must hold K flags");
             std::copy(a.data(), a.data() + a.size(), s.bad_task.begin());
           })
      .def_readwrite("grad_nonfinite", &cpu::Stepper::grad_nonfinite)
      .def_readwrite("grad_edited", &cpu::Stepper::grad_edited)
      .def_readwrite("update_nonfinite", &cpu::Stepper::update_nonfinite)
      .def_readonly("status", &cpu::Stepper::status)
      .def_readonly("iterations", &cpu::Stepper::iterations)
      .def_readonly("residual", &cpu::Stepper::residual)
      .def_readonly("solve_time", &cpu::Stepper::solve_time)
      .def_readonly("outcome", &cpu::Stepper::outcome);

  // Codes and columns shared with Python, as {name: {member: value}} (mirrored once as IntEnums,
  // in pub_native/_native.py). Plain dicts: nine py::enum_ classes were 40% of this file's
  // compile time.
  py::dict codes;
  auto add = [&codes](const char* name,
                      std::initializer_list<std::pair<const char*, int64_t>> members) {
    py::dict d;
    for (const auto& [member, value] : members) d[member] = value;
    codes[name] = d;
  };
  add("Algorithm", {{"ADAM", int64_t(Algorithm::kAdam)},
                    {"ADAGRAD", int64_t(Algorithm::kAdaGrad)},
                    {"RMSPROP", int64_t(Algorithm::kRMSProp)}});
  add("Umm", {{"NONE", int64_t(Umm::kNone)},
              {"CLIPPY", int64_t(Umm::kClippy)},
              {"ADATASK", int64_t(Umm::kAdaTask)}});
  add("DType", {{"FLOAT32", kFloat32}, {"FLOAT64", kFloat64}, {"BFLOAT16", kBFloat16},
                {"FLOAT16", kFloat16}});
  add("SegmentKind", {{"SHARED", int64_t(SegmentKind::kShared)},
                      {"PLAIN", int64_t(SegmentKind::kPlain)}});
  add("TableCol", {{"PARAM", kTParam}, {"NUMEL", kTNumel}, {"GRAD", kTGrad}, {"BASE", kTBase},
                   {"STEP", kTStep}, {"GRAD_SUM", kTGradSum}, {"STATE", kTState},
                   {"COLS", kTableCols}});
  add("BaseCol", {{"LR", kBLr}, {"BETA1", kBBeta1}, {"BETA2", kBBeta2}, {"EPS", kBEps},
                  {"WEIGHT_DECAY", kBWeightDecay}, {"DECOUPLED", kBDecoupled},
                  {"LR_DECAY", kBLrDecay}, {"COLS", kBaseCols}});
  add("StepOutcome", {{"APPLIED", kApplied}, {"SKIPPED_FOUND_INF", kSkippedFoundInf},
                      {"NONFINITE_GRAD", kNonFiniteGrad}, {"NONFINITE_UPDATE", kNonFiniteUpdate},
                      {"GRAD_EDITED", kGradEdited}});
  add("SolveStatus", {{"CONVERGED", kConverged}, {"MAX_ITER", kMaxIter},
                      {"LINE_SEARCH_FAILED", kLineSearchFailed},
                      {"NOT_POSITIVE_DEFINITE", kNotPositiveDefinite}, {"ALL_ZERO", kAllZero},
                      {"INVALID_INPUT", kInvalidInput}});
  add("SolveMethod", {{"NEWTON", kNewton}, {"CCP", kCcp}});
  m.attr("CODES") = codes;
  m.def(
      "sum_rows",
      [](int32_t dtype, uintptr_t buf, int64_t K, int64_t P) {
        if (dtype < kFloat32 || dtype > kFloat16) throw py::value_error("unknown dtype code");
        if (buf == 0 || K < 1 || P < 0) throw py::value_error("sum_rows: bad buffer");
        py::gil_scoped_release release;
        return cpu::sum_rows(static_cast<DType>(dtype), reinterpret_cast<void*>(buf), K, P);
      },
      py::arg("dtype"), py::arg("buffer"), py::arg("num_tasks"), py::arg("row_length"),
      "Row K of a (K + 1, P) CPU buffer = the sum of rows 0..K-1 (in the math type, rounded "
      "once). Returns whether every sum is finite, which proves rows 0..K-1 finite.");
  m.attr("MAX_STATES") = kMaxStates;
  m.attr("CUDA_MAX_TASKS") = kCudaMaxTasks;
  m.attr("SYMMETRY_TOL_F64") = kSymmetryTolF64;
  m.attr("SYMMETRY_TOL_F32") = kSymmetryTolF32;
  m.attr("ZERO_TASK_REL_TOL") = kZeroTaskRelTol;
  m.attr("GRAM_CHUNK") = kGramChunk;
}
