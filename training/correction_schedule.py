"""When noise correction runs, and how hard: the official fixed epoch, or a start gated on the model's own signals.

The official schedule switches correction on at a fixed epoch (`start_clean_epoch` 11 of 90) at full strength. At
WebVision scale that epoch comes late enough; on smaller data the classifier and the prototypes may still disagree
then, and a correction that starts from a weak model relabels and drops by its own mistakes, then keeps confirming
them, since a dropped sample's label is never learned again (BENCHMARKS.md, "Regime grid").

`AdaptiveCorrectionSchedule` reads signals that every training step already computes, over each epoch (no ground
truth, no extra pass):
    agreement  = share of samples whose classifier argmax equals their nearest prototype
    fit        = share of samples whose classifier argmax equals their given label
    chance_fit = the fit that the epoch's class shares alone would give, sum_k P(argmax = k) * P(given label = k)
and starts correction at the first epoch boundary, not before `earliest_epoch`, where
    (1) agreement >= `min_agreement`: the soft label averages two heads; where they disagree it is a coin toss
        between them, not a consensus, and the prototypes (EMAs) lag the classifier for epochs on small data;
    (2) fit rose by less than `plateau_tolerance` over the epoch: the early-learning phase is over (the clean
        majority is learnt); past it, a network starts to fit the wrong labels, and correction then has the most to
        save and the most reliable model to decide with;
    (3) (fit - chance_fit) / (1 - chance_fit) >= `min_fit_beyond_chance` (Cohen's kappa of the classifier against
        the given labels): the model has learnt the classes. A model that predicts one class for every sample meets
        (1) and (2) at once, its two heads agreeing on that class and its fit flat at that class's share; started
        there, correction drops and relabels by a guess (seen on 32-px photos: 92% agreement at 12% fit, 10
        classes, the model then stuck near chance; BENCHMARKS.md, "The small-image rule").
From the start, the strength s grows linearly from 0 to 1 over `ramp_epochs`. At strength s a sample is relabelled
when its top soft score exceeds 1 - s (1 - threshold), and is out-of-distribution when its given label's score is at
most s / K: the decisions with the widest margin are taken first, and the official rule holds from s = 1 on.

Both schedules are pure: `strength(epoch)` from their state, `end_epoch(...)` to feed an epoch's signals, and
`state_dict()` / `load_state_dict()` for checkpoints (the Trainer saves them, so a resumed run decides the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from modeling_mopro import MoProPhase

SCHEDULES = ("fixed", "adaptive")


def epoch_reached(epoch: float, start: float) -> bool:
    """Whether `epoch` (global step / steps per epoch) has reached `start`; float step counts: 10.999999 is 11."""
    return epoch + 1e-9 >= start


def whole_epochs(epoch: float) -> int:
    """The 0-indexed epoch that `epoch` lies in, by `epoch_reached`'s rule."""
    return int(epoch + 1e-9)


def phase_for_epoch(epoch: float, prototype_start_epoch: float, noise_correction_start_epoch: float) -> MoProPhase:
    """The official schedule: `is_proto = epoch >= 1`, `is_clean = epoch >= start_clean_epoch` (0-indexed)."""
    if epoch_reached(epoch, noise_correction_start_epoch):
        return MoProPhase.NOISE_CORRECTION
    if epoch_reached(epoch, prototype_start_epoch):
        return MoProPhase.PROTOTYPES
    return MoProPhase.WARMUP


def fit_beyond_chance(fit: float, chance_fit: float) -> float:
    """Cohen's kappa: how far `fit` is from `chance_fit` towards 1 (0 at chance, 1 a perfect fit)."""
    return (fit - chance_fit) / (1.0 - chance_fit) if chance_fit < 1.0 else 0.0


