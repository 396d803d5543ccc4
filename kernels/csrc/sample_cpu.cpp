// One draw per row from unnormalised probabilities, by inverse CDF, on CPU (fp32 probabilities,
// fp64 uniforms): row r gives the first index i with p[0] + ... + p[i] > u[r] * sum(p).
//
// The exponential race (argmax p / Exp(1)) that the GPU path uses needs one exponential per
// vocabulary entry: torch's CPU exponential_ took 122 ms for a [200, 32000] decode batch on the
// 2-core dev VM, more than the step's forward. Here a row costs one uniform and two passes over
// its probabilities: chunk sums first (16 lanes in fp32 per chunk, chunks added in fp64), then
// the chunks are skipped by their sums up to the one holding the target, which is walked one
// entry at a time in fp64. A zero-probability entry is never picked: the running sum must
// strictly pass the target at the picked entry.
#include "cpu_ops.h"

#include <algorithm>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr int64_t kChunk = 1024;
constexpr int64_t kParallelElements = 1 << 16;

double chunk_sum(const float* p, int64_t n) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(p + i));
  double s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += p[i];
  return s;
#else
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
#endif
}

// A row whose sum is not a positive number (NaN logits upstream): its first NaN, else 0 (what
// the exponential race's argmax gives).
int64_t degenerate_pick(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (is_nan_bits(p[i])) return i;
  return 0;
}

int64_t sample_row(const float* p, int64_t n, double u, std::vector<double>& sums) {
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  sums.resize(num_chunks);
  double total = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    sums[c] = chunk_sum(p + c * kChunk, std::min(kChunk, n - c * kChunk));
    total += sums[c];
  }
  if (!is_finite_bits(total) || total <= 0.0) return degenerate_pick(p, n);
  const double target = u * total;
  double cum = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    if (cum + sums[c] <= target) {  // the target lies past this chunk
      cum += sums[c];
      continue;
    }
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) {
      cum += p[i];
      if (cum > target) return i;
    }
    // rounding: the chunk's fp32 sum overshot its entries' fp64 sum; go on from there
  }
  for (int64_t i = n - 1; i > 0; --i)  // rounding at the very end: the last possible entry
    if (p[i] > 0.f) return i;
  return 0;
}
}  // namespace

torch::Tensor sample_rows_cpu(torch::Tensor probs, torch::Tensor uniforms) {
  TORCH_CHECK(probs.dtype() == torch::kFloat32 && probs.dim() == 2 && probs.stride(1) == 1 &&
                  probs.size(1) > 0,
              "sample_rows_cpu: probs must be fp32 [rows, n] with a contiguous last dim");
  TORCH_CHECK(uniforms.dtype() == torch::kFloat64 && uniforms.dim() == 1 &&
                  uniforms.size(0) == probs.size(0),
              "sample_rows_cpu: uniforms must be fp64 [rows]");
  const int64_t rows = probs.size(0), n = probs.size(1), stride = probs.stride(0);
  auto u = uniforms.contiguous();
  auto out = torch::empty({rows}, probs.options().dtype(torch::kInt64));
  const float* pp = probs.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
#pragma omp parallel if (rows > 1 && rows * n >= kParallelElements)
  {
    std::vector<double> sums;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) op[r] = sample_row(pp + r * stride, n, up[r], sums);
  }
  return out;
}
