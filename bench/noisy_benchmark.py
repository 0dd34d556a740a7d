"""Robustness to web noise on real images: MoPro vs cross-entropy, same backbone, augmentation, schedule and seed.

Fashion-MNIST with injected label noise (symmetric or natural confusions) plus 20% out-of-distribution images
(MNIST digits, photo patches) with random labels; the clean Fashion-MNIST test set scores the models. Both methods
train through `MoProTrainer` (the code path users run). After every epoch a callback scores, on cached centre-crop
views: clean test accuracy, and on the training set the noise decisions the model would take now (the training
rule of `correct_noisy_labels`, with both OOD rules side by side: the official one and `prototype_distance`).

    python bench/noisy_benchmark.py --setting sym40 --method mopro --epochs 100 --seed 0
    python bench/noisy_benchmark.py --setting sym40 --method ce --epochs 100 --seed 0
    python bench/noisy_benchmark.py --report          # table + plots from every run in bench/results/noisy/

Each run writes `bench/results/noisy/<setting>_<method>_s<seed>/history.json` (one entry per epoch).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_mopro import (  # noqa: E402
    MoProConfig,
    MoProForImageClassification,
    MoProForPreTraining,
    correct_noisy_labels,
    far_from_prototypes,
)
from training.arguments import MoProTrainingArguments  # noqa: E402
from training.collator import MoProCollator  # noqa: E402
from training.noisy_fashion_mnist import build_noisy_fashion_mnist  # noqa: E402
from training.trainer import MoProTrainer  # noqa: E402
from training.transforms import MoProViewTransforms, decode_image  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "noisy"
# name -> (noise_rate, asymmetric_fraction): asymmetric = natural confusions only (shirt<->T-shirt, ...).
SETTINGS = {"sym40": (0.4, 0.0), "sym60": (0.6, 0.0), "asym40": (0.4, 1.0)}
BACKBONE_KWARGS = {"channels": [32, 64, 128, 256]}  # half-width ResNet-18: ~3M parameters, fast at 32 px


def test_views(dataset, transforms: MoProViewTransforms) -> torch.Tensor:
    """Deterministic centre-crop views of a whole (small) dataset, computed once."""
    return torch.stack([transforms.test(decode_image(image)) for image in dataset["image"]])


@torch.no_grad()
def predict(model, pixels: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier logits and embeddings of cached views, in eval mode (no state changes)."""
    logits, embeddings = [], []
    for chunk in pixels.split(batch_size):
        out = model(pixel_values=chunk)
        logits.append(out.logits)
        embeddings.append(out.embeddings)
    return torch.cat(logits), torch.cat(embeddings)


def decision_metrics(corrected, keep, given, true, is_ood) -> dict[str, float]:
    """Relabel accuracy, clean samples wrongly relabelled, and OOD precision/recall of one set of decisions."""
    in_dist = ~is_ood
    noisy, clean = in_dist & (given != true), in_dist & (given == true)
    relabelled = keep & (corrected != given)
    dropped = ~keep

    def ratio(a, b):
        return float(a.sum()) / max(float(b.sum()), 1.0)

    return {
        "noisy_relabelled_right": ratio(noisy & relabelled & (corrected == true), noisy),
        "clean_relabelled_wrong": ratio(clean & relabelled, clean),
        "relabel_precision": ratio(relabelled & in_dist & (corrected == true), relabelled),
        "kept_label_accuracy": ratio(keep & in_dist & (corrected == true), keep & in_dist),
        "ood_precision": ratio(dropped & is_ood, dropped),
        "ood_recall": ratio(dropped & is_ood, is_ood),
        "fraction_dropped": float(dropped.float().mean()),
    }


