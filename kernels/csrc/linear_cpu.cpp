// Small-batch linear on CPU (fp32): y[M, N] = x[M, K] @ W[N, K]^T (+ bias), for the few-row
// decode steps where the library GEMM reaches only part of the memory bandwidth. Each weight
// row is streamed once and dotted with every input row while it is in registers/L1; weights are
// used as stored ([out, in]), never re-packed.
//
// Two things decide the speed at these row counts (measured on a 2-core AVX-512 VM, a sweep over
// the bench model's 8 layers + LM head, 166 MB of weights):
// - the weight stream must not stall. At 1-2 input rows the weight is read front to back, one
//   row at a time, on 2 MiB pages (kernels/host_memory.py), with no software prefetch: the
//   hardware prefetcher follows one sequential stream on its own. (A non-temporal prefetch 4 KiB
//   ahead, measured on a sweep alone, cost 13 % of a whole batch-1 decode step side by side,
//   4.76 against 4.19 ms/token, and left the caches colder for the step's other work.) At more
//   rows several weight rows share each input load, which interleaves as many streams; the
//   hardware prefetcher stops at every 4 KiB page, so the kernel prefetches those rows a few
//   register tiles ahead in software, into L2 (prefetching into L1 measured 10-15 % slower at
//   8-32 rows; a non-temporal hint 4x slower). Without it the loads and the FMAs take turns:
//   8 rows took 11.4 ms, with it 4.4;
// - above 8 rows a task's weight tile is reused from L1 by each group of input rows; the group
//   and the tile are sized so that both fit L1 together (a group of 8 rows of a 1536-wide input
//   alone fills it), and a tile is a whole number of register tiles (a leftover weight row uses a
//   one-row register tile, not a scalar loop).
// Whether this beats the GEMMs (BLAS, or oneDNN on pre-packed weights: linear_packed below) is
// measured per shape and row count at start-up (kernels/linear_plan.py).
#include <torch/extension.h>

#include <algorithm>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr int64_t kMaxRows = 64;
constexpr int64_t kMaxGroup = 8;          // input rows held in registers per pass
constexpr int64_t kRowsPerTask = 64;      // weight rows per parallel task (<= 8 input rows)
constexpr int64_t kGroupBytes = 16 << 10;  // an input group's share of L1 (> 8 rows)
constexpr int64_t kTileBytes = 16 << 10;   // a weight tile's share of L1 (> 8 rows)
constexpr int64_t kPrefetchTiles = 2;     // register tiles of weight rows prefetched ahead

// Weight rows per register tile for M input rows. At 1-2 rows one weight row at a time: the
// weights are then read front to back in one stream (see the header). From 3 rows the input loads
// take over and several weight rows share each of them: M * NR accumulators + NR weight vectors
// fit the 32 vector registers, and the NR streams are prefetched into L2.
// (Groups of input rows inside run_many re-read a weight tile from L1, so they keep the
// interleaved tiles: OneStream = false.)
template <int M, bool OneStream>
constexpr int tile_rows() { return M <= 2 ? (OneStream ? 1 : 8) : (M <= 4 ? 4 : 2); }

template <int M>
constexpr int64_t prefetch_rows() { return kPrefetchTiles * tile_rows<M, true>(); }

#if defined(__AVX512F__)
#if defined(__GNUC__) && defined(__x86_64__)  // GNU inline asm
#define RAYLM_PLACED_DOT 1
// acc + x[0..k16) * w[0..k16) in 16-float vectors (k16 > 0, a multiple of 16): the one-row
// tile's loop, written out so that where it lands is fixed: at byte 48 of a 64-byte line, across
// the line's end (jumped to; the NOPs before it never run). Where the compiler put it, the same
// five instructions ran the batch-1 decode step of the bench model at 0.63-0.66 of the memory
// floor in the VM's fast memory state at line offsets 0x10 and 0x20, at 0.70-0.77 at 0x30
// (builds that differed only in padding, alternated process by process); any edit above the loop
// moved it. (Elsewhere the tile's own loop below runs it, wherever the compiler puts it.)
inline __m512 dot_row_placed(const float* x, const float* w, int64_t k16, __m512 acc) {
  int64_t i = 0;
  asm volatile(
      "jmp 1f\n\t"
      ".p2align 6\n\t"
      ".skip 48, 0x90\n"
      "1:\n\t"
      "vmovups (%[x],%[i],4), %%zmm31\n\t"
      "vfmadd231ps (%[w],%[i],4), %%zmm31, %[acc]\n\t"
      "add $16, %[i]\n\t"
      "cmp %[n], %[i]\n\t"
      "jne 1b\n\t"
      : [acc] "+v"(acc), [i] "+r"(i)
      : [x] "r"(x), [w] "r"(w), [n] "r"(k16)
      : "zmm31", "memory", "cc");
  return acc;
}
#endif

