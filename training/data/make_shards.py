"""Write image-classification data as WebDataset tar shards, and stream them back with `datasets`.

Each shard ``shard-00000.tar`` holds, per sample, ``<key>.jpg`` (encoded image), ``<key>.cls`` (integer label)
and ``<key>.json`` (``{"sample_id": int, "path": original path}``). Shards are written one at a time from
iterators, so memory stays flat for any dataset size.

The CLI writes the samples in a seeded random order over the whole split (``--shuffle_seed``, default 0; sample
ids keep the source order). File lists and image folders are sorted by class, and a streaming reader only mixes
within its shuffle buffer: class-sorted shards give batches of few classes (see BENCHMARKS.md, "Class diversity
of streaming batches"). The reader adds a new shard order every epoch. Layout written by the CLI::

    output_dir/id2label.json
    output_dir/<split>/shard-00000.tar ...

Example::

    python -m training.data.make_shards --webvision_dir /data/webvision --split train --output_dir /data/wv-shards
    python -m training.data.make_shards --image_folder photos/train --split train --output_dir shards
    python -m training.data.make_shards --dataset_name cifar10 --image_column img --split test --output_dir shards
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, IterableDataset, Value, load_dataset

from modeling_mopro.cli import check_output_dir

from .image_folder import image_folder_classes
from .transforms import BadImageError, ImageSource, decode_image, describe_image_source, read_encoded_image
from .webvision import WEBVISION_NUM_CLASSES

logger = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{index:05d}.tar"
ID2LABEL_FILE = "id2label.json"
SHARD_FEATURES = Features(
    {"image": Image(decode=False), "label": Value("int64"), "sample_id": Value("int64"), "path": Value("string")}
)

# Leading bytes of each format, to pass already encoded files through untouched.
_MAGIC = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG"}


@dataclass(frozen=True)
class ShardRecord:
    """One sample to write: an image in any form `decode_image` accepts, its label and id."""

    image: ImageSource
    label: int
    sample_id: int
    path: str = ""  # original location, kept in the shard for tracing bad samples back


@dataclass
class ShardSummary:
    """What `write_shards` wrote."""

    shard_paths: list[Path] = field(default_factory=list)
    num_samples: int = 0
    num_skipped: int = 0


def _encoded_image(source: ImageSource, image_format: str) -> bytes:
    """Returns the image as bytes of ``image_format``, passing already encoded files through unchanged.

    Other inputs are decoded and re-encoded (JPEG at quality 95: lossy, PNG: lossless).

    Raises:
        BadImageError: The file is missing or cannot be decoded.
    """
    raw = source
    if isinstance(raw, dict):
        raw = raw.get("bytes") if raw.get("bytes") is not None else raw.get("path")
    if isinstance(raw, (str, os.PathLike)):
        raw = read_encoded_image(raw)[0]  # regular files only (a pipe would block), a missing one a BadImageError
    if isinstance(raw, (bytes, bytearray, memoryview)) and bytes(raw[:8]).startswith(_MAGIC[image_format]):
        return bytes(raw)
    image = decode_image(raw if raw is not None else source)
    buffer = io.BytesIO()
    image.save(buffer, format=_PIL_FORMAT[image_format], **({"quality": 95} if image_format == "jpg" else {}))
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(payload))


def write_shards(
    records: Iterable[ShardRecord],
    output_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    overwrite: bool = False,
) -> ShardSummary:
    """Writes records to WebDataset shards of ``samples_per_shard`` samples, one shard at a time.

    Unreadable images are skipped with a warning. A shard is written under a temporary name and renamed when
    complete, so an interrupted run never leaves a truncated ``shard-*.tar`` behind.

    Args:
        records: The samples, consumed lazily.
        output_dir: Created if missing.
        samples_per_shard: Samples per tar file (the last one may hold fewer).
        image_format: "jpg" (default; non-JPEG inputs are re-encoded at quality 95) or "png" (lossless).
        overwrite: Delete the ``shard-*.tar`` already in ``output_dir`` first; without it they are refused.

    Returns:
        The written shard paths and the counts of written and skipped samples.

    Raises:
        FileExistsError: ``output_dir`` already holds shards and ``overwrite`` is False.
    """
    if image_format not in _MAGIC:
        raise ValueError(f"image_format must be one of {sorted(_MAGIC)}, got {image_format!r}")
    check_samples_per_shard(samples_per_shard)
    output_dir = Path(output_dir)
    _check_shard_folder(output_dir, overwrite)
    # Old shards beyond the new count would otherwise be read with the new ones.
    for old in existing_shards(output_dir):
        old.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = ShardSummary()
    tar: tarfile.TarFile | None = None
    in_shard = 0

    def close_shard() -> None:
        nonlocal tar, in_shard
        if tar is not None:
            tar.close()
            final_path = output_dir / SHARD_PATTERN.format(index=len(summary.shard_paths))
            os.replace(tar.name, final_path)
            summary.shard_paths.append(final_path)
        tar, in_shard = None, 0

    for record in records:
        try:
            image_bytes = _encoded_image(record.image, image_format)
        except BadImageError as error:
            summary.num_skipped += 1
            logger.warning(
                "Skipping sample_id=%d (%s): %s", record.sample_id, record.path or error.source, error.reason
            )
            continue
        if tar is None:
            temporary = output_dir / (SHARD_PATTERN.format(index=len(summary.shard_paths)) + ".partial")
            tar = tarfile.open(temporary, "w")
        key = f"{summary.num_samples:09d}"  # running index: unique keys even if sample ids repeat
        metadata = {"sample_id": int(record.sample_id), "path": record.path or describe_image_source(record.image)}
        _add_member(tar, f"{key}.{image_format}", image_bytes)
        _add_member(tar, f"{key}.cls", str(int(record.label)).encode())
        _add_member(tar, f"{key}.json", json.dumps(metadata).encode())
        summary.num_samples += 1
        in_shard += 1
        if in_shard == samples_per_shard:
            close_shard()
    close_shard()
    logger.info(
        "Wrote %d samples in %d shards to %s (%d skipped)",
        summary.num_samples,
        len(summary.shard_paths),
        output_dir,
        summary.num_skipped,
    )
    return summary


def check_samples_per_shard(samples_per_shard: int) -> None:
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(
            f"samples_per_shard (--samples_per_shard) must be a positive number of samples per tar file, "
            f"got {samples_per_shard!r}; e.g. 1000"
        )


def _check_shard_folder(folder: str | os.PathLike, overwrite: bool) -> None:  # earlier shards are kept unless asked
    held = lambda f: [p.name for p in existing_shards(f)]  # noqa: E731
    check_output_dir(folder, overwrite, held, "{n} shard file(s) ({names})", hint="write another --split, ")


def existing_shards(output_dir: str | os.PathLike) -> list[Path]:
    """The ``shard-*.tar`` (and interrupted ``.partial``) files already in ``output_dir``."""
    folder = Path(output_dir)
    return sorted([*folder.glob("shard-*.tar"), *folder.glob("shard-*.tar.partial")]) if folder.is_dir() else []


def shard_order(num_samples: int, seed: int | None) -> np.ndarray:
    """The order in which `write_shards` should receive ``num_samples`` samples: a permutation seeded by ``seed``
    over the whole list, or the source order when ``seed`` is None.

    A permutation of the whole list (not per shard) puts every class in every shard, so that a streaming reader's
    shuffle buffer draws from all classes; the same seed gives the same shards.
    """
    if seed is None:
        return np.arange(num_samples)
    return np.random.default_rng(seed).permutation(num_samples)


def records_from_dataset(
    dataset: Dataset | IterableDataset,
    image_column: str = "image",
    label_column: str = "label",
    shuffle_seed: int | None = None,
) -> Iterator[ShardRecord]:
    """Yields the samples of a `datasets` image-classification dataset without decoding its images.

    Sample ids come from a ``sample_id`` column when present, else from the position in the dataset.

    Args:
        shuffle_seed: Yield in `shard_order` (random access into a map-style `Dataset`); None yields in order.

    Raises:
        ValueError: ``shuffle_seed`` with an `IterableDataset` (a stream has no random access).
    """
    if isinstance(dataset.features.get(image_column) if dataset.features else None, Image):
        dataset = dataset.cast_column(image_column, Image(decode=False))
    order = None
    if shuffle_seed is not None:
        if not isinstance(dataset, Dataset):
            raise ValueError("shuffle_seed needs a map-style Dataset; load it without streaming=True")
        order = shard_order(len(dataset), shuffle_seed)
        dataset = dataset.select(order)
    for position, example in enumerate(dataset):
        index = position if order is None else int(order[position])
        image = example[image_column]
        path = (image.get("path") or "") if isinstance(image, dict) else image if isinstance(image, str) else ""
        yield ShardRecord(image, example[label_column], example.get("sample_id", index), path)


def write_id2label(output_dir: str | os.PathLike, id2label: dict[int, str]) -> Path:
    """Writes ``id2label.json``; refuses to overwrite a different mapping (splits must share one)."""
    path = Path(output_dir) / ID2LABEL_FILE
    serialisable = {str(index): name for index, name in sorted(id2label.items())}
    if path.is_file() and json.loads(path.read_text()) != serialisable:
        raise ValueError(f"{path} already holds a different label mapping; shard every split with the same classes")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(serialisable, indent=1))
    return path


def read_id2label(shard_root: str | os.PathLike) -> dict[int, str]:
    """Reads ``id2label.json`` from a shard root (or the folder above a split folder)."""
    for candidate in (Path(shard_root) / ID2LABEL_FILE, Path(shard_root).parent / ID2LABEL_FILE):
        if candidate.is_file():
            return {int(index): name for index, name in json.loads(candidate.read_text()).items()}
    raise FileNotFoundError(
        f"no {ID2LABEL_FILE} in {shard_root} or its parent; write one with training.data.make_shards.write_id2label"
    )


def shard_files(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Resolves a shard folder (its ``shard-*.tar``), a single tar, or a list of tars to sorted file paths."""
    if isinstance(shards, (str, os.PathLike)):
        path = Path(shards)
        files = sorted(path.glob("shard-*.tar")) if path.is_dir() else [path]
    else:
        files = [Path(shard) for shard in shards]
    missing = [str(file) for file in files if not file.is_file()]
    if not files or missing:
        raise FileNotFoundError(f"no shard files found at {shards}" + (f" (missing: {missing})" if missing else ""))
    return [str(file) for file in files]


