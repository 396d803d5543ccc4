"""The distillation pieces that need no model: the four divergences (zero at equality, known
values, temperature), the speculation replay behind the acceptance measure, the batch masks,
the learning-rate schedule and config validation."""
import math

import pytest
import torch

from raylm.cluster.distill.config import DistillConfig
from raylm.workers.distill.acceptance import replay_speculation
from raylm.workers.distill.batch import Batch, Sample
from raylm.workers.distill.config import TrainConfig
from raylm.workers.distill.losses import LOSSES, get_loss
from raylm.workers.distill.trainer import lr_factor

P = [0.5, 0.5, 0.0 + 1e-30]  # third token ~ impossible under p
Q = [0.25, 0.5, 0.25]


def _logits(probs):
    return torch.tensor([probs]).log()  # [1, vocab]: softmax(log p) = p


def _expected(name: str) -> float:
    p, q = P, Q
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 1e-20)
    m = [(x + y) / 2 for x, y in zip(p, q)]
    return {"fkl": kl(p, q), "rkl": kl(q, p), "jsd": (kl(p, m) + kl(q, m)) / 2,
            "tvd": sum(abs(x - y) for x, y in zip(p, q)) / 2}[name]


@pytest.mark.parametrize("name", LOSSES)
def test_zero_when_distributions_equal(name):
    logits = torch.randn(5, 17, generator=torch.Generator().manual_seed(0))
    loss = get_loss(name)(logits, logits.clone(), temperature=0.7)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_known_value(name):
    loss = get_loss(name)(_logits(P), _logits(Q)).item()
    if name == "rkl":  # q puts mass where p has (almost) none: huge, as reverse KL should be
        assert loss > 10
    else:
        assert loss == pytest.approx(_expected(name), rel=1e-5)
    assert name != "tvd" or loss == pytest.approx(0.25)


@pytest.mark.parametrize("name", LOSSES)
def test_positive_mean_over_positions_and_gradient_to_draft_only(name):
    g = torch.Generator().manual_seed(1)
    target = torch.randn(4, 11, generator=g)
    draft = torch.randn(4, 11, generator=g, requires_grad=True)
    loss = get_loss(name)(target, draft)
    rows = [get_loss(name)(target[i:i + 1], draft[i:i + 1]).item() for i in range(4)]
    assert loss.item() > 0 and loss.item() == pytest.approx(sum(rows) / 4, rel=1e-5)
    loss.backward()
    assert draft.grad is not None and draft.grad.abs().sum() > 0


def test_temperature_divides_both_logits():
    g = torch.Generator().manual_seed(2)
    target, draft = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    for name in LOSSES:
        fn = get_loss(name)
        assert fn(target, draft, temperature=2.0).item() == pytest.approx(
            fn(target / 2, draft / 2).item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        get_loss("fkl")(target, draft, temperature=0.0)
    with pytest.raises(ValueError, match="loss"):
        get_loss("mse")


def test_replay_speculation_counts_like_the_engine():
    # Token 0 comes from the prefill; then blocks of k=2 drafts from token 1.
    matches = [[False, True, True, True, True, False, True]]
    acc = replay_speculation(matches, k=2)
    # j=1: drafts 1,2 both right -> accepted 2, emitted 3, j=4
    # j=4: drafts 4,5: 4 right, 5 wrong -> accepted 1, j=6
    # j=6: one draft left (6), right -> accepted 1, j=8
    assert acc.acceptance_rate == pytest.approx(4 / 5)
    assert acc.mean_acceptance_length == pytest.approx(1 + 4 / 3)
    assert acc.agreement == pytest.approx(5 / 7)
    perfect = replay_speculation([[True] * 11], k=4)  # blocks 1-4 and 6-9
    assert perfect.acceptance_rate == 1.0 and perfect.mean_acceptance_length == 5.0


def test_batch_masks_the_prompt_and_padding():
    samples = [Sample((5, 6, 7, 8), prompt_len=2), Sample((9, 10, 11), prompt_len=1)]
    b = Batch.collate(samples, pad_id=0, device="cpu")
    assert b.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # Positions whose next token is generated: 1, 2 (predict 7, 8) and 0, 1 (predict 10, 11).
    assert b.gen_mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert b.num_positions == 4


def test_lr_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 60) == pytest.approx(0.55)
    assert lr_factor(cfg, 110) == pytest.approx(0.1)


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="l2")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="draft_init"):
        DistillConfig(target="t", out="o")
    with pytest.raises(ValueError, match="data_policy"):
        DistillConfig(target="t", out="o", draft_layers=1, data_policy="teacher")
