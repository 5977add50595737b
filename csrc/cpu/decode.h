// The fused CPU decode step of a LLaMA model (lowbit/cpu_decode.py builds it from a model): one call runs
// every layer for one new token per sequence, straight over lowbit's kernels, with no dispatcher or Python
// between operators. A 30-layer, 576-wide model does ~400 small operations per token; in eager PyTorch
// their overhead, not the weight stream, set the speed.
#pragma once
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include "kernels.h"
#include "linear.h"

namespace lowbit {
namespace cpu {

// One linear layer: quantized (any format, canonical layout, run on the int8-activation path of the kernels it was prepared
// with) or float32 (BLAS).
struct DecoderLinear {
  at::Tensor qweight, scales, zeros;  // quantized
  at::Tensor weight;                  // float32 [N, K], when not quantized
  at::Tensor bias;                    // float32 [N], or undefined
  const KernelTable* kernels = nullptr;
  QWeight w{};
  std::vector<int64_t> src;  // activation layout (linear.h source_offsets) for contiguous rows, w's kernels
  // The weight in the interleaved layout, where the kernels have a GEMV for it (the int8 path then runs
  // there): a copy made at load, with its own activation layout.
  InterleavedWeight interleaved;
  std::vector<int64_t> interleaved_src;
  int64_t N = 0, K = 0;
};

// The int8 path's activation buffers, reused from call to call.
struct Int8Scratch {
  std::vector<int8_t> xq;
  std::vector<float> xscale, xsum;
};

// A quantized linear checked and prepared for the kernels active now (op names the caller in errors).
DecoderLinear prepare_linear(const char* op, double bits, at::Tensor qweight, at::Tensor scales, at::Tensor zeros,
                             std::optional<at::Tensor> perm, std::optional<at::Tensor> bias, int64_t group_size,
                             int64_t in_features);
// y [n, N] = x [n, K] @ W.T (+ bias), n = bounds.back(). Rows bounds[i] .. bounds[i + 1] - 1 are one sequence's
// (a prompt's tokens, or one decode row): a sequence's results are the same whatever else is in the call (float
// weights take one BLAS call per sequence; quantized ones the int8 path, which computes every row on its own).
void run_linear(const DecoderLinear& l, const float* x, const std::vector<int64_t>& bounds, float* y,
                Int8Scratch& scratch);

// One quantized linear as the decode step runs it (the int8 path, in the interleaved layout where the kernels
// have it): for tests and benchmarks of that path. forward: float32 [M, K] -> [M, N].
class PreparedLinear : public torch::CustomClassHolder {
 public:
  PreparedLinear(double bits, at::Tensor qweight, at::Tensor scales, at::Tensor zeros, std::optional<at::Tensor> perm,
                 std::optional<at::Tensor> bias, int64_t group_size, int64_t in_features);
  at::Tensor forward(const at::Tensor& x);
  bool interleaved() const { return linear_.interleaved.codes.defined(); }

 private:
  DecoderLinear linear_;
  Int8Scratch scratch_;
};

// Weights and cache of one transformer block.
struct DecoderLayer {
  at::Tensor attn_norm, ffn_norm;  // [D] float32
  at::Tensor k_cache, v_cache;     // [B, Hkv, S, Dh] float32 or float16, written in place
};

class LlamaDecoder : public torch::CustomClassHolder {
 public:
  // embed [V, D], norm [D], rope_cos / rope_sin [S, Dh] (the model's tables for its cache), all float32.
  LlamaDecoder(int64_t n_heads, int64_t n_kv_heads, double eps, at::Tensor embed, at::Tensor norm,
               at::Tensor rope_cos, at::Tensor rope_sin);
  void add_layer(at::Tensor attn_norm, at::Tensor ffn_norm, at::Tensor k_cache, at::Tensor v_cache);
  // Linears in model order: per layer wqkv, wo, w_gate_up, w_down; then lm_head.
  void add_quantized_linear(double bits, at::Tensor qweight, at::Tensor scales, at::Tensor zeros,
                            std::optional<at::Tensor> perm, std::optional<at::Tensor> bias, int64_t group_size,
                            int64_t in_features);
  void add_float_linear(at::Tensor weight, std::optional<at::Tensor> bias);
  // tokens, positions, slots: int64 [n] -> logits [m, V] float32 of the rows logit_rows [m] (default: every
  // row). Row r's token sits at positions[r] of cache row slots[r]; its keys and values go there, and it
  // attends over positions 0 .. positions[r] of that cache row. One new token per sequence is a decode step;
  // a prompt's tokens at consecutive positions of one slot, with logit_rows its last row, is its prefill.
  at::Tensor step(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& slots,
                  const std::optional<at::Tensor>& logit_rows);

 private:
  void check_complete();
  void rms_norm(const float* x, const at::Tensor& weight, int64_t n, float* out) const;
  void attention(const DecoderLayer& layer, const float* qkv, int64_t n, const int64_t* pos, const int64_t* lengths,
                 const int64_t* slot, float* att);

  int64_t H_, Hkv_, Dh_, D_, V_, S_ = 0, B_ = 0;
  bool kv_half_ = false;  // the caches are float16 (halves the bytes attention reads), else float32
  float eps_;
  at::Tensor embed_, norm_, rope_cos_, rope_sin_;
  std::vector<DecoderLayer> layers_;
  std::vector<DecoderLinear> linears_;
  bool checked_ = false;
  // Step buffers, reused: activations and the int8 path's inputs.
  std::vector<float> x_, h_, qkv_, q_, att_, gate_up_, act_, tmp_;
  Int8Scratch int8_;
};

}  // namespace cpu
}  // namespace lowbit
