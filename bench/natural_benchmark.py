"""The natural-image benchmark's runs (issue 24; protocol in BENCHMARKS.md, "Natural images"), in one command.

    python bench/natural_benchmark.py plan                 # the commands, one a line, nothing run
    python bench/natural_benchmark.py run --lanes 2        # runs what is not finished yet, two at a time
    python bench/natural_benchmark.py run --only 'accuracy_*_own_length_*'   # only the jobs whose name matches

Job names: `accuracy_<setting>_s<seed>_<row>` (rows as in the table's result file), `detection_<setting>_s<seed>_<mopro|
cleanlab>[_adaptive]`, `report_<setting>`.

Per setting (human, asym20, asym40, ood20) and seed (0, 1, 2), built by `bench/natural_data.py build-all` into
`--built_dir` (built here from the pool when missing):
- clean accuracy: `training/run_mopro.py` with the demo's recipe pinned (`training/configs/demo.yaml`), 30 epochs,
  lr steps at 15 and 25: CE, MoPro with the adaptive schedule, MoPro with the fixed one from epoch 4 (11/90);
  outputs `<results_dir>/accuracy/<setting>_s<seed>/<method>/`;
- the noise report vs cleanlab: `bench/label_noise_benchmark.py train --natural_dir ...` for both methods, then its
  `report` per setting; outputs `<results_dir>/detection/<setting>/`;
- after all of these, the own-data recipe (`run_mopro.py --train_dir ... --validation_dir ...` without a YAML) on
  human and ood20: CE and MoPro (adaptive); outputs `<results_dir>/accuracy/<setting>_s<seed>/own_<method>/`;
- then MoPro with the `queue_vote` correction (the demo's recipe, parameters from the Fashion-MNIST development
  cells), every setting; outputs `<results_dir>/accuracy/<setting>_s<seed>/mopro_queue_vote/`;
- then the own-data recipe again with the small-image rule (`--backbone_kwargs '{"output_stride": 16}'`), human and
  ood20; outputs `<results_dir>/accuracy/<setting>_s<seed>/own_os16_<method>/`;
- then the noise report's MoPro run again with the adaptive schedule (the own-data recipe's; `label_noise_benchmark.py
  train --correction_schedule adaptive`), every setting; outputs `<results_dir>/detection/<setting>/mopro_adaptive_s*/`
- then the own-data recipe as a user gets it since its length rule (the epochs from the data's size; the `own` rows
  above ran at its earlier 40 epochs, now pinned), human and ood20; outputs `.../own_length_<method>/`
  (the per-setting reports score them as their own rows).
A run whose output is complete (`all_results.json`, `run.json`) is skipped, so an interrupted table resumes (an
unfinished run_mopro folder is started afresh: `--overwrite_output_dir true`). The
order is seed-major: each finished seed is a complete set of rows. Every command runs with one thread
(`OMP_NUM_THREADS=1`) and writes its log to `<results_dir>/logs/`.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import natural_data  # noqa: E402
from bench.label_noise_benchmark import run_name  # noqa: E402

EPOCHS = 30
LR_MILESTONES = ("15", "25")
FIXED_START_EPOCH = "4"  # round(30 * 11 / 90): the official start of the correction, scaled to 30 epochs
SEEDS = (0, 1, 2)
ACCURACY_METHODS = {
    "ce": ["--baseline", "ce"],
    "mopro_adaptive": [],  # the demo config's schedule
    "mopro_fixed": ["--noise_correction_schedule", "fixed", "--noise_correction_start_epoch", FIXED_START_EPOCH],
}
# The own-data recipe (`run_mopro.py --train_dir` without a YAML: training/configs/own_data.yaml, its epochs and
# image size from the rule), against the demo recipe's rows above on two settings; after every existing job.
# The queue_vote correction (issue 24's added option), with the parameters chosen on the Fashion-MNIST development
# cells (BENCHMARKS.md, "Regime grid"), never on this data; appended after the own-data rows, every setting.
ADDED_METHODS = {
    "mopro_queue_vote": ["--noise_correction_rule", "queue_vote", "--queue_vote_k", "50", "--queue_vote_weight", "0.5",
                         "--pseudo_label_threshold", "0.6"],
}  # fmt: skip
OWN_DATA_SETTINGS = ("human", "ood20")
OWN_DATA_METHODS = {"ce": ["--baseline", "ce"], "mopro_adaptive": []}  # own_data.yaml's schedule is adaptive
# The own-data recipe's versions, each a row prefix: `own` as a user got it before the length rule (timm's output
# stride 32 at 32 px, the recipe's 40 epochs, pinned since the rule so that these rows rebuild as they ran),
# `own_os16` with its last stage dilated (output stride 16: the small-image rule, chosen on the Fashion-MNIST
# development folders and the recipe's default for a day, 2026-12-05; BENCHMARKS.md), `own_length` as a user gets it
# since the length rule (`training.own_data`: the epochs from the data's size); each appended after every other job.
RECIPE_40_EPOCHS = ["--num_train_epochs", "40", "--lr_milestones", "18", "36"]
OWN_DATA_VERSIONS = {"own": RECIPE_40_EPOCHS, "own_os16": ["--backbone_kwargs", '{"output_stride": 16}',
                                                           *RECIPE_40_EPOCHS], "own_length": []}  # fmt: skip


@dataclass(frozen=True)
class Job:
    name: str
    argv: tuple[str, ...]
    done_marker: Path  # the job's output is complete when this file exists


def jobs(built_dir: Path, results_dir: Path, seeds=SEEDS, settings=natural_data.SETTINGS) -> list[Job]:
    """Every training run of the table, seed-major; then the detection reports (which need all seeds); then the
    own-data rows, seed-major (appended, so the rows before them keep their order and outputs)."""
    python = sys.executable
    out = []
    for seed in seeds:
        for setting in settings:
            data = built_dir / f"{setting}_s{seed}"
            out += [demo_recipe_job(data, results_dir, setting, seed, m, f) for m, f in ACCURACY_METHODS.items()]
            out += [detection_job(built_dir, results_dir, setting, seed, method) for method in ("mopro", "cleanlab")]
    for setting in settings:
        detection = results_dir / "detection" / setting
        argv = (python, "bench/label_noise_benchmark.py", "report", "--results_dir", str(detection))
        out.append(Job(f"report_{setting}", argv, detection / "table.md"))
    out += own_data_jobs(built_dir, results_dir, seeds, settings, "own")
    for seed in seeds:
        for setting in settings:
            data = built_dir / f"{setting}_s{seed}"
            out += [demo_recipe_job(data, results_dir, setting, seed, m, f) for m, f in ADDED_METHODS.items()]
    out += own_data_jobs(built_dir, results_dir, seeds, settings, "own_os16")
    out += [detection_job(built_dir, results_dir, setting, seed, "mopro", "adaptive") for seed in seeds
            for setting in settings]  # fmt: skip
    out += own_data_jobs(built_dir, results_dir, seeds, settings, "own_length")
    return out


def detection_job(built_dir: Path, results_dir: Path, setting: str, seed: int, method: str, schedule: str = "fixed"):
    """One `label_noise_benchmark.py train` run of the detection rows (MoPro with `schedule`, or cleanlab)."""
    detection = results_dir / "detection" / setting
    flags = ("--correction_schedule", schedule) if schedule != "fixed" else ()
    argv = (sys.executable, "bench/label_noise_benchmark.py", "train", "--method", method, *flags, "--seed", str(seed),
            "--epochs", str(EPOCHS), "--natural_dir", str(built_dir / f"{setting}_s{seed}"), "--results_dir",
            str(detection))  # fmt: skip
    job = f"detection_{setting}_s{seed}_{method}" + (f"_{schedule}" if flags else "")
    return Job(job, argv, detection / run_name(method, seed, schedule) / "run.json")


def own_data_jobs(built_dir: Path, results_dir: Path, seeds, settings, version: str) -> list[Job]:
    """The own-data recipe's rows of one version (`OWN_DATA_VERSIONS`), seed-major."""
    out = []
    for seed in seeds:
        for setting in [s for s in settings if s in OWN_DATA_SETTINGS]:
            data = built_dir / f"{setting}_s{seed}"
            for method, flags in OWN_DATA_METHODS.items():
                output = results_dir / "accuracy" / f"{setting}_s{seed}" / f"{version}_{method}"
                argv = (sys.executable, "training/run_mopro.py", "--train_dir", str(data / "train"),
                        "--validation_dir", str(data / "test"), "--seed", str(seed), "--dataloader_num_workers", "1",
                        "--output_dir", str(output), "--overwrite_output_dir", "true",
                        *OWN_DATA_VERSIONS[version], *flags)  # fmt: skip
                out.append(Job(f"accuracy_{setting}_s{seed}_{version}_{method}", argv, output / "all_results.json"))
    return out


