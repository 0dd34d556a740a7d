"""The small-image rule's development comparison (issue 24): how the own-data recipe's ResNet-18 should see 32-px
images, chosen on Fashion-MNIST, never on the natural-image benchmark.

    python bench/small_image_dev.py run --lanes 2     # builds the folders, runs what is not finished (two at a time)
    python bench/small_image_dev.py collect --load "two lanes of one thread on 2 cores" [--commit C]
    python bench/render_benchmarks.py                 # BENCHMARKS.md, "Natural images", "The small-image rule"

Data: noisy Fashion-MNIST as image folders (`training.data.noisy_fashion_mnist`, seed 100, no benchmark seed):
3,000 training images, 40% of their labels wrong (half natural confusions), plus 750 MNIST digits and photo patches
with random labels (20%); 2,000 clean test images. Every run is `run_mopro.py --train_dir ... --validation_dir ...`
without a YAML (the own-data recipe, its resolution rule: 28 px -> 32), 12 epochs with lr steps at 5 and 11 (its
4/9 and 8/9), CE or MoPro, and one of three ways to see the images:
- `stride32`: timm's ResNet-18 as it is (the last stage sees 1x1);
- `stride16`: `output_stride=16` (the last stage dilated: 2x2);
- `upsample64`: stride 32 on images resized to 64 px (16x16 after the stem; 3.5x the step time). Run for CE seed 0
  only: it lost 13.5 points there and cost the most.
Results: `bench/results/small_image_dev/<variant>_<method>_s<seed>/` (git-ignored), collected into
`bench/results-committed/small_image_dev.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.environment import head_commit, write_result  # noqa: E402
from bench.natural_benchmark import Job, run  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "small_image_dev"
DATA_SEED, EPOCHS, LR_MILESTONES = 100, "12", ("5", "11")
VARIANTS = {
    "stride32": ["--backbone_kwargs", "{}"],
    "stride16": ["--backbone_kwargs", '{"output_stride": 16}'],
    "upsample64": ["--backbone_kwargs", "{}", "--image_size", "64"],
}
METHODS = {"ce": ["--baseline", "ce"], "mopro": []}
RUNS = [(v, m, s) for s in (0, 1) for v in ("stride32", "stride16") for m in METHODS] + [("upsample64", "ce", 0)]


def build(folder: Path) -> None:
    """The development folders: `train/<class>/<k>.png`, `test/<class>/<k>.png`."""
    from training.data.noisy_fashion_mnist import build_noisy_fashion_mnist

    splits, id2label = build_noisy_fashion_mnist(num_train=3000, noise_rate=0.4, asymmetric_fraction=0.5,
                                                 ood_fraction=0.2, num_test=2000, seed=DATA_SEED)  # fmt: skip
    for split in ("train", "test"):
        for k, row in enumerate(splits[split]):
            class_dir = folder / split / id2label[row["label"]].replace("/", "-")
            class_dir.mkdir(parents=True, exist_ok=True)
            row["image"].save(class_dir / f"{k:05d}.png")


def jobs(data: Path, results: Path) -> list[Job]:
    out = []
    for variant, method, seed in RUNS:
        output = results / f"{variant}_{method}_s{seed}"
        argv = (sys.executable, "training/run_mopro.py", "--train_dir", str(data / "train"),
                "--validation_dir", str(data / "test"), "--seed", str(seed), "--num_train_epochs", EPOCHS,
                "--lr_milestones", *LR_MILESTONES, "--dataloader_num_workers", "1", "--output_dir", str(output),
                "--overwrite_output_dir", "true", *VARIANTS[variant], *METHODS[method])  # fmt: skip
        out.append(Job(output.name, argv, output / "all_results.json"))
    return out


def collect(results: Path, load: str) -> dict:
    runs = {}
    for variant, method, seed in RUNS:
        folder = results / f"{variant}_{method}_s{seed}"
        if not (folder / "all_results.json").is_file():
            runs[folder.name] = None
            continue
        final = json.loads((folder / "all_results.json").read_text())
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        config = json.loads((folder / "config.json").read_text())
        runs[folder.name] = {
            "variant": variant, "method": method, "seed": seed, "final": final["eval_accuracy"],
            "per_epoch": [entry["eval_accuracy"] for entry in history if "eval_accuracy" in entry],
            "train_runtime": final["train_runtime"], "image_size": config["image_size"],
            "backbone_kwargs": config.get("backbone_kwargs") or {},
        }  # fmt: skip
    return {"run_command": "python bench/small_image_dev.py run --lanes 2", "load": load, "epochs": int(EPOCHS),
            "runs": runs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "collect"))
    parser.add_argument("--data_dir", type=Path, default=ROOT / "bench" / "data" / "small_image_dev")
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--load", default="", help="collect: how the machine was shared while the runs ran")
    parser.add_argument("--commit", default=None, help="collect: the commit the runs were made at (default: HEAD)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results-committed" / "small_image_dev.json")
    args = parser.parse_args(argv)
    if args.command == "collect":
        result = collect(args.results_dir, args.load)
        write_result(args.output, {"commit": args.commit or head_commit(), **result})  # + date, command, machine
        print(f"{sum(r is None for r in result['runs'].values())} runs missing")
        return 0
    if not (args.data_dir / "test").is_dir():
        build(args.data_dir)
    return 1 if run(jobs(args.data_dir, args.results_dir), args.lanes, args.results_dir / "logs") else 0


if __name__ == "__main__":
    sys.exit(main())
