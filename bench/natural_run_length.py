"""The own-data recipe at 3x its epochs on the natural benchmark: is the run's length what keeps it weak? (issue 24)

A test of a suspected cause, not a choice: no default moved on these runs. Per setting S and seed N (120 epochs,
learning-rate steps at 54 and 108: the recipe's 18 and 36 of 40, scaled), B=bench/data/natural/built:

    python training/run_mopro.py --train_dir $B/${S}_s$N/train --validation_dir $B/${S}_s$N/test --seed $N \\
        --dataloader_num_workers 1 --num_train_epochs 120 --lr_milestones 54 108 --save_strategy no \\
        [--baseline ce] --output_dir RUNS/${S}_s${N}_own120_{ce,mopro}
    python bench/natural_run_length.py --runs RUNS --out bench/results-committed/natural_run_length.json

With ``--dev``, the runs that chose the own-data recipe's length rule (`training.own_data.MIN_TRAIN_STEPS`) on the
natural development pool (``natural_data.py extract-dev --tiny_imagenet``: no image of the benchmark's, its own test
set), named ``<setting>_s<seed>_e<epochs>_<ce|mopro>``, each trained with ``--num_train_epochs E --lr_milestones
0.45E 0.9E``; per setting, the fewest steps whose MoPro run ends within `DEV_TOLERANCE` of the best MoPro run there.

The result holds each run's final and best clean accuracy (`collect_natural.accuracy_cell`) beside the same
setting, seed and method at the recipe's 40 epochs and with the demo recipe, copied from
`bench/results-committed/natural_benchmark.json`. Rendered by `bench/render_benchmarks.py` (`natural_run_length`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.collect_natural import accuracy_cell  # noqa: E402
from bench.environment import head_commit, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NATURAL = ROOT / "bench" / "results-committed" / "natural_benchmark.json"
RUN_NAME = re.compile(r"(?P<setting>[a-z0-9]+)_s(?P<seed>\d+)_own120_(?P<method>ce|mopro)")
DEV_RUN_NAME = re.compile(r"(?P<setting>[a-z0-9]+)_s(?P<seed>\d+)_e(?P<epochs>\d+)_(?P<method>ce|mopro)")
DEV_TOLERANCE = 0.01  # final clean accuracy: a run within 1 point of the best counts as reaching it
# The natural benchmark's rows of the same method: the own-data recipe (40 epochs) and the demo recipe.
COMPARED = {"ce": ("own_ce", "ce"), "mopro": ("own_mopro_adaptive", "mopro_adaptive")}


def _finished_runs(runs: Path, pattern: re.Pattern):
    """(folder, name match, `accuracy_cell`, all_results.json) of each run folder whose name matches `pattern`, in
    name order; other folders are ignored, an unfinished run is refused."""
    for run_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        match = pattern.fullmatch(run_dir.name)
        if match is None:
            continue
        cell = accuracy_cell(run_dir)
        if cell is None:
            raise SystemExit(f"error: {run_dir} has not finished (no all_results.json)")
        yield run_dir, match, cell, json.loads((run_dir / "all_results.json").read_text())


def collect(runs: Path, natural: dict) -> list[dict]:
    rows = []
    for _, match, cell, results in _finished_runs(runs, RUN_NAME):
        setting, seed, method = match["setting"], match["seed"], match["method"]
        own, demo = (natural["accuracy"][setting][seed][name] for name in COMPARED[method])
        rows.append({"setting": setting, "seed": int(seed), "method": method, **cell,
                     "train_runtime": results.get("train_runtime"), "own_data_40": own, "demo_recipe": demo})  # fmt: skip
    return rows


def collect_dev(runs: Path) -> list[dict]:
    """The development runs (module docstring), with the optimiser steps each trained."""
    rows = []
    for run_dir, match, cell, results in _finished_runs(runs, DEV_RUN_NAME):
        steps = json.loads((run_dir / "trainer_state.json").read_text())["global_step"]
        rows.append({"setting": match["setting"], "seed": int(match["seed"]), "method": match["method"],
                     "epochs_asked": int(match["epochs"]), "steps": steps, **cell,
                     "train_runtime": results.get("train_runtime")})  # fmt: skip
    return rows


def fewest_steps_reaching_the_best(rows: list[dict]) -> dict[str, int]:
    """Per setting and seed with MoPro runs of 3 lengths or more: the fewest steps whose final accuracy is within
    `DEV_TOLERANCE` of the best MoPro run's there."""
    chosen = {}
    for key in sorted({(r["setting"], r["seed"]) for r in rows}):
        mopro = [r for r in rows if (r["setting"], r["seed"]) == key and r["method"] == "mopro"]
        if len(mopro) >= 3:
            best = max(r["final"] for r in mopro)
            chosen[f"{key[0]}_s{key[1]}"] = min(r["steps"] for r in mopro if r["final"] >= best - DEV_TOLERANCE)
    return chosen


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of <setting>_s<seed>_own120_<method> runs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", default=None, help="the commit the runs trained at (default: git HEAD)")
    parser.add_argument("--dev", action="store_true", help="the development runs of the length rule (docstring)")
    args = parser.parse_args(argv)
    if args.dev:
        rows = collect_dev(args.runs)
        if not rows:
            raise SystemExit(f"error: no <setting>_s<seed>_e<epochs>_<ce|mopro> run in {args.runs}")
        result = {"commit": args.commit or head_commit(), "tolerance": DEV_TOLERANCE, "runs": rows,
                  "fewest_steps_reaching_the_best": fewest_steps_reaching_the_best(rows)}  # fmt: skip
        write_result(args.out, result)
        return result
    rows = collect(args.runs, json.loads(NATURAL.read_text()))
    if not rows:
        raise SystemExit(f"error: no <setting>_s<seed>_own120_<ce|mopro> run in {args.runs}")
    result = {"commit": args.commit or head_commit(), "epochs": 120, "runs": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
