// Python bindings of raylm's CPU ops (one extension module, built on first use).
#include <torch/extension.h>

torch::Tensor paged_attention_cpu(torch::Tensor query, torch::Tensor k_cache,
                                  torch::Tensor v_cache, torch::Tensor block_tables,
                                  torch::Tensor seq_lens, torch::Tensor query_start_loc,
                                  double scale);
torch::Tensor linear_small_batch(torch::Tensor x, torch::Tensor w,
                                 c10::optional<torch::Tensor> bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_cpu", &paged_attention_cpu, "paged attention, mixed batch, CPU fp32");
  m.def("linear_small_batch", &linear_small_batch, "x @ W^T for 1..8 rows, CPU fp32");
}
