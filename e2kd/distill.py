"""The e2KD objective for one batch (Parchami-Araghi et al., ECCV 2024).

L = w_ce * CE(z_S, y) + T^2 * KL(p_T || p_S) + lam * mean_i (1 - sim(E_S_i, E_T_i)),
both explanations for the teacher's top-1 class; the student's is built with
``create_graph=True`` from the training forward, the teacher's is detached. For multi-label
data the KD term is the per-class binary KL on sigmoid probabilities and the explained
classes are those the teacher predicts positive (the loss averages over (image, class) pairs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .api import Explainer, Similarity
from .errors import ModelError
from .explaining import check_gradient_path, check_trainable, explain_checked, explained_forward
from .labels import label_loss, label_sets, padded_sets
from .runtime import at_least_fp32

#: Which classes' explanations are matched: the teacher's top-1 (the paper), the label (every
#: present class for multi-hot labels), the teacher's top-k, every class, or the classes the
#: teacher predicts positive (logit > 0; its top-1 when none is) — the loss is averaged over them.
EXPLAIN_CLASSES = ("top1", "label", "topk", "all", "positive")
KD_KINDS = ("softmax", "binary")
#: Probability clamp of the binary (multi-label) KD term.
BINARY_CLAMP = 1e-6


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(z_T/T) || softmax(z_S/T)), summed over classes, averaged over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def binary_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * sum over classes of KL(t || s) + KL(1 - t || 1 - s), t, s = sigmoid(z / T) clamped to
    [1e-6, 1 - 1e-6]; averaged over the batch (multi-label KD)."""
    t = temperature
    p = torch.sigmoid(teacher_logits / t).clamp(BINARY_CLAMP, 1 - BINARY_CLAMP)
    q = torch.sigmoid(student_logits / t).clamp(BINARY_CLAMP, 1 - BINARY_CLAMP)
    kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
    return kl.sum(1).mean() * (t * t)