class EpochScores(TrainerCallback):
    """Scores the model after every epoch on cached views and appends to `history.json`."""

    def __init__(self, trainer_ref, test_x, test_y, train_x, train_meta, out_dir: Path, started: float):
        self.trainer_ref, self.out_dir, self.started = trainer_ref, out_dir, started
        self.test_x, self.test_y, self.train_x, self.meta = test_x, test_y, train_x, train_meta
        self.history: list[dict] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        logits, _ = predict(model, self.test_x)
        entry = {
            "epoch": round(state.epoch),
            "step": state.global_step,
            "test_accuracy": float((logits.argmax(1) == self.test_y).float().mean()),
            "seconds": round(time.time() - self.started, 1),
        }
        if isinstance(model, MoProForPreTraining):
            entry.update(self.noise_decisions(model))
        logs = [h for h in state.log_history if "loss" in h]
        if logs:
            entry["train_loss"] = logs[-1]["loss"]
            for key in ("fraction_kept", "fraction_relabeled", "phase"):
                if key in logs[-1]:
                    entry[f"train_{key}"] = logs[-1][key]
        self.history.append(entry)
        (self.out_dir / "history.json").write_text(json.dumps(self.history, indent=1))
        print(json.dumps(entry), flush=True)
        model.train(was_training)

    def noise_decisions(self, model: MoProForPreTraining) -> dict[str, float]:
        config = model.config
        logits, q = predict(model, self.train_x)
        prototypes = model.mopro.prototypes
        proto_logits = q @ prototypes.T / config.temperature
        given, true, is_ood = self.meta["label"], self.meta["true_label"], self.meta["is_ood"]
        corrected, keep = correct_noisy_labels(
            logits, proto_logits, given, config.alpha, config.pseudo_label_threshold
        )
        out = {f"official_{k}": v for k, v in decision_metrics(corrected, keep, given, true, is_ood).items()}
        far = far_from_prototypes(q, prototypes, config.ood_similarity_threshold)
        distance = decision_metrics(corrected, keep & ~far, given, true, is_ood)
        out.update({f"distance_{k}": v for k, v in distance.items()})
        # A threshold-free view of the distance rule: how well the best prototype similarity ranks OOD samples.
        best = (q @ prototypes.T).max(1).values
        out["distance_auroc"] = auroc(-best, is_ood)
        return out


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of `score` for `positive` (Mann-Whitney, ties counted half)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive.numpy(), score.numpy()))


