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
- **The training run's record** (`modeling_mopro.sample_dynamics`): the classifier's softmax on each sample's
  training views, averaged over the epochs before noise correction began. Where the embedding is weak (a small
  model on natural photos) its neighbours' labels are near chance and the vote names another class for most samples,
  while the classifier's early fit still separates wrong labels from right ones; where the embedding is strong
  (Fashion-MNIST) the vote is the better one. The label decisions read the **mean of the two** when the report has
  the record (`training_evidence`): on the 7 development runs it was within 2.1 points of label-error F1 of the
  better one everywhere, where the vote alone lost 56-57 points where it was near chance and the record alone 6-8
  where the vote was good (BENCHMARKS.md, "Label evidence").
- **Label quality** = p(given label | x) under that evidence: how likely the given label is right (high = clean).
- **OOD score** = the entropy of the neighbours' label vote, over log K (0: the neighbours agree on one class;
  1: their labels are uniform; high = out of distribution). An in-distribution image sits among images of its
  true class, whose labels are mostly that class even at 40% noise; an OOD image sits among other OOD images,
  which web queries of every class return, so their labels spread over the classes. Distances did not work:
  OOD images (digits, photo patches) form tight clusters of their own, so the distance to the nearest neighbours
  ranks them near chance (AUROC 0.46-0.63) and the distance to the nearest prototype at 0.66-0.88, against 0.98
  for the vote's entropy (three benchmark runs, BENCHMARKS.md). The score fails where OOD images of one kind all
  carry one class's label: they then look like that class.
- **OOD threshold from the data**: a two-component Gaussian mixture is fitted to the OOD score (as DivideMix does on
  losses) and kept when BIC prefers it to one component and its modes are apart; a sample is called OOD when the
  posterior of the high component exceeds 1/2.
- **Label errors by confident learning** (Northcutt, Jiang & Chuang, JAIR 2021), applied to the neighbour vote: each
  class's threshold is the average vote for it among the samples given it (its self-confidence); a sample
  *confidently* belongs to the class of highest vote among those whose vote reaches their own class's threshold, and
  its label is an issue when that class is not its given label (it is then relabelled to it). No bimodality is
  assumed: the per-class thresholds adapt to how well the vote separates each class, where a two-mode fit of the
  label quality needed two modes (on noisy Fashion-MNIST, development seeds 0-2, label-error F1 0.827 against the
  two-mode fit's 0.797, and 0.824 against 0.818 on the fresh seeds 3-5 with a spread of 0.001 instead of 0.044; on
  simulated noise the fit flagged nothing at 40% in one seed of six, and 25-29% of a clean labelling, confident
  learning 17-21%; where the fit finds its two modes at 40% it is the better one: BENCHMARKS.md).
- **A guard on the OOD fit** (`check_ood_fit`): an OOD decision drops the sample and nothing else stands behind it,
  so its fit is used only when (1) its two modes are separated: Ashman's D > 2 *and* the fitted density dips between
  them to at most `MAX_DIP` of its lower peak (two components can fit one skewed mode with D > 2: on natural photos
  the OOD scores of a weak embedding are one mode skewed towards 1, and the fit's high component held 55-75% of
  the data); and (2) the OOD share is plausible: a minority (at most 1/2 of the samples: the neighbour vote assumes most
  of an image's neighbours are in distribution), and mostly made of label errors: at least half of the samples it
  calls OOD have a given label that gets less than half of their neighbours' vote (an OOD image has no right label
  for its neighbours to confirm), so the OOD share is at most twice the share of such samples.
  Otherwise the **fallback** flags as OOD only the samples whose neighbour vote is within 1 - `FALLBACK_OOD_SCORE`
  of uniform, at most `FALLBACK_MAX_SHARE` of the data (highest scores first), and the report says why.
  The label decisions have a plausibility check of the same kind: they may relabel at most `MAX_RELABEL_SHARE` (60%)
  of the samples. A vote near chance, as in a weak embedding of natural photos, makes most samples look confidently of
  another class; a good vote names another class for the wrong labels *and* for the images its embedding confuses.
  The two cannot be told apart from the vote alone (on Fashion-MNIST at 60% symmetric noise the vote agrees with the
  given labels as rarely as a weak natural-photo embedding at 10%), so the cap is set by what a good embedding
  needs: the 40% noise of the hardest common benchmarks plus the 17-21% of a *clean* labelling that confident
  learning flags in the development models' embeddings. Beyond it nothing is relabelled, and the report says why.

