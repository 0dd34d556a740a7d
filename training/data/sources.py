"""Every data source, read in one place: `load_source` (one split of one layout, for training, evaluation, the noise
report and `make_shards`) and `build_datasets` (training's train/eval pair from its arguments).

Every returned dataset has an image column (undecoded: path string, ``{"bytes", "path"}`` dict or bytes;
`training.data.collator.MoProCollator` decodes it in the DataLoader workers), a label column (int), both named as
``image_column_name`` / ``label_column_name`` say (default "image" / "label", so pass the same names to the
collator), and a ``sample_id`` column (a unique int per sample; always for training). Sources, one at a time:

* the noisy Fashion-MNIST demo (default, offline),
* ``dataset_name``: any `datasets` image-classification dataset (``load_dataset``),
* ``train_dir`` / ``validation_dir``: image folders with one subfolder per class (`training.data.image_folder`: the
  reader and label rule the evaluation scripts use too),
* ``webvision_dir``: WebVision in its native layout (``webvision_version`` "v1" or "v2"),
* ``shard_dir``: WebDataset shards written by `training.data.make_shards` (``train/``, ``validation/``).

Streaming and multiple processes: the streaming datasets are *not* split by node here. Train with
``TrainingArguments(accelerator_config={"dispatch_batches": False})``: Accelerate then gives each rank its own
whole shards (``IterableDataset.shard``) when ``n_shards >= world_size``, and each rank decodes only its data.
Splitting here as well would shard twice; splitting here with batch dispatching silently drops data. Choose
shard counts that are multiples of ``world_size * dataloader_num_workers`` for balanced readers.

Streamed epochs: `StreamedEpochs` (used by `MoProTrainer` for every streamed training set) cuts each process's
stream into epochs of exactly ``samples_per_epoch // global batch`` optimizer steps, restarting the stream in a new
order whenever a process runs out, so that every process takes the same number of steps whatever the shard layout.
Evaluation data is always map-style, also when training streams (`build_datasets`): the Trainer then splits it
evenly over the processes and counts every image exactly once.

Streaming order: a streamed training set goes through a shuffle buffer (``shuffle_buffer_size``), and the Trainer's
``set_epoch`` gives every epoch a new shard order and buffer seed. A buffer only mixes what is near in the
stream: write shards with `training.data.make_shards`, whose random sample order puts every class in every shard.
A streamed WebVision file list is dealt to its shards in a seeded random order for the same reason. Class-sorted
streams (a streamed image folder, shards written in class order) give batches of few classes (BENCHMARKS.md,
"Class diversity of streaming batches").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, IterableDataset, Value, load_dataset

from .image_folder import read_image_folder
from .make_shards import load_shards, read_id2label, shard_files
from .noisy_fashion_mnist import build_noisy_fashion_mnist
from .webvision import load_webvision, read_webvision_class_names, webvision_num_classes

logger = logging.getLogger(__name__)

AnyDataset = Dataset | IterableDataset
EVAL_SPLIT_NAMES = ("validation", "val", "test")


@dataclass
class DataArguments:
    """Where the training data comes from and how it is read (usable with ``HfArgumentParser``)."""

    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` dataset name or local path."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of `dataset_name`."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder (class subfolders) for training."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    webvision_dir: str | None = field(default=None, metadata={"help": "WebVision root folder (holding info/)."})
    webvision_version: str = field(default="v1", metadata={"help": "WebVision version: v1 (1000) or v2 (5000)."})
    shard_dir: str | None = field(default=None, metadata={"help": "Output folder of training.data.make_shards."})
    image_column_name: str = field(default="image", metadata={"help": "Image column of `dataset_name`."})
    label_column_name: str = field(default="label", metadata={"help": "Label column of `dataset_name`."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data instead of loading it."})
    shuffle_buffer_size: int = field(default=10000, metadata={"help": "Shuffle buffer when streaming."})
    num_streaming_shards: int = field(
        default=64, metadata={"help": "Shards of streamed WebVision/demo data (multiple of ranks x workers)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Random subset of the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Random subset of the evaluation set."})
    num_train: int = field(default=10000, metadata={"help": "Demo: in-distribution training images."})
    num_test: int | None = field(default=None, metadata={"help": "Demo: clean test images (default all 10k)."})
    noise_rate: float = field(default=0.4, metadata={"help": "Demo: fraction of wrong in-distribution labels."})
    asymmetric_fraction: float = field(default=0.5, metadata={"help": "Demo: share of natural confusions."})
    ood_fraction: float = field(default=0.2, metadata={"help": "Demo: fraction of out-of-distribution images."})
    crop_min_scale: float = field(
        default=0.2,
        metadata={
            "help": "Smallest area of RandomResizedCrop for both training views (official 0.2). 1.0 keeps the whole "
            "image (resized and flipped only): a weaker augmentation, under which CE memorises noisy labels sooner."
        },
    )
    noise_report: bool = field(
        default=True, metadata={"help": "After training, write the per-sample noise decisions on the train set."}
    )

    def __post_init__(self):
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"`crop_min_scale` must be in (0, 1] (an area fraction), got {self.crop_min_scale}.")


def _from_demo(args: DataArguments, seed: int) -> tuple[AnyDataset, AnyDataset, dict[int, str]]:
    splits, id2label = build_noisy_fashion_mnist(
        num_train=args.num_train,
        noise_rate=args.noise_rate,
        asymmetric_fraction=args.asymmetric_fraction,
        ood_fraction=args.ood_fraction,
        num_test=args.num_test,
        seed=seed,
    )
    train, test = splits["train"], splits["test"]
    if args.streaming:  # in memory anyway; streaming here exercises the streaming code path
        train = train.to_iterable_dataset(num_shards=min(args.num_streaming_shards, len(train)))
    return train, test, id2label


def _eval_split(splits: DatasetDict, source: str) -> AnyDataset | None:
    for name in EVAL_SPLIT_NAMES:
        if name in splits:
            return splits[name]
    logger.warning("%s has no %s split: no evaluation dataset", source, "/".join(EVAL_SPLIT_NAMES))
    return None


def _id2label_from_features(dataset: AnyDataset, label_column: str, source: str) -> dict[int, str]:
    feature = (dataset.features or {}).get(label_column)
    if hasattr(feature, "names"):
        return dict(enumerate(feature.names))
    if isinstance(dataset, Dataset):  # plain ints: name the classes by number
        return {index: str(index) for index in range(int(np.max(dataset[label_column])) + 1)}
    raise ValueError(f"column {label_column!r} of {source} is not a ClassLabel; cannot count classes when streaming")


def _from_hub(args: DataArguments, seed: int) -> tuple[AnyDataset, AnyDataset | None, dict[int, str]]:
    splits, id2label = load_source(
        "hf", args.dataset_name, None, args.streaming, config_name=args.dataset_config_name,
        label_column=args.label_column_name,
    )  # fmt: skip
    eval_dataset = _eval_split(splits, args.dataset_name)
    if isinstance(eval_dataset, IterableDataset):  # evaluation is map-style (module docstring): load that split
        eval_dataset = load_hf_dataset(args.dataset_name, eval_dataset.split, args.dataset_config_name)
    return splits["train"], eval_dataset, id2label


def _from_image_folders(args: DataArguments, seed: int) -> tuple[AnyDataset, AnyDataset | None, dict[int, str]]:
    # The validation folder is labelled with the training folder's classes.
    train, id2label = load_source("imagefolder", args.train_dir)
    validation = args.validation_dir and load_source(
        "imagefolder", args.validation_dir, class_names=[*id2label.values()]
    )
    eval_dataset = validation[0] if validation else None
    if args.streaming:
        # Sample ids first: a streamed training set cannot number its samples afterwards.
        train = train.add_column("sample_id", np.arange(len(train), dtype=np.int64))
        train = train.to_iterable_dataset(num_shards=max(1, min(args.num_streaming_shards, len(train))))
    return train, eval_dataset, id2label


def _from_webvision(args: DataArguments, seed: int) -> tuple[AnyDataset, AnyDataset, dict[int, str]]:
    # Streamed, the lines are dealt to the shards in a seeded random order: the file lists are sorted by class.
    read = lambda split, streaming: load_source(  # noqa: E731
        "webvision", args.webvision_dir, split, streaming, args.webvision_version, args.num_streaming_shards, seed
    )
    train, id2label = read("train", args.streaming)
    return train, read("validation", False)[0], id2label  # validation map-style (50,000 paths): module docstring


def load_source(
    kind: str,
    root: str | os.PathLike,
    split: str | None = "train",
    streaming: bool = False,
    webvision_version: str = "v1",
    num_streaming_shards: int = 64,
    seed: int | None = None,
    class_names: list[str] | None = None,
    config_name: str | None = None,
    label_column: str = "label",
) -> tuple[AnyDataset | DatasetDict, dict[int, str]]:
    """One split of a data source and its classes: the one dispatcher over the data layouts, for training
    (`build_datasets`) and evaluation (`image_datasets.dataset_from_arguments`, which the noise report uses too).

    Kinds (`SOURCE_KINDS`): "imagefolder" (`root/<class>/<image>`, `training.data.image_folder`; `class_names`
    labels it with another folder's classes; a "path" column holds each file relative to `root`), "webvision" (a
    WebVision root; split "validation" needs only `info/val_filelist.txt`), "shards" (a `make_shards` folder, every
    shard checked first), "hf" (a `save_to_disk` folder or a `load_dataset` name; split None gives every split, as
    a `DatasetDict`). Images stay undecoded; the columns are "image" and "label" except for "hf", which keeps the
    dataset's own (its classes are read from `label_column`).
    """
    if kind == "imagefolder":
        paths, labels, names = read_image_folder(root, class_names)
        features = Features({"image": Image(decode=False), "label": ClassLabel(names=names), "path": Value("string")})
        columns = {"image": [{"bytes": None, "path": p} for p in paths], "label": labels,
                   "path": [os.path.relpath(p, root) for p in paths]}  # fmt: skip
        return Dataset.from_dict(columns, features=features), dict(enumerate(names))
    if kind == "webvision":
        dataset = load_webvision(root, webvision_version, split, streaming, num_streaming_shards, seed)
        return dataset, read_webvision_class_names(root, webvision_num_classes(webvision_version))
    if kind == "shards":
        check_shards(Path(root) / split)
        return load_shards(Path(root) / split, streaming=streaming), read_id2label(root)
    if kind == "hf":
        dataset = load_hf_dataset(str(root), split, config_name, streaming)
        if split is None and "train" not in dataset:
            raise ValueError(f"{root} has no train split (splits: {list(dataset)})")
        return dataset, _id2label_from_features(dataset["train"] if split is None else dataset, label_column, root)
    raise ValueError(f"unknown data source {kind!r} ({', '.join(SOURCE_KINDS)})")


SOURCE_KINDS = ("imagefolder", "webvision", "shards", "hf")


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a `save_to_disk` folder (a `Dataset` or a `DatasetDict`)."""
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def load_hf_dataset(name_or_path: str, split: str | None = "train", config_name: str | None = None, streaming=False):
    """A `save_to_disk` folder's split, or `load_dataset(name_or_path, config_name, split=split)` (offline this only
    works for local files or a filled cache); split None: every split."""
    path = Path(name_or_path)
    if is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if split is None:
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
        return loaded[split] if isinstance(loaded, DatasetDict) else loaded
    return load_dataset(name_or_path, config_name, split=split, streaming=streaming)


