// Top-k and threshold masks over fp32 logit rows on CPU, without torch's bool-tensor kernels.
//
// On the 2-core dev VM a [200, 32000] `logits.masked_fill(logits < t, -inf)` took 14-18 ms
// (torch's CPU kernels over a bool mask branch per element; `logits + 1` took 0.95 ms) and
// `topk(50)` 8 ms: top-k alone cost more per step than a 32-row decode forward. Here each row is
// one compare-and-blend pass, and the k-th largest logit is found by bisection over the logits'
// order-preserving integer keys (<= 32 counting passes, over ever fewer candidates) instead of a
// selection.
//
// Both compare floats as torch does, so the kept set is the one of Hugging Face's
// `scores < threshold` rule: ties with the threshold stay, NaN logits stay, -0.0 == +0.0.
#include "cpu_ops.h"

#include <algorithm>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr int64_t kParallelElements = 1 << 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t count_at_or_above(const int32_t* keys, int64_t n, int32_t cut) {
  int64_t count = 0, i = 0;
#if defined(__AVX512F__)
  const __m512i cutv = _mm512_set1_epi32(cut);
  for (; i + 16 <= n; i += 16)
    count += __builtin_popcount(_mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + i), cutv));
#endif
  for (; i < n; ++i) count += keys[i] >= cut;
  return count;
}

// Moves the keys >= cut to the front (in place, order kept); returns their number.
int64_t keep_at_or_above(int32_t* keys, int64_t n, int32_t cut) {
  int64_t w = 0, i = 0;
#if defined(__AVX512F__)
  // compress into a register, then a full store: the store only overwrites keys already read
  const __m512i cutv = _mm512_set1_epi32(cut);
  for (; i + 16 <= n; i += 16) {
    const __m512i v = _mm512_loadu_si512(keys + i);
    const __mmask16 m = _mm512_cmpge_epi32_mask(v, cutv);
    _mm512_storeu_si512(keys + w, _mm512_maskz_compress_epi32(m, v));
    w += __builtin_popcount(m);
  }
#endif
  for (; i < n; ++i)
    if (keys[i] >= cut) keys[w++] = keys[i];
  return w;
}

// out[i] = values[i] < threshold ? -inf : logits[i]
void mask_row(const float* values, const float* logits, int64_t n, float threshold, float* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 t = _mm512_set1_ps(threshold), neg_inf = _mm512_set1_ps(kNegInf);
  for (; i + 16 <= n; i += 16) {
    const __mmask16 drop = _mm512_cmp_ps_mask(_mm512_loadu_ps(values + i), t, _CMP_LT_OQ);
    _mm512_storeu_ps(out + i, _mm512_mask_mov_ps(_mm512_loadu_ps(logits + i), drop, neg_inf));
  }
#endif
  for (; i < n; ++i) out[i] = values[i] < threshold ? kNegInf : logits[i];
}

// The k-th largest logit of a row (1 <= k < n), by bisection: the largest key c with at least k
// keys >= c is the k-th largest key. Keys below the lower bound can no longer change a count, so
// whenever the keys at or above it are a quarter of those still scanned they are moved to the front
// and the passes scan only them (the key space halves per pass, the candidates much faster).
float kth_largest(const float* logits, int64_t n, int64_t k, std::vector<int32_t>& keys) {
  keys.resize(n);
  int32_t lo_key = std::numeric_limits<int32_t>::max(), hi_key = std::numeric_limits<int32_t>::min();
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = order_key(logits[i]);
    lo_key = std::min(lo_key, keys[i]);
    hi_key = std::max(hi_key, keys[i]);
  }
  // Invariant: count(>= lo) >= k > count(>= hi); keys[0, active) holds every key >= lo.
  int64_t lo = lo_key, hi = (int64_t)hi_key + 1, active = n, at_or_above_lo = n;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    const int64_t count = count_at_or_above(keys.data(), active, (int32_t)mid);
    if (count >= k) {
      lo = mid;
      at_or_above_lo = count;
    } else {
      hi = mid;
    }
    if (at_or_above_lo * 4 <= active) active = keep_at_or_above(keys.data(), active, (int32_t)lo);
  }
  return from_order_key((int32_t)lo);
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.dim() == 2 && t.stride(1) == 1, name,
              " must be fp32 [rows, n] with a contiguous last dim");
}
}  // namespace

// logits [rows, n] fp32, top_k [rows] int64 (<= 0 or >= n: keep the row)
// -> logits with every token below the row's k-th largest logit at -inf (a new tensor).
torch::Tensor top_k_filter_cpu(torch::Tensor logits, torch::Tensor top_k) {
  check_rows(logits, "top_k_filter_cpu: logits");
  TORCH_CHECK(top_k.dtype() == torch::kInt64 && top_k.dim() == 1 &&
                  top_k.size(0) == logits.size(0),
              "top_k_filter_cpu: top_k must be int64 [rows]");
  const int64_t rows = logits.size(0), n = logits.size(1), ls = logits.stride(0);
  auto k = top_k.contiguous();
  auto out = torch::empty({rows, n}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const int64_t* kp = k.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
#pragma omp parallel if (rows > 1 && rows * n >= kParallelElements)
  {
    std::vector<int32_t> keys;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = lp + r * ls;
      if (kp[r] <= 0 || kp[r] >= n) {
        std::copy(row, row + n, op + r * n);
        continue;
      }
      mask_row(row, row, n, kth_largest(row, n, kp[r], keys), op + r * n);
    }
  }
  return out;
}

// values, logits [rows, n] fp32, threshold [rows] fp32
// -> logits with the tokens whose value is below their row's threshold at -inf (a new tensor).
torch::Tensor mask_below_cpu(torch::Tensor values, torch::Tensor threshold, torch::Tensor logits) {
  check_rows(values, "mask_below_cpu: values");
  check_rows(logits, "mask_below_cpu: logits");
  TORCH_CHECK(values.sizes() == logits.sizes(), "mask_below_cpu: values and logits differ in shape");
  TORCH_CHECK(threshold.dtype() == torch::kFloat32 && threshold.dim() == 1 &&
                  threshold.size(0) == logits.size(0),
              "mask_below_cpu: threshold must be fp32 [rows]");
  const int64_t rows = logits.size(0), n = logits.size(1);
  auto t = threshold.contiguous();
  auto out = torch::empty({rows, n}, logits.options());
  const float *vp = values.data_ptr<float>(), *lp = logits.data_ptr<float>(), *tp = t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t vs = values.stride(0), ls = logits.stride(0);
#pragma omp parallel for schedule(static) if (rows > 1 && rows * n >= kParallelElements)
  for (int64_t r = 0; r < rows; ++r) mask_row(vp + r * vs, lp + r * ls, n, tp[r], op + r * n);
  return out;
}
