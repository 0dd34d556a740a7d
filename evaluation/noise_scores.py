"""Per-sample label-quality and out-of-distribution scores from MoPro's embedding, and thresholds fitted to the data.

The training rule (`modeling_mopro.correct_noisy_labels`) decides with constants tuned for 1,000 classes and 2.4M
images (relabel above 0.8, keep above 1/K), from the model's own classifier and prototypes. Offline we can do better,
because the whole dataset is at hand:

- **Class evidence** p(c | x): the given labels of the sample's k nearest neighbours in MoPro's embedding space,
  each weighted by exp(cosine / T), the sample itself left out (a deep k-NN filter, as in Bahri et al., ICML 2020).
  Neighbours' labels are noisy one by one, but in the contrastive embedding the neighbours of an image mostly share
  its true class, so their vote recovers it where the sample's own label is wrong.
  Why not the classifier and the prototypes: they are trained on the labels that the training rule corrects, and
  when an early correction goes wrong they confirm it. In 2 of 3 benchmark runs their soft label ranked the label
  errors at AUROC 0.56-0.66, while the neighbour vote of the *given* labels, in the same model's embedding, stayed at
  0.89-0.90 (0.90 in the third run, where both did; BENCHMARKS.md).
- **Label quality** = p(given label | x): how likely the given label is right (high = clean).
- **OOD score** = the entropy of the neighbours' label vote, over log K (0: the neighbours agree on one class;
  1: their labels are uniform; high = out of distribution). An in-distribution image sits among images of its
  true class, whose labels are mostly that class even at 40% noise; an OOD image sits among other OOD images,
  which web queries of every class return, so their labels spread over the classes. Distances did not work:
  OOD images (digits, photo patches) form tight clusters of their own, so the distance to the nearest neighbours
  ranks them near chance (AUROC 0.46-0.63) and the distance to the nearest prototype at 0.66-0.88, against 0.98
  for the vote's entropy (three benchmark runs, BENCHMARKS.md). The score fails where OOD images of one kind all
  carry one class's label: they then look like that class.
- **Thresholds from the data**: a two-component Gaussian mixture is fitted to each score (as DivideMix does on
  losses) and kept when BIC prefers it to one component and its modes are apart; a sample is flagged when the
  posterior of the bad component exceeds 1/2. A score with one mode (a clean dataset) flags nothing.

Decisions: OOD when flagged by the OOD score; else "relabelled" to the argmax of the class evidence when the label
quality is flagged and the argmax differs from the given label; else "clean".
"""

from __future__ import annotations

import math

import numpy as np
import torch

from modeling_mopro.noise_correction import neighbour_label_vote

DECISIONS = ("clean", "relabelled", "ood")


