"""The offline demo over seeds: MoPro and the CE baseline, each the README's command with `--seed S`.

    python bench/demo_seeds.py run --seeds 0 1 2            # 6 runs of `training/run_mopro.py` (about 1 hour)
    python bench/demo_seeds.py report                       # mean ± std table from the finished runs

Each run is `accelerate launch --cpu training/run_mopro.py --baseline {mopro,ce} --seed S --output_dir
bench/results/demo/{method}_s{S}` (git-ignored), with `OMP_NUM_THREADS=1` and one data worker so that two can share
2 cores. The report reads each run's `all_results.json` (final clean test accuracy, noise decisions) and its
`trainer_state.json` (accuracy after every epoch, for CE's best epoch), and writes `table.md` and `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "demo"
METHODS = ("mopro", "ce")


def run(seeds: list[int], results_dir: Path, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for seed in seeds:
        for method in METHODS:
            out = results_dir / f"{method}_s{seed}"
            if (out / "all_results.json").is_file():
                continue
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                   "--num_cpu_threads_per_process", "1", str(REPO / "training" / "run_mopro.py"), "--baseline",
                   method, "--seed", str(seed), "--output_dir", str(out), "--dataloader_num_workers", "1", *extra]  # fmt: skip
            subprocess.run(cmd, env=env, check=True, cwd=REPO)


def load(results_dir: Path) -> dict[tuple[str, int], dict]:
    """(method, seed) -> final and per-epoch clean test accuracy (%), noise metrics, start of correction."""
    runs = {}
    for path in sorted(results_dir.glob("*_s*/all_results.json")):
        method, seed = path.parent.name.rsplit("_s", 1)
        results = json.loads(path.read_text())
        history = json.loads((path.parent / "trainer_state.json").read_text())["log_history"]
        curve = [100 * entry["eval_accuracy"] for entry in history if "eval_accuracy" in entry and "epoch" in entry]
        if method == "mopro" and "train_noise_correction_start_epoch" not in results:
            # Runs made before the key existed: the epoch of the first step logged with correction on (exact when
            # a log falls in every epoch, as with the demo's 20 logging steps of 39 per epoch).
            corrected = [entry["epoch"] for entry in history if entry.get("correction_strength", 0) > 0]
            results["train_noise_correction_start_epoch"] = int(min(corrected)) if corrected else -1
        runs[(method, int(seed))] = {"final": 100 * results["eval_accuracy"], "curve": curve, "results": results}
    return runs


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def report(results_dir: Path = RESULTS) -> dict:
    runs = load(results_dir)
    seeds = sorted({seed for method, seed in runs if all((m, seed) in runs for m in METHODS)})
    if not seeds:
        raise SystemExit(f"no seed with both methods finished in {results_dir}")
    summary: dict = {"seeds": seeds}
    lines = ["| run | seeds | final clean test accuracy, mean ± std | per seed | best epoch accuracy, mean |",
             "|---|---|---|---|---|"]  # fmt: skip
    for method in METHODS:
        finals = [runs[(method, s)]["final"] for s in seeds]
        bests = [max(runs[(method, s)]["curve"]) for s in seeds]
        summary[method] = {"final": finals, "best": bests}
        lines.append(f"| {'MoPro' if method == 'mopro' else 'CE'} | {', '.join(map(str, seeds))} | "
                     f"{mean_std(finals)} | {' / '.join(f'{v:.2f}' for v in finals)} | {statistics.mean(bests):.2f} |")  # fmt: skip
    paired = [runs[("mopro", s)]["final"] - runs[("ce", s)]["final"] for s in seeds]
    summary["mopro_minus_ce"] = paired
    lines.append(f"| MoPro − CE, paired by seed | | **{mean_std(paired)}** | "
                 f"{' / '.join(f'{v:+.2f}' for v in paired)} | |")  # fmt: skip
    starts = [runs[("mopro", s)]["results"].get("train_noise_correction_start_epoch") for s in seeds]
    summary["noise_correction_start_epoch"] = starts
    keys = ("noise_label_error_f1", "noise_ood_precision", "noise_ood_recall", "noise_ood_auroc")
    summary["noise_report"] = {k: [runs[("mopro", s)]["results"].get(k) for s in seeds] for k in keys}
    lines += ["", f"MoPro's correction started at epoch {', '.join(str(s) for s in starts)} (seeds {seeds})."]
    table = "\n".join(lines)
    (results_dir / "table.md").write_text(table + "\n")
    plot({key: run["curve"] for key, run in runs.items() if key[1] in seeds}, results_dir / "demo_seeds.png")
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table)
    return summary


def plot(curves: dict[tuple[str, int], list[float]], path: Path) -> None:
    """Clean test accuracy after every epoch, one line per run (MoPro orange, CE blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, seed), curve in sorted(curves.items()):
        ax.plot(range(1, len(curve) + 1), curve, color="tab:orange" if method == "mopro" else "tab:blue",
                alpha=0.5 + 0.2 * (seed % 3), label=f"{'MoPro' if method == 'mopro' else 'CE'}, seed {seed}")  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title("offline demo: 40% wrong labels + 20% OOD, whole-image views")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    args, extra = parser.parse_known_args(argv)  # anything else goes to run_mopro.py
    if args.command == "run":
        run(args.seeds, args.results_dir, extra)
    report(args.results_dir)


if __name__ == "__main__":
    main()
