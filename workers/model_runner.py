"""Runs one step on one device: ModelInput -> tensors -> forward -> sample -> ModelOutput."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from raylm.kernels.backend import get_backend
from raylm.workers import kv_cache
from raylm.workers.config import CacheConfig, ModelConfig
from raylm.workers.loader import load_model, resolve_dtype, resolve_model_path
from raylm.workers.model_input import ModelInput, ModelOutput
from raylm.workers.sampler import Sampler
from raylm.workers.step_tensors import StepTensors, build_step_tensors

logger = logging.getLogger(__name__)


class ModelRunner:
    """One rank's model, KV cache and sampler. Built in three phases so that a tensor-parallel
    executor can size the KV pool as the minimum over ranks (DESIGN.md section 2):
    ``ModelRunner(...)`` loads the weights, ``determine_num_blocks()`` measures what the
    device holds, ``initialize_kv_cache(num_blocks)`` allocates the pool the executor chose.

    Only rank 0 (the driver rank) samples; the other ranks run the forward and the collectives
    of the LM head, and ``execute`` returns None on them.
    """

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, *,
                 max_num_batched_tokens: int, max_num_seqs: int = 256, tp_rank: int = 0,
                 tp_size: int = 1, tp_group=None) -> None:
        from transformers import AutoConfig

        torch.manual_seed(model_config.seed)
        self.model_config = model_config
        self.cache_config = cache_config
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.is_driver = tp_rank == 0
        self.tp_size = tp_size
        self.device = torch.device(model_config.device)
        self.model_path = resolve_model_path(model_config.model, model_config.revision)
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        self.dtype = resolve_dtype(model_config.dtype, self.hf_config)
        self.backend = get_backend(self.device)
        self.block_size = cache_config.block_size
        self.kv_dtype = (self.dtype if cache_config.kv_cache_dtype == "auto"
                         else getattr(torch, cache_config.kv_cache_dtype))
        if self.kv_dtype != self.dtype and self.backend.name == "triton":
            raise ValueError(f"kv_cache_dtype={cache_config.kv_cache_dtype} differs from the model "
                             f"dtype {self.dtype}; the Triton backend needs them equal")
        self.model = load_model(self.model_path, dtype=self.dtype, device=self.device,
                                backend=self.backend, tp_rank=tp_rank, tp_size=tp_size,
                                tp_group=tp_group)
        self.sampler = Sampler()
        self.num_blocks = 0
        self.kv_caches: list = []
        self.cuda_graphs = None
        # Called once a step, right before the model's compute (which runs without the GIL on
        # CPU): an in-process AsyncEngine hands the last step's outputs to its event loop here,
        # so that loop's Python overlaps the compute instead of the step's Python (see
        # AsyncEngine._run).
        self.compute_hook: Callable[[], None] | None = None

    def info(self) -> dict:
        """What the executor reports about this rank (logs, tests, metrics)."""
        return {"attention_backend": self.backend.name, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
                "num_kv_heads_per_rank": self.model.num_kv_heads,
                "num_blocks": self.num_blocks, "torch_threads": torch.get_num_threads(),
                # runs several greedy decode steps per call (ModelInput.num_steps)
                "multi_step_decode": (hasattr(self.model, "greedy_tokens") and self.tp_size == 1
                                      and self.device.type == "cpu")}

    def determine_num_blocks(self) -> int:
        """How many KV blocks this rank's device holds (profiles a forward on GPU)."""
        if self.cache_config.num_blocks_override is not None:
            return self.cache_config.num_blocks_override
        if self.device.type == "cuda":
            self._profile_forward(self.max_num_batched_tokens)
            return kv_cache.num_blocks_for_gpu(self.device,
                                               self.cache_config.gpu_memory_utilization,
                                               self._block_bytes)
        # Host RAM is one pool for every rank of the node: each takes its share of the budget.
        return kv_cache.num_blocks_for_cpu(self.cache_config.kv_cache_memory, self._block_bytes,
                                           num_ranks=self.tp_size)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the pool (the same ``num_blocks`` on every rank) and capture CUDA graphs."""
        self.num_blocks = num_blocks
        self.kv_caches = kv_cache.allocate_kv_caches(
            self.model.num_layers, num_blocks, self.block_size, self.model.num_kv_heads,
            self.model.head_dim, self.kv_dtype, self.device,
            prefault=self.cache_config.prefault_kv_cache)
        if self.device.type == "cuda" and not self.model_config.enforce_eager:
            from raylm.workers.cuda_graphs import CudaGraphRunner

            max_seq_len = getattr(self.hf_config, "max_position_embeddings", None) or 2048
            if self.model_config.max_model_len is not None:
                max_seq_len = min(max_seq_len, self.model_config.max_model_len)
            self.cuda_graphs = CudaGraphRunner(self.model, self.kv_caches, self.block_size,
                                               max_batch_size=self.max_num_seqs,
                                               max_seq_len=min(max_seq_len, num_blocks
                                                               * self.block_size),
                                               device=self.device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s on %s, backend %s)",
                    num_blocks, self.block_size, num_blocks * self._block_bytes / 2**20,
                    self.kv_dtype, self.device, self.backend.name)

    @property
    def _block_bytes(self) -> int:
        return kv_cache.bytes_per_block(self.model.num_layers, self.block_size,
                                        self.model.num_kv_heads, self.model.head_dim,
                                        self.kv_dtype)

    @torch.inference_mode()
    def _profile_forward(self, num_tokens: int) -> None:
        """One forward at the largest step size, to measure peak activation memory."""
        blocks_needed = -(-num_tokens // self.block_size)
        caches = kv_cache.allocate_kv_caches(self.model.num_layers, blocks_needed, self.block_size,
                                             self.model.num_kv_heads, self.model.head_dim,
                                             self.kv_dtype, self.device)
        inp = ModelInput(input_ids=[0] * num_tokens, positions=list(range(num_tokens)),
                         slot_mapping=list(range(num_tokens)), query_lens=[num_tokens],
                         seq_lens=[num_tokens], block_tables=[list(range(blocks_needed))],
                         logits_indices=[num_tokens - 1], sampling=None)
        torch.cuda.reset_peak_memory_stats(self.device)
        step = self._step_tensors(inp)
        hidden = self.model(step.input_ids, step.positions, caches, step.meta)
        self.model.compute_logits(hidden[-1:])
        del caches, hidden
        torch.cuda.synchronize(self.device)

    def _step_tensors(self, inp: ModelInput) -> StepTensors:
        step = build_step_tensors(inp, self.block_size, self.device)
        self.backend.prepare(step.meta)
        return step

    def execute(self, inp: ModelInput) -> ModelOutput | None:
        """Run one step; the output on the driver rank, None on the others."""
        if not inp.copy_blocks and self._argmax_only(inp):
            # The compiled greedy step keeps autograd out itself (in C++): this path skips
            # Python's inference-mode context, ~30 us a step at batch 1 on a cold cache.
            step = self._step_tensors(inp)
            self._compute_starts()
            tokens = self.model.greedy_tokens(step.input_ids, step.positions, self.kv_caches,
                                              step.meta, step.logits_indices,
                                              *self._multi_step_args(inp))
            if tokens is not None:  # [steps, num_sampled] int64, the sampler's argmax bitwise
                first, *more = tokens.tolist()
                return ModelOutput(sampled_token_ids=first, more_steps=more)
            return self._execute(inp, step)
        return self._execute(inp, None)

    @torch.inference_mode()
    def _execute(self, inp: ModelInput, step: StepTensors | None) -> ModelOutput | None:
        if inp.copy_blocks:
            src, dst = zip(*inp.copy_blocks)
            self.backend.copy_blocks(self.kv_caches, torch.tensor(src, device=self.device),
                                     torch.tensor(dst, device=self.device))
        if step is None:
            step = self._step_tensors(inp)
        ids, pos, meta = step.input_ids, step.positions, step.meta
        decode_only = inp.num_tokens == inp.num_seqs
        self._compute_starts()
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(inp.num_seqs, decode_only):
            hidden = self.cuda_graphs.run(ids, pos, meta)  # [num_seqs, hidden], static buffer
        else:
            hidden = self.model(ids, pos, self.kv_caches, meta)  # [num_tokens, hidden]
        out = ModelOutput(sampled_token_ids=[])
        if inp.hidden_state_rows and self.is_driver:
            token_rows = torch.tensor(inp.hidden_state_rows, dtype=torch.long, device=self.device)
            out.token_hidden_states = hidden.index_select(0, token_rows)  # [num_rows, hidden]
        if inp.prompt_logprob_rows:
            out.prompt_logprobs = self._prompt_logprobs(hidden, inp)
        if not inp.logits_indices:
            return out if self.is_driver else None
        hidden = hidden.index_select(0, step.logits_indices)  # [num_sampled, hidden]
        logits = self.model.compute_logits(hidden)  # [num_sampled, vocab_size]; None off rank 0
        if not self.is_driver:
            return None
        sampled = self.sampler(logits, inp.sampling,
                               banned_token_ids=inp.sampling.banned_token_ids)
        if inp.spec_groups:
            sampled.sampled_token_ids = self.sampler.verify(
                logits, inp.sampling, inp.spec_groups, sampled.sampled_token_ids,
                inp.spec_draft_probs)
        if inp.return_sampling_probs:
            out.sampling_probs = self.sampler.sampling_probs(logits, inp.sampling)
        out.sampled_token_ids = sampled.sampled_token_ids.tolist()
        if sampled.logprobs is not None:
            out.logprobs = self._logprob_lists(sampled, inp.sampling.num_logprobs)
        if inp.return_hidden_states:
            out.hidden_states = hidden
        return out

    def _compute_starts(self) -> None:
        if self.compute_hook is not None:
            self.compute_hook()

    def _argmax_only(self, inp: ModelInput) -> bool:
        """Whether the step's output is the argmax of its sampled rows' logits and nothing
        else: the model may then fuse the LM head and the pick into its forward
        (``greedy_tokens``; the compiled CPU step does)."""
        return (hasattr(self.model, "greedy_tokens") and self.tp_size == 1
                and self.cuda_graphs is None and bool(inp.logits_indices)
                and not (inp.hidden_state_rows or inp.prompt_logprob_rows or inp.spec_groups
                         or inp.return_sampling_probs or inp.return_hidden_states)
                and inp.sampling.argmax_only)

    @staticmethod
    def _multi_step_args(inp: ModelInput) -> tuple[int, torch.Tensor | None]:
        """(num_steps, stop ids [num_sampled, M] int64 padded with -1) of greedy_tokens. Other
        paths run one step: the engine takes what comes back (ModelOutput.more_steps)."""
        if inp.num_steps <= 1 or inp.num_tokens != inp.num_seqs:
            return 1, None
        rows = inp.stop_token_ids or [[] for _ in inp.logits_indices]
        width = max(map(len, rows), default=0)
        stops = [ids + [-1] * (width - len(ids)) for ids in rows]
        return inp.num_steps, torch.tensor(stops, dtype=torch.int64).view(len(stops), width)

    # Rows of logits materialised at once for prompt logprobs ([rows, vocab] fp32 each).
    PROMPT_LOGPROB_CHUNK = 256

    def _prompt_logprobs(self, hidden: torch.Tensor, inp: ModelInput):
        """log_softmax of the raw logits at prompt positions: the next prompt token's + top-N."""
        results = []
        for first, num_rows, top_n, targets in inp.prompt_logprob_rows:
            rows: list[tuple[list[int], list[float]]] = []
            for c in range(0, num_rows, self.PROMPT_LOGPROB_CHUNK):
                n = min(self.PROMPT_LOGPROB_CHUNK, num_rows - c)
                logits = self.model.compute_logits(hidden[first + c : first + c + n])
                if logits is None:  # not the driver rank: it only took part in the gather
                    continue
                logprobs = torch.log_softmax(logits, dim=-1)  # [n, vocab_size]
                target = torch.tensor(targets[c : c + n], device=logprobs.device)
                ids = target[:, None]
                if top_n > 0:
                    ids = torch.cat([ids, logprobs.topk(top_n, dim=-1).indices], dim=1)
                values = logprobs.gather(1, ids)  # [n, 1 + top_n]
                rows.extend(zip(ids.tolist(), values.tolist()))
            results.append(rows)
        return results

    @staticmethod
    def _logprob_lists(sampled, num_logprobs: list[int]):
        ids = sampled.logprob_token_ids.tolist()
        values = sampled.logprobs.tolist()
        return [None if n < 0 else (ids[i][: n + 1], values[i][: n + 1])
                for i, n in enumerate(num_logprobs)]