Decisions: OOD when flagged by the OOD-score fit (or, when it is not trusted, by the fallback); else "relabelled" to
the class the sample confidently belongs to when that is not its given label; else "clean".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from modeling_mopro.noise_correction import neighbour_label_vote

DECISIONS = ("clean", "relabelled", "ood")
# What the label decisions read (`noise_scores`' `label_evidence`), as the summary names it.
EVIDENCE_NEIGHBOURS = "neighbour vote"
EVIDENCE_TRAINING = "training dynamics"
EVIDENCE_COMBINED = "neighbour vote + training dynamics"
# Each evidence as the refusal's sentence names it ("confident learning on ... would relabel").
_EVIDENCE_PHRASES = {EVIDENCE_NEIGHBOURS: "the neighbour vote", EVIDENCE_TRAINING: "the training record",
                     EVIDENCE_COMBINED: "the neighbour vote and the training record"}  # fmt: skip

# Separated modes: the fitted mixture's density between its two means falls to at most this share of its lower peak
# (1: no dip at all, one skewed mode).
MAX_DIP = 0.5
# The fallback OOD rule when the fit is not trusted: only samples whose neighbour vote has at least this normalised
# entropy (within 5% of uniform: the neighbours agree on no class), and at most this share of the samples, by score.
FALLBACK_OOD_SCORE = 0.95
FALLBACK_MAX_SHARE = 0.05
# The label decisions may relabel at most this share of all samples; beyond it, nothing is relabelled (module docstring:
# 40% wrong labels plus the ~20% of a clean labelling a good embedding's vote confuses).
MAX_RELABEL_SHARE = 0.6
FALLBACK_OOD_RULE = (
    f"OOD only where the neighbours' label vote is within {1 - FALLBACK_OOD_SCORE:.0%} of uniform "
    f"(ood_score >= {FALLBACK_OOD_SCORE}), at most {FALLBACK_MAX_SHARE:.0%} of the samples, highest scores first"
)


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


@dataclass(frozen=True)
class TwoModeFit:
    """A two-component Gaussian mixture fitted to one score, and whether its threshold is used.

    Attributes:
        posterior: (N,) posterior of the high-mean component; all 0 when the fit is not used.
        used: BIC prefers two components and they are apart (Ashman's D > 2).
        reason: why the fit is not used ("" when it is).
        separation: Ashman's D of the two components (None: no mixture was fitted).
        dip: the mixture density's lowest point between the two means over the lower of its peaks on either side
            (1: no dip, one mode; a Gaussian mixture's modes lie between its means).
        weight: the high component's mixture weight.
    """

    posterior: np.ndarray
    used: bool
    reason: str = ""
    separation: float | None = None
    dip: float | None = None
    weight: float | None = None

    @property
    def flagged_share(self) -> float:
        return float((self.posterior > 0.5).mean()) if len(self.posterior) else 0.0


def _mixture_dip(mixture, low: float, high: float, points: int = 513) -> float:
    """Lowest density of a fitted 1-D mixture between `low` and `high`, over the lower of the highest densities on
    either side of that point (1.0 when the density has no interior minimum there)."""
    grid = np.linspace(low, high, points).reshape(-1, 1)
    density = np.exp(mixture.score_samples(grid))
    j = int(np.argmin(density))
    return float(density[j] / min(density[: j + 1].max(), density[j:].max()))