def with_webvision_paths(dataset: Dataset, root: str | os.PathLike, image_column: str = "image") -> Dataset:
    """Adds a `path` column: each image's path relative to the WebVision root, as in the official `pseudo_label.json`."""
    root = os.path.abspath(root)
    paths = [os.path.relpath(os.path.abspath(image), root) for image in dataset[image_column]]
    return dataset.add_column("path", paths)


_TAR_BLOCK = 512


def check_shards(shards: str | os.PathLike) -> list[str]:
    """The shard files of a `training.data.make_shards` folder, each checked to be a whole tar file, before any reading.

    A damaged shard would otherwise fail (a bare ``tarfile.ReadError``, no file named) inside the DataLoader,
    possibly hours into training. The check is O(1) per shard: a tar header at the start, a size in whole 512-byte
    blocks, and the two zero blocks that end every complete archive (tarfile pads the end with them).

    Raises:
        ValueError: A shard is not a complete tar file; the message names it.
    """
    files = shard_files(shards)
    for file in files:
        size = os.path.getsize(file)
        if not tarfile.is_tarfile(file):
            problem = "not a tar file"
        elif size % _TAR_BLOCK or size < 2 * _TAR_BLOCK:
            problem = f"truncated ({size} bytes, not whole {_TAR_BLOCK}-byte tar blocks)"
        else:
            with open(file, "rb") as handle:
                handle.seek(size - 2 * _TAR_BLOCK)
                problem = None if not any(handle.read()) else "truncated (no end-of-archive blocks)"
        if problem:
            raise ValueError(f"shard {file} is {problem}; write it again with training.data.make_shards or remove it")
    return files


