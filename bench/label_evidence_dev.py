"""What the noise report's label decisions should read: the neighbour vote, the training run's record, or their mean.

Scores each `label_noise_benchmark.py train --method mopro` run three times with `evaluation.noise_report`, once per
`label_evidence` ("neighbours", "training", "combined"), against the truth of its data (Fashion-MNIST for its seed,
or the built natural setting its `run.json` names). The choice of the default was made on development runs
(Fashion-MNIST seeds 0-2, the natural development pool's seeds 10 and 11; BENCHMARKS.md); run on the benchmark's
own runs, the same table shows what each evidence gives there, and is no choice.

    python bench/label_evidence_dev.py RUN_DIR [RUN_DIR ...] --out bench/results-committed/label_evidence_dev.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.environment import head_commit, write_result  # noqa: E402
from bench.label_noise_benchmark import noisy_data  # noqa: E402
from evaluation.noise_report import (  # noqa: E402
    LABEL_EVIDENCE,
    NoiseReportOptions,
    build_noise_report,
    fit_summary,
    summarize_noise_report,
)

KEYS = ("label_error_precision", "label_error_recall", "label_error_f1", "label_quality_auroc", "fraction_relabelled",
        "fraction_ood", "ood_auroc", "relabel_precision", "label_issue_share", "relabel_refused", "label_evidence",
        "label_evidence_note")  # fmt: skip


def score_run(run_dir: Path) -> dict:
    """One run's report under each label evidence, with what its record holds."""
    from modeling_mopro.sample_dynamics import SampleDynamics

    run = json.loads((run_dir / "run.json").read_text())
    dataset, _ = noisy_data(
        run["seed"], argparse.Namespace(num_train=run["num_train"], natural_dir=run.get("natural_dir"))
    )
    dataset = dataset.select_columns(["image", "label", "sample_id", "true_label", "is_ood"])
    record = SampleDynamics.load(run_dir / "model")
    out = {
        "run": run_dir.name, "seed": run["seed"], "data": Path(run["natural_dir"]).name if run.get("natural_dir")
        else "fashion_mnist", "correction_schedule": run.get("correction_schedule") or "fixed",
        "record_epochs_mean": round(float(record.visits.mean()), 3), "evidence": {},
    }  # fmt: skip
    for evidence in LABEL_EVIDENCE:
        options = NoiseReportOptions(batch_size=256, num_workers=0, device="cpu", label_evidence=evidence)
        report, scores = build_noise_report(str(run_dir / "model"), dataset, options, with_scores=True)
        summary = {**summarize_noise_report(report), **fit_summary(scores)}
        cell = {key: summary.get(key) for key in KEYS}
        precision, recall = cell["label_error_precision"], cell["label_error_recall"]
        cell["flagged_vs_true"] = recall / precision if precision and recall else None
        out["evidence"][evidence] = cell
    out["truly_wrong_share"] = float(np.mean(np.asarray(dataset["label"]) != np.asarray(dataset["true_label"])))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="label_noise_benchmark.py MoPro run folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "model" / "sample_dynamics.safetensors").is_file()]
    if missing:
        raise SystemExit(f"error: no per-sample record in {', '.join(missing)} (re-train them with this code)")
    rows = []
    for run_dir in args.runs:
        rows.append(score_run(run_dir))
        print(json.dumps({k: rows[-1][k] for k in ("run", "data")} | {
            e: rows[-1]["evidence"][e]["label_error_f1"] for e in LABEL_EVIDENCE}), flush=True)  # fmt: skip
    result = {"commit": head_commit(), "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
