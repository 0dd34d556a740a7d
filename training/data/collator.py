"""Batch collation for MoPro: decode each raw example once, build its views, drop undecodable images."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .transforms import MoProViewTransforms, decode_image, decode_image_tensor, decode_or_skip, describe_image_source


class MoProCollator:
    """Turns a list of raw examples into a MoPro batch.

    Raw examples hold an undecoded image (bytes, path, ``datasets.Image(decode=False)`` dict, or PIL image) and
    an integer label. Decoding happens here, i.e. inside the DataLoader workers, so it runs in parallel and a
    bad image costs one sample instead of the whole run.

    Output keys:
        * ``pixel_values``: weak (query) views when training, test views otherwise; ``(B, 3, S, S)`` float32,
          or uint8 training views with ``uint8_training_views=True`` (normalised later, where the model runs).
        * ``pixel_values_key``: strong (key) views, training only (same dtype as the query views).
        * ``labels``: ``(B,)`` long, the (possibly noisy) training labels.
        * ``sample_ids``: ``(B,)`` long, only if the examples have a sample id column.
        * ``num_skipped_images``: 0-d long, undecodable images dropped from this batch. The count travels with
          the batch because worker processes cannot update a counter in the trainer process.
        * one key per name in ``extra_columns`` (opt-in; never pass ground-truth columns to training).

    A batch whose images are all bad has ``B == 0``; the trainer decides what to do with it.
    """

    def __init__(
        self,
        transforms: MoProViewTransforms,
        image_column: str = "image",
        label_column: str = "label",
        train: bool = True,
        extra_columns: Sequence[str] = (),
        num_labels: int | None = None,
        sample_id_column: str = "sample_id",
        seed: int | None = None,
        key_view: bool = True,
        uint8_training_views: bool = False,
    ) -> None:
        """Configures the collator.

        Args:
            transforms: The view transforms (their ``image_size`` also shapes empty batches).
            image_column: Column holding the undecoded image.
            label_column: Column holding the integer label.
            train: Build (weak, strong) training views if True, else the deterministic test view.
            extra_columns: Further numeric columns to pass through as tensors under their own names, e.g.
                diagnostic flags for evaluation. Keep ground truth of a noisy training set out of training.
            num_labels: If given, labels outside ``[0, num_labels)`` raise; otherwise only negatives do.
            sample_id_column: Column with a unique integer per sample, emitted as ``sample_ids`` when present.
            seed: If given (and samples have ids), the random views of a sample are drawn from a generator seeded
                by ``(seed, epoch, sample_id)`` instead of the global RNG. Augmentations then depend only on the
                data position, so a run resumed from a checkpoint sees the very same views as a straight run
                (the Trainer restores its RNG only after the DataLoader has already prefetched batches), and
                views do not depend on which worker process decodes the sample. The trainer calls `set_epoch`.
            key_view: Build the strong (key) view when training. False for the cross-entropy baseline, which
                only sees the weak view, so it does not pay for an augmentation it never uses.
            uint8_training_views: Emit training views as uint8 instead of normalising them here. A float32 batch is
                4x larger, and a worker spends much of its time writing it into the shared memory that carries it
                to the main process; `MoProTrainer` normalises uint8 batches on the model's device
                (`normalize_pixels`, with these transforms' mean and std). Leave False for any other consumer.
        """
        self.transforms = transforms
        self.image_column = image_column
        self.label_column = label_column
        self.train = train
        self.extra_columns = tuple(extra_columns)
        self.num_labels = num_labels
        self.sample_id_column = sample_id_column
        self.seed = seed
        self.epoch = 0
        self.key_view = key_view
        self.uint8_training_views = uint8_training_views
        self._skip_batches, self._num_workers, self._batches_collated = 0, 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by `MoProTrainer` at the start of each epoch (before the DataLoader workers start)."""
        self.epoch = int(epoch)

    def skip_first_batches(self, num_batches: int, num_workers: int) -> None:
        """Leave the first ``num_batches`` batches of the next DataLoader pass undecoded (a resume skips them).

        Each worker collates every ``num_workers``-th batch of the pass, in turn (the DataLoader's in-order round
        robin), so worker ``w``'s ``i``-th batch is batch ``i * num_workers + w``, or earlier once another worker
        has run dry. Those numbered below ``num_batches`` come back as ``{"skipped_examples": n}``: they are all
        among the pass's first ``num_batches`` batches, which `training.data.sources.StreamedEpochs` drops (it still decodes
        any of them a worker did not recognise). Called before the pass starts, as the workers copy the collator.
        """
        self._skip_batches, self._num_workers, self._batches_collated = num_batches, max(num_workers, 1), 0

    def _train_views(self, image, example: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        def views():
            if self.key_view:
                return self.transforms.train_views(image)
            return self.transforms.weak_augment(image), None

        if self.seed is None or self.sample_id_column not in example:
            return views()
        # torchvision's random transforms draw from the global torch RNG: fork it, seed it per sample.
        with torch.random.fork_rng(devices=[]):
            # default_generator only: torch.manual_seed would also re-seed every CUDA generator, per sample.
            torch.default_generator.manual_seed(
                hash((self.seed, self.epoch, int(example[self.sample_id_column]))) & 0x7FFF_FFFF_FFFF
            )
            return views()

    def _checked_label(self, example: Mapping[str, Any]) -> int:
        """Returns the example's label as an int; bad labels are data errors, so they raise instead of skipping."""
        raw_label = example.get(self.label_column)
        try:
            label = operator.index(raw_label)  # ints and numpy/torch integers; not floats or None
        except TypeError:
            label = None
        upper = self.num_labels if self.num_labels is not None else float("inf")
        if label is None or not 0 <= label < upper:
            valid = f"[0, {self.num_labels})" if self.num_labels is not None else "a non-negative int"
            raise ValueError(
                f"label {raw_label!r} of sample {self._sample_name(example)} is not in {valid}; "
                "fix the dataset (labels are never silently dropped)"
            )
        return label

    def _sample_name(self, example: Mapping[str, Any]) -> str:
        image_description = describe_image_source(example.get(self.image_column))
        if self.sample_id_column in example:
            return f"sample_id={example[self.sample_id_column]} ({image_description})"
        return image_description

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collates raw examples into a batch (see the class docstring for the keys)."""
        if self._skip_batches:
            info = torch.utils.data.get_worker_info()
            index, self._batches_collated = self._batches_collated, self._batches_collated + 1
            if index * self._num_workers + (info.id if info is not None else 0) < self._skip_batches:
                return {"skipped_examples": torch.tensor(len(examples))}
        has_sample_ids = bool(examples) and all(self.sample_id_column in example for example in examples)
        query_views: list[torch.Tensor] = []
        key_views: list[torch.Tensor] = []
        kept: list[Mapping[str, Any]] = []
        labels: list[int] = []
        num_skipped = 0
        for example in examples:
            label = self._checked_label(example)
            # Training views start from a uint8 tensor; the test view from PIL, like the image processor.
            decode = decode_image_tensor if self.train else decode_image
            image = decode_or_skip(example[self.image_column], f"sample {self._sample_name(example)}", decode)
            if image is None:
                num_skipped += 1
                continue
            if self.train:
                query_view, key_view = self._train_views(image, example)
                key_views.append(key_view)
            else:
                query_view = self.transforms.test(image)
            query_views.append(query_view)
            labels.append(label)
            kept.append(example)

        batch = {
            "pixel_values": self._stack(query_views),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if self.train and self.key_view:
            batch["pixel_values_key"] = self._stack(key_views)
        if self.train and not self.uint8_training_views:
            for name in ("pixel_values", "pixel_values_key"):
                if name in batch:
                    batch[name] = self.transforms.normalize(batch[name])
        if has_sample_ids:
            batch["sample_ids"] = torch.tensor([int(ex[self.sample_id_column]) for ex in kept], dtype=torch.long)
        for column in self.extra_columns:
            batch[column] = torch.tensor([ex[column] for ex in kept])
        batch["num_skipped_images"] = torch.tensor(num_skipped, dtype=torch.long)
        return batch

    def _stack(self, views: list[torch.Tensor]) -> torch.Tensor:
        if views:
            return torch.stack(views)
        size = self.transforms.image_size
        return torch.empty((0, 3, size, size), dtype=torch.uint8 if self.train else torch.float32)
