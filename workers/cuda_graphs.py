"""CUDA graphs for decode-only steps: capture ``model.forward`` once per padded batch size.

A decode step launches a few hundred tiny kernels; replaying a captured graph removes the CPU
launch cost. Graphs are captured lazily, the first time a padded batch size is needed (1, 2, 4,
8, 16, 32, then multiples of 32), over static input buffers that each step copies into. The
attention launch inside reads only host-side upper bounds that do not change between steps:
``max_query_len = 1`` and ``max_seq_len`` = the runner's ``max_seq_len`` (the model's context
limit), so the grid captured once stays valid for every later step.

Padded rows are inert: slot -1 (the KV write skips them), sequence length 1 over block 0, token 0
at position 0; their hidden states are dropped.
"""
from __future__ import annotations

from typing import Any

import torch

from raylm.kernels.metadata import AttentionMetadata

SMALL_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
LARGE_BATCH_STEP = 32


def capture_sizes(max_batch_size: int) -> list[int]:
    """Padded batch sizes up to the first one that holds ``max_batch_size`` sequences."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [s for s in SMALL_BATCH_SIZES if s < max_batch_size]
    size = next((s for s in SMALL_BATCH_SIZES if s >= max_batch_size), None)
    if size is None:
        size = -(-max_batch_size // LARGE_BATCH_STEP) * LARGE_BATCH_STEP
        sizes += list(range(2 * LARGE_BATCH_STEP, size, LARGE_BATCH_STEP))
    return sizes + [size]


class CudaGraphRunner:
    """Replays ``model.forward(input_ids, positions, kv_caches, meta)`` for decode-only batches.

    The returned hidden states are a view of a static buffer: valid until the next ``run``.
    """

    def __init__(
        self,
        model: Any,  # forward(input_ids [T], positions [T], kv_caches, meta) -> [T, hidden]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_batch_size: int,
        max_seq_len: int,
        device: torch.device | str = "cuda",
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)
        self.sizes = capture_sizes(max_batch_size)
        self.max_blocks_per_seq = -(-max_seq_len // block_size)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=self.device)
        self.block_tables = torch.zeros(n, self.max_blocks_per_seq, dtype=torch.int32,
                                        device=self.device)
        # Decode-only: one query token per sequence, so query_start_loc is always 0..n.
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pool: Any = None

    def can_run(self, num_seqs: int, all_decode: bool) -> bool:
        return (all_decode and 0 < num_seqs <= self.sizes[-1] and self.device.type == "cuda"
                and torch.cuda.is_available())

    def _padded(self, num_seqs: int) -> int:
        return next(s for s in self.sizes if s >= num_seqs)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            block_size=self.block_size,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            query_lens_host=[1] * size,
            seq_lens_host=[self.max_seq_len] * size,
        )

    def _reset_padding(self, start: int, stop: int) -> None:
        self.input_ids[start:stop].zero_()
        self.positions[start:stop].zero_()
        self.slot_mapping[start:stop].fill_(-1)
        self.seq_lens[start:stop].fill_(1)
        self.block_tables[start:stop].zero_()

    def _capture(self, size: int) -> None:
        self._reset_padding(0, size)  # inert inputs: the warm-up run must not touch the cache
        meta = self._meta(size)
        args = (self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.model.forward(*args)  # compiles/tunes kernels outside the capture
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._outputs[size] = self.model.forward(*args)
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[size] = graph

    def run(
        self,
        input_ids: torch.Tensor,  # [num_seqs] int64
        positions: torch.Tensor,  # [num_seqs] int64
        meta: AttentionMetadata,  # decode-only: query_start_loc == 0..num_seqs
    ) -> torch.Tensor:  # [num_seqs, hidden]
        num_seqs = meta.num_seqs
        if not self.can_run(num_seqs, meta.max_query_len == 1):
            raise ValueError(f"CUDA graphs need a decode-only batch of 1..{self.sizes[-1]} "
                             f"sequences, got num_seqs={num_seqs}, "
                             f"max_query_len={meta.max_query_len}")
        if meta.max_seq_len > self.max_seq_len:
            raise ValueError(f"meta.max_seq_len {meta.max_seq_len} exceeds the captured bound "
                             f"{self.max_seq_len}")
        if meta.block_size != self.block_size:
            raise ValueError(f"meta.block_size {meta.block_size} != {self.block_size}")
        size = self._padded(num_seqs)
        if size not in self._graphs:
            self._capture(size)
        cols = meta.block_tables.shape[1]
        if cols > self.max_blocks_per_seq:
            raise ValueError(f"meta.block_tables has {cols} columns, more than "
                             f"{self.max_blocks_per_seq}")
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens, non_blocking=True)
        # Columns past `cols` may hold stale ids; the kernel reads only blocks below seq_len.
        self.block_tables[:num_seqs, :cols].copy_(meta.block_tables, non_blocking=True)
        self._reset_padding(num_seqs, size)
        self._graphs[size].replay()
        return self._outputs[size][:num_seqs]
