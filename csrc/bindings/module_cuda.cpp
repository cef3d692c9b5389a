// pybind11 module pub_native._C_cuda (built when a CUDA compiler is found): device entry points
// taking raw device pointers and a stream handle from Python, so nothing here links libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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

cuda::DeviceSegment make_segment(const StepConfig& cfg, uintptr_t table, int64_t n_tensors,
                                 uintptr_t items, int64_t n_items, uintptr_t partial,
                                 uintptr_t sigma, uintptr_t gscale, uintptr_t bad,
                                 uintptr_t ratio, uintptr_t edited) {
  if (n_tensors < 0 || n_items < 0) throw py::value_error("negative sizes");
  if (cfg.dtype == kFloat64)
    throw py::type_error("CUDA PUB step: parameters must be float32, bfloat16 or float16");
  if (cfg.num_tasks > kCudaMaxTasks)
    throw py::value_error("CUDA PUB step: at most " + std::to_string(kCudaMaxTasks) + " tasks");
  if ((n_tensors > 0 && (table == 0 || gscale == 0 || bad == 0 || ratio == 0 || edited == 0)) ||
      (n_items > 0 && (items == 0 || partial == 0 || sigma == 0)))
    throw py::value_error("CUDA PUB step: a segment buffer is missing");
  cuda::DeviceSegment s;
  s.cfg = cfg;
  s.table = ptr<const int64_t>(table);
  s.n_tensors = n_tensors;
  s.items = ptr<const int64_t>(items);
  s.n_items = n_items;
  s.partial = ptr<double>(partial);
  s.sigma = ptr<double>(sigma);
  s.gscale = ptr<double>(gscale);
  s.bad = ptr<int32_t>(bad);
  s.ratio = ptr<double>(ratio);
  s.edited = ptr<int32_t>(edited);
  return s;
}

cuda::DeviceStep make_step(int64_t num_tasks, uintptr_t base, uintptr_t G, uintptr_t alpha,
                           uintptr_t weights, uintptr_t applied, uintptr_t task_sq,
                           uintptr_t flags, uintptr_t residual, uintptr_t workspace,
                           uintptr_t grad_scale, uintptr_t task_scale, uintptr_t found_inf) {
  if (num_tasks < 1 || num_tasks > kCudaMaxTasks)
    throw py::value_error("CUDA PUB step: num_tasks must be in [1, " +
                          std::to_string(kCudaMaxTasks) + "]");
  if (!base || !G || !alpha || !weights || !applied || !task_sq || !flags || !residual ||
      !workspace)
    throw py::value_error("CUDA PUB step: a step buffer is missing");
  cuda::DeviceStep d;
  d.num_tasks = num_tasks;
  d.base = ptr<const double>(base);
  d.G = ptr<double>(G);
  d.alpha = ptr<double>(alpha);
  d.weights = ptr<double>(weights);
  d.applied = ptr<double>(applied);
  d.task_sq = ptr<double>(task_sq);
  d.flags = ptr<int32_t>(flags);
  d.residual = ptr<double>(residual);
  d.workspace = ptr<double>(workspace);
  d.grad_scale = ptr<const float>(grad_scale);
  d.task_scale = ptr<const double>(task_scale);
  d.found_inf = ptr<float>(found_inf);
  return d;
}

