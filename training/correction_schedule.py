"""When noise correction runs, and how hard: the official fixed epoch, or a start gated on the model's own signals.

The official schedule switches correction on at a fixed epoch (`start_clean_epoch` 11 of 90) at full strength. At
WebVision scale that epoch comes late enough; on smaller data the classifier and the prototypes may still disagree
then, and a correction that starts from a weak model relabels and drops by its own mistakes, then keeps confirming
them, since a dropped sample's label is never learned again (BENCHMARKS.md, "Regime grid").

`AdaptiveCorrectionSchedule` reads two signals that every training step already computes, averaged over each epoch
(no ground truth, no extra pass):
    agreement  = share of samples whose classifier argmax equals their nearest prototype
    fit        = share of samples whose classifier argmax equals their given label
and starts correction at the first epoch boundary, not before `earliest_epoch`, where
    (1) agreement >= `min_agreement`: the soft label averages two heads; where they disagree it is a coin toss
        between them, not a consensus, and the prototypes (EMAs) lag the classifier for epochs on small data;
    (2) fit rose by less than `plateau_tolerance` over the epoch: the early-learning phase is over (the clean
        majority is learnt); past it, a network starts to fit the wrong labels, and correction then has the most to
        save and the most reliable model to decide with.
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


@dataclass
class FixedCorrectionSchedule:
    """The official schedule: full-strength correction from `start_epoch` (0-indexed) on."""

    start_epoch: float

    def strength(self, epoch: float) -> float:
        return 1.0 if epoch_reached(epoch, self.start_epoch) else 0.0

    def end_epoch(self, epoch: int, agreement: float, fit: float) -> None:
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
        plateau_tolerance: the largest rise of the fit to the given labels over one epoch that counts as a plateau.
        ramp_epochs: epochs from the start to full strength (0: full strength at once).
        start_epoch: the decided start (`None` until the signals allow it); set to force a start.
        history: the signals fed so far, one dict per epoch (kept in checkpoints and logs).
    """

    earliest_epoch: float
    min_agreement: float = 0.6
    plateau_tolerance: float = 0.01
    ramp_epochs: float = 4.0
    start_epoch: float | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        # The run's flags are checked here too (`MoProTrainingArguments`): the message names both.
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(
                f"min_agreement (`correction_min_agreement`) must be in [0, 1], got {self.min_agreement}."
            )
        for name in ("plateau_tolerance", "ramp_epochs"):
            if getattr(self, name) < 0 or math.isnan(getattr(self, name)):
                raise ValueError(f"{name} (`correction_{name}`) must be >= 0, got {getattr(self, name)}.")

    def strength(self, epoch: float) -> float:
        if self.start_epoch is None or not epoch_reached(epoch, self.start_epoch):
            return 0.0
        # Linear from 1 / (ramp + 1) at the start to 1 at `ramp_epochs` after it (at once for a ramp of 0).
        return min((epoch - self.start_epoch + 1.0) / (self.ramp_epochs + 1.0), 1.0)

    def end_epoch(self, epoch: int, agreement: float, fit: float) -> None:
        """Feed the signals of finished epoch `epoch` (0-indexed); may decide to start at `epoch + 1`."""
        previous_fit = self.history[-1]["fit"] if self.history else None
        self.history.append({"epoch": epoch, "agreement": agreement, "fit": fit})
        if self.start_epoch is not None or epoch + 1 < self.earliest_epoch or previous_fit is None:
            return
        if agreement >= self.min_agreement and fit - previous_fit < self.plateau_tolerance:
            self.start_epoch = float(epoch + 1)

    def state_dict(self) -> dict:
        return {"start_epoch": self.start_epoch, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.start_epoch = state.get("start_epoch")
        self.history = list(state.get("history", []))


__all__ = ["SCHEDULES", "AdaptiveCorrectionSchedule", "FixedCorrectionSchedule", "phase_for_epoch"]