class Distiller:
    """Computes ``{"loss", "kd", "explanation", "ce", ...}`` for a batch; knows no training loop.

    The teacher is frozen and kept in eval mode and runs first (as a hand-written step does, so
    its activations are gone before the student's are built); the student is run exactly once.
    ``lam == 0`` is plain KD and does no explanation work at all. ``teacher=None`` makes a
    distiller for a frozen teacher whose outputs every call passes in. ``explain_every = K``
    computes the explanation term on calls whose ``step`` is a multiple of K only (plain KD on
    the others). ``student_forward`` runs the student's forward (e.g. its DDP wrapper, so
    gradients are averaged over processes); the explanation is captured on ``student`` itself.
    The KD, label and explanation terms are computed in float32 whatever the autocast precision.
    ``feature_resolution``: when the explainer's maps are bilinear upsamplings and the
    similarity declares ``feature_resolution``, compare the maps at the explainer's feature
    resolution (the same value, without forming or back-propagating through 224 x 224 maps).
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
        explain_classes: str = "top1",
        top_k: int = 2,
        kd: str = "softmax",
        explain_every: int = 1,
        student_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
        feature_resolution: bool = True,
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
        if explain_classes not in EXPLAIN_CLASSES:
            raise ValueError(f"explain_classes must be one of {', '.join(EXPLAIN_CLASSES)} (got {explain_classes!r})")
        self.explain_classes, self.top_k = explain_classes, int(top_k)
        if kd not in KD_KINDS:
            raise ValueError(f"kd must be one of {', '.join(KD_KINDS)} (got {kd!r})")
        self.kd = kd
        if explain_every < 1:
            raise ValueError(f"explain_every must be >= 1 (got {explain_every})")
        self.explain_every = int(explain_every)
        self.student_forward = student_forward or student
        if self.lam > 0:
            check_trainable(explainer, similarity)
            for role, model in (("teacher", teacher), ("student", student)):
                if model is not None:
                    try:
                        explainer.check_model(model)
                    except ModelError as exc:
                        raise ModelError(f"the {role} does not fit: {exc}") from None
        #: Maps are compared at the explainer's feature resolution (see ``feature_resolution``).
        self.at_feature_resolution = (
            self.lam > 0 and feature_resolution and explainer.upsamples_bilinearly() and similarity.feature_resolution
        )
        #: Whether the explanation term was checked to reach the student's parameters (first explaining call).
        self.graph_checked = False

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
        step: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one batch (``step``: the training step, for ``explain_every``).

        With ``teacher_logits`` (and, when explaining, ``teacher_maps``) given — a frozen
        teacher replayed from a cache — the teacher is not run at all.
        """
        frozen = teacher_logits is not None
        explains = self.explains and (step is None or step % self.explain_every == 0)
        if frozen and explains and teacher_maps is None:
            raise ValueError("a frozen teacher needs teacher_maps when lam > 0")
        if frozen and explains and self.explain_classes != "top1":
            raise ValueError("a frozen teacher stores top-1 maps only: use explain_classes='top1'")
        if not frozen and self.teacher is None:
            raise ValueError("this distiller has no teacher model: pass teacher_logits (and teacher_maps)")
        # The teacher first: its activations are freed (or, explained, kept only from the hooked
        # layer on) before the student's are built, so the peak memory is the student's step.
        weights = None
        if frozen:
            targets = teacher_logits.argmax(dim=1, keepdim=True)
            teacher_maps = teacher_maps[:, None] if teacher_maps is not None else None
        else:
            chosen: dict[str, torch.Tensor | None] = {}

            def choose(z: torch.Tensor) -> torch.Tensor:
                targets, chosen["weights"] = self.targets(z, labels)
                return targets

            teacher_logits, teacher_maps, targets = explained_forward(
                self.teacher,
                images,
                self.explainer if explains else None,
                choose if explains else None,
                upsample=not self.at_feature_resolution,
                role="teacher",
            )
            weights = chosen.get("weights")
        s_ctx = self.explainer.capture(self.student, images, trainable=True) if explains else contextlib.nullcontext()
        with s_ctx as s_cap:
            student_logits = self.student_forward(s_cap.inputs if s_cap is not None else images)
        out = self.losses(student_logits, teacher_logits.detach(), labels)
        if explains:
            upsample = not self.at_feature_resolution
            size = None if upsample else tuple(images.shape[-2:])
            student_maps = [
                explain_checked(
                    self.explainer,
                    s_cap,
                    student_logits,
                    targets[:, j],
                    images,
                    role="student",
                    create_graph=True,
                    upsample=upsample,
                )
                for j in range(targets.shape[1])
            ]
            per_class = torch.stack(
                [
                    self.similarity.loss(at_least_fp32(m), at_least_fp32(teacher_maps[:, j].detach()), size)
                    for j, m in enumerate(student_maps)
                ],
                dim=1,
            )
            explanation = per_class.mean() if weights is None else (per_class * weights).sum() / weights.sum()
            if not self.graph_checked:
                check_gradient_path(
                    self.explainer, student_maps[0], self.student, term=explanation, similarity=self.similarity
                )
                self.graph_checked = True
            out["explanation"] = explanation
            out["loss"] = out["loss"] + self.lam * explanation
        return out

    def targets(
        self, teacher_logits: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, k) classes whose explanations are matched (default: the teacher's top-1), and (B, k)
        weights of the (image, class) pairs where rows have sets of different sizes (else None)."""
        mode = self.explain_classes
        if mode == "top1":
            return teacher_logits.argmax(dim=1, keepdim=True), None
        if mode == "label":
            if labels is None:
                raise ValueError("explain_classes='label' needs labels")
            return label_sets(labels)
        if mode == "topk":
            return teacher_logits.topk(min(self.top_k, teacher_logits.shape[1]), dim=1).indices, None
        if mode == "positive":
            member = teacher_logits > 0
            member[torch.arange(len(member), device=member.device), teacher_logits.argmax(1)] = True
            return padded_sets(member)
        return torch.arange(teacher_logits.shape[1], device=teacher_logits.device).expand(
            teacher_logits.shape[0], -1
        ), None

    def losses(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The logit terms (KD and optional CE), in float32; the explanation term is added by the caller."""
        logits = at_least_fp32(student_logits)
        kd = (binary_kd_loss if self.kd == "binary" else kd_loss)(
            logits, at_least_fp32(teacher_logits), self.temperature
        )
        zero = kd.new_zeros(())
        ce = zero
        if self.ce_weight > 0:
            if labels is None:
                raise ValueError("ce_weight > 0 needs labels")
            ce = label_loss(logits, labels)
        return {
            "loss": kd + self.ce_weight * ce if self.ce_weight > 0 else kd,
            "kd": kd,
            "ce": ce,
            "explanation": zero,
            "student_logits": student_logits.detach(),
            "teacher_logits": teacher_logits,
        }
