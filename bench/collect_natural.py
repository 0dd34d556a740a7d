"""Collects the natural-image benchmark's runs into the committed result file its tables are rendered from.

    python bench/collect_natural.py --commit COMMIT --load "two lanes of one thread, load 2-4 on 2 cores"
    python bench/collect_natural.py --rows own_length_ce own_length_mopro_adaptive --load "..."   # add rows
    python bench/render_benchmarks.py          # then: the tables of BENCHMARKS.md and the plot

Reads what `bench/natural_benchmark.py run` leaves under `--results_dir` (default `bench/results/natural`, which git
ignores):
- `accuracy/<setting>_s<seed>/<method>/all_results.json` (final clean test accuracy `eval_accuracy`, the adaptive
  schedule's `train_noise_correction_start_epoch`) and `trainer_state.json` (the per-epoch `eval_accuracy`, for the
  best epoch);
- `detection/<setting>/scores.json`, written by `bench/label_noise_benchmark.py report` per setting: per detector
  and seed, the noise report's or cleanlab's decisions scored against the ground truth.
and writes `--output` (default `bench/results-committed/natural_benchmark.json`) in the schema documented in
`bench/render_benchmarks.py`. A run that is not finished (no `all_results.json`, or a setting whose report is not
made yet) is recorded as `null`, so the tables show it as missing.

With `--rows`, only those rows (methods) are read, and their finished cells are written into the existing `--output`,
every other cell kept as it is: rows run later (a new version of a recipe) join the table without the other rows' run
folders, and the addition is stamped in `_run["added"]` (its commit, dates, load and command) beside the first stamp.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.environment import head_commit, machine_info  # noqa: E402
from bench.natural_benchmark import (  # noqa: E402
    ACCURACY_METHODS,
    ADDED_METHODS,
    EPOCHS,
    OWN_DATA_METHODS,
    OWN_DATA_SETTINGS,
    OWN_DATA_VERSIONS,
    SEEDS,
)
from bench.natural_data import SETTINGS  # noqa: E402

DETECTION_KEYS = ("label_error_precision", "label_error_recall", "label_error_f1", "label_quality_auroc", "ood_auroc")


def accuracy_cell(run_dir: Path) -> dict | None:
    """Final and best-epoch clean test accuracy of one finished `run_mopro.py` run; None if it is not finished."""
    results_file = run_dir / "all_results.json"
    if not results_file.is_file():
        return None
    results = json.loads(results_file.read_text())
    evaluations = []
    state_file = run_dir / "trainer_state.json"
    if state_file.is_file():
        history = json.loads(state_file.read_text())["log_history"]
        evaluations = [(entry["eval_accuracy"], entry.get("epoch")) for entry in history if "eval_accuracy" in entry]
    best, best_epoch = max(evaluations, key=lambda item: item[0], default=(results["eval_accuracy"], None))
    start = results.get("train_noise_correction_start_epoch")
    return {
        "final": results["eval_accuracy"],
        "best": max(best, results["eval_accuracy"]),
        "best_epoch": None if best_epoch is None else round(best_epoch),
        "correction_start_epoch": None if start is None or start < 0 else round(start),
        "epochs": round(results["epoch"]) if "epoch" in results else None,
    }


def detection_cells(setting_dir: Path, seeds) -> dict:
    """Per detector and seed, the scores of `label_noise_benchmark.py report` (`scores.json`); {} if not made."""
    scores_file = setting_dir / "scores.json"
    if not scores_file.is_file():
        return {}
    out = {}
    for detector, by_seed in json.loads(scores_file.read_text()).items():
        out[detector] = {}
        for seed in seeds:
            summary = by_seed.get(str(seed))
            if summary is None:
                out[detector][str(seed)] = None
                continue
            cell = {key: summary.get(key) for key in DETECTION_KEYS}
            cell["fraction_flagged"] = 1 - summary["fraction_clean"]
            precision, recall = summary.get("label_error_precision"), summary.get("label_error_recall")
            # flagged / truly wrong = (TP / precision) / (TP / recall) = recall / precision
            cell["flagged_vs_true"] = recall / precision if precision and recall else None
            out[detector][str(seed)] = cell
    return out


def methods_of(setting: str) -> list[str]:
    """The accuracy rows the protocol runs on `setting`: the demo-recipe rows, the added correction, and the own-data
    recipe's rows (each version) on the settings it is compared on."""
    own = [f"{v}_{m}" for v in OWN_DATA_VERSIONS for m in OWN_DATA_METHODS] if setting in OWN_DATA_SETTINGS else []
    return [*ACCURACY_METHODS, *ADDED_METHODS, *own]