def _from_shards(args: DataArguments, seed: int) -> tuple[AnyDataset, AnyDataset | None, dict[int, str]]:
    root = Path(args.shard_dir)
    eval_splits = [name for name in EVAL_SPLIT_NAMES if (root / name).is_dir()]
    train, id2label = load_source("shards", root, "train", streaming=args.streaming)
    # Validation is map-style (converted once into the `datasets` cache): see the module docstring.
    eval_dataset = load_source("shards", root, eval_splits[0])[0] if eval_splits else None
    return train, eval_dataset, id2label


_SOURCES = {
    "dataset_name": _from_hub,
    "train_dir": _from_image_folders,
    "webvision_dir": _from_webvision,
    "shard_dir": _from_shards,
}


def _prepare(
    dataset: AnyDataset, args: DataArguments, max_samples: int | None, is_train: bool, seed: int
) -> AnyDataset:
    """Leaves images undecoded, ensures sample ids, subsets and (streaming) shuffles."""
    features = dataset.features or {}
    image_feature = features.get(args.image_column_name)
    if isinstance(image_feature, Image) and image_feature.decode:
        # Decoding belongs to the collator: in the workers, once per image, skipping bad files.
        dataset = dataset.cast_column(args.image_column_name, Image(decode=False))
    if "sample_id" not in features and isinstance(dataset, Dataset):
        dataset = dataset.add_column("sample_id", np.arange(len(dataset), dtype=np.int64))
    elif "sample_id" not in features and is_train:
        # Per-stream indices restart in every shard/worker, so ids cannot be added to a stream afterwards.
        raise ValueError(
            "a streamed training set needs a sample_id column; write it as shards with training.data.make_shards "
            "(which numbers the samples) or load it without streaming"
        )
    if isinstance(dataset, IterableDataset):
        # Subsets are shuffled too: file lists are sorted by class, so a prefix would hold few classes.
        if is_train or max_samples is not None:
            dataset = dataset.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
        return dataset.take(max_samples) if max_samples is not None else dataset
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    return dataset