// y[m, n..n+NR) for M input rows and the NR weight rows at wn; any k (the tail is masked).
// pf: the same rows of a later tile, prefetched while this one computes (nullptr: none).
template <int M, int NR>
inline void tile_avx512(const float* x, int64_t x_stride, const float* wn, int64_t k,
                        const float* bias, float* y, int64_t y_stride, int64_t n,
                        const float* pf) {
  __m512 acc[M][NR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t i = 0;
#ifdef RAYLM_PLACED_DOT
  if constexpr (M == 1 && NR == 1) {
    if (k >= 16) {
      i = k / 16 * 16;
      acc[0][0] = dot_row_placed(x, wn, i, acc[0][0]);
    }
  }
#endif
  for (; i + 16 <= k; i += 16) {
    if (pf)
      for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)(pf + r * k + i), _MM_HINT_T1);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_ps(wn + r * k + i);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * x_stride + i);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (i < k) {
    const __mmask16 mask = (__mmask16)((1u << (k - i)) - 1);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, wn + r * k + i);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * x_stride + i);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r)
      y[m * y_stride + n + r] = _mm512_reduce_add_ps(acc[m][r]) + (bias ? bias[n + r] : 0.f);
}
#endif

// y[0..M, n_begin..n_end) of a weight with n_total rows; prefetch_ahead: how many weight rows
// ahead to prefetch (0 when the rows are already in cache; one-row tiles never prefetch).
template <int M, bool OneStream = false>
void rows_kernel(const float* x, int64_t x_stride, const float* w, int64_t k, const float* bias,
                 float* y, int64_t n_total, int64_t n_begin, int64_t n_end,
                 int64_t prefetch_ahead) {
#if defined(__AVX512F__)
  constexpr int NR = tile_rows<M, OneStream>();
  int64_t n = n_begin;
  for (; n + NR <= n_end; n += NR) {
    const float* pf = nullptr;
    if (NR > 1 && prefetch_ahead > 0 && n + prefetch_ahead + NR <= n_total)
      pf = w + (n + prefetch_ahead) * k;
    tile_avx512<M, NR>(x, x_stride, w + n * k, k, bias, y, n_total, n, pf);
  }
  for (; n < n_end; ++n) tile_avx512<M, 1>(x, x_stride, w + n * k, k, bias, y, n_total, n, nullptr);
#else
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* wn = w + n * k;
    const float b = bias ? bias[n] : 0.f;
    for (int m = 0; m < M; ++m) {
      const float* xm = x + m * x_stride;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < k; ++i) s += xm[i] * wn[i];
      y[m * n_total + n] = s + b;
    }
  }
#endif
}

template <int M>
void run(const float* x, int64_t x_stride, const float* w, int64_t n, int64_t k,
         const float* bias, float* y) {
  const int64_t num_tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for schedule(static) if (n * k >= (1 << 18))
  for (int64_t t = 0; t < num_tasks; ++t) {
    const int64_t begin = t * kRowsPerTask, end = std::min(n, begin + kRowsPerTask);
    rows_kernel<M, true>(x, x_stride, w, k, bias, y, n, begin, end, prefetch_rows<M>());
  }
}

void group_kernel(int64_t rows, const float* x, int64_t x_stride, const float* w, int64_t k,
                  const float* bias, float* y, int64_t n, int64_t begin, int64_t end,
                  int64_t prefetch_ahead) {
  switch (rows) {
    case 1: rows_kernel<1>(x, x_stride, w, k, bias, y, n, begin, end, prefetch_ahead); break;
    case 2: rows_kernel<2>(x, x_stride, w, k, bias, y, n, begin, end, prefetch_ahead); break;
    case 3: rows_kernel<3>(x, x_stride, w, k, bias, y, n, begin, end, prefetch_ahead); break;
    case 4: rows_kernel<4>(x, x_stride, w, k, bias, y, n, begin, end, prefetch_ahead); break;
    case 5: rows_kernel<5>(x, x_stride, w, k, bias, y, n, begin, end, prefetch_ahead); break;
    case 6: rows_kernel<6>(x, x_stride, w, k, bias, y, n, begin, end, prefetch_ahead); break;
    case 7: rows_kernel<7>(x, x_stride, w, k, bias, y, n, begin, end, prefetch_ahead); break;
    default: rows_kernel<8>(x, x_stride, w, k, bias, y, n, begin, end, prefetch_ahead); break;
  }
}

