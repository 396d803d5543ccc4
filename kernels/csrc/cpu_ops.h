// raylm's CPU ops as C++ functions: bound to Python in cpu_ops.cpp, composed in llama_cpu.cpp.
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <tuple>

// NaN / infinity tests on the bit pattern: the ops build with -ffast-math, under which the
// compiler may fold std::isnan and std::isfinite to constants.
inline bool is_nan_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x7fffffffu) > 0x7f800000u;
}
inline bool is_finite_bits(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return ((bits >> 52) & 0x7ffu) != 0x7ffu;
}

// Order-preserving map of a float to a signed int, and back (the map is its own inverse): -inf
// lowest, positive NaNs above +inf (where torch.topk ranks NaN). Logit filters bisect over it.
inline int32_t order_key(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits >= 0 ? bits : (int32_t)(bits ^ 0x7fffffff);
}
inline float from_order_key(int32_t key) {
  const int32_t bits = key >= 0 ? key : (int32_t)(key ^ 0x7fffffff);
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

torch::Tensor paged_attention_cpu(torch::Tensor query, torch::Tensor k_cache,
                                  torch::Tensor v_cache, torch::Tensor block_tables,
                                  torch::Tensor seq_lens, torch::Tensor query_start_loc,
                                  double scale);
torch::Tensor paged_attention_legacy_cpu(torch::Tensor query, torch::Tensor k_cache,
                                         torch::Tensor v_cache, torch::Tensor block_tables,
                                         torch::Tensor seq_lens, torch::Tensor query_start_loc,
                                         double scale);
torch::Tensor linear_small_batch(torch::Tensor x, torch::Tensor w,
                                 c10::optional<torch::Tensor> bias);
torch::Tensor linear_packed(const torch::Tensor& x, const torch::Tensor& packed_w,
                            const c10::optional<torch::Tensor>& bias);
torch::Tensor rms_norm_cpu(torch::Tensor x, torch::Tensor w, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_cpu(torch::Tensor x, torch::Tensor residual,
                                                          torch::Tensor w, double eps);
void rotary_cpu(torch::Tensor positions, torch::Tensor q, torch::Tensor k,
                torch::Tensor cos_sin_cache);
torch::Tensor silu_and_mul_cpu(torch::Tensor x);
void write_kv_cpu(torch::Tensor key, torch::Tensor value, torch::Tensor k_cache,
                  torch::Tensor v_cache, torch::Tensor slot_mapping);
torch::Tensor argmax_rows_cpu(torch::Tensor x);
torch::Tensor sample_rows_cpu(torch::Tensor probs, torch::Tensor uniforms);
torch::Tensor top_p_filter_cpu(torch::Tensor logits, torch::Tensor probs, torch::Tensor top_p);
torch::Tensor top_k_filter_cpu(torch::Tensor logits, torch::Tensor top_k);
torch::Tensor mask_below_cpu(torch::Tensor values, torch::Tensor threshold, torch::Tensor logits);
void bind_llama_cpu(pybind11::module& m);
