#include "decode.h"

#include <cmath>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>

#include "../checks.h"
#include "isa.h"
#include "linear.h"

namespace lowbit {
namespace cpu {
namespace {

constexpr const char* kOp = "lowbit.LlamaDecoder";

void check_float32(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kOp, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous(), kOp, ": ", name, " must be a contiguous CPU tensor");
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), kOp, ": ", name, " must be ", at::IntArrayRef(shape),
                    ", got ", t.sizes());
}

void check_ids(const at::Tensor& t, const char* name, int64_t n, int64_t limit) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, kOp, ".step: ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n && t.is_contiguous(), kOp, ".step: ",
                    name, " must be a contiguous CPU tensor of ", n, " values, got ", t.sizes());
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < limit, kOp, ".step: ", name, "[", i, "] = ", p[i], " is outside [0, ",
                      limit, ")");
}

template <typename T>
T* sized(std::vector<T>& v, int64_t count) {
  if (static_cast<int64_t>(v.size()) < count) v.resize(count);
  return v.data();
}

}  // namespace

LlamaDecoder::LlamaDecoder(int64_t n_heads, int64_t n_kv_heads, double eps, at::Tensor embed, at::Tensor norm,
                           at::Tensor rope_cos, at::Tensor rope_sin)
    : H_(n_heads), Hkv_(n_kv_heads), eps_(static_cast<float>(eps)) {
  TORCH_CHECK_VALUE(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, kOp,
                    ": n_heads must be a positive multiple of n_kv_heads, got ", n_heads, " and ", n_kv_heads);
  TORCH_CHECK_VALUE(embed.dim() == 2 && rope_cos.dim() == 2, kOp, ": embed and rope_cos must be 2-D");
  V_ = embed.size(0), D_ = embed.size(1), S_ = rope_cos.size(0), Dh_ = rope_cos.size(1);
  check_float32(embed, "embed", {V_, D_});
  check_float32(norm, "norm", {D_});
  check_float32(rope_cos, "rope_cos", {S_, Dh_});
  check_float32(rope_sin, "rope_sin", {S_, Dh_});
  TORCH_CHECK_VALUE(Dh_ % 2 == 0, kOp, ": head_dim must be even, got ", Dh_);
  embed_ = embed, norm_ = norm, rope_cos_ = rope_cos, rope_sin_ = rope_sin;
}

