"""The noise report's label decisions on the development models: confident learning vs the two-mode fit it replaced.

    python bench/noise_rule_dev.py --runs bench/results/label_noise --seeds 0,1,2 \
        --out bench/results-committed/noise_rule_dev.json

`--runs` holds `label_noise_benchmark.py train --method mopro --seed S` runs (the development seeds 0-2 of noisy
Fashion-MNIST). For each: the saved model's embeddings of its training set, then both rules on the same neighbour
vote, scored against the truth (a label error: given label not the true class, every OOD image included):

- `confident_learning`: `evaluation.noise_scores.noise_scores`, the report's rule since 2026-12-05;
- `two_mode_fit`: the rule before it (`ae5e48d`), rebuilt here from the same parts: a two-component mixture on the
  label quality of the samples not called OOD, relabelled where its low mode's posterior exceeds 1/2 and the vote's
  argmax is another class, nothing relabelled when that would be more than half of the samples.

Then a simulation on the same embeddings: the in-distribution samples' true labels flipped at random (symmetric
noise at 0-40%, one draw per level), both rules' flagged share and F1. Rendered in BENCHMARKS.md by
`bench/render_benchmarks.py` (`noise_rule_dev`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.environment import head_commit, write_result  # noqa: E402
from bench.label_noise_benchmark import noisy_data  # noqa: E402
from evaluation.features import extract_features, load_model  # noqa: E402
from evaluation.noise_scores import (  # noqa: E402
    DECISIONS,
    check_ood_fit,
    fallback_ood,
    fit_two_modes,
    noise_scores,
)
from training.data.image_datasets import hf_image_dataset  # noqa: E402
from training.data.transforms import transforms_from_config  # noqa: E402

NOISE_LEVELS = (0.0, 0.05, 0.1, 0.2, 0.4)
RULES = ("two_mode_fit", "confident_learning")


def two_mode_fit_decisions(evidence: np.ndarray, ood_score: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) indices into DECISIONS by the rule of `ae5e48d` (module docstring)."""
    label_quality = evidence[np.arange(len(labels)), labels]
    ood_fit = fit_two_modes(ood_score)
    ood = fallback_ood(ood_score) if check_ood_fit(ood_fit, label_quality) else ood_fit.posterior > 0.5
    issue = np.zeros(len(labels))
    issue[~ood] = fit_two_modes(-label_quality[~ood]).posterior
    relabel = (issue > 0.5) & (evidence.argmax(1) != labels) & ~ood
    if relabel.mean() > 0.5:
        relabel[:] = False
    return np.where(ood, DECISIONS.index("ood"), np.where(relabel, DECISIONS.index("relabelled"), 0))


def decide(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, temperature: float) -> dict[str, dict]:
    """Both rules' decisions and suggested labels on one labelling."""
    scored = noise_scores(embeddings, labels, num_classes, temperature)
    old = two_mode_fit_decisions(scored["class_evidence"], scored["ood_score"], labels)
    return {
        "two_mode_fit": {"decision": old, "suggested": np.where(old == 1, scored["class_evidence"].argmax(1), labels)},
        "confident_learning": {"decision": scored["decision"], "suggested": scored["suggested_label"],
                               "issue_share": scored.label_issue_share},
    }  # fmt: skip


def score(decision: np.ndarray, suggested: np.ndarray, labels: np.ndarray, true: np.ndarray) -> dict[str, float]:
    wrong = labels != true  # OOD images have true label -1: every one is wrong
    flagged = decision != 0
    hits = int((flagged & wrong).sum())
    precision, recall = hits / max(int(flagged.sum()), 1), hits / max(int(wrong.sum()), 1)
    relabelled = decision == DECISIONS.index("relabelled")
    return {
        "truly_wrong": float(wrong.mean()), "flagged": float(flagged.mean()), "precision": precision,
        "recall": recall, "f1": 2 * precision * recall / (precision + recall) if hits else 0.0,
        "relabel_accuracy": float((suggested[relabelled] == true[relabelled]).mean()) if relabelled.any() else None,
    }  # fmt: skip


def evaluate(run_dir: Path) -> dict:
    run = json.loads((run_dir / "run.json").read_text())
    dataset, _ = noisy_data(run["seed"], argparse.Namespace(num_train=run["num_train"], natural_dir=None))
    model = load_model(str(run_dir / "model"), "cpu")
    view = hf_image_dataset(dataset, transforms_from_config(model.config), "image", "label")
    features = extract_features(model, view, ("embeddings",), batch_size=256, num_workers=0, device="cpu")
    embeddings, labels = torch.as_tensor(features.embeddings), features.labels.astype(np.int64)
    true = np.asarray(dataset["true_label"])
    k, temperature = model.config.num_labels, model.config.temperature
    given = {
        rule: {**score(d["decision"], d["suggested"], labels, true), "issue_share": d.get("issue_share")}
        for rule, d in decide(embeddings, labels, k, temperature).items()
    }
    inside = true >= 0
    rng = np.random.default_rng(0)
    simulated = []
    for level in NOISE_LEVELS:
        flipped = true[inside].copy()
        flip = rng.random(len(flipped)) < level
        flipped[flip] = (flipped[flip] + rng.integers(1, k, int(flip.sum()))) % k
        decided = decide(embeddings[inside], flipped, k, temperature)
        simulated.append({"noise": level, **{rule: score(d["decision"], d["suggested"], flipped, true[inside])
                                             for rule, d in decided.items()}})  # fmt: skip
    return {"seed": run["seed"], "run_command": run["command"], "given": given, "simulated": simulated}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of label_noise_benchmark.py MoPro runs")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", default=None, help="the commit of the code that scored (default: git HEAD)")
    args = parser.parse_args(argv)
    missing = [s for s in args.seeds if not (args.runs / f"mopro_s{s}" / "model").is_dir()]
    if missing:
        raise SystemExit(f"error: no MoPro run for seed(s) {missing} in {args.runs}")
    result = {
        "commit": args.commit or head_commit(),
        "rules": list(RULES),
        "runs": [evaluate(args.runs / f"mopro_s{s}") for s in args.seeds],
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
