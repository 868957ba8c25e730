"""B-cos building blocks, written as "dynamic linear" operations.

Every layer computes ``out = factor(x) * linear(x)``. The multiplication goes through
:class:`DynamicMultiplication`, which reads the module-level explanation switch **at backward
time**: inside :func:`explanation_mode` the factor is treated as a constant (its gradient is
dropped), which turns the input gradient into the dynamic linear weights W(x) with
``logit - bias = sum(W(x) * x)``. Outside it, and in the forward, everything is ordinary, so the
KD gradient is the full gradient and the double backward through W(x) (built with
``create_graph=True``) is the exact derivative of W(x) — unlike detaching the factor in the
forward, which drops the factor's dependence on the weights from that derivative.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from e2kd.runtime import at_least_fp32

_EXPLANATION_DEPTH = 0  # a plain global: autograd may run backward on another thread


@contextlib.contextmanager
def explanation_mode() -> Iterator[None]:
    """Within this block, backward passes treat the dynamic factors as constants."""
    global _EXPLANATION_DEPTH
    _EXPLANATION_DEPTH += 1
    try:
        yield
    finally:
        _EXPLANATION_DEPTH -= 1


def in_explanation_mode() -> bool:
    return _EXPLANATION_DEPTH > 0


class DynamicMultiplication(torch.autograd.Function):
    """``linear * factor``; in explanation mode the backward gives the factor no gradient.

    Under autocast it is an element-wise product in the wider of its inputs' dtypes (the factor
    of a normalisation is float32); autograd casts each gradient back to its input's dtype.
    """

    @staticmethod
    def forward(ctx, linear: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(linear, factor)
        return linear * factor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        linear, factor = ctx.saved_tensors
        grad_linear = grad * factor
        if in_explanation_mode():
            return grad_linear, None
        grad_factor = grad * linear
        if factor.shape != grad_factor.shape:  # the factor was broadcast: sum over the broadcast dims
            grad_factor = grad_factor.sum_to_size(factor.shape)
        return grad_linear, grad_factor


def dynamic_mul(linear: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return DynamicMultiplication.apply(linear, factor)


class AddInverse(nn.Module):
    """[0, 1] images (B, 3, H, W) -> (B, 6, H, W) = [x, 1 - x] (the B-cos input encoding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 1 - x], dim=1)


class BcosConv2d(nn.Module):
    """out = (w^T x) * |w^T x|^(B-1) / ||x||^(B-1), w of unit norm, ||x|| the norm of the input patch."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        b: float = 2.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight)
        self.stride, self.padding, self.b, self.eps = stride, padding, float(b), eps
        self.register_buffer("ones", torch.ones(1, in_channels, kernel_size, kernel_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / self.weight.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        linear = F.conv2d(x, w, None, self.stride, self.padding)
        if self.b == 1:
            return linear
        norm = (F.conv2d(x * x, self.ones, None, self.stride, self.padding) + self.eps).sqrt()
        factor = (linear / norm).abs()
        if self.b != 2:  # B = 2 (the default): the power is 1, and an extra op in every backward
            factor = factor.pow(self.b - 1)
        return dynamic_mul(linear, factor)


class UncenteredBatchNorm2d(nn.Module):
    """x * gamma / sqrt(E[x^2] + eps): no centring, no bias, so the layer stays linear in x.

    In training E[x^2] is the batch's (a dynamic factor); in eval the running estimate.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # statistics in at least float32 (as BatchNorm under autocast), whatever the input precision
            second_moment = at_least_fp32(x).pow(2).mean(dim=(0, 2, 3))
            with torch.no_grad():
                self.running_var.lerp_(second_moment.detach().to(self.running_var.dtype), self.momentum)
        else:
            second_moment = self.running_var
        factor = (self.weight / (second_moment + self.eps).sqrt()).view(1, -1, 1, 1)
        return dynamic_mul(x, factor)


class LogitBias(nn.Module):
    """Adds the constant -log(C - 1) to every logit (B-cos classifiers have no learnt bias)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.value = -math.log(max(num_classes - 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.value


class DynamicMatmul(torch.autograd.Function):
    """``weights @ values`` with data-dependent ``weights`` (attention); in explanation mode the
    weights count as constants, exactly like the factor of :class:`DynamicMultiplication`.

    Under autocast the product runs in the autocast dtype (float32 softmax weights, bf16 values:
    both bf16), and the operands are saved in that dtype, since the backward runs outside
    autocast; autograd casts each gradient back to its input's dtype.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        out = weights @ values
        ctx.save_for_backward(weights.to(out.dtype), values.to(out.dtype))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, values = ctx.saved_tensors
        grad_values = weights.transpose(-2, -1) @ grad
        if in_explanation_mode():
            return None, grad_values
        return grad @ values.transpose(-2, -1), grad_values


class BcosLinear(nn.Module):
    """The B-cos transform on the last dimension: (w^T x) |w^T x| / ||x|| with unit-norm w (B = 2)."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_normal_(self.weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        linear = x @ w.t()
        norm = (x.pow(2).sum(-1, keepdim=True) + self.eps).sqrt()
        return dynamic_mul(linear, linear.abs() / norm)


class DynamicLayerNorm(nn.Module):
    """LayerNorm without bias: (x - mean) is linear in x, gamma / std is a dynamic factor."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        factor = self.weight / (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        return dynamic_mul(centred, factor)
