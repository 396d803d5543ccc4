// The previous CPU paged attention (RAYLM_ATTENTION_IMPL=legacy, kept for A/B runs): one pass over each sequence's K/V blocks,
// read in place through the block table (no gather copy), online softmax per block.
// Same contract as kernels/attention_ref.py: query rows packed by query_start_loc; each row
// attends causally to its sequence's first (seq_len - query_len + i + 1) cached tokens.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace legacy {

constexpr int kMaxGroup = 16;  // query heads per KV head handled in registers
constexpr int64_t kParallelWork = 1 << 15;  // (query row, kv head, key) triples

// The cache holds T = float, or a 16-bit type read as float (halving the bytes decode reads).
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

// One query token, all query heads of one KV head.
template <typename T>
void attend_row(const float* q,            // [group, head_dim] (head stride q_head_stride)
                int64_t q_head_stride,
                const T* k_cache, const T* v_cache,
                int64_t block_stride, int64_t token_stride,  // cache strides (elements)
                const int32_t* block_table, int64_t num_keys, int64_t block_size,
                int64_t group, int64_t head_dim, float scale,
                float* out, int64_t out_head_stride) {
  float m[kMaxGroup], l[kMaxGroup];
  std::vector<float> acc(group * head_dim, 0.f);
  std::vector<float> scores(group * block_size);
  for (int64_t g = 0; g < group; ++g) {
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
  }
  const int64_t num_blocks = (num_keys + block_size - 1) / block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t block = block_table[b];
    const int64_t n = std::min(block_size, num_keys - b * block_size);
    const T* kb = k_cache + block * block_stride;
    const T* vb = v_cache + block * block_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * q_head_stride;
      float bmax = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const float s = scale * dot(qg, kb + j * token_stride, head_dim);
        scores[g * block_size + j] = s;
        bmax = std::max(bmax, s);
      }
      const float new_m = std::max(m[g], bmax);
      const float alpha = std::exp(m[g] - new_m);
      float* a = acc.data() + g * head_dim;
      if (alpha != 1.f) {
        l[g] *= alpha;
        for (int64_t d = 0; d < head_dim; ++d) a[d] *= alpha;
      }
      for (int64_t j = 0; j < n; ++j) {
        const float p = std::exp(scores[g * block_size + j] - new_m);
        l[g] += p;
        const T* vj = vb + j * token_stride;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(vj[d]);
      }
      m[g] = new_m;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / l[g];
    const float* a = acc.data() + g * head_dim;
    float* o = out + g * out_head_stride;
    for (int64_t d = 0; d < head_dim; ++d) o[d] = a[d] * inv;
  }
}

struct TaskArgs {
  const float* qp;
  int64_t q_tok, q_head;
  const int32_t *qsl_p, *lens_p, *bt;
  int64_t num_seqs, max_blocks, num_tasks, kv_heads, group, head_dim, block_size;
  int64_t block_stride, token_stride;
  float scale;
  float* op;
  int64_t num_heads;
  bool parallel;
};

// One task = one query row x one KV head (all its query heads).
template <typename T>
void run_tasks(const TaskArgs& a, const T* kp, const T* vp) {
#pragma omp parallel for schedule(dynamic, 4) if (a.parallel)
  for (int64_t task = 0; task < a.num_tasks; ++task) {
    const int64_t t = task / a.kv_heads, kvh = task % a.kv_heads;
    // The sequence owning query row t: last s with qsl[s] <= t.
    const int64_t s =
        std::upper_bound(a.qsl_p, a.qsl_p + a.num_seqs + 1, (int32_t)t) - a.qsl_p - 1;
    const int64_t q_len = a.qsl_p[s + 1] - a.qsl_p[s];
    const int64_t num_keys = a.lens_p[s] - q_len + (t - a.qsl_p[s]) + 1;
    attend_row(a.qp + t * a.q_tok + kvh * a.group * a.q_head, a.q_head,
               kp + kvh * a.head_dim, vp + kvh * a.head_dim, a.block_stride, a.token_stride,
               a.bt + s * a.max_blocks, num_keys, a.block_size, a.group, a.head_dim, a.scale,
               a.op + (t * a.num_heads + kvh * a.group) * a.head_dim, a.head_dim);
  }
}

}  // namespace legacy

using namespace legacy;

torch::Tensor paged_attention_legacy_cpu(torch::Tensor query,         // [num_tokens, num_heads, D]
                                  torch::Tensor k_cache,       // [num_blocks, B, kv_heads, D]
                                  torch::Tensor v_cache,       // [num_blocks, B, kv_heads, D]
                                  torch::Tensor block_tables,  // [num_seqs, max_blocks] int32
                                  torch::Tensor seq_lens,      // [num_seqs] int32
                                  torch::Tensor query_start_loc,  // [num_seqs + 1] int32
                                  double scale) {
  TORCH_CHECK(query.dtype() == torch::kFloat32, "paged_attention_cpu: fp32 queries only");
  TORCH_CHECK(k_cache.dtype() == v_cache.dtype(), "k_cache and v_cache dtypes differ");
  TORCH_CHECK(query.stride(2) == 1 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_attention_cpu: bad layout");
  TORCH_CHECK(block_tables.is_contiguous() && block_tables.dtype() == torch::kInt32);
  const int64_t num_tokens = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = num_heads / kv_heads;
  TORCH_CHECK(group * kv_heads == num_heads && group <= kMaxGroup, "bad GQA group");
  const int64_t num_seqs = seq_lens.size(0), max_blocks = block_tables.size(1);
  auto out = torch::empty({num_tokens, num_heads, head_dim}, query.options());
  auto qsl = query_start_loc.contiguous();
  auto lens = seq_lens.contiguous();
  const int32_t* qsl_p = qsl.data_ptr<int32_t>();
  const int32_t* lens_p = lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const float* qp = query.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t block_stride = k_cache.stride(0), token_stride = k_cache.stride(1);
  const int64_t q_tok = query.stride(0), q_head = query.stride(1);
  const int64_t num_tasks = num_tokens * kv_heads;
  int64_t max_len = 0;
  for (int64_t s = 0; s < num_seqs; ++s) max_len = std::max<int64_t>(max_len, lens_p[s]);
  // Small steps (batch-1 decode) run on this thread: waking the pool costs more than they do.
  const bool parallel = num_tasks * max_len >= kParallelWork;
  const TaskArgs args{qp, q_tok, q_head, qsl_p, lens_p, bt, num_seqs, max_blocks, num_tasks,
                      kv_heads, group, head_dim, block_size, block_stride, token_stride,
                      (float)scale, op, num_heads, parallel};
  if (k_cache.scalar_type() == at::kBFloat16) {
    run_tasks(args, k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  } else if (k_cache.scalar_type() == at::kHalf) {
    run_tasks(args, k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "cache dtype must be fp32, bf16 or fp16");
    run_tasks(args, k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  }
  return out;
}

