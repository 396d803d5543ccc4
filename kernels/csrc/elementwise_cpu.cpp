// Fused elementwise ops on CPU (fp32): RMSNorm, residual-add + RMSNorm, neox rotary in place,
// SiLU-and-mul. Each is one pass over its tokens instead of a chain of torch ops and temporaries.
#include <torch/extension.h>

#include <cmath>
#include <tuple>

namespace {
constexpr int64_t kParallelTokens = 64;

inline void norm_row(const float* x, const float* w, float eps, int64_t h, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < h; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / (float)h + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) out[i] = w[i] * (x[i] * inv);
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.dim() == 2 && t.stride(1) == 1,
              name, ": fp32 [tokens, hidden] with a contiguous last dim");
}
}  // namespace

torch::Tensor rms_norm_cpu(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "x");
  const int64_t n = x.size(0), h = x.size(1);
  auto out = torch::empty({n, h}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.contiguous().data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
#pragma omp parallel for if (n >= kParallelTokens)
  for (int64_t t = 0; t < n; ++t) norm_row(xp + t * xs, wp, (float)eps, h, op + t * h);
  return out;
}

// residual <- x + residual (in place); returns (rms_norm(residual), residual).
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_cpu(torch::Tensor x, torch::Tensor residual,
                                                          torch::Tensor w, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes(), "residual layout");
  const int64_t n = x.size(0), h = x.size(1);
  auto out = torch::empty({n, h}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.contiguous().data_ptr<float>();
  float *rp = residual.data_ptr<float>(), *op = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
#pragma omp parallel for if (n >= kParallelTokens)
  for (int64_t t = 0; t < n; ++t) {
    float* r = rp + t * h;
    const float* xr = xp + t * xs;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) r[i] += xr[i];
    norm_row(r, wp, (float)eps, h, op + t * h);
  }
  return {out, residual};
}

// Neox rotary, in place on q [T, Hq, D] and k [T, Hk, D] (any token/head strides, D contiguous).
void rotary_cpu(torch::Tensor positions, torch::Tensor q, torch::Tensor k,
                torch::Tensor cos_sin_cache) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(cos_sin_cache.dtype() == torch::kFloat32 && cos_sin_cache.is_contiguous());
  auto pos = positions.contiguous();
  const int64_t n = q.size(0), rot = cos_sin_cache.size(1), half = rot / 2;
  const int64_t* pp = pos.data_ptr<int64_t>();
  const float* cache = cos_sin_cache.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const int64_t hq = q.size(1), hk = k.size(1);
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
#pragma omp parallel for if (n >= kParallelTokens)
  for (int64_t t = 0; t < n; ++t) {
    const float* c = cache + pp[t] * rot;
    const float* s = c + half;
    for (int64_t h = 0; h < hq + hk; ++h) {
      float* x = h < hq ? qp + t * qs0 + h * qs1 : kp + t * ks0 + (h - hq) * ks1;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

// [T, 2d] (gate | up) -> [T, d] silu(gate) * up.
torch::Tensor silu_and_mul_cpu(torch::Tensor x) {
  check_rows(x, "x");
  const int64_t n = x.size(0), d = x.size(1) / 2;
  auto out = torch::empty({n, d}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
#pragma omp parallel for if (n >= kParallelTokens)
  for (int64_t t = 0; t < n; ++t) {
    const float* g = xp + t * xs;
    const float* u = g + d;
    float* o = op + t * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
  return out;
}