// m > 8 rows: tiles of weight rows; each tile is read from memory once (the next tile is
// prefetched meanwhile) and from L1 by every later group of input rows.
void run_many(const float* x, int64_t x_stride, int64_t m, const float* w, int64_t n, int64_t k,
              const float* bias, float* y) {
  const int64_t row_bytes = k * (int64_t)sizeof(float);
  int64_t group = kMaxGroup;
  while (group > 1 && group * row_bytes > kGroupBytes) group /= 2;
  // a multiple of every register tile height (8, 4, 2), so no leftover row inside a tile
  const int64_t tile = std::max<int64_t>(8, kTileBytes / row_bytes / 8 * 8);
  const int64_t num_tasks = (n + tile - 1) / tile;
#pragma omp parallel for schedule(static) if (m * n * k >= (1 << 18))
  for (int64_t t = 0; t < num_tasks; ++t) {
    const int64_t begin = t * tile, end = std::min(n, begin + tile);
    for (int64_t r = 0; r < m; r += group)
      group_kernel(std::min(group, m - r), x + r * x_stride, x_stride, w, k, bias, y + r * n, n,
                   begin, end, r == 0 ? tile : 0);
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

// Rows a packed GEMM runs with for m input rows: m rounded up to 1/8 of its power of two (at
// least 8), so at most 8 distinct row counts per octave. oneDNN builds (JIT-compiles) a kernel per
// distinct shape, ~2.6 ms each on the dev VM against ~5 ms for a 250-row gate/up, and keeps 1024
// of them: every new decode batch size or prefill chunk length would otherwise pay one per weight
// shape, and a server with varied lengths would keep evicting them. The padding costs <= 12.5 %
// of a call's rows (2-6 % at typical decode batches).
int64_t packed_gemm_rows(int64_t m) {
  int64_t octave = 1;
  while (octave * 2 <= m) octave *= 2;
  const int64_t step = std::max<int64_t>(8, octave / 8);
  return (m + step - 1) / step * step;
}

// x @ W^T through oneDNN with W packed once at load (torch.ops.mkldnn._reorder_linear_weight):
// the library GEMM without its per-call packing of W, which at decode row counts is a large part
// of the call (a [200, 512] x [512, 32000] LM head: 30 ms packed vs 44 ms for torch's GEMM).
// The op is torch's own (what inductor's CPU freezing emits); it is reached through the
// dispatcher because oneDNN's headers are not shipped with torch.
torch::Tensor linear_packed(const torch::Tensor& x,         // [M, K]
                            const torch::Tensor& packed_w,  // oneDNN layout of W [N, K]
                            const c10::optional<torch::Tensor>& bias) {  // [N]
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  TORCH_CHECK(x.dim() == 2, "linear_packed: x must be [M, K]");
  const int64_t m = x.size(0), rows = packed_gemm_rows(m);
  torch::Tensor input;
  if (rows == m) {
    input = x.is_contiguous() ? x : x.contiguous();
  } else {  // [rows, K]: x, then zero rows (their outputs are dropped)
    input = torch::empty({rows, x.size(1)}, x.options());
    input.narrow(0, 0, m).copy_(x);
    input.narrow(0, m, rows - m).zero_();
  }
  std::vector<c10::IValue> stack;
  stack.reserve(6);
  stack.emplace_back(input);
  stack.emplace_back(packed_w);
  stack.emplace_back(bias);
  stack.emplace_back(std::string("none"));                      // no fused post-op
  stack.emplace_back(c10::List<c10::optional<c10::Scalar>>());  // its scalars
  stack.emplace_back(c10::IValue());                            // its algorithm
  op.callBoxed(&stack);
  torch::Tensor y = stack[0].toTensor();  // [rows, N]
  return rows == m ? y : y.narrow(0, 0, m);  // [M, N], contiguous (leading rows)
}