void LlamaDecoder::add_layer(at::Tensor attn_norm, at::Tensor ffn_norm, at::Tensor k_cache, at::Tensor v_cache) {
  check_float32(attn_norm, "attn_norm", {D_});
  check_float32(ffn_norm, "ffn_norm", {D_});
  TORCH_CHECK_VALUE(k_cache.dim() == 4, kOp, ": k_cache must be [batch, n_kv_heads, max_seq_len, head_dim]");
  if (layers_.empty()) B_ = k_cache.size(0), kv_half_ = k_cache.scalar_type() == at::kHalf;
  const at::ScalarType kv_type = kv_half_ ? at::kHalf : at::kFloat;
  for (const auto& [cache, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    TORCH_CHECK_TYPE(cache->scalar_type() == kv_type, kOp, ": ", name, " must be ", kv_type,
                     " (float32 or float16, the same in every layer), got ", cache->scalar_type());
    TORCH_CHECK_VALUE(cache->device().is_cpu() && cache->is_contiguous(), kOp, ": ", name,
                      " must be a contiguous CPU tensor");
    TORCH_CHECK_VALUE(cache->sizes() == at::IntArrayRef({B_, Hkv_, S_, Dh_}), kOp, ": ", name, " must be ",
                      at::IntArrayRef({B_, Hkv_, S_, Dh_}), ", got ", cache->sizes());
  }
  layers_.push_back({attn_norm, ffn_norm, k_cache, v_cache});
  checked_ = false;
}

DecoderLinear prepare_linear(const char* op, double bits, at::Tensor qweight, at::Tensor scales, at::Tensor zeros,
                             std::optional<at::Tensor> perm, std::optional<at::Tensor> bias, int64_t group_size,
                             int64_t in_features) {
  TORCH_CHECK_VALUE(bits == 4.0 || bits == 3.5 || bits == 8.0, op, ": bits must be 4, 3.5 or 8, got ", bits);
  const Format format = bits == 4.0 ? Format::kInt4 : bits == 3.5 ? Format::kInt35 : Format::kInt8;
  const WeightShape s = check_weight(op, format, qweight, scales, zeros, perm, group_size, in_features);
  TORCH_CHECK_VALUE(qweight.device().is_cpu(), op, ": the weights must be on the CPU");
  check_perm_values(op, perm, s.K);
  DecoderLinear l;
  l.qweight = qweight, l.scales = scales, l.zeros = zeros;
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.N, op, ": bias must be [", s.N, "]");
    l.bias = bias->to(at::kFloat).contiguous();
  }
  // The kernels of the ISA active now, for the linear's lifetime: the activation layout depends on them.
  l.kernels = &active_kernels();
  l.w = view_weight(s, qweight, scales, zeros);
  const int32_t* p = perm ? perm->data_ptr<int32_t>() : nullptr;
  l.src.resize(s.Kp);
  source_offsets(s.K, s.Kp, p, l.kernels->x_order[static_cast<int>(format)], 1, l.src.data());
  if (l.kernels->interleaved_gemv) {
    l.interleaved = interleave(l.w);
    l.interleaved_src.resize(s.Kp);
    source_offsets(s.K, s.Kp, p, kInterleavedOrder.x_order[static_cast<int>(format)], 1, l.interleaved_src.data());
  }
  l.N = s.N, l.K = s.K;
  return l;
}

void LlamaDecoder::add_quantized_linear(double bits, at::Tensor qweight, at::Tensor scales, at::Tensor zeros,
                                        std::optional<at::Tensor> perm, std::optional<at::Tensor> bias,
                                        int64_t group_size, int64_t in_features) {
  linears_.push_back(prepare_linear(kOp, bits, qweight, scales, zeros, perm, bias, group_size, in_features));
  checked_ = false;
}

void LlamaDecoder::add_float_linear(at::Tensor weight, std::optional<at::Tensor> bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2, kOp, ": a float linear's weight must be 2-D, got ", weight.sizes());
  DecoderLinear l;
  l.N = weight.size(0), l.K = weight.size(1);
  check_float32(weight, "weight", {l.N, l.K});
  l.weight = weight;
  if (bias) {
    check_float32(*bias, "bias", {l.N});
    l.bias = *bias;
  }
  linears_.push_back(std::move(l));
  checked_ = false;
}

// Every linear's shape against the layer structure, once before the first step.
void LlamaDecoder::check_complete() {
  const int64_t L = static_cast<int64_t>(layers_.size());
  TORCH_CHECK_VALUE(L > 0 && static_cast<int64_t>(linears_.size()) == 4 * L + 1, kOp, ": ", L, " layers need ",
                    4 * L + 1, " linears (wqkv, wo, w_gate_up, w_down per layer, then lm_head), got ",
                    linears_.size());
  const int64_t q_rows = H_ * Dh_, qkv_rows = q_rows + 2 * Hkv_ * Dh_;
  const int64_t I = linears_[2].N / 2;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t expected[4][2] = {{qkv_rows, D_}, {D_, q_rows}, {2 * I, D_}, {D_, I}};
    for (int i = 0; i < 4; ++i) {
      const DecoderLinear& lin = linears_[4 * l + i];
      TORCH_CHECK_VALUE(lin.N == expected[i][0] && lin.K == expected[i][1], kOp, ": layer ", l, " linear ", i,
                        " is [", lin.N, ", ", lin.K, "], expected [", expected[i][0], ", ", expected[i][1], "]");
    }
  }
  TORCH_CHECK_VALUE(linears_.back().N == V_ && linears_.back().K == D_, kOp, ": lm_head must be [", V_, ", ", D_,
                    "], got [", linears_.back().N, ", ", linears_.back().K, "]");
  checked_ = true;
}

