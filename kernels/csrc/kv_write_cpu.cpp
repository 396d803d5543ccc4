// KV write on CPU: scatter this step's keys and values into the paged cache in one pass.
// The torch reference (kernels/kv_write_ref.py) is a mask test, a host sync on it and two
// index_copy_ calls per layer: ~40 us of dispatch per layer, 12 % of a batch-1 decode step of
// the bench model. Keys/values are fp32 views into the fused qkv output (any token/head strides,
// head_dim contiguous); the cache is fp32, bf16 or fp16, [num_blocks, block_size, kv_heads, D]
// contiguous; a slot < 0 is skipped (padding rows).
#include <torch/extension.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace {
constexpr int64_t kParallelTokens = 64;

template <typename T>
void write_rows(const float* src, int64_t s0, int64_t s1, T* cache, const int64_t* slots,
                int64_t n, int64_t heads, int64_t d) {
#pragma omp parallel for if (n >= kParallelTokens)
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    T* dst = cache + slot * heads * d;
    for (int64_t h = 0; h < heads; ++h) {
      const float* s = src + t * s0 + h * s1;
      T* o = dst + h * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(s[i]);
    }
  }
}

template <typename T>
void write_both(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& k_cache,
                torch::Tensor& v_cache, const int64_t* slots) {
  const int64_t n = key.size(0), heads = key.size(1), d = key.size(2);
  write_rows<T>(key.data_ptr<float>(), key.stride(0), key.stride(1), k_cache.data_ptr<T>(),
                slots, n, heads, d);
  write_rows<T>(value.data_ptr<float>(), value.stride(0), value.stride(1),
                v_cache.data_ptr<T>(), slots, n, heads, d);
}
}  // namespace

void write_kv_cpu(torch::Tensor key,            // [T, kv_heads, D] fp32, D contiguous
                  torch::Tensor value,          // [T, kv_heads, D] fp32, D contiguous
                  torch::Tensor k_cache,        // [num_blocks, block_size, kv_heads, D]
                  torch::Tensor v_cache,        // [num_blocks, block_size, kv_heads, D]
                  torch::Tensor slot_mapping) {  // [T] int64, -1 = skip
  TORCH_CHECK(key.dtype() == torch::kFloat32 && value.dtype() == torch::kFloat32, "fp32 k/v");
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "k/v shape");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache layout");
  TORCH_CHECK(k_cache.dtype() == v_cache.dtype(), "k/v cache dtypes differ");
  TORCH_CHECK(k_cache.size(2) == key.size(1) && k_cache.size(3) == key.size(2), "cache shape");
  TORCH_CHECK(slot_mapping.dtype() == torch::kInt64 && slot_mapping.size(0) == key.size(0),
              "slot_mapping: int64 [T]");
  auto slots = slot_mapping.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < key.size(0); ++t) TORCH_CHECK(sp[t] < num_slots, "slot out of range");
  switch (k_cache.scalar_type()) {
    case torch::kFloat32: write_both<float>(key, value, k_cache, v_cache, sp); break;
    case torch::kBFloat16: write_both<c10::BFloat16>(key, value, k_cache, v_cache, sp); break;
    case torch::kHalf: write_both<c10::Half>(key, value, k_cache, v_cache, sp); break;
    default: TORCH_CHECK(false, "KV cache dtype must be float32, bfloat16 or float16");
  }
}
