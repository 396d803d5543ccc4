// Paged attention for a mixed batch on CPU: tiled, GQA-grouped, split over key blocks.
//
// Same contract as kernels/attention_ref.py: query rows packed by query_start_loc; query token i
// of sequence s (context = seq_len - query_len) attends to its first ctx + i + 1 cached tokens.
//
// Work item = (sequence, KV head, tile of query tokens, range of key blocks). The tile's rows are
// all query heads of the KV group times its tokens (R <= kMaxRows), copied once, pre-scaled.
// Keys are consumed 16 at a time (a chunk of a block): every key row is loaded once per chunk and
// dotted with all R rows (AVX-512: 16 per-key partial vectors reduced to one score vector with a
// shuffle tree, so one vector holds the 16 keys' scores); the online softmax then runs on whole
// 16-lane score vectors with a vectorised exp; P.V streams each value row once for all R rows.
// Long sequences with few work items are split over key blocks (flash-decoding) and merged with
// their log-sum-exp, so a batch-1 decode uses every core.
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kChunk = 16;                  // keys scored per vector operation
constexpr int kMaxRows = 32;                // query rows (tokens x group heads) per tile
constexpr int kMaxHeadDim = 256;
constexpr int64_t kMinKeysPerSplit = 256;   // below this a split's merge costs more than it buys
// (token, kv head, key) triples; below: one thread. Inside a decode step the other OpenMP thread
// is waiting for the next projection anyway, so a parallel region costs little: batch-1 decode
// of the bench model (4 KV heads) at ~1,000-1,130 tokens of context ran 0.951 / 0.946 of the time
// with its attention on both threads (2 x 20 pairs, faster in 17 / 17), and 0.998 / 1.010 at
// ~160 / ~300-430 tokens (1 << 13 before: one thread below ~2,000 tokens at 4 KV heads).
constexpr int64_t kParallelWork = 1 << 12;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- 16-lane helpers ---------------------------------------------------------------------------
#if defined(__AVX512F__)
template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <>
inline __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// exp on 16 lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial (~1 ulp
// of fp32 over the softmax range; inputs <= 0 here). Lanes below -87 flush to 0.
inline __m512 exp16(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

// v[j] holds partial sums of key j's dot product; returns lane j = sum of v[j]'s lanes.
inline __m512 reduce16x16(const __m512* v) {
  __m512 s[8], q[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: that lane's sums of keys 4i..4i+3
    q[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(q[2], q[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

#if defined(__AVX512F__)
// NV = head_dim / 16 vectors per row (a template argument, so the key row stays in registers).
// pk, pv: the same head's rows of the next chunk (nullptr: none), prefetched into L2 while this
// chunk computes. Blocks are scattered over the pool and a block's rows span several 4 KiB pages,
// where the hardware prefetcher stops: without this a decode batch read 13 GB/s, not ~40.
template <int NV, typename T>
inline void score_chunk_avx512(const float* q, int r0, int R, const T* k, int64_t ts, int n,
                               float* scores, const T* pk, const T* pv) {
  alignas(64) __m512 part[kMaxRows][kChunk];
  constexpr int kLines = (NV * 16 * (int)sizeof(T) + 63) / 64;  // cache lines per head row
  for (int j = 0; j < n; ++j) {
    if (pk != nullptr) {
      for (int c = 0; c < kLines; ++c) {
        _mm_prefetch((const char*)(pk + j * ts) + 64 * c, _MM_HINT_T1);
        _mm_prefetch((const char*)(pv + j * ts) + 64 * c, _MM_HINT_T1);
      }
    }
    const T* kj = k + j * ts;
    __m512 kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = load16(kj + 16 * c);  // the key row, loaded once
    for (int r = r0; r < R; ++r) {
      const float* qr = q + r * NV * 16;
      __m512 acc = _mm512_mul_ps(_mm512_load_ps(qr), kv[0]);
      for (int c = 1; c < NV; ++c) acc = _mm512_fmadd_ps(_mm512_load_ps(qr + 16 * c), kv[c], acc);
      part[r][j] = acc;
    }
  }
  for (int r = r0; r < R; ++r) {
    for (int j = n; j < kChunk; ++j) part[r][j] = _mm512_setzero_ps();
    _mm512_store_ps(scores + r * kChunk, reduce16x16(part[r]));
  }
}
#endif

// scores[r][j] = q[r] . k[j] for rows r in [r0, R), keys j < n (lanes >= n: 0 or undefined).
template <typename T>
inline void score_chunk(const float* q, int r0, int R, int d, const T* k, int64_t ts, int n,
                        float* scores, const T* pk, const T* pv) {
#if defined(__AVX512F__)
  switch (d) {
    case 32: return score_chunk_avx512<2>(q, r0, R, k, ts, n, scores, pk, pv);
    case 64: return score_chunk_avx512<4>(q, r0, R, k, ts, n, scores, pk, pv);
    case 80: return score_chunk_avx512<5>(q, r0, R, k, ts, n, scores, pk, pv);
    case 96: return score_chunk_avx512<6>(q, r0, R, k, ts, n, scores, pk, pv);
    case 128: return score_chunk_avx512<8>(q, r0, R, k, ts, n, scores, pk, pv);
    case 256: return score_chunk_avx512<16>(q, r0, R, k, ts, n, scores, pk, pv);
    default: break;
  }
#endif
  for (int j = 0; j < n; ++j) {
    const T* kj = k + j * ts;
    for (int r = r0; r < R; ++r) {
      const float* qr = q + r * d;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int i = 0; i < d; ++i) s += qr[i] * static_cast<float>(kj[i]);
      scores[r * kChunk + j] = s;
    }
  }
}

// p[j] = exp(s[j] - m) where valid (j < num_valid), else 0; returns sum p.
inline float exp_chunk(float* s, float m, int num_valid) {
#if defined(__AVX512F__)
  const __mmask16 valid = (__mmask16)((1u << num_valid) - 1u);
  const __m512 p = _mm512_maskz_mov_ps(
      valid, exp16(_mm512_sub_ps(_mm512_load_ps(s), _mm512_set1_ps(m))));
  _mm512_store_ps(s, p);
  return _mm512_reduce_add_ps(p);
#else
  float sum = 0.f;
  for (int j = 0; j < kChunk; ++j) {
    s[j] = j < num_valid ? std::exp(s[j] - m) : 0.f;
    sum += s[j];
  }
  return sum;
#endif
}

#if defined(__AVX512F__)
// acc[r] += sum_{j < n} p[r][j] v[j] for rows [rb, re) (v[j] = v + j * vs); ROWS rows'
// accumulators in registers, each value vector loaded once per ROWS rows; the rows left over
// go through ROWS / 2.
template <int NV, int ROWS>
inline void add_pv_avx512(const float* p, int rb, int re, const float* v, int64_t vs, int n,
                          float* acc) {
  int r = rb;
  for (; r + ROWS <= re; r += ROWS) {
    __m512 a[ROWS][NV];
    for (int k = 0; k < ROWS; ++k)
      for (int c = 0; c < NV; ++c) a[k][c] = _mm512_load_ps(acc + (r + k) * NV * 16 + 16 * c);
    for (int j = 0; j < n; ++j) {
      __m512 pj[ROWS];
      for (int k = 0; k < ROWS; ++k) pj[k] = _mm512_set1_ps(p[(r + k) * kChunk + j]);
      for (int c = 0; c < NV; ++c) {
        const __m512 vv = _mm512_loadu_ps(v + j * vs + 16 * c);
        for (int k = 0; k < ROWS; ++k) a[k][c] = _mm512_fmadd_ps(pj[k], vv, a[k][c]);
      }
    }
    for (int k = 0; k < ROWS; ++k)
      for (int c = 0; c < NV; ++c) _mm512_store_ps(acc + (r + k) * NV * 16 + 16 * c, a[k][c]);
  }
  if constexpr (ROWS > 1) {
    if (r < re) add_pv_avx512<NV, ROWS / 2>(p, r, re, v, vs, n, acc);
  }
}
#endif

// v: the chunk's value rows as fp32, row j at v + j * vs.
inline void add_pv(const float* p, int rb, int re, const float* v, int64_t vs, int n, int d,
                   float* acc) {
#if defined(__AVX512F__)
  switch (d) {
    case 32: return add_pv_avx512<2, 4>(p, rb, re, v, vs, n, acc);
    case 64: return add_pv_avx512<4, 4>(p, rb, re, v, vs, n, acc);
    case 80: return add_pv_avx512<5, 4>(p, rb, re, v, vs, n, acc);
    case 96: return add_pv_avx512<6, 2>(p, rb, re, v, vs, n, acc);
    case 128: return add_pv_avx512<8, 2>(p, rb, re, v, vs, n, acc);
    case 256: return add_pv_avx512<16, 1>(p, rb, re, v, vs, n, acc);
    default: break;
  }
#endif
  for (int r = rb; r < re; ++r) {
    float* ar = acc + r * d;
    for (int j = 0; j < n; ++j) {
      const float pj = p[r * kChunk + j];
      if (pj == 0.f) continue;  // masked (causal) lanes
      const float* vj = v + j * vs;
#pragma omp simd
      for (int i = 0; i < d; ++i) ar[i] += pj * vj[i];
    }
  }
}

// The largest of s[0..n), n >= 1.
inline float max_chunk(const float* s, int n) {
#if defined(__AVX512F__)
  return _mm512_mask_reduce_max_ps((__mmask16)((1u << n) - 1u), _mm512_load_ps(s));
#else
  float m = s[0];
  for (int j = 1; j < n; ++j) m = std::max(m, s[j]);
  return m;
#endif
}

// ---- one work item ---------------------------------------------------------------------------
// Rows of an item: r = head * rows_per_head + token * group + query head within the group, for
// its num_kv consecutive KV heads. Several KV heads per item (decode at large batch) read each
// block's token rows front to back instead of one head's 1/kv_heads slice of every row.
struct Item {
  int64_t seq, kv_head, num_kv;    // KV heads [kv_head, kv_head + num_kv)
  int64_t tok_begin, tok_end;      // query tokens of the tile, relative to the seq
  int64_t key_begin, key_end;      // this item's keys (block aligned begin)
  int64_t partial;                 // -1: write the output; else its partial slot
};

struct Args {
  const float* q;
  int64_t q_tok, q_head;
  const int32_t *qsl, *lens, *bt;
  int64_t max_blocks, group, head_dim, block_size, block_stride, token_stride, num_heads;
  float scale;
  float* out;
  float* part_acc;  // [num_partials, kMaxRows, head_dim]
  float* part_ml;   // [num_partials, kMaxRows, 2] (running max, sum)
};

// Offset of row r's query / output head vector within its token's [num_heads, D] row.
inline int64_t row_head(const Item& it, int64_t g, int64_t rows_per_head, int64_t r) {
  return (it.kv_head + r / rows_per_head) * g + r % g;
}
inline int64_t row_token(int64_t g, int64_t rows_per_head, int64_t r) {
  return (r % rows_per_head) / g;
}

template <typename T>
void run_item(const Args& a, const Item& it, const T* kp, const T* vp) {
  const int64_t g = a.group, d = a.head_dim, bs = a.block_size;
  const int64_t q0 = a.qsl[it.seq], q_len = a.qsl[it.seq + 1] - q0;
  const int64_t ctx = a.lens[it.seq] - q_len;
  const int ntok = (int)(it.tok_end - it.tok_begin), rph = (int)(ntok * g);
  const int R = (int)(it.num_kv * rph);
  alignas(64) float q[kMaxRows * kMaxHeadDim];
  alignas(64) float acc[kMaxRows * kMaxHeadDim];
  alignas(64) float s[kMaxRows * kChunk];
  float m[kMaxRows], l[kMaxRows];
  int row_tok[kMaxRows];  // the row's query token within the tile
  for (int r = 0; r < R; ++r) row_tok[r] = (int)row_token(g, rph, r);
  for (int r = 0; r < R; ++r) {
    const float* src = a.q + (q0 + it.tok_begin + row_token(g, rph, r)) * a.q_tok +
                       row_head(it, g, rph, r) * a.q_head;
    float* dst = q + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) dst[i] = src[i] * a.scale;
  }
  std::fill(acc, acc + R * d, 0.f);
  std::fill(m, m + R, kNegInf);
  std::fill(l, l + R, 0.f);
  const int32_t* table = a.bt + it.seq * a.max_blocks;
  const int64_t head_off = it.kv_head * d;
  // Token t of the tile sees keys < ctx + tok_begin + t + 1.
  const int64_t first_limit = ctx + it.tok_begin + 1;
  const int64_t key_end = std::min(it.key_end, ctx + it.tok_end);
  for (int64_t c0 = it.key_begin; c0 < key_end;) {
    const int64_t block = table[c0 / bs], off = c0 % bs;
    const int n = (int)std::min<int64_t>({kChunk, bs - off, key_end - c0});
    const T* kc = kp + block * a.block_stride + off * a.token_stride + head_off;
    const T* vc = vp + block * a.block_stride + off * a.token_stride + head_off;
    // Rows of tokens whose causal limit is at or before this chunk see none of it.
    const int t_first = (int)std::max<int64_t>(0, c0 - first_limit + 1);
    const int r0 = t_first * (int)g;  // within each head's rows
    // the next chunk's rows (same offsets), prefetched while this one computes
    const T *next_k = nullptr, *next_v = nullptr;
    if (c0 + n < key_end) {
      const int64_t c1 = c0 + n, nb = table[c1 / bs], noff = c1 % bs;
      next_k = kp + nb * a.block_stride + noff * a.token_stride + head_off;
      next_v = vp + nb * a.block_stride + noff * a.token_stride + head_off;
    }
    for (int h = 0; h < it.num_kv; ++h)
      score_chunk(q + h * rph * d, r0, rph, (int)d, kc + h * d, a.token_stride, n,
                  s + h * rph * kChunk, next_k ? next_k + h * d : nullptr,
                  next_v ? next_v + h * d : nullptr);
    for (int r = 0; r < R; ++r) {
      const int t = row_tok[r];
      if (t < t_first) continue;
      const int valid = (int)std::min<int64_t>(n, first_limit + t - c0);  // >= 1
      float* sr = s + r * kChunk;
      const float bmax = max_chunk(sr, valid);
      if (bmax > m[r]) {  // the running max moves: rescale (alpha = 0 on the first chunk)
        const float alpha = std::exp(m[r] - bmax);
        m[r] = bmax;
        l[r] *= alpha;
        float* ar = acc + r * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) ar[i] *= alpha;
      }
      l[r] += exp_chunk(sr, m[r], valid);
    }
    // acc[r] += sum_j p[r][j] v[j], into a few rows at a time held in registers (masked lanes
    // carry p = 0): fp32 value rows read in place, 16-bit ones widened once per head.
    for (int h = 0; h < it.num_kv; ++h) {
      if constexpr (std::is_same_v<T, float>) {
        add_pv(s, h * rph + r0, (h + 1) * rph, vc + h * d, a.token_stride, n, (int)d, acc);
      } else {
        alignas(64) float vf[kChunk * kMaxHeadDim];
        for (int j = 0; j < n; ++j) {
          const T* vj = vc + j * a.token_stride + h * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) vf[j * d + i] = static_cast<float>(vj[i]);
        }
        add_pv(s, h * rph + r0, (h + 1) * rph, vf, d, n, (int)d, acc);
      }
    }
    c0 += n;
  }
  if (it.partial < 0) {
    for (int r = 0; r < R; ++r) {
      float* o = a.out + ((q0 + it.tok_begin + row_token(g, rph, r)) * a.num_heads +
                          row_head(it, g, rph, r)) * d;
      const float inv = 1.f / l[r];
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = acc[r * d + i] * inv;
    }
  } else {
    std::memcpy(a.part_acc + it.partial * kMaxRows * d, acc, sizeof(float) * R * d);
    for (int r = 0; r < R; ++r) {
      a.part_ml[(it.partial * kMaxRows + r) * 2] = m[r];
      a.part_ml[(it.partial * kMaxRows + r) * 2 + 1] = l[r];
    }
  }
}

// Merges the partials [first, first + num) of one (seq, kv heads, tile) into the output.
void merge_partials(const Args& a, const Item& it, int64_t first, int64_t num) {
  const int64_t g = a.group, d = a.head_dim, q0 = a.qsl[it.seq];
  const int64_t rph = (it.tok_end - it.tok_begin) * g;
  const int R = (int)(it.num_kv * rph);
  for (int r = 0; r < R; ++r) {
    float m = kNegInf;
    for (int64_t p = first; p < first + num; ++p) m = std::max(m, a.part_ml[(p * kMaxRows + r) * 2]);
    float* o = a.out + ((q0 + it.tok_begin + row_token(g, rph, r)) * a.num_heads +
                        row_head(it, g, rph, r)) * d;
    std::fill(o, o + d, 0.f);
    float l = 0.f;
    for (int64_t p = first; p < first + num; ++p) {
      const float pm = a.part_ml[(p * kMaxRows + r) * 2];
      if (pm == kNegInf) continue;  // this split held none of the row's keys
      const float w = std::exp(pm - m);
      l += w * a.part_ml[(p * kMaxRows + r) * 2 + 1];
      const float* pa = a.part_acc + (p * kMaxRows + r) * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] += w * pa[i];
    }
    const float inv = 1.f / l;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] *= inv;
  }
}

}  // namespace

