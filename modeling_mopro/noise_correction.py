"""The MoPro rules, as pure functions: noise correction, the momentum-prototype update and the neighbour vote.

[0] MoPro, Li et al., ICLR 2021, arXiv:2009.07995, Sec. 3.3: "we combine the prediction from the classifier with
the prototypical score ... if the highest score is above a threshold, we assign the sample a pseudo-label ...
otherwise, if the score of the original label is above 1/K we keep it ... otherwise the sample is OOD."
Semantics follow the official code (salesforce/MoPro `model.py`), which is what the published numbers used.

The neighbour vote of the given labels (`neighbour_label_vote`) is not part of the official method: it is the weighted
kNN vote of InstDisc (Wu et al., 2018) and of a deep k-NN noise filter (Bahri et al., ICML 2020). The option
`noise_correction_rule="queue_vote"` adds it to the soft label over the MoCo queue's keys (`queue_label_vote`), and
the evaluation's kNN accuracy and noise report use the same function over a dataset's embeddings.
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
    neighbour_vote: torch.Tensor | None = None,
    vote_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct web labels with the classifier and the prototypes (and, not official, a neighbour vote).

    Args:
        class_logits: (N, K) classifier logits.
        prototype_logits: (N, K) prototype similarities already divided by the temperature.
        labels: (N,) given (noisy) labels in [0, K).
        alpha: weight of the classifier in the soft label.
        threshold: a sample is relabelled when the largest soft score exceeds it.
        ood_threshold: a sample that is not relabelled is out-of-distribution when the soft score of its given label
            is at most this (official: 1/K, the default).
        neighbour_vote: optional (N, K) vote of the neighbours' given labels (`queue_label_vote`), each row summing
            to 1, or to 0 where no neighbour voted. The soft label becomes `(1 - vote_weight) * official soft label +
            vote_weight * vote` in the rows that have a vote; a row without one keeps the official soft label.
        vote_weight: weight of `neighbour_vote` in [0, 1].

    Returns:
        corrected_labels: (N,) argmax of the soft label where it is confident, else the given label.
        keep_mask: (N,) bool, False for out-of-distribution samples, which leave the CE and prototype losses.
    """
    num_classes = class_logits.shape[1]
    soft = alpha * F.softmax(class_logits.float(), dim=1) + (1 - alpha) * F.softmax(prototype_logits.float(), dim=1)
    if neighbour_vote is not None:
        # A mix of two distributions is one: the thresholds below keep their meaning. `torch.where`, not indexing,
        # so that no step reads the vote back to the host.
        has_vote = neighbour_vote.sum(dim=1, keepdim=True) > 0  # (N, 1)
        soft = torch.where(has_vote, (1 - vote_weight) * soft + vote_weight * neighbour_vote.float(), soft)
    given_score = soft.gather(1, labels[:, None]).squeeze(1)  # (N,)
    max_score, soft_argmax = soft.max(dim=1)  # (N,), (N,)
    relabel = max_score > threshold
    corrected_labels = torch.where(relabel, soft_argmax, labels)
    # Official: the given-label test uses the score of the label *before* relabelling.
    ood_threshold = 1.0 / num_classes if ood_threshold is None else ood_threshold
    keep_mask = (given_score > ood_threshold) | relabel
    return corrected_labels, keep_mask


@torch.no_grad()
def neighbour_label_vote(
    similarities: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float | None
) -> torch.Tensor:
    """The weighted vote of the neighbours' labels: each neighbour votes for its label with weight
    `exp(similarity / temperature)`, normalised over the row's neighbours (InstDisc's kNN; `temperature=None`: every
    neighbour weight 1, a majority vote). The one kNN vote of the project: the training option `queue_vote`, the kNN
    accuracy (`evaluation.knn`) and the noise report's class evidence (`evaluation.noise_scores`) all call it.

    Args:
        similarities: (N, k) cosine similarity of each sample to its k neighbours; `-inf` marks a neighbour that does
            not exist (an unfilled queue slot, the sample's own key), which gets no weight.
        neighbour_labels: (N, k) labels of those neighbours in [0, K) (any value where the similarity is `-inf`).
        num_classes: K.
        temperature: T of the weights, or None for a majority vote.

    Returns:
        (N, K) vote shares: each row sums to 1, or is all 0 when none of its neighbours exists.
    """
    valid = similarities > float("-inf")  # (N, k)
    if temperature is None:
        weights = valid.to(torch.float32)
    else:
        logits = similarities.float() / temperature
        # A softmax over the valid neighbours; a row without any would be 0 / 0, so shift by a finite maximum.
        row_max = logits.amax(dim=1, keepdim=True)
        weights = (logits - torch.where(torch.isfinite(row_max), row_max, 0)).exp()  # exp(-inf) = 0
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    labels = torch.where(valid, neighbour_labels, 0).long()  # an invalid neighbour adds 0 to class 0
    votes = torch.zeros(similarities.shape[0], num_classes, dtype=weights.dtype, device=similarities.device)
    return votes.scatter_add_(1, labels, weights)


@torch.no_grad()
def queue_label_vote(
    embeddings: torch.Tensor,
    queue: torch.Tensor,
    queue_labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    sample_ids: torch.Tensor | None = None,
    queue_sample_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`neighbour_label_vote` of the k keys of the MoCo queue most similar (cosine) to each embedding.

    The keys carry the *given* labels of their samples: in the contrastive embedding an image's neighbours mostly
    share its true class even where many labels are wrong, so their vote can outvote a wrong given label that the
    classifier and the prototypes, trained on that label, confirm.

    Args:
        embeddings: (N, D) L2-normalised query embeddings q.
        queue: (D, Q) L2-normalised keys.
        queue_labels: (Q,) given label of each key, -1 for a slot not filled yet (it does not vote).
        num_classes: K.
        k: neighbours per sample (at most the filled slots vote).
        temperature: T of the `exp(similarity / T)` weights.
        sample_ids: optional (N,) dataset index of each sample, with `queue_sample_ids` (Q,) that of each key
            (-1: unknown): a sample's own earlier keys (a queue longer than an epoch holds them) are left out, as the
            noise report leaves the sample itself out; they would vote for its given label.

    Returns:
        (N, K) vote shares (rows of 0 where no slot is filled).
    """
    similarities = embeddings.float() @ queue.float()  # (N, Q)
    invalid = (queue_labels < 0)[None, :]  # (1, Q)
    if sample_ids is not None and queue_sample_ids is not None:
        invalid = invalid | ((sample_ids[:, None] == queue_sample_ids[None, :]) & (queue_sample_ids >= 0))  # (N, Q)
    similarities = similarities.masked_fill(invalid, float("-inf"))
    top, slots = similarities.topk(min(k, queue.shape[1]), dim=1)  # (N, k)
    return neighbour_label_vote(top, queue_labels[slots], num_classes, temperature)


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


__all__ = [
    "correct_noisy_labels", "correction_thresholds", "far_from_prototypes", "neighbour_label_vote", "queue_label_vote",
    "update_prototypes",
]  # fmt: skip