def chance_fit(predicted_counts, label_counts) -> float | None:
    """sum_k P(argmax = k) P(label = k) from two per-class counts of one epoch; None where either is empty."""
    total_predicted, total_labels = sum(predicted_counts), sum(label_counts)
    if total_predicted <= 0 or total_labels <= 0:
        return None
    return sum(p * q for p, q in zip(predicted_counts, label_counts, strict=True)) / (total_predicted * total_labels)


@dataclass
class FixedCorrectionSchedule:
    """The official schedule: full-strength correction from `start_epoch` (0-indexed) on."""

    start_epoch: float

    def strength(self, epoch: float) -> float:
        return 1.0 if epoch_reached(epoch, self.start_epoch) else 0.0

    def end_epoch(self, epoch: int, agreement: float, fit: float, chance_fit: float | None = None) -> None:
        """Signals do not move a fixed schedule."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class AdaptiveCorrectionSchedule:
    """Correction that starts when the classifier and the prototypes agree and learning has plateaued, then ramps.

    Args:
        earliest_epoch: no correction before this epoch (0-indexed; at least one epoch after the prototype loss
            starts, so that the prototypes exist).
        min_agreement: the share of training samples on which classifier and nearest prototype must agree.
        min_fit_beyond_chance: the least Cohen's kappa of the classifier's argmax against the given labels.
        plateau_tolerance: the largest rise of the fit to the given labels over one epoch that counts as a plateau.
        ramp_epochs: epochs from the start to full strength (0: full strength at once).
        start_epoch: the decided start (`None` until the signals allow it); set to force a start.
        history: the signals fed so far, one dict per epoch (kept in checkpoints and logs).
    """

    earliest_epoch: float
    min_agreement: float = 0.6
    min_fit_beyond_chance: float = 0.1
    plateau_tolerance: float = 0.01
    ramp_epochs: float = 4.0
    start_epoch: float | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        # The run's flags are checked here too (`MoProTrainingArguments`): the message names both.
        for name in ("min_agreement", "min_fit_beyond_chance"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} (`correction_{name}`) must be in [0, 1], got {getattr(self, name)}.")
        for name in ("plateau_tolerance", "ramp_epochs"):
            if getattr(self, name) < 0 or math.isnan(getattr(self, name)):
                raise ValueError(f"{name} (`correction_{name}`) must be >= 0, got {getattr(self, name)}.")

    def strength(self, epoch: float) -> float:
        if self.start_epoch is None or not epoch_reached(epoch, self.start_epoch):
            return 0.0
        # Linear from 1 / (ramp + 1) at the start to 1 at `ramp_epochs` after it (at once for a ramp of 0).
        return min((epoch - self.start_epoch + 1.0) / (self.ramp_epochs + 1.0), 1.0)

    def end_epoch(self, epoch: int, agreement: float, fit: float, chance_fit: float | None = None) -> None:
        """Feed the signals of finished epoch `epoch` (0-indexed); may decide to start at `epoch + 1`. `chance_fit`
        None (an epoch whose class shares were not counted): condition (3) reads the fit itself, kappa at chance 0."""
        previous_fit = self.history[-1]["fit"] if self.history else None
        self.history.append({"epoch": epoch, "agreement": agreement, "fit": fit, "chance_fit": chance_fit})
        if self.start_epoch is not None or epoch + 1 < self.earliest_epoch or previous_fit is None:
            return
        learnt = fit_beyond_chance(fit, chance_fit or 0.0) >= self.min_fit_beyond_chance
        if agreement >= self.min_agreement and fit - previous_fit < self.plateau_tolerance and learnt:
            self.start_epoch = float(epoch + 1)

    def state_dict(self) -> dict:
        return {"start_epoch": self.start_epoch, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.start_epoch = state.get("start_epoch")
        self.history = list(state.get("history", []))


__all__ = [
    "SCHEDULES",
    "AdaptiveCorrectionSchedule",
    "FixedCorrectionSchedule",
    "chance_fit",
    "fit_beyond_chance",
    "phase_for_epoch",
]
