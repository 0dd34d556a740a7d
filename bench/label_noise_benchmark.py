"""Finding wrong labels and out-of-distribution images: MoPro's noise report against cleanlab.

Data: noisy Fashion-MNIST with known truth (`training.data.noisy_fashion_mnist`): 40% wrong labels (half symmetric, half
natural confusions such as shirt <-> T-shirt) plus 20% out-of-distribution images (MNIST digits, photo patches) with
random labels. Both methods use the same backbone (half-width ResNet-18 at 32 px), augmentation (the official
RandomResizedCrop 0.2-1 + flip), optimiser and number of epochs, through `MoProTrainer`:

- **MoPro**: one training run on all samples, then `evaluation.noise_report` on the saved model (the user's command).
- **cleanlab**: 5-fold cross-validated cross-entropy runs give out-of-fold predicted probabilities and pooled
  features; `cleanlab.filter.find_label_issues` flags label issues and `cleanlab.Datalab` (outlier issues, from the
  same features) flags out-of-distribution images.

    pip install -e ".[bench]"                                  # cleanlab, for this benchmark only
    python bench/label_noise_benchmark.py train --method mopro --seed 0 --epochs 30
    python bench/label_noise_benchmark.py train --method cleanlab --seed 0 --epochs 30
    python bench/label_noise_benchmark.py report               # table + figure from every finished run
    python bench/label_noise_benchmark.py cost --epochs 3      # training time of each method alone, A/B
    python bench/label_noise_benchmark.py train --method mopro --seed 0 --natural_dir DIR --results_dir R
                                        # the natural-image benchmark: a setting built by bench/natural_data.py

Each `train` writes `bench/results/label_noise/<method>_s<seed>/` (`run.json` with the compute used; MoPro: the saved
model; cleanlab: `out_of_fold.npz` with probabilities and features). `report` scores them all: a label error is a
sample whose given label is not its true class (every OOD image: their labels are random), and each method's
flagged set is every sample it does not call clean.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.noisy_benchmark import build_trainer  # noqa: E402
from evaluation.features import extract_features  # noqa: E402
from modeling_mopro import (  # noqa: E402
    build_image_processor,
)
from training.data.image_datasets import hf_image_dataset  # noqa: E402
from training.data.noisy_fashion_mnist import build_noisy_fashion_mnist  # noqa: E402
from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MoProViewTransforms  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "label_noise"
NUM_FOLDS = 5
IMAGE_SIZE = 32


def noisy_data(seed: int, args) -> tuple:
    """The benchmark's training set (with its truth columns) and class names, for one seed: noisy Fashion-MNIST, or
    with `args.natural_dir` a setting built by `bench/natural_data.py` for that seed (the natural-image benchmark)."""
    if getattr(args, "natural_dir", None):
        from bench.natural_data import load_training_set

        built_seed = json.loads((Path(args.natural_dir) / "meta.json").read_text())["seed"]
        if built_seed != seed:
            raise SystemExit(f"error: {args.natural_dir} was built for seed {built_seed}, not --seed {seed}")
        return load_training_set(args.natural_dir)
    splits, id2label = build_noisy_fashion_mnist(
        num_train=args.num_train, noise_rate=0.4, asymmetric_fraction=0.5, ood_fraction=0.2, num_test=1, seed=seed
    )
    return splits["train"], id2label


def train(method: str, train_dataset, id2label: dict[int, str], seed: int, args, output_dir: Path):
    """One training run (`method` "mopro" or "ce") with the benchmarks' small-data recipe (`build_trainer`): the
    official augmentation and weight decay, encoder momentum 0.99. Returns the trainer (its model in eval mode)."""
    trainer, _ = build_trainer(
        method, train_dataset, id2label, seed, args.epochs, output_dir, batch_size=args.batch_size, lr=args.lr,
        weight_decay=1e-4, queue_size=args.queue_size, encoder_momentum=0.99, workers=args.workers, logging_steps=50,
        correction_schedule=getattr(args, "correction_schedule", "fixed"),
    )  # fmt: skip
    trainer.train()
    trainer.model.eval()
    return trainer


def train_mopro(seed: int, args, output_dir: Path) -> dict:
    """One MoPro run on every sample; saves the model (with its image processor) for `evaluation.noise_report`."""
    dataset, id2label = noisy_data(seed, args)
    training_set = dataset.select_columns(["image", "label", "sample_id"])  # the truth stays out of training
    started = time.time()
    trainer = train("mopro", training_set, id2label, seed, args, output_dir)
    seconds = time.time() - started
    trainer.model.save_pretrained(output_dir / "model")
    trainer.save_sample_dynamics(output_dir / "model")  # the report's label evidence, as beside a run_mopro model
    build_image_processor(IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD).save_pretrained(output_dir / "model")
    return {"training_runs": 1, "sample_epochs": args.epochs * len(dataset), "train_seconds": round(seconds, 1)}


def train_cleanlab(seed: int, args, output_dir: Path) -> dict:
    """5-fold cross-validated CE runs: out-of-fold softmax probabilities and pooled features of every sample."""
    from sklearn.model_selection import StratifiedKFold

    dataset, id2label = noisy_data(seed, args)
    training_set = dataset.select_columns(["image", "label", "sample_id"])
    labels = np.asarray(dataset["label"])
    probabilities = np.zeros((len(dataset), len(id2label)), dtype=np.float32)
    features = None
    seconds, sample_epochs = 0.0, 0
    folds = StratifiedKFold(NUM_FOLDS, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    view = MoProViewTransforms(IMAGE_SIZE).test
    for fold, (fit, held_out) in enumerate(folds):
        started = time.time()
        model = train(
            "ce", training_set.select(fit), id2label, seed + 1000 * fold, args, output_dir / f"fold{fold}"
        ).model
        seconds += time.time() - started
        sample_epochs += args.epochs * len(fit)
        out = extract_features(
            model, hf_image_dataset(training_set.select(held_out), view), ("pooled", "logits"), 256, 0, "cpu",
            desc=f"fold {fold}", progress=False,
        )  # fmt: skip
        probabilities[held_out] = torch.as_tensor(out.logits).softmax(1).numpy()
        if features is None:
            features = np.zeros((len(dataset), out.pooled.shape[1]), dtype=np.float32)
        features[held_out] = out.pooled
        print(json.dumps({"fold": fold, "train_seconds": round(seconds, 1)}), flush=True)
    np.savez_compressed(output_dir / "out_of_fold.npz", probabilities=probabilities, features=features)
    return {"training_runs": NUM_FOLDS, "sample_epochs": sample_epochs, "train_seconds": round(seconds, 1)}


def measure_cost(args) -> dict:
    """Training seconds per epoch of a MoPro run and of one cleanlab fold, each alone on the machine, alternated
    (A/B) `--repeats` times so that load drifts hit both; the whole-run ratio follows (1 run vs 5 folds).

    The `train` runs ran side by side (one thread each) with whatever else the machine did, so their wall times
    mix in contention; this is the clean ratio.
    """
    import tempfile

    dataset, id2label = noisy_data(args.seed, args)
    training_set = dataset.select_columns(["image", "label", "sample_id"])
    fold = training_set.select(range(len(training_set) * (NUM_FOLDS - 1) // NUM_FOLDS))  # a fold's training size
    seconds: dict[str, list[float]] = {"mopro": [], "ce": []}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeats):
            for method, data in (("mopro", training_set), ("ce", fold)):
                started = time.time()
                train(method, data, id2label, args.seed, args, Path(scratch) / method)
                seconds[method].append((time.time() - started) / args.epochs)
    mopro, ce = float(np.median(seconds["mopro"])), float(np.median(seconds["ce"]))
    record = {
        "epochs_per_measurement": args.epochs, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "seconds_per_epoch": seconds, "mopro_run_vs_cleanlab": mopro / (NUM_FOLDS * ce),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
    }  # fmt: skip
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "cost.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)
    return record


def run_name(method: str, seed: int, schedule: str = "fixed") -> str:
    """A run's folder: `<method>_s<seed>`, MoPro with the adaptive schedule `mopro_adaptive_s<seed>`."""
    return f"{method}{'_adaptive' if method == 'mopro' and schedule == 'adaptive' else ''}_s{seed}"