def _as_data_arguments(data_args: object | None, overrides: dict) -> DataArguments:
    """Reads the `DataArguments` fields from any object that has (some of) them, then applies overrides.

    Duck typing lets a script pass its own arguments dataclass; fields it lacks keep their defaults, fields
    unknown here are ignored.
    """
    names = {data_field.name for data_field in dataclasses.fields(DataArguments)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown data arguments {unknown}")
    values = {name: getattr(data_args, name) for name in names if hasattr(data_args, name)}
    return DataArguments(**{**values, **overrides})


def _rename_columns(dataset: AnyDataset | None, renames: dict[str, str]) -> AnyDataset | None:
    renames = {old: new for old, new in renames.items() if old != new}
    return dataset.rename_columns(renames) if dataset is not None and renames else dataset


def build_datasets(
    data_args: object | None = None, seed: int = 42, **overrides
) -> tuple[AnyDataset, AnyDataset | None, dict[int, str]]:
    """Builds the training and evaluation datasets from the one source named in the arguments.

    Args:
        data_args: A `DataArguments`, or any object with attributes of the same names (missing ones take the
            defaults); None means the defaults, i.e. the noisy Fashion-MNIST demo.
        **overrides: `DataArguments` fields to replace, e.g. ``build_datasets(args, seed=training_seed)``.

    Returns:
        ``(train_dataset, eval_dataset, id2label)``. ``eval_dataset`` is None when the source has no evaluation
        split. Map-style training sets are not shuffled here (the Trainer's sampler does it); streamed ones are
        shuffled with a buffer and are not split by node (see the module docstring).

    Raises:
        ValueError: Several sources given, or a streamed training set without sample ids.
    """
    args = _as_data_arguments(data_args, overrides)
    given = [name for name in _SOURCES if getattr(args, name)]
    if len(given) > 1:
        raise ValueError(f"give one data source, not {given}")
    if args.validation_dir and not args.train_dir:
        raise ValueError("validation_dir needs train_dir")
    load = _SOURCES[given[0]] if given else _from_demo
    train, eval_dataset, id2label = load(args, seed)
    if not given or given[0] != "dataset_name":  # the other sources name their columns "image" and "label"
        renames = {"image": args.image_column_name, "label": args.label_column_name}
        train, eval_dataset = _rename_columns(train, renames), _rename_columns(eval_dataset, renames)
    train = _prepare(train, args, args.max_train_samples, is_train=True, seed=seed)
    if eval_dataset is not None:
        eval_dataset = _prepare(eval_dataset, args, args.max_eval_samples, is_train=False, seed=seed)
    logger.info(
        "data source %s: %d classes, streaming=%s", given[0] if given else "demo", len(id2label), args.streaming
    )
    return train, eval_dataset, id2label


def _batch_examples(batch: dict) -> int:
    """Examples a collated batch was made of: its rows plus the undecodable images the collator dropped."""
    if "skipped_examples" in batch:  # left undecoded (`MoProCollator.skip_first_batches`)
        return int(batch["skipped_examples"])
    skipped = batch.get("num_skipped_images")
    rows = next((len(value) for value in batch.values() if hasattr(value, "__len__") and value.ndim > 0), 0)
    return rows + (int(skipped) if skipped is not None else 0)


class StreamedEpochs:
    """A streamed training DataLoader cut into epochs of exactly ``batches_per_epoch`` batches on every process.

    Streamed, each process reads its own shards (Accelerate's ``IterableDataset.shard``) and DataLoader workers
    split them again, so processes hold different numbers of samples whenever the shards are of unequal size or do
    not divide by processes x workers. A process that ran out first would end its epoch, and evaluate, while the
    others are still inside training collectives. Here every process takes the same number of batches per epoch:
    when its stream ends before, it is started again in a new order (a new shard order and shuffle-buffer seed, and
    new augmentation seeds); at the end of the epoch the rest of the stream is left unread. The next epoch starts
    the stream afresh (``set_epoch``), so that epoch ``e`` is a function of ``e`` alone, which a resume relies on.

    Pass ``r`` of epoch ``e`` is numbered ``r * num_epochs + e`` (distinct for every pair; the first pass of an
    epoch is numbered as the epoch) and that number goes to the stream's ``set_epoch`` and the collator's: the
    views of a sample are seeded by it (`training.data.collator.MoProCollator`), so no two passes reuse the same views.

    Args:
        dataloader: The process's DataLoader (as prepared by Accelerate) over a streamed dataset.
        batches_per_epoch: Batches each process takes per epoch (optimizer steps x gradient accumulation).
        num_epochs: Epochs in the run (the pass numbering's stride).
        batch_size: Per-device batch size: with ``drop_last``, shorter batches (the end of a worker's share of a
            pass) are dropped, as the Trainer's ``dataloader_drop_last`` does for map-style data.
        drop_last: Drop batches of fewer than ``batch_size`` examples.
        collator: Told the pass number before each pass (``set_epoch``), if it has the method.
    """

    def __init__(
        self,
        dataloader,
        batches_per_epoch: int,
        num_epochs: int,
        batch_size: int,
        drop_last: bool = True,
        collator=None,
        skip_batches: int = 0,
    ) -> None:
        if batches_per_epoch < 1 or num_epochs < 1:
            raise ValueError(f"need at least one batch and epoch, got {batches_per_epoch} and {num_epochs}")
        self.dataloader = dataloader
        self.batches_per_epoch = batches_per_epoch
        self.num_epochs = num_epochs
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.collator = collator
        self.skip_batches = skip_batches
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skipping(self, num_batches: int) -> StreamedEpochs:
        """The same epochs, the first ``num_batches`` batches of the current one read and left out (a resume).

        The stream is read from the epoch's start (samples are only read, and with a `MoProCollator` not decoded:
        `MoProCollator.skip_first_batches`), so the batches that follow are those of the interrupted run."""
        copy = StreamedEpochs(
            self.dataloader, self.batches_per_epoch, self.num_epochs, self.batch_size, self.drop_last,
            self.collator, num_batches,
        )  # fmt: skip
        copy.epoch = self.epoch
        return copy

    def pass_number(self, restart: int) -> int:
        return restart * self.num_epochs + self.epoch

    def __iter__(self):
        taken, restart = 0, 0
        while taken < self.batches_per_epoch:
            number = self.pass_number(restart)
            self.dataloader.set_epoch(number)
            if hasattr(self.collator, "set_epoch"):
                self.collator.set_epoch(number)  # before the workers start (they copy the collator)
            if hasattr(self.collator, "skip_first_batches"):  # a resume: the batches to leave out, undecoded
                workers = getattr(self.dataloader, "num_workers", 0)
                self.collator.skip_first_batches(max(self.skip_batches - taken, 0), workers)
            full_batches = 0
            batches = iter(self.dataloader)
            try:
                for batch in batches:
                    if self.drop_last and _batch_examples(batch) < self.batch_size:
                        continue
                    full_batches += 1
                    taken += 1
                    if taken > self.skip_batches:
                        if "skipped_examples" in batch:
                            raise RuntimeError(
                                f"batch {taken} of the epoch was left undecoded, but is to be trained on"
                            )
                        yield batch
                    if taken == self.batches_per_epoch:
                        return
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()  # ends the pass's workers now, not when garbage-collected
            if full_batches == 0:
                raise ValueError(
                    f"this process's share of the streamed training set gave no {'full ' if self.drop_last else ''}"
                    f"batch of {self.batch_size} in a whole pass: each process needs at least one shard per "
                    "DataLoader worker with a batch's worth of samples (write more, smaller shards, or use fewer "
                    "processes or --dataloader_num_workers)"
                )
            restart += 1


def training_set_for_report(data_args: object | None = None, seed: int = 42, **overrides) -> Dataset:
    """The training set of a streamed run as a map-style dataset, for the noise report at the end of training.

    The report scores every training sample exactly once, in contiguous shares per process
    (`PartialState.split_between_processes` in `evaluation.noise_report`), which a stream cannot give. The same source is read without
    streaming: a WebVision file list (paths only), `make_shards` shards converted once into the `datasets` cache
    (the disk of the shards again), the demo or an image folder in memory, a Hub dataset downloaded. A ``path``
    column names each sample where the source knows it (WebVision: the path relative to the root, as the official
    ``pseudo_label.json``; shards: the original path kept in each sample), which the report takes as its ``id``.
    ``max_train_samples`` takes a seeded subset of the map-style set, not the samples the stream took.
    """
    args = dataclasses.replace(_as_data_arguments(data_args, overrides), streaming=False)
    train = build_datasets(args, seed=seed)[0]
    return with_webvision_paths(train, args.webvision_dir, args.image_column_name) if args.webvision_dir else train
