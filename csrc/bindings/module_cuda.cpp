// pybind11 module pub_native._C_cuda (built when a CUDA compiler is found): device entry points
// taking raw device pointers and a stream handle from Python, so nothing here links libtorch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../cuda/pub_step_cuda.h"
#include "../cuda/solve_weights_cuda.h"
#include "build_config.h"

namespace py = pybind11;
using namespace pub_native;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void solve_weights_py(uintptr_t G, uintptr_t warm, uintptr_t alpha, uintptr_t status,
                      uintptr_t iterations, uintptr_t residual, uintptr_t workspace,
                      int64_t batch, int64_t K, int itemsize, int32_t method, double ridge,
                      double tol, int32_t max_iter, uintptr_t stream) {
  SolveOptions o;
  o.method = method;
  o.ridge = ridge;
  o.tol = tol;
  o.max_iter = max_iter;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  py::gil_scoped_release release;
  if (itemsize == 8) {
    cuda::solve_weights_batch<double>(ptr<const double>(G), ptr<const double>(warm),
                                      ptr<double>(alpha), ptr<int32_t>(status),
                                      ptr<int32_t>(iterations), ptr<double>(residual),
                                      ptr<double>(workspace), batch, K, o, s);
  } else if (itemsize == 4) {
    cuda::solve_weights_batch<float>(ptr<const float>(G), ptr<const float>(warm),
                                     ptr<float>(alpha), ptr<int32_t>(status),
                                     ptr<int32_t>(iterations), ptr<double>(residual),
                                     ptr<double>(workspace), batch, K, o, s);
  } else {
    throw py::type_error("G must be float32 or float64");
  }
}

cuda::StepBuffers make_buffers(uintptr_t table, int64_t n_tensors, uintptr_t items,
                               int64_t n_items, uintptr_t hyper, uintptr_t grads,
                               uintptr_t partial, uintptr_t G, uintptr_t sigma, uintptr_t alpha,
                               uintptr_t weights, uintptr_t status, uintptr_t iterations,
                               uintptr_t residual, uintptr_t skip, uintptr_t workspace) {
  if (n_tensors < 0 || n_items < 0) throw py::value_error("negative sizes");
  cuda::StepBuffers b;
  b.table = ptr<const int64_t>(table);
  b.n_tensors = n_tensors;
  b.items = ptr<const int64_t>(items);
  b.n_items = n_items;
  b.hyper = ptr<double>(hyper);
  b.grads = ptr<const void>(grads);
  b.partial = ptr<double>(partial);
  b.G = ptr<double>(G);
  b.sigma = ptr<double>(sigma);
  b.alpha = ptr<double>(alpha);
  b.weights = ptr<double>(weights);
  b.status = ptr<int32_t>(status);
  b.iterations = ptr<int32_t>(iterations);
  b.residual = ptr<double>(residual);
  b.skip = ptr<int32_t>(skip);
  b.workspace = ptr<double>(workspace);
  return b;
}

StepConfig make_config(int32_t algo, bool amsgrad, bool centered, bool momentum, int32_t umm,
                       int32_t dtype, int64_t num_tasks, int64_t row_length, double grad_sign,
                       double clippy_rel, double clippy_abs, bool has_l2) {
  if (dtype == kFloat64)
    throw py::type_error("CUDA PUB step: parameters must be float32, bfloat16 or float16");
  return make_step_config(algo, amsgrad, centered, momentum, umm, dtype, num_tasks, row_length,
                          grad_sign, clippy_rel, clippy_abs, has_l2);
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pub_native CUDA core (raw device pointers and streams; never links libtorch).";
  m.def("solve_weights", &solve_weights_py, py::arg("G"), py::arg("warm_start"),
        py::arg("weights"), py::arg("status"), py::arg("iterations"), py::arg("residual"),
        py::arg("workspace"), py::arg("batch"), py::arg("K"), py::arg("itemsize"),
        py::arg("method"), py::arg("ridge"), py::arg("tol"), py::arg("max_iter"),
        py::arg("stream"));
  m.def("build_info", []() {
    py::dict d;
    d["cuda_compiler"] = PN_CUDA_COMPILER;
    d["cuda_architectures"] = PN_CUDA_ARCHITECTURES;
    d["cuda_runtime"] = CUDART_VERSION;
    return d;
  });
  m.def("device_count", &cuda::device_count);

  // ---- PUB step (asynchronous on the given stream; nothing waits for the device) ----
  // module_local: _C registers the same C++ StepConfig for the CPU path.
  py::class_<StepConfig>(m, "StepConfig", py::module_local());
  py::class_<cuda::StepBuffers>(m, "StepBuffers", py::module_local());
  m.attr("MAX_TASKS") = 32;
  m.attr("BASE_COLS") = cuda::kBaseCols;
  m.def("make_config", &make_config, py::arg("algo"), py::arg("amsgrad"), py::arg("centered"),
        py::arg("momentum"), py::arg("umm"), py::arg("dtype"), py::arg("num_tasks"),
        py::arg("row_length"), py::arg("grad_sign"), py::arg("clippy_rel"),
        py::arg("clippy_abs"), py::arg("has_l2"));
  m.def("make_buffers", &make_buffers, py::arg("table"), py::arg("n_tensors"), py::arg("items"),
        py::arg("n_items"), py::arg("hyper"), py::arg("grads"), py::arg("partial"), py::arg("G"),
        py::arg("sigma"), py::arg("alpha"), py::arg("weights"), py::arg("status"),
        py::arg("iterations"), py::arg("residual"), py::arg("skip"), py::arg("workspace"));
  m.def("pub_hyper", [](int32_t algo, uintptr_t step_ptrs, uintptr_t base, int64_t n_rows,
                        uintptr_t hyper, uintptr_t stream) {
    cuda::pub_hyper(algo, ptr<const int64_t>(step_ptrs), ptr<const double>(base), n_rows,
                    ptr<double>(hyper), stream_of(stream));
  });
  m.def("pub_gram", [](const StepConfig& c, const cuda::StepBuffers& b, uintptr_t stream) {
    cuda::pub_gram(c, b, stream_of(stream));
  });
  m.def("pub_solve", [](const StepConfig& c, int32_t method, double ridge, double tol,
                        int32_t max_iter, bool normalize_sum, const cuda::StepBuffers& b,
                        uintptr_t stream) {
    SolveOptions o;
    o.method = method;
    o.ridge = ridge;
    o.tol = tol;
    o.max_iter = max_iter;
    cuda::pub_solve(c, o, normalize_sum, b, stream_of(stream));
  });
  m.def("pub_check_rows", [](const StepConfig& c, const cuda::StepBuffers& b, uintptr_t stream) {
    cuda::pub_check_rows(c, b, stream_of(stream));
  });
  m.def("pub_apply", [](const StepConfig& c, const cuda::StepBuffers& b, uintptr_t step_ptrs,
                        uintptr_t stream) {
    cuda::pub_apply(c, b, ptr<const int64_t>(step_ptrs), stream_of(stream));
  });
}
