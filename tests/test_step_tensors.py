"""A step's index tensors (workers/step_tensors.py): the values, dtypes and shapes of one tensor
per list, whatever the batch's shape, as views of two buffers that outlive the builder."""
import gc

import pytest
import torch

from raylm.workers.model_input import ModelInput
from raylm.workers.step_tensors import build_step_tensors, padded_block_tables


def _input(query_lens, seq_lens, block_tables, logits_indices):
    num_tokens = sum(query_lens)
    return ModelInput(input_ids=[100 + i for i in range(num_tokens)],
                      positions=[7 * i for i in range(num_tokens)],
                      slot_mapping=[3000 + 2 * i for i in range(num_tokens)],
                      query_lens=query_lens, seq_lens=seq_lens, block_tables=block_tables,
                      logits_indices=logits_indices, sampling=None)


CASES = {
    "batch 1 decode": ([1], [37], [[5, 9, 2]], [0]),
    "decode, equal tables": ([1, 1, 1], [20, 30, 17], [[1, 2], [3, 4], [8, 6]], [0, 1, 2]),
    "mixed, ragged tables": ([5, 1, 3], [5, 40, 19], [[11], [1, 2, 3], [4, 5]], [4, 5, 8]),
    "prefill chunk, nothing sampled": ([16], [48], [[7, 8, 9]], []),
    "speculative rows": ([3, 1], [30, 12], [[2, 3], [4]], [0, 1, 2, 3]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_tensors_equal_one_tensor_per_list(case):
    query_lens, seq_lens, tables, rows = CASES[case]
    inp = _input(query_lens, seq_lens, tables, rows)
    step = build_step_tensors(inp, block_size=16, device=torch.device("cpu"))
    gc.collect()  # the host buffers live as long as the tensors that view them
    width = max(map(len, tables))
    expected_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    starts = torch.tensor([0] + [sum(query_lens[:i + 1]) for i in range(len(query_lens))],
                          dtype=torch.int32)
    for got, want in [(step.input_ids, torch.tensor(inp.input_ids)),
                      (step.positions, torch.tensor(inp.positions)),
                      (step.logits_indices, torch.tensor(rows, dtype=torch.long)),
                      (step.meta.slot_mapping, torch.tensor(inp.slot_mapping)),
                      (step.meta.query_start_loc, starts),
                      (step.meta.seq_lens, torch.tensor(seq_lens, dtype=torch.int32)),
                      (step.meta.block_tables, expected_tables)]:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    assert step.meta.max_query_len == max(query_lens)
    assert step.meta.max_seq_len == max(seq_lens)
    assert step.meta.block_size == 16


def test_padded_block_tables_pads_with_block_zero():
    table = padded_block_tables([[4], [1, 2, 3], [9, 8]])
    assert table.tolist() == [[4, 0, 0], [1, 2, 3], [9, 8, 0]]
    assert str(table.dtype) == "int32"
