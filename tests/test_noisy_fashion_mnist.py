"""The offline noisy Fashion-MNIST demo: sizes, noise and OOD rates, determinism, clean test set."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Image as ImageFeature

from training.data.collator import MoProCollator
from training.data.noisy_fashion_mnist import (
    ASYMMETRIC_CONFUSIONS,
    FASHION_MNIST_APT_PACKAGE,
    FASHION_MNIST_DIR,
    FASHION_MNIST_HUB_ID,
    build_noisy_fashion_mnist,
    load_fashion_mnist,
)
from training.data.transforms import MoProViewTransforms, decode_image

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"needs the Debian package {FASHION_MNIST_APT_PACKAGE}",
)
NUM_TRAIN, NUM_TEST = 1000, 300


@pytest.fixture(scope="module")
def demo():
    return build_noisy_fashion_mnist(num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)


def columns(dataset) -> dict[str, np.ndarray]:
    return {name: np.asarray(dataset[name]) for name in ("label", "true_label", "is_ood", "is_noisy", "sample_id")}


def test_sizes_and_schema(demo):
    splits, id2label = demo
    assert len(splits["train"]) == 1250  # 1000 Fashion-MNIST + 20% of the final set OOD
    assert len(splits["test"]) == NUM_TEST
    assert id2label[0] == "T-shirt/top" and id2label[9] == "Ankle boot" and len(id2label) == 10
    image = splits["train"][0]["image"]
    assert image.size == (28, 28) and image.mode == "L"
    train = columns(splits["train"])
    assert sorted(train["sample_id"]) == list(range(1250))


def test_noise_and_ood_rates(demo):
    train = columns(demo[0]["train"])
    ood, clean_part = train["is_ood"], ~train["is_ood"]
    assert ood.mean() == pytest.approx(0.2, abs=0.005)
    assert (train["true_label"][ood] == -1).all() and (train["true_label"][clean_part] >= 0).all()
    assert not train["is_noisy"][ood].any()
    wrong = train["label"][clean_part] != train["true_label"][clean_part]
    np.testing.assert_array_equal(wrong, train["is_noisy"][clean_part])
    assert wrong.mean() == pytest.approx(0.4, abs=0.005)
    # Half of the noise follows natural confusions (symmetric flips can hit them by chance: about 1 in 9).
    true, noisy = train["true_label"][clean_part][wrong], train["label"][clean_part][wrong]
    natural = sum(ASYMMETRIC_CONFUSIONS.get(int(t)) == int(n) for t, n in zip(true, noisy, strict=True))
    assert 200 <= natural <= 200 + 60
    assert np.bincount(train["true_label"][clean_part], minlength=10).tolist() == [100] * 10  # stratified
    assert set(train["label"][ood].tolist()) == set(range(10))  # OOD labels random over all classes


def test_deterministic_for_a_seed(demo):
    again, _ = build_noisy_fashion_mnist(num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
    other, _ = build_noisy_fashion_mnist(num_train=NUM_TRAIN, num_test=NUM_TEST, seed=1)
    for name in ("label", "true_label", "is_ood"):
        assert demo[0]["train"][name] == again["train"][name]
    raw = demo[0]["train"].cast_column("image", ImageFeature(decode=False))["image"]
    raw_again = again["train"].cast_column("image", ImageFeature(decode=False))["image"]
    assert raw == raw_again
    assert demo[0]["train"]["label"] != other["train"]["label"]


def test_test_set_is_clean_fashion_mnist(demo):
    test = columns(demo[0]["test"])
    assert (test["label"] == test["true_label"]).all()
    assert not test["is_ood"].any() and not test["is_noisy"].any()
    assert np.bincount(test["label"], minlength=10).tolist() == [30] * 10
    images, labels = load_fashion_mnist("test")
    first = demo[0]["test"][0]
    matches = np.flatnonzero((images == np.asarray(first["image"])).all(axis=(1, 2)))
    assert first["label"] in labels[matches]


def test_ground_truth_never_reaches_training(demo):
    rows = [demo[0]["train"][i] for i in range(4)]
    batch = MoProCollator(MoProViewTransforms(32), num_labels=10)(rows)
    assert set(batch) == {"pixel_values", "pixel_values_key", "labels", "sample_ids", "num_skipped_images"}
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert decode_image(rows[0]["image"]).mode == "RGB"


def test_impossible_noise_split_and_missing_data_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="asymmetric"):  # only 7 of 10 classes have a natural confusion
        build_noisy_fashion_mnist(num_train=100, num_test=10, noise_rate=1.0, asymmetric_fraction=1.0)
    with pytest.raises(FileNotFoundError) as error:  # offline (conftest): no Hub fallback either
        load_fashion_mnist("train", data_dir=tmp_path)
    assert FASHION_MNIST_APT_PACKAGE in str(error.value) and FASHION_MNIST_HUB_ID in str(error.value)