def collect(
    results_dir: Path, commit: str, load: str, command: str, settings=SETTINGS, seeds=SEEDS, rows=None
) -> dict:
    """The result file's content from the run folders (only the accuracy rows in `rows`, when given)."""
    accuracy: dict = {}
    finished = []
    for setting in settings:
        accuracy[setting] = {}
        for seed in seeds:
            accuracy[setting][str(seed)] = {}
            for method in [m for m in methods_of(setting) if rows is None or m in rows]:
                run_dir = results_dir / "accuracy" / f"{setting}_s{seed}" / method
                accuracy[setting][str(seed)][method] = accuracy_cell(run_dir)
                if (run_dir / "all_results.json").is_file():
                    finished.append((run_dir / "all_results.json").stat().st_mtime)
    detection = {setting: detection_cells(results_dir / "detection" / setting, seeds) for setting in settings}

    def day(stamp: float) -> str:
        return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).date().isoformat()

    return {
        "_run": {
            "command": "python bench/natural_benchmark.py run --lanes 2",
            "collected_by": command,
            "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "run_dates": [day(min(finished)), day(max(finished))] if finished else ["none finished"],
            "machine": machine_info(),
            "load": load,
        },
        "settings": list(settings),
        "seeds": list(seeds),
        "methods": list(dict.fromkeys(m for setting in settings for m in methods_of(setting))),
        "epochs": EPOCHS,
        "accuracy": accuracy,
        "detection": detection,
    }


def add_rows(previous: dict, fresh: dict, rows: list[str]) -> int:
    """Writes `fresh`'s finished cells of `rows` into `previous` (every other cell kept) and stamps the addition in
    `previous["_run"]["added"]`; returns how many cells it wrote."""
    written = 0
    for setting, by_seed in fresh["accuracy"].items():
        for seed, cells in by_seed.items():
            for method, cell in cells.items():
                kept = previous["accuracy"][setting][seed]
                if cell is not None or method not in kept:  # a finished cell is never replaced by a missing one
                    kept[method] = cell
                    written += cell is not None
    for method in rows:  # a row new to the file is appended to its list of rows (the table shows it last)
        if method not in previous["methods"]:
            previous["methods"].append(method)
    stamp = {key: fresh["_run"][key] for key in ("commit", "date", "run_dates", "machine", "load", "collected_by")}
    previous["_run"].setdefault("added", []).append({"rows": list(rows), **stamp})
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_dir", type=Path, default=ROOT / "bench" / "results" / "natural")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results-committed" / "natural_benchmark.json")
    parser.add_argument("--commit", default=None, help="the commit the runs were made at (default: this checkout's)")
    parser.add_argument("--load", required=True, help="how the machine was shared while the runs ran, in words")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="add only these rows to the existing --output")
    args = parser.parse_args(argv)
    if not (args.results_dir / "accuracy").is_dir():
        print(
            f"error: {args.results_dir} holds no accuracy/ folder of `bench/natural_benchmark.py run`", file=sys.stderr
        )
        return 2
    commit = args.commit or head_commit()
    command = " ".join(["python", "bench/collect_natural.py", *(argv if argv is not None else sys.argv[1:])])
    if args.rows:
        known = {m for setting in SETTINGS for m in methods_of(setting)}
        unknown = [row for row in args.rows if row not in known]
        if unknown or not args.output.is_file():
            what = (
                f"unknown row(s) {', '.join(unknown)}" if unknown else f"{args.output} does not exist to add rows to"
            )
            print(f"error: --rows: {what}", file=sys.stderr)
            return 2
        result = json.loads(args.output.read_text())
        written = add_rows(result, collect(args.results_dir, commit, args.load, command, rows=args.rows), args.rows)
        print(f"added {written} finished cells of {', '.join(args.rows)}")
    else:
        result = collect(args.results_dir, commit, args.load, command)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    missing = sum(cell is None for s in result["accuracy"].values() for seed in s.values() for cell in seed.values())
    print(f"wrote {args.output} ({missing} accuracy runs missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
