"""Benchmark: how many distinct classes a streamed training batch holds, against a uniform shuffle.

WebVision file lists are sorted by class. A streaming reader mixes only within its shuffle buffer (and across its
shard order), so shards that keep the file order give batches of few classes. Measured here, on one class-sorted
list of labels at WebVision 1.0 proportions, as the mean number of distinct labels in each batch of 32 of one
epoch (every batch of the epoch is counted):

- ``uniform``: a uniform random permutation of the whole list (what a map-style sampler gives; the target).
- ``class_sorted_shards``: shards written in file order, read back by the real streaming reader
  (`training.data.sources.build_datasets(shard_dir=..., streaming=True)`: `load_shards` + a shuffle buffer).
- ``shuffled_shards``: shards written in `training.data.make_shards.shard_order` (the CLI default, seed 0), read back
  the same way; the reader reshuffles the shard order every epoch (`IterableDataset.set_epoch`, which the Trainer's
  dataloader calls).
- ``webvision_stream_in_file_order``: the file lists streamed directly (no shards written) as 64 shards of
  consecutive lines (`load_webvision(..., streaming=True)` without ``shuffle_seed``, what `build_datasets` did
  before), through the same shuffle buffer.
- ``webvision_stream``: `build_datasets(webvision_dir=..., streaming=True)`, which deals the lines to its 64
  shards in a seeded random order.

Everything is scaled from WebVision 1.0 (2.44M images, 1000 classes, shards of 1000, buffer 10,000) by
``num_samples / 2.44M``: per-class counts, samples per shard and buffer size, so that classes, shards and buffer
keep their real ratios. Per-class counts are a seeded log-uniform draw between 300 and 10,000 images (WebVision's
long tail; not the real per-class counts), scaled. The shards hold the same 1x1 JPEG for every sample: the reader
never decodes here, so only the labels and the order matter.

    python bench/bench_class_diversity.py                       # 100k labels, 1000 classes (~a few minutes)
    python bench/bench_class_diversity.py --num_samples 2000 --num_classes 50   # smoke run

Writes `bench/results/class_diversity.json` (git-ignored). Target: ``shuffled_shards`` within 5% of ``uniform``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
from environment import write_result  # noqa: E402

WEBVISION_IMAGES = 2_440_000
WEBVISION_SAMPLES_PER_SHARD = 1000
WEBVISION_SHUFFLE_BUFFER = 10_000  # `DataArguments.shuffle_buffer_size` default
TARGET_FRACTION = 0.95


def class_sorted_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """(num_samples,) labels sorted by class, per-class counts log-uniform in [300, 10000] (scaled), each >= 1."""
    rng = np.random.default_rng(seed)
    weights = np.exp(rng.uniform(np.log(300), np.log(10_000), num_classes))
    shares = np.maximum(weights / weights.sum() * num_samples, 1.0)
    counts = np.floor(shares).astype(np.int64)
    remainder = num_samples - counts.sum()  # to the largest fractional parts: exact total, shape kept
    counts[np.argsort(counts - shares)[:remainder]] += 1
    return np.repeat(np.arange(num_classes), counts)


def distinct_per_batch(labels: Iterable[int], batch_size: int) -> float:
    """Mean number of distinct labels per full batch."""
    labels = np.fromiter(labels, dtype=np.int64)
    batches = labels[: len(labels) // batch_size * batch_size].reshape(-1, batch_size)
    return float(np.mean([len(np.unique(batch)) for batch in batches]))


def one_pixel_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (128, 64, 32)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_label_shards(labels: np.ndarray, folder: Path, samples_per_shard: int, shuffle_seed: int | None) -> int:
    """Shards of 1x1 JPEGs with the given labels, in `shard_order` (as the make_shards CLI writes); returns the
    shard count."""
    from training.data.make_shards import ShardRecord, shard_order, write_id2label, write_shards

    image = one_pixel_jpeg()
    order = shard_order(len(labels), shuffle_seed)
    records: Iterator[ShardRecord] = (ShardRecord(image, int(labels[i]), int(i), f"{i}.jpg") for i in order)
    write_id2label(folder, {label: f"class_{label}" for label in range(int(labels.max()) + 1)})
    return len(write_shards(records, folder / "train", samples_per_shard).shard_paths)


def write_webvision_filelists(labels: np.ndarray, root: Path) -> None:
    """A WebVision root with only its file lists (the streamed file lists are read, never the images)."""
    (root / "info").mkdir(parents=True)
    lines = "".join(f"google/q{label:04d}/{i}.jpg {label}\n" for i, label in enumerate(labels))
    (root / "info" / "train_filelist_google.txt").write_text(lines)
    (root / "info" / "train_filelist_flickr.txt").write_text("")
    (root / "info" / "val_filelist.txt").write_text("val000001.jpg 0\n")


def streamed_epochs(
    source: dict, shuffle_buffer: int, epochs: int, seed: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Labels and sample ids of each epoch of the streamed training set, as `build_datasets` gives it (or, for
    ``{"webvision_in_file_order": root}``, the file lists streamed in file order through the same buffer)."""
    from training.data.sources import build_datasets
    from training.data.webvision import load_webvision

    if "webvision_in_file_order" in source:
        train = load_webvision(source["webvision_in_file_order"], "v1", "train", streaming=True, num_shards=64)
        train = train.shuffle(seed=seed, buffer_size=shuffle_buffer)
    else:
        train, _, _ = build_datasets(streaming=True, shuffle_buffer_size=shuffle_buffer, seed=seed, **source)
    train = train.select_columns(["label", "sample_id"])  # before set_epoch: select_columns drops the epoch
    labels, ids = [], []
    for epoch in range(epochs):
        train.set_epoch(epoch)  # what accelerate's DataLoaderShard.set_epoch forwards from the Trainer
        rows = list(train)
        labels.append([row["label"] for row in rows])
        ids.append([row["sample_id"] for row in rows])
    return labels, ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_samples", type=int, default=100_000, help="length of the class-sorted list")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="streamed epochs (each counted; orders compared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples_per_shard", type=int, default=None, help="default: 1000 scaled")
    parser.add_argument("--shuffle_buffer", type=int, default=None, help="default: 10,000 scaled")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write shards (default: a temp dir)")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results" / "class_diversity.json"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    scale = args.num_samples / WEBVISION_IMAGES
    samples_per_shard = args.samples_per_shard or max(round(WEBVISION_SAMPLES_PER_SHARD * scale), 1)
    shuffle_buffer = args.shuffle_buffer or max(round(WEBVISION_SHUFFLE_BUFFER * scale), 1)
    labels = class_sorted_labels(args.num_samples, args.num_classes, args.seed)
    counts = np.bincount(labels, minlength=args.num_classes)
    print(
        f"{args.num_samples} labels, {args.num_classes} classes ({counts.min()}-{counts.max()} per class), "
        f"shards of {samples_per_shard}, shuffle buffer {shuffle_buffer}, batches of {args.batch_size}"
    )
    rng = np.random.default_rng(args.seed)
    rows = {"uniform": {"distinct_per_batch": [distinct_per_batch(rng.permutation(labels), args.batch_size)]}}

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        sources = {}
        for name, shuffle_seed in (("class_sorted_shards", None), ("shuffled_shards", 0)):
            start = time.perf_counter()
            folder = Path(workdir) / name
            num_shards = write_label_shards(labels, folder, samples_per_shard, shuffle_seed)
            print(f"{name}: wrote {num_shards} shards in {time.perf_counter() - start:.1f} s")
            sources[name] = {"shard_dir": str(folder)}
        write_webvision_filelists(labels, Path(workdir) / "webvision")
        sources["webvision_stream_in_file_order"] = {"webvision_in_file_order": str(Path(workdir) / "webvision")}
        sources["webvision_stream"] = {"webvision_dir": str(Path(workdir) / "webvision"), "num_streaming_shards": 64}
        for name, source in sources.items():
            start = time.perf_counter()
            epoch_labels, epoch_ids = streamed_epochs(source, shuffle_buffer, args.epochs, args.seed)
            if any(sorted(ids) != list(range(args.num_samples)) for ids in epoch_ids):
                raise RuntimeError(f"{name}: an epoch did not hold every sample exactly once")
            rows[name] = {
                "distinct_per_batch": [distinct_per_batch(epoch, args.batch_size) for epoch in epoch_labels],
                "order_differs_between_epochs": len(epoch_ids) < 2 or epoch_ids[0] != epoch_ids[1],
                "read_seconds": round(time.perf_counter() - start, 1),
            }

    uniform = rows["uniform"]["distinct_per_batch"][0]
    print(f"\n| order | distinct classes per batch of {args.batch_size} (per epoch) | of uniform |")
    print("|---|---|---|")
    for name, row in rows.items():
        row["fraction_of_uniform"] = round(min(row["distinct_per_batch"]) / uniform, 4)
        per_epoch = ", ".join(f"{value:.2f}" for value in row["distinct_per_batch"])
        print(f"| {name} | {per_epoch} | {100 * row['fraction_of_uniform']:.1f}% |")
    passed = rows["shuffled_shards"]["fraction_of_uniform"] >= TARGET_FRACTION
    print(f"\nshuffled_shards within {100 * (1 - TARGET_FRACTION):.0f}% of uniform: {passed}")
    result = {
        "num_samples": args.num_samples,
        "num_classes": args.num_classes,
        "per_class_min": int(counts.min()),
        "per_class_max": int(counts.max()),
        "batch_size": args.batch_size,
        "samples_per_shard": samples_per_shard,
        "shuffle_buffer": shuffle_buffer,
        "epochs": args.epochs,
        "target_fraction_of_uniform": TARGET_FRACTION,
        "shuffled_shards_within_target": passed,
        "orders": rows,
    }
    write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()
