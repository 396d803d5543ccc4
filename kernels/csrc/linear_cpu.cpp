// Small-batch linear on CPU (fp32): y[M, N] = x[M, K] @ W[N, K]^T (+ bias), for the few-row
// decode steps where the library GEMM reaches only part of the memory bandwidth. Each weight
// row is streamed once and dotted with every input row while it is in registers/L1. Above 8
// rows a task's weight tile (sized to L1) is reused from cache by each group of 8 input rows;
// whether that beats the BLAS GEMM is measured per shape at start-up (kernels/linear_plan.py).
#include <torch/extension.h>

#include <algorithm>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr int64_t kMaxRows = 64;
constexpr int64_t kRowsPerGroup = 8;   // input rows held per pass over a weight tile
constexpr int64_t kRowsPerTask = 64;  // weight rows per parallel task (<= 8 input rows)
constexpr int64_t kTileBytes = 32 << 10;  // weight tile re-read per input group (> 8 rows)

#if defined(__AVX512F__)
// Weight rows per register tile for M input rows: M * NR accumulators + NR weight vectors fit
// the 32 vector registers, and NR independent streams keep the loads in flight.
template <int M>
constexpr int tile_rows() { return M <= 2 ? 8 : (M <= 4 ? 4 : 2); }

// y[m, n..n+NR) for NR weight rows at a time; k % 16 == 0. Returns the first row not done.
template <int M>
int64_t rows_avx512(const float* x, int64_t x_stride, const float* w, int64_t k,
                    const float* bias, float* y, int64_t y_stride, int64_t n_begin,
                    int64_t n_end) {
  constexpr int NR = tile_rows<M>();
  int64_t n = n_begin;
  for (; n + NR <= n_end; n += NR) {
    __m512 acc[M][NR];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
    const float* wn = w + n * k;
    for (int64_t i = 0; i < k; i += 16) {
      __m512 wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_ps(wn + r * k + i);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * x_stride + i);
        for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < NR; ++r)
        y[m * y_stride + n + r] = _mm512_reduce_add_ps(acc[m][r]) + (bias ? bias[n + r] : 0.f);
  }
  return n;
}
#endif

template <int M>
void rows_kernel(const float* x, int64_t x_stride, const float* w, int64_t k, const float* bias,
                 float* y, int64_t y_stride, int64_t n_begin, int64_t n_end) {
#if defined(__AVX512F__)
  if (k % 16 == 0) n_begin = rows_avx512<M>(x, x_stride, w, k, bias, y, y_stride, n_begin, n_end);
#endif
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* wn = w + n * k;
    float acc[M];
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    for (int m = 0; m < M; ++m) {
      const float* xm = x + m * x_stride;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < k; ++i) s += xm[i] * wn[i];
      acc[m] = s;
    }
    const float b = bias ? bias[n] : 0.f;
    for (int m = 0; m < M; ++m) y[m * y_stride + n] = acc[m] + b;
  }
}

template <int M>
void run(const float* x, int64_t x_stride, const float* w, int64_t n, int64_t k,
         const float* bias, float* y) {
  const int64_t num_tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for schedule(static) if (n * k >= (1 << 18))
  for (int64_t t = 0; t < num_tasks; ++t) {
    const int64_t begin = t * kRowsPerTask, end = std::min(n, begin + kRowsPerTask);
    rows_kernel<M>(x, x_stride, w, k, bias, y, n, begin, end);
  }
}

// m > 8 rows: tiles of weight rows; each tile is read from memory once and from L1/L2 by every
// group of 8 input rows.
void run_many(const float* x, int64_t x_stride, int64_t m, const float* w, int64_t n, int64_t k,
              const float* bias, float* y) {
  const int64_t tile = std::max<int64_t>(4, kTileBytes / (k * (int64_t)sizeof(float)));
  const int64_t num_tasks = (n + tile - 1) / tile;
#pragma omp parallel for schedule(static) if (m * n * k >= (1 << 18))
  for (int64_t t = 0; t < num_tasks; ++t) {
    const int64_t begin = t * tile, end = std::min(n, begin + tile);
    for (int64_t r = 0; r < m; r += kRowsPerGroup) {
      const float* xr = x + r * x_stride;
      float* yr = y + r * n;
      switch (std::min(kRowsPerGroup, m - r)) {
        case 1: rows_kernel<1>(xr, x_stride, w, k, bias, yr, n, begin, end); break;
        case 2: rows_kernel<2>(xr, x_stride, w, k, bias, yr, n, begin, end); break;
        case 3: rows_kernel<3>(xr, x_stride, w, k, bias, yr, n, begin, end); break;
        case 4: rows_kernel<4>(xr, x_stride, w, k, bias, yr, n, begin, end); break;
        case 5: rows_kernel<5>(xr, x_stride, w, k, bias, yr, n, begin, end); break;
        case 6: rows_kernel<6>(xr, x_stride, w, k, bias, yr, n, begin, end); break;
        case 7: rows_kernel<7>(xr, x_stride, w, k, bias, yr, n, begin, end); break;
        default: rows_kernel<8>(xr, x_stride, w, k, bias, yr, n, begin, end); break;
      }
    }
  }
}
}  // namespace

torch::Tensor linear_small_batch(torch::Tensor x,  // [M, K], M <= 64, last dim contiguous
                                 torch::Tensor w,  // [N, K] contiguous
                                 c10::optional<torch::Tensor> bias) {  // [N]
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shape mismatch");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous(), "bad layout");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(m >= 1 && m <= kMaxRows, "linear_small_batch: 1..64 rows");
  auto y = torch::empty({m, n}, x.options());
  const float* b = nullptr;
  torch::Tensor bias_c;
  if (bias.has_value()) {
    bias_c = bias->contiguous();
    b = bias_c.data_ptr<float>();
  }
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs = x.stride(0);
  switch (m) {
    case 1: run<1>(xp, xs, wp, n, k, b, yp); break;
    case 2: run<2>(xp, xs, wp, n, k, b, yp); break;
    case 3: run<3>(xp, xs, wp, n, k, b, yp); break;
    case 4: run<4>(xp, xs, wp, n, k, b, yp); break;
    case 5: run<5>(xp, xs, wp, n, k, b, yp); break;
    case 6: run<6>(xp, xs, wp, n, k, b, yp); break;
    case 7: run<7>(xp, xs, wp, n, k, b, yp); break;
    case 8: run<8>(xp, xs, wp, n, k, b, yp); break;
    default: run_many(xp, xs, m, wp, n, k, b, yp); break;
  }
  return y;
}
