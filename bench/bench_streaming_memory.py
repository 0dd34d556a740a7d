"""Benchmark: peak memory of the streaming data path reading 10k against 100k images (it should not grow).

The path under test is what training on shards runs: `training.data.make_shards.load_shards(..., streaming=True)` (the
`datasets` WebDataset reader), then `torch.utils.data.DataLoader` workers calling `training.data.collator.MoProCollator`
(decode, weak and strong views). Shards of tiny JPEGs (32 px, 1000 per shard, written once with
`training.data.make_shards.write_shards`) keep 100k images quick to write and read; the views are made at 32 px.

Every run is a fresh child process that reads N images and reports its own peak RSS (`ru_maxrss`), that of its
largest DataLoader worker (`RUSAGE_CHILDREN` after the workers are joined), its RSS before reading, and the current
RSS of itself and of its largest worker sampled every few batches. The sampled figures matter for the workers: a
forked process inherits its parent's RSS high-water mark, so a worker's `ru_maxrss` only moves if it outgrows the
main process. Small and large runs alternate over the repetitions; the table gives medians and the ratio
large / small (target: <= 1.10). A shuffle buffer (`--shuffle_buffer`) legitimately grows memory until it is full.

    python bench/bench_streaming_memory.py            # 10k vs 100k images, 2 repetitions
    python bench/bench_streaming_memory.py --quick    # 2k vs 20k images, 2 repetitions (~1-2 minutes)

Writes `bench/results/streaming_memory.json` (git-ignored).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
from environment import write_result  # noqa: E402

TARGET_RATIO = 1.10
SAMPLES_PER_SHARD = 1000
BYTES_PER_SAMPLE_ESTIMATE = 4096  # 32 px JPEG + three tar headers and padding


def tiny_jpegs(count: int, size: int = 32, seed: int = 0) -> list[bytes]:
    """A pool of distinct small JPEGs with smooth random content."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        coarse = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        buffer = io.BytesIO()
        coarse.save(buffer, format="JPEG", quality=90)
        pool.append(buffer.getvalue())
    return pool


def write_tiny_shards(folder: Path, num_samples: int, num_labels: int = 1000) -> list[Path]:
    """Writes ``num_samples`` tiny JPEG samples as shards of 1000 with `write_shards` (lazily, as the CLI does)."""
    from training.data.make_shards import ShardRecord, write_shards

    needed = num_samples * BYTES_PER_SAMPLE_ESTIMATE
    free = shutil.disk_usage(folder).free
    if free < 2 * needed:
        raise SystemExit(f"{folder}: {free / 2**30:.1f} GiB free, about {2 * needed / 2**30:.1f} GiB wanted")
    pool = tiny_jpegs(256)

    def records() -> Iterator[ShardRecord]:
        for index in range(num_samples):
            yield ShardRecord(pool[index % len(pool)], index % num_labels, index, f"img/{index:07d}.jpg")

    return write_shards(records(), folder, samples_per_shard=SAMPLES_PER_SHARD).shard_paths


