"""Running a model and explaining it, and the checks on what an explainer hands back.

:func:`explained_forward` is the one place that runs a frozen model (a teacher, an evaluated model)
and explains its classes; :func:`explain_checked` explains a captured forward and checks the map's
shape against the explainer's declaration; :func:`check_gradient_path` checks that a student's
explanation term reaches the student's parameters. The loss (:mod:`e2kd.distill`), evaluation, the
frozen-teacher cache and guidance all explain through here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .api import Explainer, Similarity
from .errors import PluginError

Targets = torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None


def explained_forward(
    model: nn.Module,
    images: torch.Tensor,
    explainer: Explainer | None,
    targets: Targets = None,
    *,
    upsample: bool = True,
    role: str = "model",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Run a frozen ``model`` (eval mode) once and explain it: logits, detached maps, explained classes.

    ``targets`` is a (B, k) tensor of classes, a function of the logits returning one, or None
    for the model's own top-1. Maps are (B, k, C, H, W), or None without an explainer
    (``upsample=False``: before the explainer's final bilinear upsampling); their shape is checked
    against the explainer's declaration (``role`` names the model in the error). This is the one
    place that runs a teacher (or an evaluated model) and explains its classes.
    """
    if model.training:  # (eval() walks every module: a cost per step when already in eval mode)
        model.eval()
    if explainer is None:
        with torch.no_grad():
            logits = model(images)
        return logits, None, logits.argmax(dim=1, keepdim=True)
    with torch.enable_grad():
        with explainer.capture(model, images, trainable=False) as cap:
            logits = model(cap.inputs)
        if targets is None:
            targets = logits.argmax(dim=1, keepdim=True)
        elif callable(targets):
            targets = targets(logits.detach())
        maps = torch.stack(
            [
                explain_checked(explainer, cap, logits, targets[:, j], images, role=role, upsample=upsample).detach()
                for j in range(targets.shape[1])
            ],
            dim=1,
        )
    return logits.detach(), maps, targets


def check_map_shape(
    explainer: Explainer, maps: torch.Tensor, images: torch.Tensor, *, role: str = "model", upsample: bool = True
) -> None:
    """One-line PluginError when ``maps`` break the explainer's declaration: (B, C, H, W) with C its
    :meth:`~e2kd.api.Explainer.map_channels` and (H, W) the input's (``upsample=False``, or an
    explainer not :meth:`~e2kd.api.Explainer.at_input_resolution`: at most that)."""
    b, c, h, w = images.shape
    channels = explainer.map_channels(c)
    upsample = upsample and explainer.at_input_resolution()
    got = tuple(maps.shape)
    if maps.dim() != 4 or got[0] != b or got[1] != channels:
        problem = (
            "not 4-D"
            if maps.dim() != 4
            else ("another batch size" if got[0] != b else f"{got[1]} channels where the explainer declares {channels}")
        )
    elif upsample and got[2:] != (h, w):
        problem = f"{got[2]} x {got[3]} where the input is {h} x {w} (upsample the map to the input)"
    elif not upsample and (got[2] > h or got[3] > w):
        problem = f"{got[2]} x {got[3]}, larger than the {h} x {w} input"
    else:
        return
    want = f"({b}, {channels}, {h}, {w})" if upsample else f"({b}, {channels}, <= {h}, <= {w})"
    raise PluginError(
        f"explainer {explainer.name!r} returned {role} maps of shape {got}, expected {want}: {problem}; "
        f"maps are (B, C, H, W) at input resolution with C = map_channels() (docs/plugins.md)"
    )


def explain_checked(
    explainer: Explainer,
    cap,
    logits: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    *,
    role: str = "model",
    create_graph: bool = False,
    upsample: bool = True,
) -> torch.Tensor:
    """``cap.explain(...)`` whose map shape is checked (:func:`check_map_shape`); an explainer that
    frees its graph after the first of several classes gets a one-line PluginError."""
    low = {} if upsample else {"upsample": False}
    try:
        maps = cap.explain(logits, target, create_graph=create_graph, **low)
    except RuntimeError as exc:
        if "backward through the graph a second time" not in str(exc):
            raise
        raise PluginError(
            f"explainer {explainer.name!r} explains only one class per capture: its explain() frees the "
            f"graph, but several classes are explained on one forward (explain_classes other than "
            f"top1); keep the graph (torch.autograd.grad(..., retain_graph=True)) as the capture "
            f"contract in e2kd.api.Capture says, or use explain_classes: top1"
        ) from None
    check_map_shape(explainer, maps, images, role=role, upsample=upsample)
    return maps


def reaches(tensor: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether ``tensor``'s autograd graph leads to any of ``params`` (a walk over the graph, no backward)."""
    wanted = {id(p) for p in params if p.requires_grad}
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if id(getattr(node, "variable", None)) in wanted:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def check_gradient_path(
    explainer: Explainer,
    trained_map: torch.Tensor,
    model: nn.Module,
    *,
    term: torch.Tensor | None = None,
    similarity: Similarity | None = None,
    role: str = "student",
    consequence: str = "distill.lam > 0 would train plain KD",
    fix: str = "set distill.lam: 0",
) -> None:
    """One-line PluginError unless the map (and the ``term`` built from it with ``similarity``) has
    a gradient path to ``model``'s parameters: a detached map or similarity trains nothing, silently."""
    params = list(model.parameters())
    if not reaches(trained_map, params):
        raise PluginError(
            f"explainer {explainer.name!r} returned a {role} map with no gradient path to the {role}'s "
            f"parameters under create_graph=True, so {consequence}; build the map from the captured "
            f"forward without .detach() or torch.no_grad() (e2kd.testing.check_explainer shows where), "
            f"or {fix}"
        )
    if term is not None and similarity is not None and not reaches(term, params):
        raise PluginError(
            f"similarity {similarity.name!r} cuts the gradient: its loss of a trainable student map has "
            f"no gradient path to the student's parameters, so distill.lam > 0 would train plain KD; "
            f"compute it with differentiable torch operations (no .detach(), .item() or numpy), or "
            f"declare differentiable = False"
        )


def check_trainable(explainer: Explainer | None, similarity: Similarity | None) -> None:
    """Refuse, before training starts, plugins that cannot carry an e2KD gradient."""
    if explainer is None or similarity is None:
        raise PluginError("distill.lam > 0 needs both distill.explainer and distill.similarity")
    if not explainer.differentiable:
        raise PluginError(
            f"explainer {explainer.name!r} is not differentiable and cannot train a student (use it for evaluation, or set distill.lam: 0)"
        )
    if not similarity.differentiable:
        raise PluginError(
            f"similarity {similarity.name!r} is not differentiable and cannot train a student (use it for evaluation, or pick a differentiable one)"
        )