def demo_recipe_job(data: Path, results_dir: Path, setting: str, seed: int, method: str, flags: list[str]) -> Job:
    """One clean-accuracy run with the demo's recipe pinned (the table's rows)."""
    output = results_dir / "accuracy" / f"{setting}_s{seed}" / method
    argv = (sys.executable, "training/run_mopro.py", "training/configs/demo.yaml",
            "--train_dir", str(data / "train"), "--validation_dir", str(data / "test"),
            "--seed", str(seed), "--num_train_epochs", str(EPOCHS), "--lr_milestones", *LR_MILESTONES,
            "--dataloader_num_workers", "1", "--output_dir", str(output),
            "--overwrite_output_dir", "true", *flags)  # fmt: skip
    return Job(f"accuracy_{setting}_s{seed}_{method}", argv, output / "all_results.json")


def run(all_jobs: list[Job], lanes: int, log_dir: Path) -> int:
    """Runs the unfinished jobs, `lanes` at a time (reports after every training run); returns the failures."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    training = [j for j in all_jobs if not j.name.startswith("report_") and not j.done_marker.is_file()]
    reports = [j for j in all_jobs if j.name.startswith("report_")]
    failures = 0
    for batch, width in ((training, lanes), (reports, 1)):
        pending, running = list(batch), []
        while pending or running:
            while pending and len(running) < width:
                job = pending.pop(0)
                log = open(log_dir / f"{job.name}.log", "w")
                print(f"start {job.name}", flush=True)
                running.append((job, subprocess.Popen(job.argv, cwd=ROOT, env=env, stdout=log, stderr=log), log))
            time.sleep(2)
            for entry in [e for e in running if e[1].poll() is not None]:
                job, process, log = entry
                log.close()
                running.remove(entry)
                failures += process.returncode != 0
                print(f"{'done' if process.returncode == 0 else 'FAILED'} {job.name} (rc {process.returncode})",
                      flush=True)  # fmt: skip
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("plan", "run"))
    parser.add_argument("--built_dir", type=Path, default=natural_data.ROOT / "data" / "natural" / "built")
    parser.add_argument("--results_dir", type=Path, default=natural_data.ROOT / "results" / "natural")
    parser.add_argument("--pool", type=Path, default=natural_data.DEFAULT_POOL)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--lanes", type=int, default=2, help="run: runs side by side (one thread each)")
    parser.add_argument("--only", action="append", metavar="GLOB",
                        help="only the jobs whose name matches (shell pattern; repeatable), e.g. one version's rows")  # fmt: skip
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    all_jobs = jobs(args.built_dir, args.results_dir, seeds)
    if args.only:
        all_jobs = [job for job in all_jobs if any(fnmatch.fnmatchcase(job.name, glob) for glob in args.only)]
        if not all_jobs:
            print(f"error: no job's name matches --only {' '.join(args.only)}", file=sys.stderr)
            return 2
    if args.command == "plan":
        for job in all_jobs:
            print(("# done: " if job.done_marker.is_file() else "") + " ".join(job.argv))
        return 0
    try:
        for setting in natural_data.SETTINGS:
            for seed in seeds:
                folder = args.built_dir / f"{setting}_s{seed}"
                if not (folder / "meta.json").is_file():
                    if not args.pool.is_file():
                        raise FileNotFoundError(f"{folder} is not built and the pool {args.pool} is missing; run "
                                                "`python bench/natural_data.py extract ...` first (BENCHMARKS.md)")  # fmt: skip
                    natural_data.build(args.pool, setting, seed, folder)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if run(all_jobs, args.lanes, args.results_dir / "logs") else 0


if __name__ == "__main__":
    sys.exit(main())