def run(setting: str, method: str, epochs: int, seed: int, args) -> Path:
    noise_rate, asymmetric = SETTINGS[setting]
    out_dir = RESULTS / f"{setting}_{method}_s{seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    splits, id2label = build_noisy_fashion_mnist(
        num_train=args.num_train, noise_rate=noise_rate, asymmetric_fraction=asymmetric, ood_fraction=0.2,
        num_test=args.num_test, seed=seed,
    )  # fmt: skip
    train, test = splits["train"], splits["test"]
    transforms = MoProViewTransforms(32)
    meta = {
        "label": torch.tensor(train["label"]),
        "true_label": torch.tensor(train["true_label"]),
        "is_ood": torch.tensor(train["is_ood"]),
    }
    config = MoProConfig(
        backbone="resnet18", backbone_kwargs=BACKBONE_KWARGS, image_size=32, num_labels=10, id2label=id2label,
        label2id={v: k for k, v in id2label.items()}, projection_hidden_size=512, queue_size=args.queue_size,
        encoder_momentum=args.encoder_momentum, alpha=args.alpha, pseudo_label_threshold=args.threshold,
        ood_similarity_threshold=args.ood_similarity_threshold,
    )  # fmt: skip
    set_seed(seed)
    model = MoProForPreTraining(config) if method == "mopro" else MoProForImageClassification(config)
    steps_per_epoch = len(train) // args.batch_size
    training_args = MoProTrainingArguments(
        output_dir=str(out_dir / "trainer"), num_train_epochs=epochs, per_device_train_batch_size=args.batch_size,
        optim="sgd", optim_args="momentum=0.9", learning_rate=args.lr, weight_decay=5e-4,
        lr_milestones=[round(epochs * 40 / 90), round(epochs * 80 / 90)], lr_gamma=0.1,
        prototype_start_epoch=1, noise_correction_start_epoch=args.correction_start or round(epochs * 11 / 90),
        baseline="mopro" if method == "mopro" else "ce", dataloader_num_workers=args.workers,
        logging_steps=steps_per_epoch, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
        seed=seed, disable_tqdm=True,
    )  # fmt: skip
    collator = MoProCollator(transforms, train=True, num_labels=10, seed=seed, key_view=method == "mopro")
    trainer = MoProTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
    started = time.time()
    scores = EpochScores(
        trainer, test_views(test, transforms), torch.tensor(test["label"]), test_views(train, transforms), meta,
        out_dir, started,
    )  # fmt: skip
    trainer.add_callback(scores)
    trainer.train()
    summary = {
        "setting": setting, "method": method, "seed": seed, "epochs": epochs, "num_train": len(train),
        "final_test_accuracy": scores.history[-1]["test_accuracy"],
        "best_test_accuracy": max(h["test_accuracy"] for h in scores.history),
        "best_epoch": max(scores.history, key=lambda h: h["test_accuracy"])["epoch"],
        "train_seconds": round(time.time() - started, 1),
        "arguments": vars(args), "noise_correction_start_epoch": training_args.noise_correction_start_epoch,
        "lr_milestones": training_args.lr_milestones,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }  # fmt: skip
    if method == "mopro":
        summary["final_noise_decisions"] = {
            k: v for k, v in scores.history[-1].items() if k.startswith(("official_", "distance_"))
        }
        per_class_decisions(model, scores, meta, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    return out_dir


def per_class_decisions(model, scores: EpochScores, meta, out_dir: Path) -> None:
    """Final per-class counts of clean / relabelled / OOD decisions (official rule), by given label."""
    model.eval()
    logits, q = predict(model, scores.train_x)
    proto_logits = q @ model.mopro.prototypes.T / model.config.temperature
    corrected, keep = correct_noisy_labels(
        logits, proto_logits, meta["label"], model.config.alpha, model.config.pseudo_label_threshold
    )
    rows = []
    for c in range(model.config.num_labels):
        given = meta["label"] == c
        rows.append(
            {
                "class": model.config.id2label[c],
                "given": int(given.sum()),
                "clean": int((given & keep & (corrected == c)).sum()),
                "relabelled": int((given & keep & (corrected != c)).sum()),
                "ood": int((given & ~keep).sum()),
                "truly_ood": int((given & meta["is_ood"]).sum()),
                "truly_noisy": int((given & ~meta["is_ood"] & (meta["true_label"] != c)).sum()),
            }
        )
    (out_dir / "per_class_decisions.json").write_text(json.dumps(rows, indent=1))


def report() -> None:
    """Aggregate every finished run: a markdown table and per-epoch plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*/summary.json"))]
    histories = {p.parent.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*/history.json"))}
    lines = ["| setting | method | seed | epochs | final acc | best acc (epoch) | relabel right | clean relabelled "
             "wrong | OOD P / R (official) | OOD P / R (distance) | OOD AUROC (distance) | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        d = r.get("final_noise_decisions", {})

        def pct(key, d=d):
            return f"{100 * d[key]:.1f}" if key in d else "–"

        cells = [
            r["setting"], r["method"], str(r["seed"]), str(r["epochs"]), f"{100 * r['final_test_accuracy']:.2f}",
            f"{100 * r['best_test_accuracy']:.2f} ({r['best_epoch']})", pct("official_noisy_relabelled_right"),
            pct("official_clean_relabelled_wrong"),
            f"{pct('official_ood_precision')} / {pct('official_ood_recall')}",
            f"{pct('distance_ood_precision')} / {pct('distance_ood_recall')}",
            f"{d['distance_auroc']:.3f}" if "distance_auroc" in d else "–", f"{r['train_seconds'] / 60:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (RESULTS / "table.md").write_text(table + "\n")
    print(table)

    settings = sorted({name.split("_")[0] for name in histories})
    fig, axes = plt.subplots(len(settings), 3, figsize=(15, 4 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        for name, history in histories.items():
            if not name.startswith(setting + "_"):
                continue
            epochs = [h["epoch"] for h in history]
            axes[row][0].plot(epochs, [100 * h["test_accuracy"] for h in history], label=name)
            if "official_ood_recall" in history[0]:
                for rule, style in (("official", "-"), ("distance", "--")):
                    axes[row][1].plot(epochs, [100 * h[f"{rule}_ood_precision"] for h in history], style,
                                      label=f"{name} {rule} precision")  # fmt: skip
                    axes[row][1].plot(epochs, [100 * h[f"{rule}_ood_recall"] for h in history], style,
                                      label=f"{name} {rule} recall")  # fmt: skip
                axes[row][2].plot(epochs, [100 * h["official_noisy_relabelled_right"] for h in history],
                                  label=f"{name} noisy relabelled right")  # fmt: skip
                axes[row][2].plot(epochs, [100 * h["official_clean_relabelled_wrong"] for h in history],
                                  label=f"{name} clean relabelled wrong")  # fmt: skip
        titles = ("clean test accuracy (%)", "OOD precision / recall (%)", "relabelling (%)")
        for col, title in enumerate(titles):
            axes[row][col].set_title(f"{setting}: {title}")
            axes[row][col].set_xlabel("epoch")
            axes[row][col].legend(fontsize=6)
            axes[row][col].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "noisy_benchmark.png", dpi=110)
    print(f"wrote {RESULTS / 'table.md'} and {RESULTS / 'noisy_benchmark.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="sym40")
    parser.add_argument("--method", choices=("mopro", "ce"), default="mopro")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=5000, help="Fashion-MNIST images (OOD added on top)")
    parser.add_argument("--num_test", type=int, default=None, help="clean test images (default: all 10,000)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05, help="0.1 at the official global batch 256, scaled")
    parser.add_argument("--queue_size", type=int, default=4096)
    parser.add_argument("--encoder_momentum", type=float, default=0.99)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--ood_similarity_threshold", type=float, default=0.5)
    parser.add_argument("--correction_start", type=int, default=None, help="default: 11/90 of the epochs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only aggregate finished runs")
    args = parser.parse_args()
    if args.report:
        report()
        return
    run(args.setting, args.method, args.epochs, args.seed, args)


if __name__ == "__main__":
    main()