def read_in_child(args: argparse.Namespace) -> None:
    """Child mode: stream the first ``--num_shards`` shards through the collator and report memory as JSON."""
    import psutil
    import torch
    from torch.utils.data import DataLoader

    from training.data.collator import MoProCollator
    from training.data.make_shards import load_shards
    from training.data.transforms import MoProViewTransforms

    torch.set_num_threads(1)
    shards = sorted(Path(args.shard_dir).glob("shard-*.tar"))[: args.num_shards]
    dataset = load_shards([str(shard) for shard in shards], streaming=True)
    if args.shuffle_buffer:
        dataset = dataset.shuffle(seed=0, buffer_size=args.shuffle_buffer)
    collator = MoProCollator(MoProViewTransforms(args.image_size), seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collator, num_workers=args.num_workers)
    process = psutil.Process()
    rss_before = process.memory_info().rss
    # Peaks can be set by a start-up transient and hide later growth of less than its headroom, so the current
    # RSS of the main process and of the largest worker is also sampled while reading.
    rss_samples: list[tuple[float, float]] = []
    start = time.perf_counter()
    samples = 0
    iterator = iter(loader)
    for index, batch in enumerate(iterator):
        samples += int(batch["labels"].numel())
        del batch
        if index % args.sample_every == 0:
            workers = [child.memory_info().rss for child in process.children()]
            rss_samples.append((process.memory_info().rss / 2**20, max(workers, default=0) / 2**20))
    del iterator  # joins the workers, so that RUSAGE_CHILDREN covers them
    elapsed = time.perf_counter() - start
    kib = 1024  # Linux reports ru_maxrss in KiB
    settled = rss_samples[len(rss_samples) // 10 :] or rss_samples  # past the first 10% (buffers filling)
    report = {
        "samples": samples,
        "seconds": elapsed,
        "rss_before_read_mib": rss_before / 2**20,
        "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 2**20,
        "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 2**20,
        "main_rss_last_mib": rss_samples[-1][0],
        "worker_rss_last_mib": rss_samples[-1][1],
        "worker_rss_max_sampled_mib": max(worker for _, worker in rss_samples),
        "worker_rss_growth_after_10pct_mib": settled[-1][1] - settled[0][1],
        "rss_samples": len(rss_samples),
    }
    print("RESULT " + json.dumps(report))


def run_child(shard_dir: Path, num_shards: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--shard_dir",
        str(shard_dir),
        "--num_shards",
        str(num_shards),
        "--num_workers",
        str(args.num_workers),
        "--batch_size",
        str(args.batch_size),
        "--image_size",
        str(args.image_size),
        "--shuffle_buffer",
        str(args.shuffle_buffer),
        "--sample_every",
        str(args.sample_every),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000], help="small and large image counts")
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2k vs 20k images")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=32, help="view size")
    parser.add_argument("--shuffle_buffer", type=int, default=0, help="streaming shuffle buffer (0: none)")
    parser.add_argument("--sample_every", type=int, default=10, help="batches between RSS samples")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results" / "streaming_memory.json"
    )
    # child mode (internal)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--num_shards", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        read_in_child(args)
        return
    small, large = (2_000, 20_000) if args.quick else args.sizes
    if small % SAMPLES_PER_SHARD or large % SAMPLES_PER_SHARD:
        raise SystemExit(f"sizes must be multiples of {SAMPLES_PER_SHARD}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mopro-bench-shards-", dir=args.workdir) as folder:
        start = time.perf_counter()
        shards = write_tiny_shards(Path(folder), large)
        write_seconds = time.perf_counter() - start
        shard_mib = sum(shard.stat().st_size for shard in shards) / 2**20
        runs: dict[int, list[dict[str, Any]]] = {small: [], large: []}
        for repetition in range(args.repetitions):
            for size in (small, large) if repetition % 2 == 0 else (large, small):
                report = run_child(Path(folder), size // SAMPLES_PER_SHARD, args)
                if report["samples"] != size:
                    raise RuntimeError(f"read {report['samples']} samples instead of {size}")
                runs[size].append(report)
                print(
                    f"  rep {repetition}: {size:>7} images, main peak {report['main_peak_mib']:.0f} MiB, largest "
                    f"worker at the end {report['worker_rss_last_mib']:.0f} MiB, {report['seconds']:.1f} s"
                )
    load_after = os.getloadavg()

    def median(size: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[size])

    metrics = {
        "main process peak RSS (MiB)": "main_peak_mib",
        "largest worker peak RSS (MiB)": "worker_peak_mib",
        "main RSS before reading (MiB)": "rss_before_read_mib",
        "main RSS at the end (MiB)": "main_rss_last_mib",
        "largest worker RSS at the end (MiB)": "worker_rss_last_mib",
        "largest worker RSS, max sampled (MiB)": "worker_rss_max_sampled_mib",
    }
    table = {
        label: {
            "small": median(small, key),
            "large": median(large, key),
            "ratio": median(large, key) / median(small, key),
        }
        for label, key in metrics.items()
    }
    growth = {
        "small": median(small, "main_peak_mib") - median(small, "rss_before_read_mib"),
        "large": median(large, "main_peak_mib") - median(large, "rss_before_read_mib"),
    }
    print(
        f"\nstreaming {small} vs {large} 32 px JPEGs ({len(shards)} shards, {shard_mib:.0f} MiB, written in "
        f"{write_seconds:.0f} s), {args.num_workers} workers, batch {args.batch_size}, views {args.image_size} px, "
        f"shuffle buffer {args.shuffle_buffer}, {args.repetitions} reps, load avg {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    print(f"{'':<38}{small:>12}{large:>12}{'ratio':>8}")
    for label, row in table.items():
        print(f"{label:<38}{row['small']:>12.1f}{row['large']:>12.1f}{row['ratio']:>8.3f}")
    print(f"{'main peak - RSS before (MiB)':<38}{growth['small']:>12.1f}{growth['large']:>12.1f}")
    worker_growth = {size: median(size, "worker_rss_growth_after_10pct_mib") for size in (small, large)}
    print(f"{'worker RSS growth after 10% (MiB)':<38}{worker_growth[small]:>12.1f}{worker_growth[large]:>12.1f}")
    throughput = {size: statistics.median(run["samples"] / run["seconds"] for run in runs[size]) for size in runs}
    print(f"{'img/s':<38}{throughput[small]:>12.0f}{throughput[large]:>12.0f}")
    worst = max(row["ratio"] for label, row in table.items() if "before" not in label)
    print(f"worst ratio {worst:.3f} (target <= {TARGET_RATIO:.2f}: {'met' if worst <= TARGET_RATIO else 'NOT met'})")

    result = {
        "benchmark": "streaming_memory",
        "setup": {
            "sizes": [small, large],
            "samples_per_shard": SAMPLES_PER_SHARD,
            "shard_mib": shard_mib,
            "write_seconds": write_seconds,
            "num_workers": args.num_workers,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "shuffle_buffer": args.shuffle_buffer,
            "repetitions": args.repetitions,
        },
        "table": table,
        "main_growth_mib": growth,
        "worker_rss_growth_after_10pct_mib": {str(size): value for size, value in worker_growth.items()},
        "img_per_s": {str(size): value for size, value in throughput.items()},
        "runs": {str(size): value for size, value in runs.items()},
        "target_ratio": TARGET_RATIO,
        "load_average": {"before": load_before, "after": load_after},
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