namespace {

// n rows on the int8 path: each row is quantized and summed on its own.
void int8_rows(const DecoderLinear& l, const float* x, int64_t n, float* y, Int8Scratch& scratch) {
  const int64_t xblock = int8_xblock(l.w);
  const Int8Buffers buf{sized(scratch.xq, n * l.w.Kp), sized(scratch.xscale, n * l.w.Kp / xblock),
                        sized(scratch.xsum, n * l.w.Kp / l.w.group_size), y, at::Tensor()};
  const float* bias = l.bias.defined() ? l.bias.data_ptr<float>() : nullptr;
  const int f = static_cast<int>(l.w.format);
  if (l.kernels->interleaved_gemv) {
    quantize_x<float>(*l.kernels, kInterleavedOrder.x_order[f], l.w, l.interleaved_src.data(), x, l.K, n, buf);
    interleaved_gemv(*l.kernels, l.interleaved.view, n, bias, buf, y);
  } else {
    quantize_x<float>(*l.kernels, l.kernels->x_order[f], l.w, l.src.data(), x, l.K, n, buf);
    int8_gemv(*l.kernels, l.w, n, bias, buf, y);
  }
}

}  // namespace

void run_linear(const DecoderLinear& l, const float* x, const std::vector<int64_t>& bounds, float* y,
                Int8Scratch& scratch) {
  if (!l.kernels) {  // float32 weight: BLAS, one call per sequence (BLAS sums a matrix in another order than a
                     // vector: a sequence's rows must not depend on what else is in the call)
    for (size_t i = 0; i + 1 < bounds.size(); ++i) {
      const int64_t begin = bounds[i], rows = bounds[i + 1] - begin;
      at::Tensor out = at::from_blob(y + begin * l.N, {rows, l.N}, at::kFloat);
      at::mm_out(out, at::from_blob(const_cast<float*>(x + begin * l.K), {rows, l.K}, at::kFloat), l.weight.t());
      if (l.bias.defined()) out.add_(l.bias);
    }
    return;
  }
  // Quantized weights take the int8 path at every row count, prompts included: on the interleaved kernels it
  // beats bfloat16 BLAS on dequantized tiles from 32 to 512 rows (1.0-3.4x for SmolLM2's and LLaMA-7B's shapes;
  // SmolLM2's 512-token prefill ~930 -> ~1150 tok/s), and it keeps a prompt's rows the same whatever else is in
  // the call.
  int8_rows(l, x, bounds.back(), y, scratch);
}

PreparedLinear::PreparedLinear(double bits, at::Tensor qweight, at::Tensor scales, at::Tensor zeros,
                               std::optional<at::Tensor> perm, std::optional<at::Tensor> bias, int64_t group_size,
                               int64_t in_features)
    : linear_(prepare_linear("lowbit.PreparedLinear", bits, qweight, scales, zeros, perm, bias, group_size,
                             in_features)) {}

at::Tensor PreparedLinear::forward(const at::Tensor& x) {
  constexpr const char* op = "lowbit.PreparedLinear.forward";
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 2 && x.size(1) == linear_.K, op,
                    ": x must be a CPU tensor [rows, ", linear_.K, "], got ", x.sizes());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), linear_.N}, at::kFloat);
  if (x.size(0) > 0) int8_rows(linear_, xc.data_ptr<float>(), x.size(0), y.data_ptr<float>(), scratch_);
  return y;
}

// out = weight * x / rms(x), row by row, as models.llama.RMSNorm computes it in float32.
void LlamaDecoder::rms_norm(const float* x, const at::Tensor& weight, int64_t n, float* out) const {
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, n, rows_per_task(D_), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * D_;
      float sum = 0.0f;
      for (int64_t i = 0; i < D_; ++i) sum += xr[i] * xr[i];
      const float inv_rms = 1.0f / std::sqrt(sum / static_cast<float>(D_) + eps_);
      for (int64_t i = 0; i < D_; ++i) out[r * D_ + i] = w[i] * (xr[i] * inv_rms);
    }
  });
}

