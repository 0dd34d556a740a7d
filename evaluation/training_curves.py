"""A MoPro run as one picture: `training_curves.png` from the Trainer's `trainer_state.json`.

Four panels against the epoch: the clean (evaluation) accuracy at each evaluation; the loss components (total,
cross-entropy, instance and prototypical contrastive); the fractions of the training samples kept, relabelled and
dropped as out-of-distribution; and the signals the correction schedule reads (classifier-prototype agreement, fit
to the given labels) with its strength. A dashed line marks where noise correction starts. Training values are the
`MoProTrainer` logs (means over each logging window, plotted at the window's end), so the x axis is the fractional
epoch; a plain CE run has no contrastive losses or schedule signals and shows what it logged.

`training/run_mopro.py` writes the picture at the end of every run; for any run folder (or a `trainer_state.json`):

    python -m evaluation.training_curves OUT [--output OUT/training_curves.png]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CURVES_FILE = "training_curves.png"
STATE_FILE = "trainer_state.json"
# The Trainer's end-of-training metrics: where `MoProTrainer` records when correction started.
RESULT_FILES = ("train_results.json", "all_results.json")
START_KEY = "train_noise_correction_start_epoch"

LOSSES = (("loss", "total"), ("loss_cls", "cross-entropy"), ("loss_instance", "instance"),
          ("loss_prototype", "prototypical"))  # fmt: skip
FRACTIONS = (("fraction_kept", "kept"), ("fraction_relabeled", "relabelled"), ("fraction_ood", "OOD (dropped)"))
SIGNALS = (("classifier_prototype_agreement", "classifier = prototype"), ("fit_given_labels", "fits given label"),
           ("correction_strength", "correction strength"))  # fmt: skip


@dataclass
class TrainingCurves:
    """The series of a run's log history: name -> (epochs, values); `correction_start` in epochs, or None."""

    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    correction_start: float | None = None

    def has(self, name: str) -> bool:
        return bool(self.series.get(name, ((), ()))[0])


def read_training_curves(state: Mapping, results: Mapping | None = None) -> TrainingCurves:
    """The curves of a `trainer_state.json` (and the run's results, for the correction start).

    The correction start is the run's recorded `train_noise_correction_start_epoch` when known, else the epoch of
    the last log before the first one with a positive `correction_strength` (resolution: one logging window).
    """
    history = state.get("log_history")
    if not isinstance(history, list):
        raise ValueError("the trainer state has no `log_history` list: is it a Trainer's trainer_state.json?")
    curves = TrainingCurves()
    names = [name for name, _ in LOSSES + FRACTIONS + SIGNALS] + ["eval_accuracy"]
    last_epoch_before, first_corrected = 0.0, None
    for entry in history:
        epoch = entry.get("epoch")
        if not isinstance(epoch, (int, float)):
            continue
        for name in names:
            value = entry.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                epochs, values = curves.series.setdefault(name, ([], []))
                epochs.append(float(epoch))
                values.append(float(value))
        strength = entry.get("correction_strength")
        if isinstance(strength, (int, float)) and first_corrected is None:
            if strength > 0:
                first_corrected = last_epoch_before
            else:
                last_epoch_before = float(epoch)
    recorded = (results or {}).get(START_KEY)
    if isinstance(recorded, (int, float)) and math.isfinite(recorded):
        curves.correction_start = float(recorded) if recorded >= 0 else None  # -1: correction never began
    else:
        curves.correction_start = first_corrected
    return curves


def _run_files(path: Path) -> tuple[Path, dict | None]:
    """`trainer_state.json` of a run folder (or the file itself) and the run's end-of-training results, if any."""
    state_path = path / STATE_FILE if path.is_dir() else path
    if not state_path.is_file():
        raise FileNotFoundError(
            f"{path} has no {STATE_FILE}: give a folder written by training/run_mopro.py (or the Trainer), or the file"
        )
    results = None
    for name in RESULT_FILES:
        candidate = state_path.parent / name
        if candidate.is_file():
            results = json.loads(candidate.read_text())
            if START_KEY in results:
                break
    return state_path, results


