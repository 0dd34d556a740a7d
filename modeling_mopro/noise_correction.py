"""The two MoPro rules, as pure functions: noise correction and the momentum-prototype update.

[0] MoPro, Li et al., ICLR 2021, arXiv:2009.07995, Sec. 3.3: "we combine the prediction from the classifier with
the prototypical score ... if the highest score is above a threshold, we assign the sample a pseudo-label ...
otherwise, if the score of the original label is above 1/K we keep it ... otherwise the sample is OOD."
Semantics follow the official code (salesforce/MoPro `model.py`), which is what the published numbers used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def correction_thresholds(strength: float, threshold: float, num_classes: int) -> tuple[float, float]:
    """(relabel threshold, OOD threshold) of a correction at `strength` in (0, 1] (`training.correction_schedule`).

    Strength 1 is the official rule: relabel above `threshold`, out-of-distribution at or below 1/K. Below 1, only
    the decisions with the widest margin are taken: relabel above 1 - s (1 - threshold), OOD at or below s / K.
    """
    if strength >= 1.0:
        return threshold, 1.0 / num_classes
    return 1.0 - strength * (1.0 - threshold), strength / num_classes


@torch.no_grad()
def correct_noisy_labels(
    class_logits: torch.Tensor,
    prototype_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    threshold: float,
    ood_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct web labels with the classifier and the prototypes.

    Args:
        class_logits: (N, K) classifier logits.
        prototype_logits: (N, K) prototype similarities already divided by the temperature.
        labels: (N,) given (noisy) labels in [0, K).
        alpha: weight of the classifier in the soft label.
        threshold: a sample is relabelled when the largest soft score exceeds it.
        ood_threshold: a sample that is not relabelled is out-of-distribution when the soft score of its given label
            is at most this (official: 1/K, the default).

    Returns:
        corrected_labels: (N,) argmax of the soft label where it is confident, else the given label.
        keep_mask: (N,) bool, False for out-of-distribution samples, which leave the CE and prototype losses.
    """
    num_classes = class_logits.shape[1]
    soft = alpha * F.softmax(class_logits.float(), dim=1) + (1 - alpha) * F.softmax(prototype_logits.float(), dim=1)
    given_score = soft.gather(1, labels[:, None]).squeeze(1)  # (N,)
    max_score, soft_argmax = soft.max(dim=1)  # (N,), (N,)
    relabel = max_score > threshold
    corrected_labels = torch.where(relabel, soft_argmax, labels)
    # Official: the given-label test uses the score of the label *before* relabelling.
    ood_threshold = 1.0 / num_classes if ood_threshold is None else ood_threshold
    keep_mask = (given_score > ood_threshold) | relabel
    return corrected_labels, keep_mask


@torch.no_grad()
def far_from_prototypes(embeddings: torch.Tensor, prototypes: torch.Tensor, min_similarity: float) -> torch.Tensor:
    """The paper's OOD description as a test: True where an embedding is far from every prototype.

    Args:
        embeddings: (N, D) L2-normalised embeddings.
        prototypes: (K, D) L2-normalised prototypes.
        min_similarity: cosine similarity below which a sample is "far" from a prototype.

    Returns:
        (N,) bool mask, True for samples whose best cosine similarity to any prototype is below `min_similarity`.
    """
    return (embeddings @ prototypes.T).max(dim=1).values < min_similarity


@torch.no_grad()
def update_prototypes(
    prototypes: torch.Tensor,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    momentum: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Momentum update of the class prototypes, then one L2 normalisation of every row.

    Equals the official per-sample loop `for z, y in zip(embeddings, labels): p[y] = m * p[y] + (1 - m) * z` run in
    batch order, in closed form: if class c receives samples z_1..z_n (in order), then
    p_c <- m^n p_c + sum_j (1 - m) m^(n - j) z_j. Each sample's weight only depends on how many same-class samples
    come *after* it, so a sort gives all weights at once and `index_add_` does the sums: no Python loop.

    No step reads a value back to the host (no boolean indexing, no `bincount`, whose output size depends on the
    data): on a GPU the update queues its kernels without waiting for them.

    Args:
        prototypes: (K, D) current prototypes.
        embeddings: (N, D) embeddings (detached; gathered over processes in distributed runs).
        labels: (N,) class of each embedding.
        momentum: the prototype momentum m in [0, 1).
        mask: optional (N,) bool, False for samples that take no part (out-of-distribution ones): the same result as
            passing `embeddings[mask], labels[mask]`, without the host synchronisation boolean indexing costs.

    Returns:
        (K, D) new, L2-normalised prototypes (a new tensor; the input is not modified).
    """
    num_classes = prototypes.shape[0]
    dtype = torch.float64 if prototypes.dtype == torch.float64 else torch.float32
    device = labels.device
    if mask is not None:
        # Left-out samples go to an extra class K, after every real one: they shift no real sample's position and
        # their row of the sums is dropped at the end.
        labels = torch.where(mask, labels, num_classes)
    slots = num_classes + (mask is not None)
    counts = torch.zeros(slots, dtype=torch.long, device=device).index_add_(0, labels, torch.ones_like(labels))
    # Position of each sample among the samples of its class, in batch order (stable sort keeps that order).
    order = torch.sort(labels, stable=True).indices  # (N,)
    class_start = torch.cumsum(counts, 0) - counts  # (K,) first sorted index of each class
    position_sorted = torch.arange(labels.numel(), device=device) - class_start[labels[order]]
    position = torch.empty_like(position_sorted)
    position[order] = position_sorted
    later = counts[labels] - 1 - position  # (N,) same-class samples after this one
    momentum_t = torch.full((), momentum, dtype=dtype, device=device)  # a fill, not a host-to-device copy
    weights = (1 - momentum) * torch.pow(momentum_t, later.to(dtype))
    decay = torch.pow(momentum_t, counts[:num_classes].to(dtype))  # (K,)
    new = prototypes.to(dtype) * decay[:, None]
    if mask is not None:
        new = torch.cat([new, new.new_zeros(1, new.shape[1])])
    new.index_add_(0, labels, embeddings.to(dtype) * weights[:, None])
    return F.normalize(new[:num_classes], dim=1).to(prototypes.dtype)


__all__ = ["correct_noisy_labels", "correction_thresholds", "far_from_prototypes", "update_prototypes"]
