// The Llama family's decoder stack as one compiled call on CPU fp32 (the CPU analogue of the CUDA
// graph the GPU path replays): the same ops the Python modules call, in the same order, without
// ~14 Python-level dispatches per layer. workers/models/llama_cpu_step.py decides when it runs.
//
// forward: token ids -> embedding -> decoder layers -> final norm (the hidden states the sampler's
// LM head reads). greedy: the same, then the LM head on the sampled rows and their argmax, for
// steps whose every row is plain greedy: no logits tensor, sampler or Python call between the
// last weight read and the token. The LM head's sweep (65 MB for the bench model, twice the L3)
// leaves every cache cold, and Python-level work right after it ran 2-4x slower than warm.
#include <torch/extension.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "cpu_ops.h"

namespace {
using OptTensor = c10::optional<torch::Tensor>;

// Bits of the stream_mask and packed_mask arguments, one per projection: which take the streaming
// few-row kernel and which oneDNN's GEMM on pre-packed weights this step (kernels/linear_plan.py
// decides per row count and shape); the others take torch's BLAS GEMM.
enum ProjectionBit : int64_t { kQKV = 1, kO = 2, kGateUp = 4, kDown = 8, kHead = 16 };

struct Layer {
  torch::Tensor input_norm, post_norm, qkv_w, o_w, gate_up_w, down_w;  // weights [out, in]
  OptTensor qkv_b, o_b, gate_up_b, down_b, q_norm, k_norm;
  OptTensor qkv_p, o_p, gate_up_p, down_p;  // the same weights packed by oneDNN, if the plan uses them
};

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const OptTensor& packed,
                     const OptTensor& b, int64_t bit, int64_t stream_mask, int64_t packed_mask) {
  if (stream_mask & bit) return linear_small_batch(x, w, b);
  if ((packed_mask & bit) && packed.has_value()) return linear_packed(x, *packed, b);
  return at::linear(x, w, b);
}

// rows[i] = table[index[i]] ([S, H] from a contiguous fp32 [N, H] table and int64 [S] indices),
// or the table itself where the indices are 0..N-1 in order (every row of a decode step sampled).
// One memcpy per row: at::embedding / index_select go through TensorIterator, and right after a
// weight sweep has flushed the caches that took 17-28 us for one row (batch-1 decode 1.3-1.5 %
// faster with this, side by side in one process, 40 pairs twice: faster in 30 and 29).
torch::Tensor gather_rows(const torch::Tensor& table, const torch::Tensor& index,
                          bool allow_same) {
  TORCH_CHECK(table.dtype() == torch::kFloat32 && table.dim() == 2 && table.is_contiguous(),
              "gather_rows: contiguous fp32 [rows, width]");
  TORCH_CHECK(index.dtype() == torch::kInt64 && index.dim() == 1, "gather_rows: int64 indices");
  const auto idx = index.contiguous();
  const int64_t n = table.size(0), width = table.size(1), s = idx.numel();
  const int64_t* ip = idx.data_ptr<int64_t>();
  bool same = allow_same && s == n;
  for (int64_t i = 0; i < s; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, "index ", ip[i], " out of range for ", n, " rows");
    same = same && ip[i] == i;
  }
  if (same) return table;
  auto out = torch::empty({s, width}, table.options());
  const float* src = table.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < s; ++i)
    std::memcpy(dst + i * width, src + ip[i] * width, width * sizeof(float));
  return out;
}

torch::Tensor required(const OptTensor& t, const char* name) {
  TORCH_CHECK(t.has_value(), "LlamaStepCpu: missing ", name);
  return *t;
}
}  // namespace

class LlamaStepCpu {
 public:
  // layers[i] = [input_norm, post_norm, qkv_w, qkv_b, o_w, o_b, gate_up_w, gate_up_b, down_w,
  //              down_b, q_norm, k_norm, qkv_p, o_p, gate_up_p, down_p] (None where the model
  //              has no such tensor; *_p: oneDNN-packed weights);
  // embed [vocab, hidden]; head [vocab, hidden] (may be embed itself: tied), head_p its packing.
  LlamaStepCpu(const std::vector<std::vector<OptTensor>>& layers, torch::Tensor final_norm,
               torch::Tensor cos_sin_cache, int64_t num_heads, int64_t num_kv_heads,
               int64_t head_dim, double eps, double scale, torch::Tensor embed,
               torch::Tensor head, OptTensor head_p)
      : final_norm_(final_norm), cos_sin_(cos_sin_cache), embed_(embed), head_(head),
        head_p_(head_p), num_heads_(num_heads), num_kv_heads_(num_kv_heads),
        head_dim_(head_dim), eps_(eps), scale_(scale) {
    for (const auto& t : layers) {
      TORCH_CHECK(t.size() == 16, "LlamaStepCpu: 16 tensors per layer");
      layers_.push_back({required(t[0], "input_norm"), required(t[1], "post_norm"),
                         required(t[2], "qkv weight"), required(t[4], "o weight"),
                         required(t[6], "gate_up weight"), required(t[8], "down weight"), t[3],
                         t[5], t[7], t[9], t[10], t[11], t[12], t[13], t[14], t[15]});
    }
  }