def run_train(args) -> None:
    output_dir = args.results_dir / run_name(args.method, args.seed, args.correction_schedule)
    output_dir.mkdir(parents=True, exist_ok=True)
    compute = (train_mopro if args.method == "mopro" else train_cleanlab)(args.seed, args, output_dir)
    record = {
        "method": args.method, "seed": args.seed, "epochs": args.epochs, "num_train": args.num_train, **compute,
        "correction_schedule": args.correction_schedule if args.method == "mopro" else None,
        "natural_dir": str(args.natural_dir) if args.natural_dir else None,
        "machine": {"threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
    }  # fmt: skip
    (output_dir / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)


METHODS = ("MoPro, fitted thresholds", "MoPro, training rule", "cleanlab")
# The MoPro runs a results folder may hold, by folder prefix, with the name of their rows (METHODS' first two for
# the benchmark's own schedule, fixed; the same rows with "MoPro adaptive" for the adaptive schedule's runs).
MOPRO_RUNS = {"mopro": "MoPro", "mopro_adaptive": "MoPro adaptive"}
COLUMNS = (  # (summary key, header, scale): rates in %, rankings as 0-1
    ("label_error_precision", "label-error P", 100),
    ("label_error_recall", "label-error R", 100),
    ("label_error_f1", "label-error F1", 100),
    ("label_quality_auroc", "label-quality AUROC", 1),
    ("label_quality_ap", "label-quality AP", 1),
    ("ood_auroc", "OOD AUROC", 1),
    ("ood_ap", "OOD AP", 1),
    ("ood_precision", "OOD P", 100),
    ("ood_recall", "OOD R", 100),
    ("relabel_precision", "relabel accuracy", 100),
)


def score_mopro(run_dir: Path, dataset, name: str = "MoPro") -> dict[str, dict]:
    """`evaluation.noise_report` on the saved model (both decision rules; the label evidence by default: the vote
    and the run's per-sample record when saved beside the model), scored against the truth; rows named `name`."""
    from evaluation.noise_report import NoiseReportOptions, build_noise_report, fit_summary, summarize_noise_report

    started = time.time()
    options = NoiseReportOptions(batch_size=256, num_workers=0, device="cpu")
    report, scores = build_noise_report(str(run_dir / "model"), dataset, options, with_scores=True)
    seconds = time.time() - started
    fitted = {**summarize_noise_report(report), **fit_summary(scores)}
    training_rule = report.remove_columns(["decision", "suggested_label"])
    training_rule = training_rule.rename_columns(
        {"training_rule_decision": "decision", "training_rule_label": "suggested_label"}
    )
    official = summarize_noise_report(training_rule)
    for key in ("label_quality_auroc", "label_quality_ap", "ood_auroc", "ood_ap"):
        official[key] = None  # the training rule has no scores of its own: its decisions only
    return {
        f"{name}, fitted thresholds": {**fitted, "score_seconds": seconds},
        f"{name}, training rule": {**official, "score_seconds": seconds},
    }


def score_cleanlab(run_dir: Path, dataset) -> dict[str, dict]:
    """Confident learning on the out-of-fold probabilities; Datalab outliers on the out-of-fold features."""
    import datasets as hf_datasets
    from cleanlab import Datalab
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from evaluation.noise_report import summarize_noise_report

    saved = np.load(run_dir / "out_of_fold.npz")
    probabilities, features = saved["probabilities"], saved["features"]
    labels = np.asarray(dataset["label"])
    started = time.time()
    label_issue = find_label_issues(labels, probabilities)
    quality = get_label_quality_scores(labels, probabilities)
    lab = Datalab(data={"label": labels}, label_name="label", verbosity=0)
    lab.find_issues(features=features, issue_types={"outlier": {}})
    outliers = lab.get_issues("outlier")
    seconds = time.time() - started
    ood = outliers["is_outlier_issue"].to_numpy()
    decision = np.where(ood, "ood", np.where(label_issue, "relabelled", "clean"))
    report = hf_datasets.Dataset.from_dict({
        "given_label": labels, "suggested_label": probabilities.argmax(1), "decision": decision,
        "label_quality": quality, "ood_score": 1 - outliers["outlier_score"].to_numpy(),
        "true_label": np.asarray(dataset["true_label"]), "is_ood": np.asarray(dataset["is_ood"]),
    })  # fmt: skip
    return {METHODS[2]: {**summarize_noise_report(report), "score_seconds": seconds}}


def _mean_sd(values: list[float], scale: float, digits: int | None = None) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "–"
    digits = digits if digits is not None else 1 if scale == 100 else 3
    return f"{np.mean(values):.{digits}f}" + (f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "")


def report(results_dir: Path = RESULTS, only_seeds: list[int] | None = None) -> str:
    """Scores every seed that has both runs (or `only_seeds`); writes `table<tag>.md`, `scores<tag>.json` and
    `label_noise<tag>.png`, the tag naming the seeds when they are chosen."""
    runs = {path.parent.name: json.loads(path.read_text()) for path in sorted(results_dir.glob("*/run.json"))}
    seeds = sorted({r["seed"] for r in runs.values()})
    seeds = [s for s in seeds if f"mopro_s{s}" in runs and f"cleanlab_s{s}" in runs]
    if only_seeds is not None:
        seeds = [s for s in seeds if s in only_seeds]
    # Each kind of MoPro run (`MOPRO_RUNS`) is scored when every seed scored has one.
    kinds = [kind for kind in MOPRO_RUNS if all(f"{kind}_s{s}" in runs for s in seeds)]
    tag = "" if only_seeds is None else "_s" + "-".join(map(str, seeds))
    if not seeds:
        raise SystemExit(f"no seed with both a mopro and a cleanlab run in {results_dir}")
    scores: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        mopro, cleanlab = runs[f"mopro_s{seed}"], runs[f"cleanlab_s{seed}"]
        arguments = argparse.Namespace(num_train=mopro["num_train"], natural_dir=mopro.get("natural_dir"))
        dataset, _ = noisy_data(seed, arguments)
        dataset = dataset.select_columns(["image", "label", "sample_id", "true_label", "is_ood"])
        scored = {}
        for kind in kinds:
            for name, summary in score_mopro(results_dir / f"{kind}_s{seed}", dataset, MOPRO_RUNS[kind]).items():
                scored[name] = (summary, runs[f"{kind}_s{seed}"])
        scored.update({name: (summary, cleanlab) for name, summary in
                       score_cleanlab(results_dir / f"cleanlab_s{seed}", dataset).items()})  # fmt: skip
        for name, (summary, run) in scored.items():
            summary.update({k: run[k] for k in ("training_runs", "sample_epochs", "train_seconds", "epochs")})
            summary["compute_vs_cleanlab"] = run["train_seconds"] / cleanlab["train_seconds"]
            # Backbone passes, in forward-pass units: forward + backward of the query ~ 3, MoPro's key forward + 1.
            summary["forward_passes"] = run["sample_epochs"] * (4 if name.startswith("MoPro") else 3)
            summary["passes_vs_cleanlab"] = summary["forward_passes"] / (cleanlab["sample_epochs"] * 3)
            scores.setdefault(name, {})[seed] = summary
            print(json.dumps({"seed": seed, "method": name, **{k: summary.get(k) for k, _, _ in COLUMNS}}), flush=True)
    header = (
        "| method | "
        + " | ".join(h for _, h, _ in COLUMNS)
        + " | training runs × epochs | train minutes | wall time vs cleanlab | passes vs cleanlab |"
    )
    lines = [header, "|" + "---|" * (len(COLUMNS) + 5)]
    for name in scores:
        by_seed = list(scores[name].values())
        first = by_seed[0]
        cells = [_mean_sd([s.get(k) for s in by_seed], scale) for k, _, scale in COLUMNS]
        minutes = _mean_sd([s["train_seconds"] / 60 for s in by_seed], 1, digits=1)
        cells += [f"{first['training_runs']} × {first['epochs']}", minutes,
                  _mean_sd([s["compute_vs_cleanlab"] for s in by_seed], 1, digits=2), f"{first['passes_vs_cleanlab']:.2f}"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cost_file = results_dir / "cost.json"
    if cost_file.is_file():
        cost = json.loads(cost_file.read_text())
        lines.append(
            f"\nMeasured alone, A/B alternated ({cost['repeats']} × {cost['epochs_per_measurement']} epochs each, "
            f"{cost['threads']} threads, `cost` command): one MoPro run costs "
            f"{cost['mopro_run_vs_cleanlab']:.2f} of cleanlab's five folds in training time."
        )
    table = "\n".join(lines) + (
        f"\n\nSeeds {', '.join(map(str, seeds))}: mean ± sd. Rates in %, rankings 0-1. Wall time: training only, "
        "both methods side by side on the same machine, one thread each. Passes: backbone forward-pass units "
        "(a training sample costs 3, MoPro's key view 1 more).\n"
    )
    (results_dir / f"table{tag}.md").write_text(table)
    (results_dir / f"scores{tag}.json").write_text(
        json.dumps({k: {str(s): v for s, v in d.items()} for k, d in scores.items()}, indent=1)
    )
    natural = {runs[f"mopro_s{seed}"].get("natural_dir") for seed in seeds} - {None}
    if natural:  # the natural-image benchmark: one setting per results folder
        plot(scores, results_dir / f"label_noise{tag}.png", "Finding wrong labels and OOD images: natural images, "
             + ", ".join(sorted(Path(d).name.rsplit("_s", 1)[0] for d in natural)))  # fmt: skip
    else:
        plot(scores, results_dir / f"label_noise{tag}.png")
    print(table)
    return table


def plot(
    scores: dict[str, dict[int, dict]],
    path: Path,
    title: str = "Finding wrong labels and OOD images: noisy Fashion-MNIST (40% wrong labels + 20% OOD)",
) -> None:
    """Label-error F1 and OOD AUROC per method: one dot per seed, a bar for the mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    panels = (("label_error_f1", "label-error F1 (%)", 100), ("ood_auroc", "OOD AUROC", 1),
              ("label_quality_auroc", "label-quality AUROC", 1))  # fmt: skip
    for position, (key, heading, scale) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), position)
        names = [n for n in scores if any(s.get(key) is not None for s in scores[n].values())]
        for x, name in enumerate(names):
            values = [scale * s[key] for s in scores[name].values() if s.get(key) is not None]
            axes.bar(x, np.mean(values), color=("tab:orange" if name.startswith("MoPro") else "tab:blue"), alpha=0.6)
            axes.plot([x] * len(values), values, "k.", markersize=6)
        axes.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
        axes.set_title(heading, fontsize=10)
        axes.grid(axis="y", alpha=0.3)
        values = [scale * s[key] for n in names for s in scores[n].values() if s.get(key) is not None]
        if not values:  # e.g. OOD AUROC on a natural-image setting without OOD images
            axes.text(0.5, 0.5, "not defined here", ha="center", va="center", transform=axes.transAxes)
            continue
        axes.set_ylim(max(0, min(values) - 0.1 * scale), scale)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("train", "report", "cost"))
    parser.add_argument("--repeats", type=int, default=2, help="cost: A/B repetitions")
    parser.add_argument("--method", choices=("mopro", "cleanlab"), default="mopro")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=None,
                        help="report: only these seeds (comma-separated)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--num_train", type=int, default=4000, help="Fashion-MNIST images (20%% OOD added on top)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05, help="0.1 at the official global batch 256, scaled")
    parser.add_argument("--queue_size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--correction_schedule", choices=("fixed", "adaptive"), default="fixed",
                        help="train: MoPro's correction schedule (the benchmark's rows: fixed, from 11/90 of the "
                        "epochs; adaptive: the own-data recipe's)")  # fmt: skip
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    parser.add_argument("--natural_dir", type=Path, default=None,
                        help="train: a setting folder of `bench/natural_data.py build` instead of Fashion-MNIST "
                        "(pass a --results_dir per setting)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str | None:
    args = parse_args(argv)
    if args.command == "train":
        run_train(args)
        return None
    if args.command == "cost":
        measure_cost(args)
        return None
    return report(args.results_dir, args.seeds)


if __name__ == "__main__":
    main()
