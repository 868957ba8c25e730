"""Optimisers and learning-rate schedules against values computed by hand."""

import math

import pytest
import torch

from e2kd.train import lr_factor, make_optimizer, make_schedule


def test_warmup_then_cosine_by_hand():
    # 2 warm-up steps, then half a cosine over the remaining 4 steps
    expected = [1 / 2, 2 / 2] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)] + [0.0, 0.0]
    assert [lr_factor(s, "cosine", 6, 2) for s in range(8)] == pytest.approx(expected)
    assert [lr_factor(s, "constant", 6, 2) for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert lr_factor(0, "cosine", 4) == 1.0 and lr_factor(2, "cosine", 4) == pytest.approx(0.5)


def test_schedule_sets_the_optimizer_lr_each_step():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer([weight], "adamw", 0.1, 0.0)
    schedule = make_schedule(optimizer, "cosine", total_steps=4, warmup_steps=1)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # step 0: warm-up 1/1; steps 1-3: half a cosine over 3 steps
    assert seen == pytest.approx([0.1] + [0.1 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)])
    with pytest.raises(ValueError, match="unknown schedule 'step' \\(known: cosine, constant\\)"):
        make_schedule(optimizer, "step", 4)


def test_constant_and_default_warmup_schedules_through_the_optimizer():
    weight = torch.nn.Parameter(torch.zeros(1))
    for name, want in (
        ("constant", [0.1] * 4),
        ("cosine", [0.1 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]),
    ):
        optimizer = make_optimizer([weight], "adamw", 0.1, 0.0)
        schedule = make_schedule(optimizer, name, total_steps=4)  # no warm-up by default
        seen = []
        for _ in range(4):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert seen == pytest.approx(want), name
    # one step after a warm-up: the cosine spans that single step
    assert lr_factor(1, "cosine", 2, 1) == 1.0 and lr_factor(2, "cosine", 2, 1) == pytest.approx(0.0, abs=1e-12)


def test_sgd_is_nesterov_momentum_with_decoupled_weight_decay_by_hand():
    """Two steps of SGD(lr, momentum 0.9, nesterov, weight decay wd) on f(w) = w^2 / 2 (gradient w)."""
    lr, wd, w0 = 0.1, 0.01, 2.0
    w = torch.nn.Parameter(torch.tensor([w0]))
    optimizer = make_optimizer([w], "sgd", lr, wd)
    b, value = 0.0, w0
    for step in range(2):
        optimizer.zero_grad()
        (0.5 * w.pow(2)).sum().backward()
        optimizer.step()
        g = value + wd * value  # gradient plus L2 decay
        b = g if step == 0 else 0.9 * b + g
        value = value - lr * (g + 0.9 * b)  # nesterov: g + momentum * buffer
        assert w.item() == pytest.approx(value, rel=1e-6)
    assert make_optimizer([w], "adamw", 0.1, 0.05).defaults["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="unknown optimizer 'adam' \\(known: adamw, sgd\\)"):
        make_optimizer([w], "adam", 0.1, 0.0)