// RoPE on q and k, k and v into the cache at (slot, position), then every (row, head) attends.
void LlamaDecoder::attention(const DecoderLayer& layer, const float* qkv, int64_t n, const int64_t* pos,
                             const int64_t* lengths, const int64_t* slot, float* att) {
  const int64_t q_rows = H_ * Dh_, kv_rows = Hkv_ * Dh_, qkv_rows = q_rows + 2 * kv_rows;
  const KernelTable& kernels = active_kernels();
  const float* cos_table = rope_cos_.data_ptr<float>();
  const float* sin_table = rope_sin_.data_ptr<float>();
  float* q = sized(q_, n * q_rows);
  at::parallel_for(0, n, rows_per_task(qkv_rows), [&](int64_t begin, int64_t end) {
    std::vector<float> key(Dh_);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = qkv + r * qkv_rows;
      const float *c = cos_table + pos[r] * Dh_, *s = sin_table + pos[r] * Dh_;
      for (int64_t h = 0; h < H_; ++h) kernels.rope(row + h * Dh_, c, s, Dh_, q + (r * H_ + h) * Dh_);
      for (int64_t h = 0; h < Hkv_; ++h) {
        const int64_t offset = ((slot[r] * Hkv_ + h) * S_ + pos[r]) * Dh_;
        const float* value = row + q_rows + kv_rows + h * Dh_;
        if (kv_half_) {  // rounded to nearest even, as torch converts
          kernels.rope(row + q_rows + h * Dh_, c, s, Dh_, key.data());
          kernels.to_half(key.data(), Dh_, reinterpret_cast<uint16_t*>(layer.k_cache.data_ptr<at::Half>()) + offset);
          kernels.to_half(value, Dh_, reinterpret_cast<uint16_t*>(layer.v_cache.data_ptr<at::Half>()) + offset);
        } else {
          kernels.rope(row + q_rows + h * Dh_, c, s, Dh_, layer.k_cache.data_ptr<float>() + offset);
          std::copy(value, value + Dh_, layer.v_cache.data_ptr<float>() + offset);
        }
      }
    }
  });
  const int64_t max_length = *std::max_element(lengths, lengths + n);
  // Items (row, head) in units of one row's heads that share a key/value head, which the kernels may run
  // together. Many units go round-robin over the threads: a prompt's rows attend over 1 .. n positions, and
  // contiguous ranges would leave the thread with the first rows idle for most of the step. A few (one
  // sequence's decode step) are split evenly by item.
  const int64_t group = H_ / Hkv_, units = n * Hkv_, threads = at::get_num_threads();
  const auto args = [&](std::vector<float>& scores) {  // a thread's arguments, with its own score scratch
    scores.resize(group * max_length);
    const bool half = kv_half_;
    return AttendArgs{q,
                      half ? nullptr : layer.k_cache.data_ptr<float>(),
                      half ? nullptr : layer.v_cache.data_ptr<float>(),
                      half ? reinterpret_cast<const uint16_t*>(layer.k_cache.data_ptr<at::Half>()) : nullptr,
                      half ? reinterpret_cast<const uint16_t*>(layer.v_cache.data_ptr<at::Half>()) : nullptr,
                      slot, lengths, scores.data(), att, H_, Hkv_, S_, Dh_,
                      1.0f / std::sqrt(static_cast<float>(Dh_))};
  };
  if (units >= 4 * threads) {
    at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
      std::vector<float> scores;
      const AttendArgs a = args(scores);
      for (int64_t t = t_begin; t < t_end; ++t)
        for (int64_t u = t; u < units; u += threads) kernels.attend(a, u * group, (u + 1) * group);
    });
  } else {
    at::parallel_for(0, n * H_, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      kernels.attend(args(scores), begin, end);
    });
  }
}

