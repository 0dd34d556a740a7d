"""Image decoding and the MoPro augmentation views.

MoPro trains on two views of every image (official ``DataLoader/dataloader.py``):

* weak / query view: ``RandomResizedCrop(size, scale=(0.2, 1)) -> RandomHorizontalFlip``
* strong / key view: ``RandomResizedCrop(size, scale=(0.2, 1)) -> RandomGrayscale(0.2)
  -> ColorJitter(0.4, 0.4, 0.4, 0.4) -> RandomHorizontalFlip``
* test view: ``Resize(size * 256 / 224) -> CenterCrop(size)``

all followed by ``ToTensor + Normalize``. Each image is decoded once (JPEGs straight into a uint8 tensor) and both
training views are cut from it; training views stay uint8 through the DataLoader and are normalised a batch at a
time, where the model runs (`normalize_pixels`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2
from transformers import ConvNextImageProcessorPil

# The one ImageNet mean/std: transformers' own, the image processor's default too (`build_image_processor`).
from transformers.image_utils import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from transformers.image_utils import IMAGENET_DEFAULT_STD as IMAGENET_STD
from transformers.image_utils import PILImageResampling

from modeling_mopro import build_image_processor, image_processor_for

from .color_jitter import FastColorJitter

logger = logging.getLogger(__name__)

# Everything `decode_image` accepts: encoded bytes, a file path, the dict of `datasets.Image(decode=False)`,
# or an already decoded PIL image.
ImageSource = bytes | bytearray | memoryview | str | os.PathLike | dict | Image.Image


class BadImageError(Exception):
    """An image that cannot be read or decoded (missing file, garbage bytes, unsupported format).

    Attributes:
        source: A human-readable description of the image (its path, or the size of the byte string).
        reason: Why decoding failed.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot decode image {source}: {reason}")
        self.source = source
        self.reason = reason


# PIL only has a process-wide switch for truncated files. Web JPEGs are often truncated and the official code
# sets the switch globally; we turn it on only while one of our decodes runs, so that other code in the process
# keeps PIL's strict default. A counter protected by a lock keeps concurrent decodes in threads from switching
# it off under each other's feet.
_truncated_lock = threading.Lock()
_truncated_users = 0
_truncated_saved_value = False


@contextlib.contextmanager
def _allow_truncated_images() -> Iterator[None]:
    """Lets PIL load truncated files inside the block (reference-counted across threads)."""
    global _truncated_users, _truncated_saved_value
    with _truncated_lock:
        if _truncated_users == 0:
            _truncated_saved_value = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = True
        _truncated_users += 1
    try:
        yield
    finally:
        with _truncated_lock:
            _truncated_users -= 1
            if _truncated_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _truncated_saved_value


def describe_image_source(source: Any) -> str:
    """Returns a short description of an image source for log and error messages (a path when known)."""
    if isinstance(source, dict):
        if source.get("path"):
            return str(source["path"])
        if source.get("bytes") is None:
            return "<empty image entry>"
        source = source["bytes"]
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return f"<{type(source).__name__}>"


def read_encoded_image(source: ImageSource) -> tuple[bytes | bytearray | memoryview, str]:
    """The encoded bytes of a non-PIL image source, and its description for messages."""
    description = describe_image_source(source)
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise BadImageError(description, "neither bytes nor path given")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return source, description
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"unsupported image source type {type(source).__name__}")
    try:
        # Only a regular file is opened: a named pipe would block `open` (and the run) forever, a device or a
        # folder is no image. `stat` follows links, as the read would.
        if not stat.S_ISREG(os.stat(source).st_mode):
            raise BadImageError(description, "not a regular file (a pipe, socket, device or folder)")
        # Reading the whole file first means no file handle outlives the decode (PIL keeps multi-frame files
        # open until garbage collection) and the decoded image needs no defensive copy.
        return Path(source).read_bytes(), description
    except OSError as error:
        raise BadImageError(description, f"{type(error).__name__}: {error}") from error


# The image-geometry guard of every decode (`check_image_geometry`). PIL's own limit applies to the pixel count at
# decode time; the aspect ratio matters later: the views resize the short side to the crop size, so a 100000 x 1
# image would become 25.6M x 256 pixels (~26 GB at 224 px) before the crop.
MAX_ASPECT_RATIO = 50.0


