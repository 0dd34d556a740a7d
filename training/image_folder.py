"""The one image-folder reader of training and evaluation: ``root/<class>/**/<image>``, with one label rule.

Label rule (`image_folder_classes`): the class folders are the sub-folders of ``root`` (hidden ones, starting with
".", are ignored). If every name is a decimal integer ("0", "1", ..., "10"), they are ordered by value (the official
``imagenet/val/<0..999>/`` layout then gets label == folder number); otherwise by name, as torchvision's
``ImageFolder`` and the `datasets` imagefolder loader do (ImageNet's WordNet ids give the ImageNet class index).
A class's label is its position in that order. Images are the files, at any depth under a class folder, whose
extension PIL can decode, in sorted path order.

A class folder without images is an error, not a silent drop: dropping it would shift the labels of every class
after it, and a model trained on the folder would disagree with one evaluated on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image


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
    if all(name.isdecimal() for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def _image_files(folder: Path, extensions: set[str]) -> list[str]:
    return sorted(
        os.path.join(directory, file)
        for directory, _, files in os.walk(folder)
        for file in files
        if os.path.splitext(file)[1].lower() in extensions
    )


def read_image_folder(
    root: str | os.PathLike, class_names: Sequence[str] | None = None
) -> tuple[list[str], list[int], list[str]]:
    """Lists the images of ``root/<class>/...`` with their labels.

    Args:
        root: Folder with one sub-folder per class.
        class_names: The label order to use, e.g. the training split's classes when reading a validation folder;
            its classes may lack a folder here (a validation split without some class), but every class folder
            here must be one of them. Defaults to `image_folder_classes(root)`, where every class needs images.

    Returns:
        ``(paths, labels, class_names)``: image paths, their integer labels, and the class names in label order.

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
    for label, name in enumerate(class_names):
        if not (root / name).is_dir():
            continue  # only with given class names (checked above)
        files = _image_files(root / name, extensions)
        if not files:
            empty.append(str(root / name))
        paths += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(
            f"class folder(s) {empty[:5]} hold no image files ({len(empty)} in all); add images or remove the "
            "folders (an empty class would shift the labels of the classes after it)"
        )
    return paths, labels, class_names


__all__ = ["image_folder_classes", "read_image_folder"]
