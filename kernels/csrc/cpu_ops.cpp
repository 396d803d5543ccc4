// Python bindings of raylm's CPU ops (one extension module, built on first use).
#include "cpu_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every op releases the GIL while it computes (none touches a Python object): the server's
  // event loop thread keeps running while the step thread is inside a kernel.
  using nogil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("paged_attention_cpu", &paged_attention_cpu,
        "paged attention, mixed batch, tiled + GQA-grouped, CPU", nogil());
  m.def("paged_attention_legacy_cpu", &paged_attention_legacy_cpu,
        "the previous per-key paged attention (A/B runs only)", nogil());
  m.def("linear_small_batch", &linear_small_batch, "x @ W^T for 1..64 rows, CPU fp32", nogil());
  m.def("linear_packed", &linear_packed,
        "x @ W^T with W pre-packed by oneDNN (torch.ops.mkldnn._reorder_linear_weight)", nogil());
  m.def("rms_norm_cpu", &rms_norm_cpu, "RMSNorm, CPU fp32", nogil());
  m.def("add_rms_norm_cpu", &add_rms_norm_cpu,
        "residual += x; RMSNorm(residual), CPU fp32", nogil());
  m.def("rotary_cpu", &rotary_cpu, "neox rotary in place on q and k, CPU fp32", nogil());
  m.def("silu_and_mul_cpu", &silu_and_mul_cpu, "silu(gate) * up, CPU fp32", nogil());
  m.def("write_kv_cpu", &write_kv_cpu, "scatter k/v rows into the paged cache, CPU", nogil());
  m.def("argmax_rows_cpu", &argmax_rows_cpu, "torch.argmax(x, -1) of fp32 rows, CPU", nogil());
  m.def("sample_rows_cpu", &sample_rows_cpu,
        "one inverse-CDF draw per row of fp32 probabilities, fp64 uniforms, CPU", nogil());
  m.def("top_p_filter_cpu", &top_p_filter_cpu,
        "top-p filtering by bisection over the logits, no sort, CPU fp32", nogil());
  m.def("top_k_filter_cpu", &top_k_filter_cpu,
        "top-k filtering by bisection over the logits, no selection, CPU fp32", nogil());
  m.def("mask_below_cpu", &mask_below_cpu,
        "logits at -inf where values < the row's threshold, CPU fp32", nogil());
  bind_llama_cpu(m);
}