at::Tensor LlamaDecoder::step(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& slots,
                              const std::optional<at::Tensor>& logit_rows) {
  if (!checked_) check_complete();
  const int64_t n = tokens.dim() == 1 ? tokens.size(0) : -1;
  TORCH_CHECK_VALUE(n >= 1, kOp, ".step: tokens must be a non-empty 1-D tensor, got ", tokens.sizes());
  check_ids(tokens, "tokens", n, V_);
  check_ids(positions, "positions", n, S_);
  check_ids(slots, "slots", n, B_);
  const int64_t m = logit_rows ? logit_rows->numel() : n;
  if (logit_rows) check_ids(*logit_rows, "logit_rows", m, n);
  const int64_t* token = tokens.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  // Sequences: runs of rows in one cache row (a prompt, or one decode row), row bounds[i] .. bounds[i + 1] - 1.
  const auto sequence_bounds = [&](int64_t count, const auto& slot_of) {
    std::vector<int64_t> bounds{0};
    for (int64_t r = 1; r < count; ++r)
      if (slot_of(r) != slot_of(r - 1)) bounds.push_back(r);
    bounds.push_back(count);
    return bounds;
  };
  const std::vector<int64_t> bounds = sequence_bounds(n, [&](int64_t r) { return slot[r]; });
  std::vector<int64_t> lengths(n);  // positions each row attends over
  for (int64_t r = 0; r < n; ++r) lengths[r] = pos[r] + 1;

  const int64_t qkv_rows = linears_[0].N, q_rows = H_ * Dh_, I = linears_[2].N / 2;
  const KernelTable& kernels = active_kernels();  // for the glue (the linears keep the kernels they were made for)
  float* x = sized(x_, n * D_);
  float* h = sized(h_, n * D_);
  float* qkv = sized(qkv_, n * qkv_rows);
  float* att = sized(att_, n * q_rows);
  float* gate_up = sized(gate_up_, n * 2 * I);
  float* act = sized(act_, n * I);
  float* tmp = sized(tmp_, n * D_);
  const auto add_to_x = [&] {
    at::parallel_for(0, n, rows_per_task(D_), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * D_; i < end * D_; ++i) x[i] += tmp[i];
    });
  };

  const float* embed = embed_.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) std::copy(embed + token[r] * D_, embed + (token[r] + 1) * D_, x + r * D_);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const DecoderLinear* lin = &linears_[4 * l];
    rms_norm(x, layers_[l].attn_norm, n, h);
    run_linear(lin[0], h, bounds, qkv, int8_);
    attention(layers_[l], qkv, n, pos, lengths.data(), slot, att);
    run_linear(lin[1], att, bounds, tmp, int8_);
    add_to_x();
    rms_norm(x, layers_[l].ffn_norm, n, h);
    run_linear(lin[2], h, bounds, gate_up, int8_);
    at::parallel_for(0, n, rows_per_task(I), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        kernels.silu_mul(gate_up + r * 2 * I, gate_up + r * 2 * I + I, I, act + r * I);
    });
    run_linear(lin[3], act, bounds, tmp, int8_);
    add_to_x();
  }
  const int64_t* rows = logit_rows ? logit_rows->data_ptr<int64_t>() : nullptr;
  if (rows) {  // only these rows go through the head (a prefill needs its last)
    for (int64_t i = 0; i < m; ++i) std::copy(x + rows[i] * D_, x + (rows[i] + 1) * D_, tmp + i * D_);
    std::copy(tmp, tmp + m * D_, x);
  }
  rms_norm(x, norm_, m, h);
  at::Tensor logits = at::empty({m, V_}, at::kFloat);
  run_linear(linears_.back(), h, sequence_bounds(m, [&](int64_t i) { return slot[rows ? rows[i] : i]; }),
             logits.data_ptr<float>(), int8_);
  return logits;
}

}  // namespace cpu
}  // namespace lowbit