  // input_ids: [T] int64; returns the final normed hidden states [T, hidden].
  torch::Tensor forward(torch::Tensor input_ids, torch::Tensor positions,
                        const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, torch::Tensor slot_mapping,
                        torch::Tensor block_tables, torch::Tensor seq_lens,
                        torch::Tensor query_start_loc, int64_t stream_mask,
                        int64_t packed_mask) const {
    TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(),
                "LlamaStepCpu: one k and one v cache per layer");
    // [T, hidden]: a copy, since it becomes the residual stream (updated in place)
    auto hidden = gather_rows(embed_, input_ids, false);
    const int64_t T = hidden.size(0);
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    torch::Tensor residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      if (i == 0) {
        residual = hidden;
        hidden = rms_norm_cpu(hidden, L.input_norm, eps_);
      } else {
        std::tie(hidden, residual) = add_rms_norm_cpu(hidden, residual, L.input_norm, eps_);
      }
      // attention: [T, (H + 2 Hk) * D] -> q/k/v views, no copies
      auto qkv = linear(hidden, L.qkv_w, L.qkv_p, L.qkv_b, kQKV, stream_mask, packed_mask);
      auto q = qkv.narrow(1, 0, q_size).view({T, num_heads_, head_dim_});
      auto k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads_, head_dim_});
      auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads_, head_dim_});
      if (L.q_norm.has_value()) {  // Qwen3: RMSNorm per head before rotary
        q = rms_norm_cpu(q.reshape({-1, head_dim_}), *L.q_norm, eps_).view(q.sizes());
        k = rms_norm_cpu(k.reshape({-1, head_dim_}), required(L.k_norm, "k_norm"), eps_)
                .view(k.sizes());
      }
      rotary_cpu(positions, q, k, cos_sin_);
      write_kv_cpu(k, v, k_caches[i], v_caches[i], slot_mapping);
      auto attn = paged_attention_cpu(q, k_caches[i], v_caches[i], block_tables, seq_lens,
                                      query_start_loc, scale_);  // [T, H, D]
      hidden = linear(attn.reshape({T, q_size}), L.o_w, L.o_p, L.o_b, kO, stream_mask,
                      packed_mask);
      std::tie(hidden, residual) = add_rms_norm_cpu(hidden, residual, L.post_norm, eps_);
      // gated MLP
      auto gate_up = linear(hidden, L.gate_up_w, L.gate_up_p, L.gate_up_b, kGateUp, stream_mask,
                          packed_mask);
      hidden = linear(silu_and_mul_cpu(gate_up), L.down_w, L.down_p, L.down_b, kDown, stream_mask,
                      packed_mask);
    }
    return std::get<0>(add_rms_norm_cpu(hidden, residual, final_norm_, eps_));
  }

  // forward, then the argmax of the LM head's logits at rows logits_indices [S] int64: the
  // greedy token of each sampled row, for up to num_steps decode steps in a row ([steps, S]
  // int64; the sampler's argmax_rows, bitwise, step by step).
  //
  // num_steps > 1 (a decode batch: one token per sequence, every row sampled): step j + 1 feeds
  // step j's tokens at the next positions, its KV slots looked up in block_tables (which must
  // already hold the blocks of every position the run reaches). The run ends early, after the
  // step where every row has produced one of its stop_ids [S, M] (-1 pads); the caller applies
  // its own stop rules to the tokens and drops what follows a stop. One Python round trip
  // (scheduling, inputs, outputs: ~0.26 ms of a ~3.8 ms batch-1 step) per run, not per step.
  torch::Tensor greedy(torch::Tensor input_ids, torch::Tensor positions,
                       const std::vector<torch::Tensor>& k_caches,
                       const std::vector<torch::Tensor>& v_caches, torch::Tensor slot_mapping,
                       torch::Tensor block_tables, torch::Tensor seq_lens,
                       torch::Tensor query_start_loc, int64_t stream_mask, int64_t packed_mask,
                       torch::Tensor logits_indices, int64_t num_steps, torch::Tensor stop_ids,
                       int64_t block_size) const {
    // The caller (ModelRunner's greedy path) does not enter Python's inference mode (~30 us a
    // step on a cold cache at batch 1): this call's ~150 ATen ops skip autograd here instead.
    c10::InferenceMode no_autograd;
    const int64_t S = logits_indices.numel();
    TORCH_CHECK(num_steps >= 1, "greedy: num_steps must be >= 1");
    TORCH_CHECK(num_steps == 1 || (input_ids.numel() == S && seq_lens.numel() == S),
                "greedy: a multi-step run is a decode batch (one token per sequence)");
    TORCH_CHECK(stop_ids.dtype() == torch::kInt64 && stop_ids.dim() == 2 &&
                    stop_ids.size(0) == S, "greedy: stop_ids [S, M] int64");
    auto out = torch::empty({num_steps, S}, input_ids.options());
    int64_t* tokens = out.data_ptr<int64_t>();
    const auto stops = stop_ids.contiguous();
    const int64_t* stop = stops.data_ptr<int64_t>();
    const int64_t M = stops.size(1);
    std::vector<char> stopped(S, 0);
    int64_t steps = 0;
    while (true) {
      auto hidden = forward(input_ids, positions, k_caches, v_caches, slot_mapping, block_tables,
                            seq_lens, query_start_loc, stream_mask, packed_mask);
      auto rows = gather_rows(hidden, logits_indices, true);  // [S, hidden]
      auto logits = linear(rows, head_, head_p_, c10::nullopt, kHead, stream_mask, packed_mask);
      auto picked = argmax_rows_cpu(logits);  // [S]
      std::memcpy(tokens + steps * S, picked.data_ptr<int64_t>(), S * sizeof(int64_t));
      const int64_t* t = tokens + steps * S;
      bool all_stopped = true;
      for (int64_t i = 0; i < S; ++i) {
        for (int64_t m = 0; m < M && !stopped[i]; ++m) stopped[i] = stop[i * M + m] == t[i];
        all_stopped = all_stopped && stopped[i];
      }
      if (++steps == num_steps || all_stopped) break;
      if (steps == 1) next_step_inputs(positions, seq_lens, slot_mapping);
      advance(positions, seq_lens, slot_mapping, block_tables, block_size);
      input_ids = picked;
    }
    return steps == num_steps ? out : out.narrow(0, 0, steps);
  }

 private:
  // Fresh copies of the step's index tensors, which the run advances in place (the caller's
  // stay as they were).
  static void next_step_inputs(torch::Tensor& positions, torch::Tensor& seq_lens,
                               torch::Tensor& slot_mapping) {
    positions = positions.contiguous().clone();
    seq_lens = seq_lens.contiguous().clone();
    slot_mapping = slot_mapping.contiguous().clone();
  }

  // One decode step on: every sequence's next position, one more token of context, the slot of
  // the new position from its block table.
  static void advance(torch::Tensor& positions, torch::Tensor& seq_lens,
                      torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                      int64_t block_size) {
    const int64_t S = positions.numel(), width = block_tables.size(1);
    int64_t* pos = positions.data_ptr<int64_t>();
    int32_t* lens = seq_lens.data_ptr<int32_t>();
    int64_t* slots = slot_mapping.data_ptr<int64_t>();
    const auto tables = block_tables.contiguous();
    const int32_t* table = tables.data_ptr<int32_t>();
    for (int64_t i = 0; i < S; ++i) {
      const int64_t p = ++pos[i];
      ++lens[i];
      TORCH_CHECK(p / block_size < width, "greedy: position ", p, " has no block in its table");
      slots[i] = static_cast<int64_t>(table[i * width + p / block_size]) * block_size +
                 p % block_size;
    }
  }

  std::vector<Layer> layers_;
  torch::Tensor final_norm_, cos_sin_, embed_, head_;
  OptTensor head_p_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
};

void bind_llama_cpu(pybind11::module& m) {
  pybind11::class_<LlamaStepCpu>(m, "LlamaStepCpu")
      .def(pybind11::init<const std::vector<std::vector<OptTensor>>&, torch::Tensor,
                          torch::Tensor, int64_t, int64_t, int64_t, double, double,
                          torch::Tensor, torch::Tensor, OptTensor>())
      // no Python objects are touched inside: other threads (the server's event loop) run
      // while a step computes
      .def("forward", &LlamaStepCpu::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("greedy", &LlamaStepCpu::greedy, pybind11::call_guard<pybind11::gil_scoped_release>());
}
