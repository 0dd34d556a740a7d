"""The one image-folder reader of training and evaluation: ``root/<class>/**/<image>``, with one label rule.

Label rule (`image_folder_classes`): the class folders are the sub-folders of ``root`` (hidden ones, starting with
".", are ignored). If every name is a decimal integer ("0", "1", ..., "10"), they are ordered by value (the official
``imagenet/val/<0..999>/`` layout then gets label == folder number); otherwise by name, as torchvision's
``ImageFolder`` and the `datasets` imagefolder loader do (ImageNet's WordNet ids give the ImageNet class index).
A class's label is its position in that order. Images are the files, at any depth under a class folder, whose
extension PIL can decode, in sorted path order.

A class folder without images is an error, not a silent drop: dropping it would shift the labels of every class
after it, and a model trained on the folder would disagree with one evaluated on it.

Only regular files are read. Every other entry under a class folder is passed over and counted by reason
(`PASSED_OVER_REASONS`): a file whose extension PIL does not decode ("extension"), a named pipe, socket or device
("not a regular file": opening a pipe would block the run forever), and a link that leads nowhere or back into a
folder already listed ("link"). Links to regular files and to folders are followed, each real folder listed once.
The counts are logged with examples and kept with the listing (`ImageFolderListing.passed_over`); files that are
read but cannot be decoded, or whose geometry is refused, are counted where they are decoded
(`training.data.transforms.decode_image`).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

# Why the reader passes over an entry of a class folder (the keys of `ImageFolderListing.passed_over`).
PASSED_OVER_REASONS = ("extension", "not a regular file", "link")
# Folder names that hold a split of a dataset, never a class (`image_folder_classes` refuses them as classes).
SPLIT_FOLDER_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing")
# The counts of the last listing of each root in this process (`passed_over_counts`), for the run's results.
_passed_over_by_root: dict[str, dict[str, int]] = {}


def image_folder_classes(root: str | os.PathLike) -> list[str]:
    """The class names of an image folder in label order (see the module docstring for the rule).

    Raises:
        FileNotFoundError: ``root`` is not a folder, or has no class sub-folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    names = [entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    if not names:
        raise FileNotFoundError(f"no class sub-folders in {root}; expected {root}/<class name>/<image files>")
    splits = sorted(name for name in names if name.lower() in SPLIT_FOLDER_NAMES)
    if len(splits) >= 2 or (splits and len(names) == 1):
        # A dataset root (root/train/<class>/...) given for a split: its "classes" would be the splits.
        raise ValueError(
            f"{root} holds split folders ({', '.join(splits)}), not class folders: pass the split itself "
            f"({root / splits[0]}), whose sub-folders are the classes"
        )
    if all(name.isdecimal() for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


class ImageFolderListing(tuple):
    """``(paths, labels, class_names)`` of `read_image_folder`, with what the listing passed over.

    Attributes:
        passed_over: Count of passed-over entries by reason (`PASSED_OVER_REASONS`, all present).
        passed_over_examples: Up to 5 paths per reason.
    """

    def __new__(cls, paths, labels, class_names, passed_over: Counter, examples: dict[str, list[str]]):
        listing = super().__new__(cls, (paths, labels, class_names))
        listing.passed_over = {reason: passed_over.get(reason, 0) for reason in PASSED_OVER_REASONS}
        listing.passed_over_examples = examples
        return listing


def _image_files(folder: Path, extensions: set[str], passed_over: Counter, examples: dict[str, list[str]]) -> list[str]:
    """The regular image files under `folder`, following links once per real folder; everything else is counted."""

    def pass_over(reason: str, path: str) -> None:
        passed_over[reason] += 1
        if len(examples.setdefault(reason, [])) < 5:
            examples[reason].append(path)

    found = []
    seen_folders = {os.path.realpath(folder)}
    for directory, subfolders, files in os.walk(folder, followlinks=True):
        subfolders.sort()  # a deterministic walk: of two links to one folder, the first by name is listed
        for name in list(subfolders):
            real = os.path.realpath(os.path.join(directory, name))
            if real in seen_folders:  # a link back into a listed folder (or a loop): listed once
                subfolders.remove(name)
                pass_over("link", os.path.join(directory, name))
            seen_folders.add(real)
        for name in files:
            path = os.path.join(directory, name)
            try:
                mode = os.stat(path).st_mode  # follows links: what a read would open
            except OSError:
                pass_over("link", path)  # a dangling link (os.walk lists it as a file)
                continue
            if not stat.S_ISREG(mode):
                pass_over("not a regular file", path)
            elif os.path.splitext(name)[1].lower() not in extensions:
                pass_over("extension", path)
            else:
                found.append(path)
    return sorted(found)


def read_image_folder(root: str | os.PathLike, class_names: Sequence[str] | None = None) -> ImageFolderListing:
    """Lists the images of ``root/<class>/...`` with their labels.

    Args:
        root: Folder with one sub-folder per class.
        class_names: The label order to use, e.g. the training split's classes when reading a validation folder;
            its classes may lack a folder here (a validation split without some class), but every class folder
            here must be one of them. Defaults to `image_folder_classes(root)`, where every class needs images.

    Returns:
        ``(paths, labels, class_names)``: image paths, their integer labels, and the class names in label order; an
        `ImageFolderListing` whose ``passed_over`` counts the entries passed over (logged as a warning too).

    Raises:
        FileNotFoundError: ``root`` has no class folders.
        ValueError: A class folder holds no image, or (with ``class_names``) is not one of the given classes.
    """
    root = Path(root)
    folders = image_folder_classes(root)
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    if class_names is None:
        class_names = folders
    else:
        class_names = list(class_names)
        unknown = sorted(set(folders) - set(class_names))
        if unknown:
            raise ValueError(
                f"class folders {unknown[:5]} of {root} are not among the {len(class_names)} known classes "
                f"(e.g. {class_names[:3]}); rename or remove them"
            )
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    passed_over: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for label, name in enumerate(class_names):
        if not (root / name).is_dir():
            continue  # only with given class names (checked above)
        files = _image_files(root / name, extensions, passed_over, examples)
        if not files:
            empty.append(str(root / name))
        paths += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(
            f"class folder(s) {empty[:5]} hold no image files ({len(empty)} in all); add images or remove the "
            "folders (an empty class would shift the labels of the classes after it)"
        )
    if passed_over:
        logger.warning(
            "%s: passed over %d file(s) that are not readable images: %s",
            root, sum(passed_over.values()),
            "; ".join(f"{count} {reason} (e.g. {', '.join(examples[reason][:3])})" for reason, count in passed_over.items()),
        )  # fmt: skip
    listing = ImageFolderListing(paths, labels, class_names, passed_over, examples)
    _passed_over_by_root[os.path.realpath(root)] = listing.passed_over
    return listing


def passed_over_counts(root: str | os.PathLike) -> dict[str, int] | None:
    """The passed-over counts by reason of this process's last `read_image_folder(root)`; None if not read."""
    return _passed_over_by_root.get(os.path.realpath(root))


__all__ = [
    "ImageFolderListing",
    "PASSED_OVER_REASONS",
    "SPLIT_FOLDER_NAMES",
    "image_folder_classes",
    "passed_over_counts",
    "read_image_folder",
]
