"""The own-data recipe's rules: the training image size and the run's length, chosen from the user's images.

`run_mopro.py --train_dir DIR` (or `--dataset_name NAME`) without a YAML file trains with
`training/configs/own_data.yaml`, whose `image_size` comes from the data unless `--image_size` is given: the median
shorter side of up to `SAMPLE_SIZE` training images (evenly spaced over the listing, read from their headers only),
rounded down to a multiple of 32 and kept within 32-224 (`image_size_for`). CIFAR-size photos (32 px) then train at
32 px, Tiny-ImageNet-size ones (64 px) at 64, and photos of 224 px or more at the official 224; a ResNet divides
its input by 32, so a multiple of 32 leaves no partial cell in its last feature map. A larger size than the
images' own would only upsample them, a size above 224 would cost quadratically more for the official recipe's
resolution. Small images keep timm's stride-32 ResNet: a dilated last stage (`--backbone_kwargs '{"output_stride":
16}'`) was tried as their default and not kept (BENCHMARKS.md, "The small-image rule": CE gained, MoPro lost).

The length rule: the recipe's 40 epochs, or more where an epoch is only a few optimiser steps. A run trains at least
`MIN_TRAIN_STEPS` steps (epochs = that over the steps an epoch of the training images makes at the global batch),
within 40-`MAX_TRAIN_EPOCHS` epochs, and the learning-rate steps keep their place (`LR_MILESTONE_FRACTIONS`, the
recipe's 18 and 36 of 40). A step count, not an epoch count, is what a from-scratch model of a few thousand images
lacks: at 128 images a step, 40 epochs of 3,000 images are 920 steps. 2,760 steps (120 epochs of those 3,000) was
chosen on the natural development pool: the fewest steps whose MoPro run ended within 1 point of the best of 920,
1,840, 2,760 and 3,680 (BENCHMARKS.md, "The length rule"). Data of 8,832 images or more (69 steps an epoch) keeps 40
epochs. The rule applies when neither `--num_train_epochs` nor `--lr_milestones` (nor `--max_steps`) is given, and
not to a loaded model (`--model_name_or_path`: it starts trained); with `--num_train_epochs E` alone, the recipe's
learning-rate steps move to 0.45E and 0.9E.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data.image_folder import read_image_folder
from .data.transforms import BadImageError, read_encoded_image

logger = logging.getLogger(__name__)

OWN_DATA_CONFIG = Path(__file__).resolve().parent / "configs" / "own_data.yaml"
# The data sources whose images the rule reads; with them and no YAML file, the own-data recipe is used.
OWN_DATA_SOURCES = ("train_dir", "dataset_name")
SAMPLE_SIZE = 256  # headers read: the median of 256 sides is stable to a few pixels for any realistic spread
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, IMAGE_SIZE_STEP = 32, 224, 32
# The length rule (module docstring): at least this many optimiser steps, within the recipe's epochs and this cap.
MIN_TRAIN_STEPS = 2760  # chosen on the natural development pool (module docstring)
MAX_TRAIN_EPOCHS = 200  # a bound on the cost for a few hundred images, not a measured optimum
LR_MILESTONE_FRACTIONS = (0.45, 0.9)  # own_data.yaml's 18 and 36 of 40 (the official 40 and 80 of 90: 0.44, 0.89)


@dataclass(frozen=True)
class ImageSizeChoice:
    """What the resolution rule chose, and from what.

    Attributes:
        image_size: The training (and saved image processor's) crop size.
        median_shorter_side: Median shorter side, in pixels, of the images read.
        num_images: Images whose header was read.
        source: The flag and value the images came from, e.g. "--train_dir data/train".
    """

    image_size: int
    median_shorter_side: float
    num_images: int
    source: str

    def describe(self) -> str:
        return (
            f"median shorter side {self.median_shorter_side:g} px of {self.num_images} images of {self.source} -> "
            f"{self.image_size} (a multiple of {IMAGE_SIZE_STEP} in {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE})"
        )


def image_size_for(shorter_sides: Sequence[int]) -> int:
    """The rule: the median shorter side rounded down to a multiple of 32, within 32-224 (module docstring)."""
    if not shorter_sides:
        raise ValueError("image_size_for needs at least one image size")
    median = statistics.median(shorter_sides)
    return int(min(max(IMAGE_SIZE_STEP * (median // IMAGE_SIZE_STEP), MIN_IMAGE_SIZE), MAX_IMAGE_SIZE))


def _spread(count: int, sample_size: int) -> list[int]:
    """Up to `sample_size` indices evenly spaced over `range(count)`: listings are sorted by class, so a prefix
    would see only the first classes."""
    return sorted({int(i) for i in np.linspace(0, count - 1, num=min(count, sample_size)).round()}) if count else []


def _shorter_side(source) -> int | None:
    """The shorter side of an image from its header (no pixel decoded); None when it cannot be read (the
    training reader skips and counts such files, `training.data.transforms.decode_image`)."""
    try:
        if isinstance(source, Image.Image):
            return min(source.size)
        data, _ = read_encoded_image(source)
        with Image.open(io.BytesIO(data)) as image:
            return min(image.size)
    except (BadImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        logger.debug("resolution rule: passing over an unreadable image (%s)", error)
        return None


def folder_listing(train_dir: str) -> Callable[[], list[str]]:
    """`train_dir`'s image paths, listed on the first call and kept: both rules read them, and a folder of millions
    of files takes seconds to list (in every process of a launch: each one parses the arguments)."""
    return functools.cache(lambda: read_image_folder(train_dir)[0])


def _sample_sides_of_folder(paths: Sequence[str], sample_size: int) -> list[int]:
    return [side for i in _spread(len(paths), sample_size) if (side := _shorter_side(paths[i])) is not None]


def _sample_sides_of_dataset(data_args, sample_size: int) -> list[int]:
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    # The same call as `training.data.sources` makes for the run (its cache serves both).
    name, config_name, streaming = data_args.dataset_name, data_args.dataset_config_name, data_args.streaming
    split = load_dataset(name, config_name, split="train", streaming=streaming)
    column = data_args.image_column_name
    feature = (split.features or {}).get(column)
    if isinstance(feature, ImageFeature) and feature.decode:
        split = split.cast_column(column, ImageFeature(decode=False))  # headers only
    if streaming:  # no random access: the first rows
        rows = (row[column] for row in split.take(sample_size))
    else:
        if column not in split.column_names:
            raise ValueError(f"--dataset_name {name} has no image column {column!r} (columns: "
                             f"{split.column_names}); pass --image_column_name")  # fmt: skip
        rows = (split[i][column] for i in _spread(len(split), sample_size))
    return [side for row in rows if (side := _shorter_side(row)) is not None]


def choose_image_size(
    data_args, sample_size: int = SAMPLE_SIZE, listing: Callable[[], list[str]] | None = None
) -> ImageSizeChoice | None:
    """The rule applied to the run's training data (`--train_dir` or `--dataset_name`); None when the data has no
    image the rule can read (the own-data config's `image_size` then stands, and the log says so). `listing`: the
    folder's `folder_listing`, when the length rule shares it."""
    if data_args.train_dir:
        paths = (listing or folder_listing(data_args.train_dir))()
        source, sides = f"--train_dir {data_args.train_dir}", _sample_sides_of_folder(paths, sample_size)
    elif data_args.dataset_name:
        source, sides = f"--dataset_name {data_args.dataset_name}", _sample_sides_of_dataset(data_args, sample_size)
    else:
        return None
    if not sides:
        return None
    return ImageSizeChoice(image_size_for(sides), float(statistics.median(sides)), len(sides), source)


@dataclass(frozen=True)
class LengthChoice:
    """What the length rule chose, and from what.

    Attributes:
        num_train_epochs: The run's epochs.
        lr_milestones: The epochs at which the learning rate steps down.
        num_images: Training images counted (files listed, or the split's rows).
        steps_per_epoch: Optimiser steps an epoch of them makes at `global_batch_size` (a last partial batch dropped).
        global_batch_size: The batch the steps are counted at.
        source: The flag and value the images came from.
    """

    num_train_epochs: int
    lr_milestones: tuple[float, ...]
    num_images: int
    steps_per_epoch: int
    global_batch_size: int
    source: str

    def describe(self) -> str:
        return (
            f"{self.num_images} images of {self.source} at {self.global_batch_size} a step: {self.steps_per_epoch} "
            f"steps an epoch; at least {MIN_TRAIN_STEPS} steps -> {self.num_train_epochs} epochs (within "
            f"the recipe's 40-{MAX_TRAIN_EPOCHS}), learning-rate steps at {', '.join(f'{m:g}' for m in self.lr_milestones)}"
        )


def steps_per_epoch(num_images: int, global_batch_size: int) -> int:
    """Optimiser steps an epoch makes (the recipe drops a last partial batch; at least one)."""
    return max(num_images // global_batch_size, 1)


def epochs_for(num_images: int, global_batch_size: int, recipe_epochs: int) -> int:
    """The length rule (module docstring): enough epochs for `MIN_TRAIN_STEPS` steps, within `recipe_epochs` and
    `MAX_TRAIN_EPOCHS` (never fewer than the recipe's)."""
    steps = steps_per_epoch(num_images, global_batch_size)
    return max(recipe_epochs, min(math.ceil(MIN_TRAIN_STEPS / steps), MAX_TRAIN_EPOCHS))


def milestones_for(num_train_epochs: float) -> tuple[float, ...]:
    """The learning-rate steps at `LR_MILESTONE_FRACTIONS` of the run, in epochs (18 and 36 of 40, 54 and 108 of 120,
    4.5 and 9 of 10; the scheduler rounds them to steps)."""
    return tuple(round(fraction * num_train_epochs, 2) for fraction in LR_MILESTONE_FRACTIONS)


def _count_images(data_args, listing: Callable[[], list[str]] | None) -> tuple[int, str] | None:
    """Training images of `--train_dir` (files listed) or of a non-streaming `--dataset_name` (rows), at most
    `--max_train_samples`, with the flag they came from; None for a streamed dataset, whose length is unknown before
    it is read."""
    if data_args.train_dir:
        count = len((listing or folder_listing(data_args.train_dir))())
        source = f"--train_dir {data_args.train_dir}"
    elif data_args.dataset_name and not data_args.streaming:
        from datasets import load_dataset

        split = load_dataset(data_args.dataset_name, data_args.dataset_config_name, split="train")
        count, source = len(split), f"--dataset_name {data_args.dataset_name}"
    else:
        return None
    if data_args.max_train_samples is not None and data_args.max_train_samples < count:
        count, source = data_args.max_train_samples, f"{source} (--max_train_samples)"
    return count, source


def choose_length(
    data_args, global_batch_size: int, recipe_epochs: int, listing: Callable[[], list[str]] | None = None
) -> LengthChoice | None:
    """The length rule applied to the run's training data; None when its size is not known before training
    (streamed or sharded data: the recipe's epochs stand, and the log says so). `listing`: as `choose_image_size`."""
    counted = _count_images(data_args, listing)
    if counted is None or counted[0] == 0:
        return None
    num_images, source = counted
    epochs = epochs_for(num_images, global_batch_size, recipe_epochs)
    return LengthChoice(epochs, milestones_for(epochs), num_images, steps_per_epoch(num_images, global_batch_size),
                        global_batch_size, source)  # fmt: skip


__all__ = [
    "ImageSizeChoice",
    "LR_MILESTONE_FRACTIONS",
    "LengthChoice",
    "MAX_TRAIN_EPOCHS",
    "MIN_TRAIN_STEPS",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "OWN_DATA_CONFIG",
    "OWN_DATA_SOURCES",
    "SAMPLE_SIZE",
    "choose_image_size",
    "choose_length",
    "epochs_for",
    "folder_listing",
    "image_size_for",
    "milestones_for",
    "steps_per_epoch",
]
