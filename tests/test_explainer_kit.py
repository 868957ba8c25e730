"""The explainer kit of ``e2kd.api`` by value: the target score and its gradient (against the
gradient written out by hand, kept for a second class, differentiable when asked) and ``recorded``
(what it records, in which order, leaves for frozen models, checks, the attention switch, and its
hooks gone after the block, also after an error)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from e2kd.api import class_gradient, recorded, target_score
from e2kd.errors import ModelError


def test_the_target_score_sums_each_samples_class_logit():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    assert target_score(logits, torch.tensor([2, 0, 3])).item() == 3.0 + 5.0 + 12.0
    assert target_score(logits, torch.tensor([[1], [1], [1]])).item() == 2.0 + 6.0 + 10.0  # (B, 1) as (B,)


def test_the_class_gradient_is_each_samples_row_of_the_weights_and_keeps_the_graph():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g, requires_grad=True)
    x = torch.randn(4, 5, generator=g, requires_grad=True)
    logits = (x * x) @ w  # d z_c / d x_j = 2 x_j w_jc
    target = torch.tensor([0, 2, 1, 2])
    got = class_gradient(logits, target, x)
    torch.testing.assert_close(got, 2 * x.detach() * w.detach()[:, target].T)
    assert not got.requires_grad
    other = class_gradient(logits, torch.tensor([1, 1, 1, 1]), x, create_graph=True)  # the same forward again
    torch.testing.assert_close(other, 2 * x.detach() * w.detach()[:, 1])
    (dw,) = torch.autograd.grad(other.sum(), w)  # differentiable in the weights: d/dw_j1 of sum 2 x_j w_j1
    want = torch.zeros(5, 3)
    want[:, 1] = 2 * x.detach().sum(0)
    torch.testing.assert_close(dw, want)


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_recorded_values_are_the_modules_outputs_or_inputs_in_call_order():
    model, x = _Two(), torch.rand(2, 3)
    with recorded([model.b, model.a]) as outs, recorded(model.b, read="input") as ins:
        model(x)
        model(x + 1)
    with torch.no_grad():
        a0, a1 = model.a(x), model.a(x + 1)
        want = [a0, model.b(torch.tanh(a0)), a1, model.b(torch.tanh(a1))]
    assert len(outs) == 4 and all(torch.equal(o, w) for o, w in zip(outs, want))  # call order, not list order
    assert len(ins) == 2 and torch.equal(ins[0], torch.tanh(a0)) and torch.equal(ins[1], torch.tanh(a1))
    assert not model.a._forward_hooks and not model.b._forward_hooks


def test_a_leaf_lets_a_frozen_model_be_explained_from_its_layer():
    model, x = _Two().requires_grad_(False), torch.rand(2, 3)
    with recorded(model.a, leaf=True) as outs:
        logits = model(x)
    (acts,) = outs
    assert acts.is_leaf and acts.requires_grad and logits.requires_grad  # the forward went on from the leaf
    got = class_gradient(logits, torch.tensor([1, 0]), acts)
    want = torch.autograd.functional.jacobian(lambda a: model.b(torch.tanh(a)), acts.detach()[0])[1]
    torch.testing.assert_close(got[0], want)
    with recorded(model.a, leaf=lambda out: out.shape[0] > 2) as outs:  # decided per output
        model(x)
    assert not outs[0].requires_grad


def test_a_failed_check_stops_the_forward_and_the_hooks_are_gone():
    model = _Two()

    def check(out):
        if out.shape[-1] != 4:
            raise ModelError(f"want 4 features, got {out.shape[-1]}")

    with pytest.raises(ModelError, match="^want 4 features, got 3$"):
        with recorded(model.a, check=check):
            model(torch.rand(2, 3))
    assert not model.a._forward_hooks
    with pytest.raises(ValueError, match="boom"):  # an error in the block: hooks removed too
        with recorded([model.a, model.b]):
            raise ValueError("boom")
    assert not model.a._forward_hooks and not model.b._forward_hooks


def test_fused_attention_is_off_inside_the_block_only():
    class Attention(nn.Module):
        fused_attn = True

    model = nn.Sequential(Attention(), Attention())
    model[1].fused_attn = False  # (a module already unfused stays unfused)
    with recorded(model[0], unfuse=model):
        assert [m.fused_attn for m in model] == [False, False]
    assert [m.fused_attn for m in model] == [True, False]
    with recorded(model[0]):
        assert model[0].fused_attn is True
