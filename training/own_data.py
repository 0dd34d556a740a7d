"""The own-data recipe's resolution rule: the training image size, chosen from the user's images.

`run_mopro.py --train_dir DIR` (or `--dataset_name NAME`) without a YAML file trains with
`training/configs/own_data.yaml`, whose `image_size` comes from the data unless `--image_size` is given: the median
shorter side of up to `SAMPLE_SIZE` training images (evenly spaced over the listing, read from their headers only),
rounded down to a multiple of 32 and kept within 32-224 (`image_size_for`). CIFAR-size photos (32 px) then train at
32 px, Tiny-ImageNet-size ones (64 px) at 64, and photos of 224 px or more at the official 224; a ResNet divides
its input by 32, so a multiple of 32 leaves no partial cell in its last feature map. A larger size than the
images' own would only upsample them, a size above 224 would cost quadratically more for the official recipe's
resolution. Small images keep timm's stride-32 ResNet: a dilated last stage (`--backbone_kwargs '{"output_stride":
16}'`) was tried as their default and not kept (BENCHMARKS.md, "The small-image rule": CE gained, MoPro lost).
"""

from __future__ import annotations

import io
import logging
import statistics
from collections.abc import Sequence
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


def _sample_sides_of_folder(train_dir: str, sample_size: int) -> list[int]:
    paths = read_image_folder(train_dir)[0]
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


def choose_image_size(data_args, sample_size: int = SAMPLE_SIZE) -> ImageSizeChoice | None:
    """The rule applied to the run's training data (`--train_dir` or `--dataset_name`); None when the data has no
    image the rule can read (the own-data config's `image_size` then stands, and the log says so)."""
    if data_args.train_dir:
        source, sides = f"--train_dir {data_args.train_dir}", _sample_sides_of_folder(data_args.train_dir, sample_size)
    elif data_args.dataset_name:
        source, sides = f"--dataset_name {data_args.dataset_name}", _sample_sides_of_dataset(data_args, sample_size)
    else:
        return None
    if not sides:
        return None
    return ImageSizeChoice(image_size_for(sides), float(statistics.median(sides)), len(sides), source)


__all__ = [
    "ImageSizeChoice",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "OWN_DATA_CONFIG",
    "OWN_DATA_SOURCES",
    "SAMPLE_SIZE",
    "choose_image_size",
    "image_size_for",
]