@torch.no_grad()
def nearest_neighbours(
    embeddings: torch.Tensor, k: int, max_reference: int | None = None, seed: int = 0, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-nearest neighbours of every row among the others (itself excluded).

    Args:
        embeddings: (N, D) L2-normalised rows.
        k: neighbours per row (fewer when there are fewer other rows).
        max_reference: search among a seeded random subset of at most this many rows (bounds the N x M work at
            WebVision scale); None searches all rows.
        chunk_size: query rows per matrix product (memory is chunk_size x M).

    Returns:
        similarities (N, k') and dataset indices (N, k') of the neighbours, most similar first.
    """
    n = embeddings.shape[0]
    reference = torch.arange(n)
    if max_reference is not None and n > max_reference:
        generator = torch.Generator().manual_seed(seed)
        reference = torch.randperm(n, generator=generator)[:max_reference].sort().values
    reference = reference.to(embeddings.device)
    k = min(k, len(reference) - 1)
    if k < 1:
        raise ValueError(f"nearest neighbours need at least 2 samples, got {n}")
    bank = embeddings[reference]  # (M, D)
    similarities, indices = [], []
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n), device=embeddings.device)
        s = embeddings[rows] @ bank.T  # (B, M)
        # A sample is not its own neighbour: find each row in the (sorted) reference, O(B log M) rather than a
        # B x M comparison mask (400 MB per chunk at M = 200k).
        position = torch.searchsorted(reference, rows).clamp(max=len(reference) - 1)  # (B,)
        is_reference = reference[position] == rows
        s[is_reference.nonzero().squeeze(1), position[is_reference]] = -float("inf")
        top = s.topk(k, dim=1)
        similarities.append(top.values)
        indices.append(reference[top.indices])
    return torch.cat(similarities), torch.cat(indices)


def two_mode_posterior(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """Posterior of the high-mean component of a two-component Gaussian mixture fitted to `scores`.

    The mixture is kept only when BIC prefers it to a single Gaussian and its modes are apart (Ashman's D > 2);
    otherwise every posterior is 0 (one mode: nothing stands out). Deterministic for a seed.
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    if len(x) < 4 or np.ptp(x) < 1e-6:  # (numerically) one value: nothing stands out
        return np.zeros(len(x))
    one = GaussianMixture(1, random_state=seed).fit(x)
    two = GaussianMixture(2, random_state=seed, reg_covar=1e-6 * float(x.var()) + 1e-12, n_init=3).fit(x)
    means, variances = two.means_.ravel(), two.covariances_.ravel()
    # Two modes only when BIC prefers them and they are apart (Ashman's D > 2): a split inside one mode, e.g. at
    # 1e-3 scale in a clean set, must not flag half of it.
    separation = math.sqrt(2) * abs(means[0] - means[1]) / math.sqrt(variances.sum())
    if two.bic(x) >= one.bic(x) or separation <= 2:
        return np.zeros(len(x))
    posterior = two.predict_proba(x)[:, int(np.argmax(means))]
    # A wide low mode can out-weigh a narrow high one on its own far tail; nothing below the low mean is flagged.
    posterior[x.ravel() <= means.min()] = 0.0
    return posterior


@torch.no_grad()
def noise_scores(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    num_classes: int,
    temperature: float = 0.1,
    num_neighbours: int = 50,
    max_reference: int | None = 200_000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Scores, suggested labels and fitted decisions of every sample.

    Args:
        embeddings: (N, D) L2-normalised embeddings (a tensor on a GPU runs the neighbour search there).
        labels: (N,) given labels in [0, num_classes).
        num_classes: K.
        temperature: of the neighbour weights exp(cosine / T) (the model's `config.temperature`).
        num_neighbours: k of the neighbour vote.
        max_reference: see `nearest_neighbours`.

    Returns:
        numpy arrays: `label_quality` (N,) in [0, 1], `ood_score` (N,) in [0, 1], `suggested_label` (N,),
        `class_evidence` (N, K), `label_issue_probability` and `ood_probability` (the fitted posteriors),
        `decision` (N,) indices into DECISIONS.
    """
    embeddings = torch.as_tensor(embeddings).float()
    labels = torch.as_tensor(labels).long().to(embeddings.device)
    similarities, neighbours = nearest_neighbours(embeddings, num_neighbours, max_reference, seed)
    # The project's one kNN vote, the one the `queue_vote` training rule uses over the queue's keys.
    evidence = neighbour_label_vote(similarities, labels[neighbours], num_classes, temperature)  # (N, K)

    label_quality = evidence.gather(1, labels[:, None]).squeeze(1).cpu().numpy()
    suggested = evidence.argmax(1).cpu().numpy()
    entropy = -(evidence * evidence.clamp_min(1e-12).log()).sum(1)
    ood_score = (entropy / (math.log(num_classes) if num_classes > 1 else 1.0)).cpu().numpy()

    ood_probability = two_mode_posterior(ood_score, seed)
    ood = ood_probability > 0.5
    # The label-quality mixture is fitted to the in-distribution samples only: OOD images would be a third mode.
    issue_probability = np.zeros(len(labels))
    issue_probability[~ood] = two_mode_posterior(-label_quality[~ood], seed)
    relabel = (issue_probability > 0.5) & (suggested != labels.cpu().numpy()) & ~ood
    decision = np.where(ood, DECISIONS.index("ood"), np.where(relabel, DECISIONS.index("relabelled"), 0))
    return {
        "label_quality": label_quality,
        "ood_score": ood_score,
        "suggested_label": suggested,
        "class_evidence": evidence.cpu().numpy(),
        "label_issue_probability": issue_probability,
        "ood_probability": ood_probability,
        "decision": decision,
    }


__all__ = ["DECISIONS", "nearest_neighbours", "noise_scores", "two_mode_posterior"]