torch::Tensor paged_attention_cpu(torch::Tensor query,         // [num_tokens, num_heads, D]
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
  TORCH_CHECK(group * kv_heads == num_heads && group <= kMaxRows, "bad GQA group");
  TORCH_CHECK(head_dim <= kMaxHeadDim, "head_dim > ", kMaxHeadDim);
  const int64_t num_seqs = seq_lens.size(0);
  auto out = torch::empty({num_tokens, num_heads, head_dim}, query.options());
  auto qsl = query_start_loc.contiguous();
  auto lens = seq_lens.contiguous();
  const int32_t* qsl_p = qsl.data_ptr<int32_t>();
  const int32_t* lens_p = lens.data_ptr<int32_t>();

  // Work items: tiles of tokens x KV heads. With enough tiles for the cores, an item takes as
  // many KV heads as its rows allow (contiguous reads of each block); with too few, one head
  // per item and the keys split while the pool would starve.
  const int64_t tile_tokens = kMaxRows / group;
  const int num_threads = omp_get_max_threads();
  int64_t num_tiles = 0, work = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qsl_p[s + 1] - qsl_p[s];
    num_tiles += (q_len + tile_tokens - 1) / tile_tokens;
    work += q_len * lens_p[s] * kv_heads;
  }
  const bool parallel = work >= kParallelWork && num_threads > 1;
  const int64_t want_items = parallel ? 4 * num_threads : 1;
  const bool group_heads = num_tiles >= want_items;
  std::vector<Item> items;
  std::vector<std::pair<int64_t, int64_t>> merges;  // (first item, number of splits)
  int64_t num_partials = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qsl_p[s + 1] - qsl_p[s], ctx = lens_p[s] - q_len;
    for (int64_t t0 = 0; t0 < q_len; t0 += tile_tokens) {
      const int64_t t1 = std::min(q_len, t0 + tile_tokens), keys = ctx + t1;
      const int64_t heads_per_item =
          group_heads ? std::max<int64_t>(1, std::min(kv_heads, kMaxRows / ((t1 - t0) * group)))
                      : 1;
      int64_t splits = 1;
      if (!group_heads)
        splits = std::min((want_items + num_tiles * kv_heads - 1) / (num_tiles * kv_heads),
                          keys / kMinKeysPerSplit);
      splits = std::max<int64_t>(splits, 1);
      // Block-aligned split boundaries.
      const int64_t nb = (keys + block_size - 1) / block_size;
      const int64_t per = (nb + splits - 1) / splits;
      splits = (nb + per - 1) / per;
      for (int64_t h = 0; h < kv_heads; h += heads_per_item) {
        const int64_t nh = std::min(heads_per_item, kv_heads - h);
        if (splits > 1) merges.emplace_back((int64_t)items.size(), splits);
        for (int64_t p = 0; p < splits; ++p)
          items.push_back({s, h, nh, t0, t1, p * per * block_size,
                           std::min(keys, (p + 1) * per * block_size),
                           splits > 1 ? num_partials++ : -1});
      }
    }
  }
  torch::Tensor part_acc, part_ml;
  if (num_partials > 0) {
    part_acc = torch::empty({num_partials, kMaxRows, head_dim}, query.options());
    part_ml = torch::empty({num_partials, kMaxRows, 2}, query.options());
  }
  const Args args{query.data_ptr<float>(), query.stride(0), query.stride(1), qsl_p, lens_p,
                  block_tables.data_ptr<int32_t>(), block_tables.size(1), group, head_dim,
                  block_size, k_cache.stride(0), k_cache.stride(1), num_heads, (float)scale,
                  out.data_ptr<float>(),
                  num_partials ? part_acc.data_ptr<float>() : nullptr,
                  num_partials ? part_ml.data_ptr<float>() : nullptr};
  const int64_t num_items = (int64_t)items.size();
  auto run_all = [&](auto* kp, auto* vp) {
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t i = 0; i < num_items; ++i) run_item(args, items[i], kp, vp);
  };
  if (k_cache.scalar_type() == at::kBFloat16) {
    run_all(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  } else if (k_cache.scalar_type() == at::kHalf) {
    run_all(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "cache dtype must be fp32, bf16 or fp16");
    run_all(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  }
  const int64_t num_merges = (int64_t)merges.size();
#pragma omp parallel for schedule(static) if (parallel && num_merges > 1)
  for (int64_t i = 0; i < num_merges; ++i) {
    const Item& first = items[merges[i].first];
    merge_partials(args, first, first.partial, merges[i].second);
  }
  return out;
}
