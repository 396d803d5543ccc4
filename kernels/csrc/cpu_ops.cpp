// Python bindings of raylm's CPU ops (one extension module, built on first use).
#include <torch/extension.h>

#include <tuple>

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
torch::Tensor rms_norm_cpu(torch::Tensor x, torch::Tensor w, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_cpu(torch::Tensor x, torch::Tensor residual,
                                                          torch::Tensor w, double eps);
void rotary_cpu(torch::Tensor positions, torch::Tensor q, torch::Tensor k,
                torch::Tensor cos_sin_cache);
torch::Tensor silu_and_mul_cpu(torch::Tensor x);
void write_kv_cpu(torch::Tensor key, torch::Tensor value, torch::Tensor k_cache,
                  torch::Tensor v_cache, torch::Tensor slot_mapping);

void bind_llama_cpu(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every op releases the GIL while it computes (none touches a Python object): the server's
  // event loop thread keeps running while the step thread is inside a kernel.
  using nogil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("paged_attention_cpu", &paged_attention_cpu,
        "paged attention, mixed batch, tiled + GQA-grouped, CPU", nogil());
  m.def("paged_attention_legacy_cpu", &paged_attention_legacy_cpu,
        "the previous per-key paged attention (A/B runs only)", nogil());
  m.def("linear_small_batch", &linear_small_batch, "x @ W^T for 1..64 rows, CPU fp32", nogil());
  m.def("rms_norm_cpu", &rms_norm_cpu, "RMSNorm, CPU fp32", nogil());
  m.def("add_rms_norm_cpu", &add_rms_norm_cpu,
        "residual += x; RMSNorm(residual), CPU fp32", nogil());
  m.def("rotary_cpu", &rotary_cpu, "neox rotary in place on q and k, CPU fp32", nogil());
  m.def("silu_and_mul_cpu", &silu_and_mul_cpu, "silu(gate) * up, CPU fp32", nogil());
  m.def("write_kv_cpu", &write_kv_cpu, "scatter k/v rows into the paged cache, CPU", nogil());
  bind_llama_cpu(m);
}