def load_shards(
    shards: str | os.PathLike | Sequence[str | os.PathLike], streaming: bool = True, cache_dir: str | None = None
) -> Dataset | IterableDataset:
    """Loads WebDataset shards written by `write_shards`.

    Args:
        shards: A folder of ``shard-*.tar`` files, one tar, or a list of tars. Streaming, each tar is a shard
            that Accelerate and DataLoader workers can assign to a different reader.
        streaming: Stream the tars (default) instead of converting them into an Arrow cache.
        cache_dir: `datasets` cache folder for the non-streaming conversion.

    Returns:
        Columns ``image`` (undecoded ``{"bytes", "path"}``, path being the original location), ``label``,
        ``sample_id`` and ``path`` (the original location, else the sample's key in its shard: what names it in a
        noise report).
    """
    files = shard_files(shards)
    dataset = load_dataset(
        "webdataset", data_files={"train": files}, split="train", streaming=streaming, cache_dir=cache_dir
    )
    image_fields = [name for name in ("jpg", "png") if name in dataset.features]
    if len(image_fields) != 1 or "cls" not in dataset.features or "json" not in dataset.features:
        raise ValueError(f"{files[0]} is not a shard of training.data.make_shards (fields: {list(dataset.features)})")
    image_field = image_fields[0]
    dataset = dataset.cast_column(image_field, Image(decode=False))

    def to_columns(example: dict) -> dict:
        image = example[image_field]
        path = example["json"]["path"] or image["path"]
        return {
            "image": {"bytes": image["bytes"], "path": path},
            "label": example["cls"],
            "sample_id": example["json"]["sample_id"],
            "path": path,
        }

    return dataset.map(to_columns, remove_columns=list(dataset.features), features=SHARD_FEATURES)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--webvision_dir", help="WebVision root (with info/)")
    source.add_argument("--image_folder", help="folder with one subfolder of images per class")
    source.add_argument("--dataset_name", help="a `datasets` dataset name or local path")
    parser.add_argument("--webvision_version", default="v1", choices=sorted(WEBVISION_NUM_CLASSES))
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--split", default="train", help="split to shard; output goes to OUTPUT_DIR/SPLIT")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in OUTPUT_DIR/SPLIT")
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--image_format", default="jpg", choices=sorted(_MAGIC))
    parser.add_argument(
        "--shuffle_seed",
        type=int,
        default=0,
        help="seed of the random sample order over the whole split (class-sorted shards stream poorly mixed)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> ShardSummary:
    """CLI entry point: shards one split of one source into ``OUTPUT_DIR/SPLIT``."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Checked before any input is read: a WebVision list or a Hub dataset takes long to go through.
    check_samples_per_shard(args.samples_per_shard)
    split_dir = Path(args.output_dir) / args.split
    _check_shard_folder(split_dir, args.overwrite)
    for flag, folder in (("--webvision_dir", args.webvision_dir), ("--image_folder", args.image_folder)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{flag} {folder} is not a folder; give the path of an existing folder")
    kind, root = (
        ("webvision", args.webvision_dir) if args.webvision_dir
        else ("imagefolder", args.image_folder) if args.image_folder else ("hf", args.dataset_name)
    )  # fmt: skip
    class_names = None
    if kind == "imagefolder" and (Path(args.output_dir) / ID2LABEL_FILE).is_file():
        # A later split (e.g. validation) may lack classes: label it with the classes already written.
        known = list(read_id2label(args.output_dir).values())
        unknown = sorted(set(image_folder_classes(root)) - set(known))
        if unknown:
            raise ValueError(f"classes {unknown} of {root} are not in {args.output_dir}/{ID2LABEL_FILE}")
        class_names = known
    from .sources import load_source  # it reads shards with this module's reader

    # The one reader of every layout. A WebVision list in its (class-sorted) file order is read lazily; the random
    # order needs random access, so the list or `datasets` data is loaded (Arrow) first.
    dataset, id2label = load_source(
        kind, root, args.split, streaming=kind == "webvision" and args.shuffle_seed is None, num_streaming_shards=1,
        webvision_version=args.webvision_version, class_names=class_names, config_name=args.dataset_config_name,
        label_column=args.label_column,
    )  # fmt: skip
    columns = (args.image_column, args.label_column) if kind == "hf" else ("image", "label")
    if kind == "hf" and not hasattr(dataset.features[args.label_column], "names"):
        raise ValueError(f"column {args.label_column!r} of {root} is not a ClassLabel")
    records = records_from_dataset(dataset, *columns, args.shuffle_seed)
    write_id2label(args.output_dir, id2label)
    summary = write_shards(records, split_dir, args.samples_per_shard, args.image_format, overwrite=args.overwrite)
    if summary.num_samples == 0:
        source = args.webvision_dir or args.image_folder or args.dataset_name
        raise ValueError(
            f"no images written from {source} (split {args.split!r}): it holds no readable images "
            f"({summary.num_skipped} skipped as unreadable); check the path and the files"
        )
    return summary


if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
