"""The e2KD objective for one batch (Parchami-Araghi et al., ECCV 2024).

L = w_ce * CE(z_S, y) + T^2 * KL(p_T || p_S) + lam * mean_i (1 - sim(E_S_i, E_T_i)),
both explanations for the teacher's top-1 class; the student's is built with
``create_graph=True`` from the training forward, the teacher's is detached.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .api import Explainer, Similarity
from .errors import PluginError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(z_T/T) || softmax(z_S/T)), summed over classes, averaged over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class Distiller:
    """Computes ``{"loss", "kd", "explanation", "ce", ...}`` for a batch; knows no training loop.

    The teacher is frozen and kept in eval mode; the student is run exactly once per call.
    ``lam == 0`` is plain KD and does no explanation work at all. ``teacher=None`` makes a
    distiller for a frozen teacher whose outputs every call passes in.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        *,
        explainer: Explainer | None = None,
        similarity: Similarity | None = None,
        temperature: float = 1.0,
        lam: float = 1.0,
        ce_weight: float = 0.0,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {temperature})")
        if lam < 0 or ce_weight < 0:
            raise ValueError(f"lam and ce_weight must be >= 0 (got lam={lam}, ce_weight={ce_weight})")
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.student = student
        self.temperature = float(temperature)
        self.lam = float(lam)
        self.ce_weight = float(ce_weight)
        self.explainer = explainer
        self.similarity = similarity
        if self.lam > 0:
            check_trainable(explainer, similarity)
            for model in (teacher, student):
                if model is not None:
                    explainer.check_model(model)

    @property
    def explains(self) -> bool:
        return self.lam > 0

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        teacher_logits: torch.Tensor | None = None,
        teacher_maps: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one batch.

        With ``teacher_logits`` (and, when explaining, ``teacher_maps``) given — a frozen
        teacher replayed from a cache — the teacher is not run at all.
        """
        frozen = teacher_logits is not None
        if frozen and self.explains and teacher_maps is None:
            raise ValueError("a frozen teacher needs teacher_maps when lam > 0")
        if not frozen and self.teacher is None:
            raise ValueError("this distiller has no teacher model: pass teacher_logits (and teacher_maps)")
        s_ctx = self.explainer.capture(self.student, images, trainable=True) if self.explains else contextlib.nullcontext()
        with s_ctx as s_cap:
            student_logits = self.student(s_cap.inputs if s_cap is not None else images)
        if not frozen:
            teacher_logits, teacher_maps = teacher_outputs(self.teacher, images, self.explainer if self.explains else None)
        out = self.losses(student_logits, teacher_logits.detach(), labels)
        if self.explains:
            target = teacher_logits.argmax(dim=1)
            student_maps = s_cap.explain(student_logits, target, create_graph=True)
            explanation = self.similarity.loss(student_maps, teacher_maps.detach()).mean()
            out["explanation"] = explanation
            out["loss"] = out["loss"] + self.lam * explanation
        return out

    def losses(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The logit terms (KD and optional CE); the explanation term is added by the caller."""
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        zero = kd.new_zeros(())
        ce = zero
        if self.ce_weight > 0:
            if labels is None:
                raise ValueError("ce_weight > 0 needs labels")
            ce = F.cross_entropy(student_logits, labels)
        return {
            "loss": kd + self.ce_weight * ce,
            "kd": kd,
            "ce": ce,
            "explanation": zero,
            "student_logits": student_logits.detach(),
            "teacher_logits": teacher_logits,
        }


def teacher_outputs(
    teacher: nn.Module, images: torch.Tensor, explainer: Explainer | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen teacher's logits and (with an explainer) its detached map for its top-1 class."""
    teacher.eval()
    if explainer is None:
        with torch.no_grad():
            return teacher(images), None
    with torch.enable_grad():
        with explainer.capture(teacher, images, trainable=False) as cap:
            logits = teacher(cap.inputs)
        maps = cap.explain(logits, logits.argmax(dim=1), create_graph=False)
    return logits.detach(), maps.detach()


def check_trainable(explainer: Explainer | None, similarity: Similarity | None) -> None:
    """Refuse, before training starts, plugins that cannot carry an e2KD gradient."""
    if explainer is None or similarity is None:
        raise PluginError("distill.lam > 0 needs both distill.explainer and distill.similarity")
    if not explainer.differentiable:
        raise PluginError(f"explainer {explainer.name!r} is not differentiable and cannot train a student (use it for evaluation, or set distill.lam: 0)")
    if not similarity.differentiable:
        raise PluginError(f"similarity {similarity.name!r} is not differentiable and cannot train a student (use it for evaluation, or pick a differentiable one)")
