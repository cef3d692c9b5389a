// pybind11 module pub_native._C_cuda (built when a CUDA compiler is found): device entry points
// taking raw device pointers and a stream handle from Python, so nothing here links libtorch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

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
}