StepConfig make_config(int32_t algo, bool amsgrad, bool centered, bool momentum, int32_t umm,
                       int32_t dtype, int32_t kind, int64_t num_tasks, int64_t grad_task_stride,
                       double grad_sign, double clippy_rel, double clippy_abs, bool has_l2) {
  return make_step_config(algo, amsgrad, centered, momentum, umm, dtype, kind, num_tasks,
                          grad_task_stride, grad_sign, clippy_rel, clippy_abs, has_l2);
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

SolveOptions solve_options(int32_t method, double ridge, double tol, int32_t max_iter) {
  SolveOptions o;
  o.method = method;
  o.ridge = ridge;
  o.tol = tol;
  o.max_iter = max_iter;
  return o;
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

  // ---- PUB step (asynchronous on the given stream; nothing waits for the device) ----
  // module_local: _C registers the same C++ StepConfig for the CPU path.
  py::class_<StepConfig>(m, "StepConfig", py::module_local());
  py::class_<cuda::DeviceSegment>(m, "DeviceSegment", py::module_local());
  py::class_<cuda::DeviceStep>(m, "DeviceStep", py::module_local());
  m.def("make_config", &make_config, py::arg("algo"), py::arg("amsgrad"), py::arg("centered"),
        py::arg("momentum"), py::arg("umm"), py::arg("dtype"), py::arg("kind"),
        py::arg("num_tasks"), py::arg("grad_task_stride"), py::arg("grad_sign"),
        py::arg("clippy_rel"), py::arg("clippy_abs"), py::arg("has_l2"));
  m.def("make_segment", &make_segment, py::arg("config"), py::arg("table"), py::arg("n_tensors"),
        py::arg("items"), py::arg("n_items"), py::arg("partial"), py::arg("sigma"),
        py::arg("gscale"), py::arg("bad"), py::arg("ratio"), py::arg("edited"));
  m.def("make_step", &make_step, py::arg("num_tasks"), py::arg("base"), py::arg("G"),
        py::arg("alpha"), py::arg("weights"), py::arg("applied"), py::arg("task_sq"),
        py::arg("flags"), py::arg("residual"),
        py::arg("workspace"), py::arg("grad_scale"), py::arg("task_scale"),
        py::arg("found_inf"));
  m.def("gram", [](const std::vector<cuda::DeviceSegment>& segs, const cuda::DeviceStep& d,
                   bool solve, uintptr_t stream) { cuda::gram(segs, d, solve, stream_of(stream)); },
        py::arg("segments"), py::arg("step"), py::arg("solve"), py::arg("stream"));
  m.def("finish",
        [](const std::vector<cuda::DeviceSegment>& segs, const cuda::DeviceStep& d, bool solve,
           int32_t method, double ridge, double tol, int32_t max_iter, bool normalize_sum,
           uintptr_t stream) {
          cuda::finish(segs, d, solve, solve_options(method, ridge, tol, max_iter),
                       normalize_sum, stream_of(stream));
        },
        py::arg("segments"), py::arg("step"), py::arg("solve"), py::arg("method"),
        py::arg("ridge"), py::arg("tol"), py::arg("max_iter"), py::arg("normalize_sum"),
        py::arg("stream"));
  m.attr("FLAG_HAS_WEIGHTS") = static_cast<int>(cuda::kFlagHasWeights);
  m.attr("FLAG_HAS_ALPHA") = static_cast<int>(cuda::kFlagHasAlpha);
  m.attr("FLAG_OUTCOME") = static_cast<int>(cuda::kFlagOutcome);
  m.attr("FLAG_STATUS") = static_cast<int>(cuda::kFlagStatus);
  m.attr("FLAG_ITERATIONS") = static_cast<int>(cuda::kFlagIterations);
  m.attr("FLAG_GRAD_NONFINITE") = static_cast<int>(cuda::kFlagGradNonFinite);
  m.attr("FLAG_GRAD_EDITED") = static_cast<int>(cuda::kFlagGradEdited);
  m.attr("FLAG_STICKY_ERROR") = static_cast<int>(cuda::kFlagStickyError);
  m.attr("FLAG_COUNT") = static_cast<int>(cuda::kFlagCount);
  m.def(
      "sum_rows",
      [](int32_t dtype, uintptr_t buf, int64_t K, int64_t P, uintptr_t stream) {
        if (dtype < kFloat32 || dtype > kFloat16) throw py::value_error("unknown dtype code");
        if (buf == 0 || K < 1 || P < 0) throw py::value_error("sum_rows: bad buffer");
        cuda::sum_rows(static_cast<DType>(dtype), reinterpret_cast<void*>(buf), K, P,
                       stream_of(stream));
      },
      py::arg("dtype"), py::arg("buffer"), py::arg("num_tasks"), py::arg("row_length"),
      py::arg("stream"));
}