def check_image_geometry(width: int, height: int, description: str) -> None:
    """Refuse an image (`BadImageError`, reason starting "too large") whose pixel count exceeds PIL's refusal limit
    (twice ``Image.MAX_IMAGE_PIXELS``; PIL warns above once) or whose sides differ by more than `MAX_ASPECT_RATIO`;
    called with the header's size, before any pixel is decoded."""
    if width <= 0 or height <= 0:
        raise BadImageError(description, f"empty image ({width} x {height} pixels)")
    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS is not None else None
    if limit is not None and width * height > limit:
        raise BadImageError(
            description, f"too large: {width} x {height} pixels, more than {limit} (2 x PIL.Image.MAX_IMAGE_PIXELS)"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadImageError(
            description,
            f"too large in one dimension: {width} x {height} pixels, aspect ratio above {MAX_ASPECT_RATIO:g}",
        )


def decode_image(source: ImageSource) -> Image.Image:
    """Decodes an image into an RGB PIL image, tolerating truncated files like the official code.

    Args:
        source: Encoded bytes, a file path, a ``{"bytes": ..., "path": ...}`` dict as given by
            ``datasets.Image(decode=False)`` (bytes win over path, as in ``datasets``), or a PIL image.

    Returns:
        The fully loaded image in RGB mode.

    Raises:
        BadImageError: The file is missing or the data is not a decodable image.
        TypeError: ``source`` is of an unsupported type (a programming error, not a data error).
    """
    if isinstance(source, Image.Image):
        check_image_geometry(*source.size, describe_image_source(source))
        return _to_rgb(source)
    return _decode_with_pil(*read_encoded_image(source))


def decode_or_skip(source: ImageSource, name: str, decode=decode_image) -> Any | None:
    """`decode(source)`, or None for an image that cannot be read (logged as "Skipping <name>: <reason>"): the one
    skip rule of training, evaluation and the noise report; their callers count what they skip."""
    try:
        return decode(source)
    except BadImageError as error:
        logger.warning("Skipping %s: %s", name, error.reason)
        return None


# PIL signals broken data with OSError (incl. UnidentifiedImageError, FileNotFoundError), SyntaxError or
# ValueError depending on the plugin; oversized images raise DecompressionBombError.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _bad_image(error: Exception, buffer: io.BytesIO, description: str) -> BadImageError:
    # PIL names the in-memory buffer ("cannot identify image file <_io.BytesIO object at 0x...>"): name the file.
    reason = f"{type(error).__name__}: {error}".replace(repr(buffer), description)
    return BadImageError(description, reason)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any PIL mode, as the transformers pipeline sees the image (`IMAGE_SEMANTICS`): turned upright by its
    EXIF orientation, transparency composited on white; 16/32-bit integer greyscale is scaled to 8 bits first.

    PIL's own ``convert("RGB")`` clips integer modes at 255, so a 16-bit greyscale PNG (mode "I;16", or "I" as
    older Pillow versions and PGM files give it) would come out almost all white. Such images hold 16-bit
    samples: the top 8 bits (``value >> 8``) are the 8-bit image, as libpng's ``png_set_strip_16`` gives it.
    """
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I"
        samples = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(samples, 0, 0xFFFF) >> 8).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # transformers' `convert_to_rgb`: a transparent pixel is white, whatever colour it holds underneath.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# One image semantics for training, evaluation, the noise report and the saved image processor / pipeline: EXIF
# orientation applied and transparency composited on white, as transformers' `load_image` + `convert_to_rgb` and
# `datasets.Image` do. The official code applies neither (PIL `convert("RGB")` of the stored pixels); its web images
# rarely carry either, and where they do, the upright, white-backed image is the one a user's pipeline classifies.
IMAGE_SEMANTICS = "exif_transposed_alpha_on_white"
_EXIF_ORIENTATION = 0x0112


def _decode_with_pil(data: bytes | bytearray | memoryview, description: str) -> Image.Image:
    buffer = io.BytesIO(data)
    try:
        with _allow_truncated_images():
            # Image.open reads only the header and refuses images above 2x Image.MAX_IMAGE_PIXELS before any
            # pixel is decoded (and warns above 1x).
            image = Image.open(buffer)
            check_image_geometry(*image.size, description)  # from the header, before the pixels
            image.load()
        return _to_rgb(image)
    except _PIL_ERRORS as error:
        raise _bad_image(error, buffer, description) from error


def _check_jpeg_size(data: bytes | bytearray | memoryview, description: str) -> int:
    """Applies PIL's decompression-bomb rule to a JPEG before torchvision decodes it; returns its EXIF orientation
    (1: upright, or no header PIL can parse), which decoders without EXIF support (nvJPEG) must leave to `decode_image`.

    ``decode_jpeg`` has no size limit (a 20000 x 20000 JPEG takes GBs). ``Image.open`` parses only the header and
    applies ``Image.MAX_IMAGE_PIXELS`` (warning above it, `BadImageError` above twice it), as every PIL decode does.
    A header PIL cannot parse is left to the decoders, which report it.
    """
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as image:
            size, orientation = image.size, image.getexif().get(_EXIF_ORIENTATION, 1)
    except Image.DecompressionBombError as error:
        raise _bad_image(error, buffer, description) from error
    except _PIL_ERRORS:
        return 1
    check_image_geometry(*size, description)
    return orientation


def decode_image_tensor(source: ImageSource) -> torch.Tensor:
    """Decodes an image into an RGB uint8 ``(3, H, W)`` tensor: the input of the training views.

    JPEGs (nearly all web images) go straight to a tensor through torchvision's libjpeg-turbo ``decode_jpeg``:
    the same pixels as PIL, without PIL's image object and its copy into a tensor. Everything else, and the JPEGs
    ``decode_jpeg`` refuses (truncated files, which PIL still decodes as the official code does), goes through
    `decode_image`. Same arguments and errors as `decode_image`.
    """
    if isinstance(source, Image.Image):
        return v2.functional.pil_to_tensor(decode_image(source))
    data, description = read_encoded_image(source)
    if bytes(data[:3]) == b"\xff\xd8\xff":  # JPEG start-of-image marker
        _check_jpeg_size(data, description)
        try:
            return decode_jpeg(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                apply_exif_orientation=True,  # IMAGE_SEMANTICS, as `decode_image`
            )  # fmt: skip
        except RuntimeError:
            pass  # truncated or unusual: PIL is more tolerant, and raises BadImageError if it cannot decode either
    return v2.functional.pil_to_tensor(_decode_with_pil(data, description))


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images ``(..., 3, H, W)`` -> float32 in [0, 1], normalised by ``mean`` / ``std``, on their device.

    The same kernels (``ToDtype(scale=True)`` then ``Normalize``) as the per-image views, applied to a whole batch
    at once: training batches travel from the DataLoader workers as uint8 (4x less shared memory to fill and
    copy) and are normalised where the model runs. ``mean`` and ``std`` may also be (3, 1, 1) float32 tensors on the
    pixels' device (`MoProTrainer` keeps them there): a list is copied to the device at every call, and that
    host-to-device copy waits for the GPU.
    """
    pixels = v2.functional.to_dtype(pixels, torch.float32, scale=True)
    mean, std = (v if isinstance(v, torch.Tensor) else list(v) for v in (mean, std))
    return v2.functional.normalize(pixels, mean, std, inplace=True)


