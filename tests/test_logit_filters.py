"""Logit filters on CPU fp32 without sorting or selecting over the vocabulary
(kernels/logit_filters.py): the tokens they keep are the ones of Hugging Face's rules."""
import pytest
import torch

from raylm.kernels.cpu_ops import load_extension

pytestmark = pytest.mark.skipif(load_extension() is None, reason="no C++ toolchain to build it")

@pytest.mark.parametrize("vocab", [7, 50, 32000])
def test_top_p_without_sort_drops_what_the_sort_drops(vocab):
    from raylm.kernels.logit_filters import top_p_filter_cpu

    g = torch.Generator().manual_seed(vocab)
    rows = 24
    logits = torch.randn(rows, vocab, generator=g) * torch.linspace(0.5, 6, rows).unsqueeze(1)
    logits[1, : vocab // 3] = float("-inf")  # already filtered (top-k, banned tokens)
    top_p = torch.linspace(0.05, 1.0, rows, dtype=torch.float64)
    top_p[2] = 1e-9  # only the best token survives
    # the reference: Hugging Face's rule on an ascending sort
    sorted_logits, ids = logits.sort(dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1.0 - top_p).float().unsqueeze(1)
    remove[:, -1] = False
    expected = logits.masked_fill(remove.scatter(1, ids, remove), float("-inf"))
    got = top_p_filter_cpu(logits, top_p)
    differ = (got.isinf() != expected.isinf()).sum(dim=-1)
    # the same tokens, up to fp rounding at the cut (one token at most, in a rare row)
    assert int((differ > 0).sum()) <= 1 and int(differ.max()) <= 1, differ
    assert torch.equal(got[~got.isinf()], logits[~got.isinf()])
    assert int((~got[2].isinf()).sum()) == 1 and got[2].argmax() == logits[2].argmax()
    assert not got[-1].isinf().any() or logits[-1].isinf().any()  # top_p = 1 keeps everything


@pytest.mark.parametrize("vocab", [7, 50, 32000])
def test_top_k_without_selection_keeps_what_hf_keeps(vocab):
    """The bisection kernel against HF's TopKLogitsWarper rule (`scores < topk(k)[-1]`): ties
    with the k-th logit stay, k <= 0 or >= vocab keeps the row, -0.0 ties +0.0, -inf stays out."""
    from raylm.kernels.logit_filters import top_k_filter_cpu
    from raylm.workers.logits_processors import _apply_top_k_only

    g = torch.Generator().manual_seed(vocab)
    rows = 12
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[1] = torch.randint(-2, 3, (vocab,), generator=g).float()  # many ties
    logits[2] = 0.0
    logits[2, ::2] = -0.0
    logits[3, : vocab // 2] = float("-inf")
    logits[4, 0] = float("inf")
    top_k = torch.tensor([1, 2, 3, max(vocab // 3, 1), 5, vocab - 1, vocab, vocab + 9, 0, -1,
                          min(50, vocab), 1], dtype=torch.int64)
    got = top_k_filter_cpu(logits, top_k)
    for r in range(rows):
        k = int(top_k[r])
        if 0 < k < vocab:
            kth = logits[r].topk(k).values[-1]
            expected = logits[r].masked_fill(logits[r] < kth, float("-inf"))
        else:
            expected = logits[r]
        assert torch.equal(got[r], expected), (r, k)
    # the processor takes it on CPU fp32; the torch path (partial topk) agrees
    assert torch.equal(_apply_top_k_only(logits, top_k, None), got)
    torch_path = logits.double()  # not fp32: the kernel does not apply
    assert top_k_filter_cpu(torch_path, top_k) is None
    assert torch.equal(_apply_top_k_only(torch_path, top_k, None).float(), got)


def test_mask_below_masks_only_values_under_the_row_threshold():
    from raylm.kernels.logit_filters import mask_below_cpu

    g = torch.Generator().manual_seed(0)
    values = torch.rand(5, 1000, generator=g)
    values[0, 3] = float("nan")  # a NaN compares false: kept, as torch's `values < t`
    logits = torch.randn(5, 1000, generator=g)
    threshold = torch.tensor([0.5, 0.0, 1.0, 0.25, float("-inf")])
    got = mask_below_cpu(values, threshold, logits)
    assert torch.equal(got, logits.masked_fill(values < threshold.unsqueeze(1), float("-inf")))
    assert got[0, 3] == logits[0, 3]
    assert not got[1].isinf().any() and got[2].isinf().all()
    assert mask_below_cpu(values.double(), threshold, logits.double()) is None