def plot_training_curves(run: str | Path, output: str | Path | None = None, title: str | None = None) -> Path:
    """Draws `training_curves.png` for a run folder (or its `trainer_state.json`) and returns its path.

    Args:
        run: the run's output folder, or a `trainer_state.json`.
        output: where to write the PNG (default: `training_curves.png` beside the trainer state).
        title: the figure's title (default: the run folder's name).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    state_path, results = _run_files(Path(run))
    try:
        state = json.loads(state_path.read_text())
    except ValueError as error:
        raise ValueError(f"{state_path} is not JSON: {error}") from error
    curves = read_training_curves(state, results)
    if not any(curves.has(name) for name in curves.series):
        raise ValueError(f"{state_path} logs none of the curves (no training or evaluation logs with an epoch)")
    output = Path(output) if output is not None else state_path.parent / CURVES_FILE

    figure = Figure(figsize=(11, 7), dpi=80)
    FigureCanvasAgg(figure)
    panels = figure.subplots(2, 2, sharex=True)
    accuracy, losses, fractions, signals = panels.ravel()
    if curves.has("eval_accuracy"):
        epochs, values = curves.series["eval_accuracy"]
        scale = 100.0 if max(values) <= 1.0 else 1.0  # the Trainer logs [0, 1]
        accuracy.plot(epochs, [v * scale for v in values], "o-", color="tab:blue", markersize=3)
        best = max(range(len(values)), key=values.__getitem__)
        accuracy.annotate(f"best {values[best] * scale:.1f}% (epoch {epochs[best]:g})",
                          (epochs[best], values[best] * scale), textcoords="offset points", xytext=(-60, -14),
                          fontsize=8)  # fmt: skip
    else:
        accuracy.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=accuracy.transAxes)
    accuracy.set_title("clean accuracy (evaluation set)")
    accuracy.set_ylabel("%")
    for axes, group, title_text, ylabel in (
        (losses, LOSSES, "loss components (training)", "loss"),
        (fractions, FRACTIONS, "training samples: kept / relabelled / OOD", "fraction"),
        (signals, SIGNALS, "correction schedule: agreement, fit, strength", "fraction"),
    ):
        drawn = False
        for name, label in group:
            if curves.has(name):
                axes.plot(*curves.series[name], label=label, linewidth=1.2)
                drawn = True
        if drawn:
            axes.legend(fontsize=8, loc="best")
        else:
            axes.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=axes.transAxes)
        axes.set_title(title_text)
        axes.set_ylabel(ylabel)
    for axes in (fractions, signals):
        axes.set_ylim(-0.02, 1.02)
    for axes in panels.ravel():
        axes.grid(alpha=0.3)
        if curves.correction_start is not None:
            axes.axvline(curves.correction_start, color="black", linestyle="--", linewidth=1)
    for axes in panels[1]:
        axes.set_xlabel("epoch")
    if curves.correction_start is not None:
        signals.annotate(f"correction starts (epoch {curves.correction_start:g})", (curves.correction_start, 1.0),
                         textcoords="offset points", xytext=(4, -12), fontsize=8)  # fmt: skip
    figure.suptitle(title or f"MoPro run {state_path.parent.resolve().name}")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(output), format="png")
    return output


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run's output folder (or its trainer_state.json)")
    parser.add_argument("--output", default=None, help=f"the PNG to write (default: RUN/{CURVES_FILE})")
    parser.add_argument("--title", default=None, help="figure title (default: the run folder's name)")
    args = parser.parse_args(argv)
    path = plot_training_curves(args.run, args.output, args.title)
    print(f"wrote {path}")
    return path


__all__ = ["CURVES_FILE", "TrainingCurves", "plot_training_curves", "read_training_curves"]

if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