class MoProViewTransforms:
    """The official MoPro weak (query), strong (key) and test views.

    The training views run on a uint8 tensor made once per image (torchvision ``transforms.v2`` tensor kernels:
    the random crop is cut from the shared tensor, and the colour ops work on the small crop). The test view
    runs on the PIL image, which reproduces the official PIL pipeline (and a PIL-backend image processor) exactly.

    Attributes:
        image_size: Side of the square output views.
        weak: Callable mapping a decoded RGB PIL image (or uint8 CHW tensor) to the normalised query view.
        strong: Same for the strongly augmented key view.
        weak_augment, strong_augment: The same augmentations without the normalisation (uint8 out), for
            `train_views`, whose uint8 views are normalised a batch at a time.
        test: Callable mapping a decoded RGB PIL image to the deterministic evaluation view.
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
        processor: ConvNextImageProcessorPil | None = None,
    ) -> None:
        """Builds the three views.

        Args:
            image_size: Output side in pixels (224 in the paper).
            mean: Per-channel normalisation mean (ImageNet by default).
            std: Per-channel normalisation standard deviation (ImageNet by default).
            crop_scale: Area range of ``RandomResizedCrop`` (official: 0.2 to 1).
            interpolation: Resampling filter of the training views' crops (official: bilinear).
            processor: The image processor saved with the model, which defines the test view (`evaluation_view`); by
                default the official one at `image_size` with `mean` / `std` (`build_image_processor`).
        """
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        finish = [
            v2.ToImage(),  # no-op for tensors; PIL -> uint8 CHW tensor otherwise
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),
        ]
        # The augmentations proper, uint8 in and out: training batches stay uint8 until `normalize`.
        self.weak_augment = v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=interpolation, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToPureTensor(),
            ]
        )
        # Official order: crop, grayscale, colour jitter, flip.
        self.strong_augment = v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=interpolation, antialias=True),
                v2.RandomGrayscale(p=0.2),
                # v2.ColorJitter's random draws, ~2.5x faster on uint8 crops (training/data/color_jitter.py)
                FastColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4),
                v2.RandomHorizontalFlip(),
                v2.ToPureTensor(),
            ]
        )
        self.weak = v2.Compose([*self.weak_augment.transforms, *finish])
        self.strong = v2.Compose([*self.strong_augment.transforms, *finish])
        processor = processor or build_image_processor(image_size, mean, std)
        if processor.size.get("shortest_edge") != image_size:
            raise ValueError(f"the image processor is for {processor.size} px images, the views for {image_size} px")
        self.test = evaluation_view(processor)

    def train_views(self, image: Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the (weak, strong) uint8 views of one decoded image, converting it to a tensor only once.

        Args:
            image: A decoded RGB PIL image, or a uint8 ``(3, H, W)`` tensor (`decode_image_tensor`).

        Returns:
            Two uint8 tensors of shape ``(3, image_size, image_size)``; `normalize` turns batches of them into
            model inputs (equal to what `weak` and `strong` give image by image).
        """
        pixels = image if isinstance(image, torch.Tensor) else v2.functional.pil_to_tensor(image)
        return self.weak_augment(pixels), self.strong_augment(pixels)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 views (one or a batch) -> normalised float32 model inputs (`normalize_pixels`)."""
        return normalize_pixels(pixels, self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weak={self.weak}, strong={self.strong}, test={self.test})"


class CentreCrop(torch.nn.Module):
    """The processor's centre crop: top-left corner at ``(H - size) // 2``, ``(W - size) // 2``. torchvision's
    `CenterCrop` rounds an odd margin's half instead (to even), one pixel off on some images."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, image):
        height, width = v2.functional.get_size(image)
        return v2.functional.crop(image, (height - self.size) // 2, (width - self.size) // 2, self.size, self.size)


def evaluation_view(processor: ConvNextImageProcessorPil) -> v2.Compose:
    """The evaluation view that a saved image processor defines, as torchvision ops on the decoded PIL image: the one
    test view of training, every evaluation protocol and the noise report, equal to what `pipeline()` computes with
    that processor (to float rounding; tested over sizes, filters and crop fractions). The processor's rule: resize
    the short side to ``int(size / crop_pct)`` and centre-crop ``size`` (official at 224: 256 then 224), or, at 384 px
    and more, resize the whole image to ``size`` x ``size`` (transformers' ConvNeXt processor warps there)."""
    size, mode = processor.size["shortest_edge"], InterpolationMode[PILImageResampling(processor.resample).name]
    if size < 384:
        geometry = [v2.Resize(int(size / processor.crop_pct), interpolation=mode, antialias=True), CentreCrop(size)]
    else:
        geometry = [v2.Resize((size, size), interpolation=mode, antialias=True)]
    return v2.Compose(
        [
            *geometry,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(processor.image_mean), std=list(processor.image_std)),
            v2.ToPureTensor(),
        ]
    )


def transforms_from_config(config, train: bool = False, crop_scale: tuple[float, float] = (0.08, 1.0)):
    """The test view (or, with `train`, the weak view: RandomResizedCrop(scale=crop_scale) + flip, the fine-tuning
    and classifier-retraining augmentation) at the model's `image_size`, as the image processor saved with the model
    defines it (`image_processor_for`: the one the pipeline uses; the official one for a model in memory)."""
    processor = image_processor_for(config)
    mean, std = processor.image_mean, processor.image_std
    views = MoProViewTransforms(config.image_size, mean, std, crop_scale, processor=processor)
    return views.weak if train else views.test
