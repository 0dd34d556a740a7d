"""Tiny on-disk fixtures for the evaluation tests: a 64k-parameter MoPro model and 32-px image datasets.

Images carry a class-dependent colour plus noise, so a random network already separates the classes somewhat and
the metrics are not all at chance (and not all perfect).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modeling_mopro import MoProConfig, MoProForImageClassification

NUM_LABELS = 4
IMAGE_SIZE = 32
CLASS_COLOURS = np.array(
    [[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 210, 40], [160, 60, 200], [40, 200, 200]], dtype=np.float64
)


def tiny_config(**overrides) -> MoProConfig:
    kwargs = dict(
        backbone="resnet18",
        backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [4, 8, 16, 32], "stem_width": 4},
        num_labels=NUM_LABELS,
        projection_hidden_size=16,
        embedding_size=8,
        queue_size=20,
        image_size=IMAGE_SIZE,
    )
    kwargs.update(overrides)
    return MoProConfig(**kwargs)


def tiny_model(seed: int = 0, classifier_scale: float = 1.0, **config_overrides) -> MoProForImageClassification:
    """A random tiny release model whose prototypes are random unit vectors (a trained model has non-zero ones)."""
    torch.manual_seed(seed)
    model = MoProForImageClassification(tiny_config(**config_overrides)).eval()
    with torch.no_grad():
        prototypes = torch.nn.functional.normalize(torch.randn_like(model.mopro.prototypes), dim=1)
        model.mopro.prototypes.copy_(prototypes)
        model.classifier.weight.mul_(classifier_scale)
    return model


def save_tiny_model(path: Path, **kwargs) -> Path:
    tiny_model(**kwargs).save_pretrained(path)
    return path


def class_image(label: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """An RGB image tinted by its class, with noise; a bit larger than 32 px so the resize/crop does work."""
    colour = CLASS_COLOURS[label % len(CLASS_COLOURS)]
    pixels = colour + rng.normal(0, 50, size=(size, size + 6, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_image_folder(root: Path, per_class: int, class_names: list[str], seed: int = 0) -> Path:
    """`root/<class name>/<i>.png`; the class colour follows the position in `class_names`."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(class_names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            class_image(label, rng).save(root / name / f"{name}_{i}.png")
    return root


def write_voc07(root: Path, num_trainval: int = 48, num_test: int = 30, seed: int = 0) -> Path:
    """A VOC2007 devkit layout with 20 classes; every class has positives in both splits, some difficult."""
    from training.data.image_datasets import VOC07_CLASSES

    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "JPEGImages").mkdir(parents=True)
    for split, count, offset in (("trainval", num_trainval, 0), ("test", num_test, 10_000)):
        names = [f"{offset + i:06d}" for i in range(count)]
        targets = -np.ones((count, len(VOC07_CLASSES)), dtype=int)
        for i in range(count):
            main = i % len(VOC07_CLASSES)  # every class gets a positive
            targets[i, main] = 1
            targets[i, rng.integers(len(VOC07_CLASSES))] = 1
            if rng.random() < 0.2:
                targets[i, rng.integers(len(VOC07_CLASSES))] = 0  # difficult
            targets[i, main] = 1
            class_image(main, rng).convert("RGB").save(base / "JPEGImages" / f"{names[i]}.jpg")
        for c, name in enumerate(VOC07_CLASSES):
            lines = [f"{n} {t:2d}" for n, t in zip(names, targets[:, c], strict=True)]
            (base / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_places205(root: Path, train_per_class: int = 5, val_per_class: int = 3, num_classes: int = 4) -> Path:
    """The Places205 layout of the official loader (csv + images256/), `num_classes` classes."""
    rng = np.random.default_rng(1)
    images = root / "data" / "vision" / "torralba" / "deeplearning" / "images256"
    (root / "trainvalsplit_places205").mkdir(parents=True)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        lines = []
        for label in range(num_classes):
            for i in range(per_class):
                relative = f"c/class{label}/{split}_{i}.jpg"
                (images / relative).parent.mkdir(parents=True, exist_ok=True)
                class_image(label, rng).save(images / relative)
                lines.append(f"{relative} {label}")
        (root / "trainvalsplit_places205" / f"{split}_places205.csv").write_text("\n".join(lines) + "\n")
    return root


def noisy_hf_dataset(num_samples: int = 32, num_classes: int = NUM_LABELS, seed: int = 0):
    """A `datasets.Dataset` of web-like samples: image, given label, sample_id, path and the ground truth
    (true_label, is_ood; OOD samples have true_label -1 and a grey image)."""
    import datasets

    rng = np.random.default_rng(seed)
    rows = {"image": [], "label": [], "sample_id": [], "path": [], "true_label": [], "is_ood": []}
    for i in range(num_samples):
        is_ood = i % 8 == 7
        true = -1 if is_ood else i % num_classes
        given = int(rng.integers(num_classes)) if (is_ood or i % 4 == 3) else true
        image = (
            Image.fromarray(rng.integers(100, 140, size=(40, 46, 3), dtype=np.uint8))
            if is_ood
            else class_image(true, rng)
        )
        rows["image"].append(image)
        rows["label"].append(given)
        rows["sample_id"].append(i)
        rows["path"].append(f"web/{i:04d}.png")
        rows["true_label"].append(true)
        rows["is_ood"].append(is_ood)
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


def forbid_hub_network(monkeypatch) -> None:
    """Every way our code could reach the Hub (repo creation, uploads, a dataset push, the reachability probe's
    socket) fails the test instead."""
    import datasets
    from huggingface_hub import HfApi

    from evaluation import release

    def forbidden(*args, **kwargs):
        raise AssertionError("a network call was attempted")

    for name in ("create_repo", "upload_file", "upload_folder"):
        monkeypatch.setattr(HfApi, name, forbidden)
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", forbidden)
    monkeypatch.setattr(release.socket, "create_connection", forbidden)
