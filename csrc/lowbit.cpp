// The lowbit extension module: op schemas (TORCH_LIBRARY) and build/CPU information for Python.
// Backend implementations register themselves with TORCH_LIBRARY_IMPL (cpu/ops_cpu.cpp, cuda/ops_cuda.cu).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cpu/decode.h"
#include "cpu/isa.h"

TORCH_LIBRARY(lowbit, m) {
  // y[..., N] = x[..., K] @ W.T (+ bias), W in the int4 / int3.5 / int8 formats of docs/FORMAT.md.
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, Tensor? bias, "
        "int group_size, int in_features) -> Tensor");
  m.def("int35_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, Tensor? bias, "
        "int group_size, int in_features) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, Tensor? bias, "
        "int group_size, int in_features) -> Tensor");
  // W as float32 [N, K] in logical column order (the permutation undone).
  m.def("int4_dequantize(Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, int group_size, "
        "int in_features) -> Tensor");
  m.def("int35_dequantize(Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, int group_size, "
        "int in_features) -> Tensor");
  m.def("int8_dequantize(Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, int group_size, "
        "int in_features) -> Tensor");
  // The same on the CUDA tile layout (docs/FORMAT.md; int4 and int3.5 only), which also needs out_features
  // (rows are padded to tiles of 16).
  m.def("int4_tiled_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, Tensor? bias, "
        "int group_size, int in_features, int out_features) -> Tensor");
  m.def("int35_tiled_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, Tensor? bias, "
        "int group_size, int in_features, int out_features) -> Tensor");
  m.def("int4_tiled_dequantize(Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, int group_size, "
        "int in_features, int out_features) -> Tensor");
  m.def("int35_tiled_dequantize(Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, int group_size, "
        "int in_features, int out_features) -> Tensor");
  // The "mse" grid search of lowbit.quantize (its reference: quantize._mse_grid) over float32 groups
  // [..., L]: float16 (scales, zeros) [...]. bits: 3.5 or an integer 2..8. weight (optional, float32): each
  // column's weight in the squared error, shaped as the trailing dimensions of groups (0 for padding columns).
  // ratios, refits: the candidates (quantize.MSE_RATIOS, MSE_REFITS).
  m.def("mse_grid(Tensor groups, Tensor? weight, float bits, float[] ratios, int refits, bool integer_zeros) "
        "-> (Tensor, Tensor)");
  // A whole LLaMA decode step on the CPU (cpu/decode.h; built by lowbit/cpu_decode.py).
  using lowbit::cpu::LlamaDecoder;
  m.class_<LlamaDecoder>("LlamaDecoder")
      .def(torch::init<int64_t, int64_t, double, at::Tensor, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_layer", &LlamaDecoder::add_layer)
      .def("add_quantized_linear", &LlamaDecoder::add_quantized_linear)
      .def("add_float_linear", &LlamaDecoder::add_float_linear)
      .def("step", &LlamaDecoder::step);
  using lowbit::cpu::PreparedLinear;
  m.class_<PreparedLinear>("PreparedLinear")
      .def(torch::init<double, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
                       std::optional<at::Tensor>, int64_t, int64_t>())
      .def("forward", &PreparedLinear::forward)
      .def("interleaved", &PreparedLinear::interleaved);
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowbit native kernels (ops are registered under torch.ops.lowbit)";
  m.def("build_info", [] {
    const auto& f = lowbit::cpu::cpu_features();
    py::dict cpu;
    cpu["avx2"] = f.avx2;
    cpu["fma"] = f.fma;
    cpu["f16c"] = f.f16c;
    cpu["avx512f"] = f.avx512f;
    cpu["avx512bw"] = f.avx512bw;
    cpu["avx512vl"] = f.avx512vl;
    cpu["avx512_vbmi"] = f.avx512_vbmi;
    cpu["avx512_vnni"] = f.avx512_vnni;
    cpu["avx_vnni"] = f.avx_vnni;
    cpu["avx512_bf16"] = f.avx512_bf16;
    cpu["amx_bf16"] = f.amx_bf16;
    py::dict info;
    info["compiler"] = LOWBIT_COMPILER;
    info["torch_version"] = TORCH_VERSION;
    info["cuda"] = static_cast<bool>(LOWBIT_WITH_CUDA);
    info["cpu_isas_compiled"] = lowbit::cpu::compiled_isas();
    info["cpu_isas_available"] = lowbit::cpu::available_isas();
    info["cpu_features"] = cpu;
    py::dict int8_rows;  // per activation dtype; None: every row count
    for (const char* dtype : {"float32", "float16", "bfloat16"}) {
      const int64_t rows = lowbit::cpu::int8_max_rows(std::string(dtype) == "bfloat16");
      int8_rows[dtype] = rows == INT64_MAX ? py::object(py::none()) : py::object(py::int_(rows));
    }
    info["cpu_int8_max_rows"] = int8_rows;
    return info;
  });
  m.def("cpu_isa", [] { return std::string(lowbit::cpu::active_kernels().name); },
        "Name of the CPU kernel set in use.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        try {
          lowbit::cpu::set_isa(name);
        } catch (const c10::Error& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      py::arg("name"),
        "Select the CPU kernel set ('scalar', 'avx2', 'avx512_vnni'); the CPU must support it.");
}