def fit_two_modes(scores: np.ndarray, seed: int = 0) -> TwoModeFit:
    """Fits a two-component Gaussian mixture to `scores`; its posterior is used only when BIC prefers it to a single
    Gaussian and its modes are apart (Ashman's D > 2), else every posterior is 0 (one mode: nothing stands out).
    Deterministic for a seed."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    if len(x) < 4 or np.ptp(x) < 1e-6:  # (numerically) one value: nothing stands out
        return TwoModeFit(np.zeros(len(x)), False, "the scores take (numerically) one value")
    one = GaussianMixture(1, random_state=seed).fit(x)
    two = GaussianMixture(2, random_state=seed, reg_covar=1e-6 * float(x.var()) + 1e-12, n_init=3).fit(x)
    means, variances = two.means_.ravel(), two.covariances_.ravel()
    high = int(np.argmax(means))
    separation = math.sqrt(2) * abs(means[0] - means[1]) / math.sqrt(variances.sum())
    diagnostics = {
        "separation": float(separation),
        "dip": _mixture_dip(two, float(means.min()), float(means.max())),
        "weight": float(two.weights_[high]),
    }
    # Two modes only when BIC prefers them and they are apart (Ashman's D > 2): a split inside one mode, e.g. at
    # 1e-3 scale in a clean set, must not flag half of it.
    if two.bic(x) >= one.bic(x):
        return TwoModeFit(np.zeros(len(x)), False, "BIC prefers one Gaussian to two", **diagnostics)
    if separation <= 2:
        return TwoModeFit(np.zeros(len(x)), False, f"the two modes overlap (Ashman's D {separation:.2f} <= 2)",
                          **diagnostics)  # fmt: skip
    posterior = two.predict_proba(x)[:, high]
    # A wide low mode can out-weigh a narrow high one on its own far tail; nothing below the low mean is flagged.
    posterior[x.ravel() <= means.min()] = 0.0
    return TwoModeFit(posterior, True, **diagnostics)


def two_mode_posterior(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """Posterior of the high-mean component of a two-component Gaussian mixture fitted to `scores` (`fit_two_modes`:
    all 0 unless BIC prefers two components and Ashman's D > 2)."""
    return fit_two_modes(scores, seed).posterior


def check_ood_fit(fit: TwoModeFit, label_quality: np.ndarray) -> str:
    """Why the OOD-score fit `fit` must not decide ("" when it may): see the module docstring.

    Args:
        fit: `fit_two_modes` of the OOD scores.
        label_quality: (N,) the given label's share of each sample's neighbour vote.
    """
    if not fit.used:
        return fit.reason
    if fit.dip > MAX_DIP:
        return (
            f"the OOD scores have no dip between the fitted modes (the fitted density falls only to {fit.dip:.2f} of "
            f"its lower peak; separated modes fall to {MAX_DIP} or less): one skewed mode, not two"
        )
    share = fit.flagged_share
    if max(share, fit.weight) > 0.5:
        return (
            f"the fit would call {share:.0%} of the samples OOD (its OOD mode weighs {fit.weight:.0%}): OOD must be a "
            "minority, since the neighbour vote behind the OOD score assumes most neighbours are in distribution"
        )
    flagged = fit.posterior > 0.5
    confirmed = float((np.asarray(label_quality)[flagged] >= 0.5).mean()) if flagged.any() else 0.0
    if confirmed > 0.5:
        return (
            f"{confirmed:.0%} of the samples the fit would call OOD have neighbours that give their label at least half "
            "of the vote, which an OOD image, with no right label, cannot have"
        )
    return ""


def fallback_ood(ood_score: np.ndarray) -> np.ndarray:
    """(N,) bool: the conservative OOD rule used when the fit is not trusted (`FALLBACK_OOD_RULE`); it never flags
    more than `FALLBACK_MAX_SHARE` of the samples."""
    ood_score = np.asarray(ood_score)
    candidates = np.flatnonzero(ood_score >= FALLBACK_OOD_SCORE)
    limit = int(FALLBACK_MAX_SHARE * len(ood_score))
    # Highest scores first; ties broken by position (a stable sort), so the rule is deterministic.
    kept = candidates[np.argsort(-ood_score[candidates], kind="stable")[:limit]]
    flagged = np.zeros(len(ood_score), dtype=bool)
    flagged[kept] = True
    return flagged


def confident_labels(
    evidence: np.ndarray, labels: np.ndarray, considered: np.ndarray, chunk_size: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """The class each sample confidently belongs to, by confident learning's per-class thresholds.

    Args:
        evidence: (N, K) class evidence (here the neighbours' label vote; rows sum to 1).
        labels: (N,) given labels.
        considered: (N,) bool, the samples that set the thresholds and get a class (those not called OOD).
        chunk_size: rows compared at a time (the temporaries are chunk_size x K, not N x K: 2.4M x 1,000 at WebVision).

    Returns:
        confident (N,) int64: the class of highest evidence among those whose evidence reaches their threshold; -1
        where none does or the sample is not considered. thresholds (K,): the mean evidence for each class over the
        considered samples given it (inf for a class none of them is given: no sample is confidently of it).
    """
    evidence, labels, considered = np.asarray(evidence), np.asarray(labels), np.asarray(considered, dtype=bool)
    num_classes = evidence.shape[1]
    own = evidence[np.arange(len(labels)), labels].astype(np.float64)  # each sample's evidence for its given label
    counts = np.bincount(labels[considered], minlength=num_classes)
    sums = np.bincount(labels[considered], weights=own[considered], minlength=num_classes)
    thresholds = np.full(num_classes, np.inf)
    thresholds[counts > 0] = sums[counts > 0] / counts[counts > 0]
    # Zero evidence is no evidence, even for a class whose own samples get none (threshold 0). The tolerance: the vote
    # is float32, and samples whose neighbours all agree sit at the mean up to rounding (1 - 6e-8 vs 1).
    reach = thresholds - 1e-6
    confident = np.full(len(labels), -1, dtype=np.int64)
    for start in range(0, len(labels), chunk_size):
        block = evidence[start : start + chunk_size]  # (B, K)
        above = (block >= reach) & (block > 0)
        best = np.where(above, block, -1).argmax(1)
        confident[start : start + chunk_size] = np.where(above.any(1), best, -1)
    confident[~considered] = -1
    return confident, thresholds


class ScoredSamples(dict):
    """`noise_scores`' per-sample arrays by name, with what stands behind the decisions as attributes.

    Attributes:
        ood_fit: `TwoModeFit` of the OOD scores.
        ood_fallback_reason: why the OOD decisions come from `FALLBACK_OOD_RULE` ("" when from the fit).
        label_thresholds: (K,) confident learning's per-class thresholds (`confident_labels`).
        label_issue_share: the share of all samples whose confident class is not their given label.
        relabel_refused_reason: why nothing is relabelled ("" otherwise).
        label_evidence: what the label decisions read: `EVIDENCE_COMBINED`, `EVIDENCE_TRAINING` or
            `EVIDENCE_NEIGHBOURS`.
        label_evidence_note: why not the training record, when it was not used ("" otherwise; set by the report).
    """

    ood_fit: TwoModeFit
    ood_fallback_reason: str
    label_thresholds: np.ndarray
    label_issue_share: float
    relabel_refused_reason: str
    label_evidence: str = ""
    label_evidence_note: str = ""


def fitted_decisions(
    evidence: np.ndarray, ood_score: np.ndarray, labels: np.ndarray, seed: int = 0, source: str = "the neighbour vote"
) -> ScoredSamples:
    """The decisions from the data's own scores: OOD by the OOD-score fit when `check_ood_fit` passes it, else by
    the fallback rule; relabelled to the class the sample confidently belongs to (`confident_labels`, over the samples
    not called OOD) when that is not its given label, unless that would relabel more than `MAX_RELABEL_SHARE` of the
    samples (then nothing is); else clean.

    Args:
        evidence: (N, K) class evidence (the training record's mean probabilities, or the neighbours' label vote);
            its entry for the given label is the label quality. ood_score: (N,). labels: (N,) the given labels.
        source: the evidence, as the refusal's sentence names it.

    Returns:
        `confident_label` (-1: no class), `ood_probability` (the fit's posterior; 0 where the fit is not used),
        `decision` (indices into DECISIONS) and `suggested_label` (the confident class for relabelled samples, else
        the given label), with what stands behind them (`ScoredSamples`).
    """
    evidence, ood_score, labels = np.asarray(evidence), np.asarray(ood_score), np.asarray(labels).astype(np.int64)
    label_quality = evidence[np.arange(len(labels)), labels]
    ood_fit = fit_two_modes(ood_score, seed)
    reason = check_ood_fit(ood_fit, label_quality)
    ood = fallback_ood(ood_score) if reason else ood_fit.posterior > 0.5
    # OOD images carry random labels: they would pull every class's threshold down, so they set none.
    confident, thresholds = confident_labels(evidence, labels, ~ood)
    relabel = (confident >= 0) & (confident != labels)
    issue_share = float(relabel.mean()) if len(relabel) else 0.0
    refused = ""
    if issue_share > MAX_RELABEL_SHARE:
        refused = (
            f"confident learning on {source} would relabel {issue_share:.0%} of the samples, more than "
            f"{MAX_RELABEL_SHARE:.0%}: more than wrong labels and the images a good model confuses can explain, "
            "so the evidence is taken to be near chance and nothing is relabelled"
        )
        relabel = np.zeros_like(relabel)
    decision = np.where(ood, DECISIONS.index("ood"), np.where(relabel, DECISIONS.index("relabelled"), 0))
    # An untrusted fit's posterior is not a decision: the column reads 0, as for a fit that found one mode.
    ood_probability = np.zeros(len(ood_score)) if reason else ood_fit.posterior
    # Only a relabelled sample gets another class; every other keeps its given label (`pseudo_label.json`).
    out = ScoredSamples(
        confident_label=confident, ood_probability=ood_probability, decision=decision,
        suggested_label=np.where(relabel, confident, labels),
    )  # fmt: skip
    out.ood_fit, out.ood_fallback_reason, out.relabel_refused_reason = ood_fit, reason, refused
    out.label_thresholds, out.label_issue_share = thresholds, issue_share
    return out


@torch.no_grad()
def noise_scores(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    num_classes: int,
    temperature: float = 0.1,
    num_neighbours: int = 50,
    max_reference: int | None = 200_000,
    seed: int = 0,
    training_evidence: np.ndarray | None = None,
    combine: bool = True,
) -> ScoredSamples:
    """Scores, suggested labels and fitted decisions of every sample (`fitted_decisions`).

    Args:
        embeddings: (N, D) L2-normalised embeddings (a tensor on a GPU runs the neighbour search there).
        labels: (N,) given labels in [0, num_classes).
        num_classes: K.
        temperature: of the neighbour weights exp(cosine / T) (the model's `config.temperature`).
        num_neighbours: k of the neighbour vote.
        max_reference: see `nearest_neighbours`.
        training_evidence: (N, K) class evidence from the training run (`modeling_mopro.sample_dynamics`' mean
            probabilities before correction; NaN rows: not recorded, the vote alone): the label quality and the
            label decisions read its mean with the neighbour vote (`combine`), or it alone; the OOD score stays the
            vote's entropy. None: the vote alone.

    Returns:
        numpy arrays: `label_quality` (N,) in [0, 1], `ood_score` (N,) in [0, 1], `suggested_label` (N,) (the
        confident class for relabelled samples, the given label otherwise), `class_evidence` (N, K),
        `confident_label`, `ood_probability` and `decision` (N,) indices into DECISIONS (`fitted_decisions`); what
        stands behind them as attributes (`ScoredSamples`).
    """
    embeddings = torch.as_tensor(embeddings).float()
    labels = torch.as_tensor(labels).long().to(embeddings.device)
    similarities, neighbours = nearest_neighbours(embeddings, num_neighbours, max_reference, seed)
    # The project's one kNN vote, the one the `queue_vote` training rule uses over the queue's keys.
    evidence = neighbour_label_vote(similarities, labels[neighbours], num_classes, temperature)  # (N, K)

    entropy = -(evidence * evidence.clamp_min(1e-12).log()).sum(1)
    ood_score = (entropy / (math.log(num_classes) if num_classes > 1 else 1.0)).cpu().numpy()

    evidence = evidence.cpu().numpy()
    kind = EVIDENCE_NEIGHBOURS
    if training_evidence is not None:
        training_evidence = np.asarray(training_evidence, dtype=np.float32)
        if training_evidence.shape != (len(labels), num_classes):
            raise ValueError(
                f"training_evidence must be ({len(labels)}, {num_classes}), got {training_evidence.shape}"
            )
        # Two estimates of p(class | image) that fail in different places (module docstring): their mean. Rows
        # the record does not hold (NaN) keep the vote.
        missing = np.isnan(training_evidence).any(1, keepdims=True)
        training_evidence = np.where(missing, evidence, training_evidence)
        evidence = (evidence + training_evidence) / 2 if combine else training_evidence
        kind = EVIDENCE_COMBINED if combine else EVIDENCE_TRAINING
    labels = labels.cpu().numpy()
    scored = fitted_decisions(evidence, ood_score, labels, seed, _EVIDENCE_PHRASES[kind])
    label_quality = evidence[np.arange(len(labels)), labels]
    scored.update(label_quality=label_quality, ood_score=ood_score, class_evidence=evidence)
    scored.label_evidence = kind
    return scored


__all__ = [
    "DECISIONS",
    "EVIDENCE_COMBINED",
    "EVIDENCE_NEIGHBOURS",
    "EVIDENCE_TRAINING",
    "FALLBACK_MAX_SHARE",
    "FALLBACK_OOD_RULE",
    "FALLBACK_OOD_SCORE",
    "MAX_DIP",
    "MAX_RELABEL_SHARE",
    "ScoredSamples",
    "TwoModeFit",
    "check_ood_fit",
    "confident_labels",
    "fallback_ood",
    "fit_two_modes",
    "fitted_decisions",
    "nearest_neighbours",
    "noise_scores",
    "two_mode_posterior",
]
