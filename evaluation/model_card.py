"""The Hub model card (README.md) of a MoPro release, built with `huggingface_hub.ModelCard`.

The YAML header carries the `model-index` (one `EvalResult` per metric found by `evaluation.release.read_results`),
which `ModelCard.load(path).data.eval_results` reads back; the body has the sections a reader of the Hub page
needs: description, intended use, how to use (transformers, pipeline, timm), training procedure and data (with the
noise statistics of the training set when a noise report was written), evaluation results, limitations, citation.

The card states what the model folder records and nothing else: the data and schedule of the run come from its
`run_args.json` (optional; JSON, never a pickled `training_args.bin`), the epochs done from `trainer_state.json`, the
input pipeline from the saved image processor. What is not recorded is written as "not recorded", not filled in
with WebVision or the paper's 90-epoch schedule.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # the one mean/std (data floor too)

if TYPE_CHECKING:  # the card needs only the config's attributes; importing the model code takes seconds
    from modeling_mopro import MoProConfig

PAPER_URL = "https://arxiv.org/abs/2009.07995"
OFFICIAL_CODE_URL = "https://github.com/salesforce/MoPro"
CITATION = """@inproceedings{li2021mopro,
  title         = {MoPro: Webly Supervised Learning with Momentum Prototypes},
  author        = {Li, Junnan and Xiong, Caiming and Hoi, Steven C. H.},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2021},
  eprint        = {2009.07995},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2009.07995}
}"""


NOT_RECORDED = "not recorded"
RUN_ARGS_FILE = "run_args.json"
CURVES_FILE = "training_curves.png"  # `evaluation.training_curves`, copied beside the card by the release
_WEBVISION_NAMES = {"v1": "WebVision 1.0", "v2": "WebVision 2.0"}


@dataclass(frozen=True)
class ModelComplexity:
    """The cost of one forward of the released model on one image (`evaluation.release.measure_complexity`).

    `macs`: multiply-accumulates (1 MAC = 2 FLOPs: a multiply and an add) of the convolutions and matrix products;
    `activations`: elements of their outputs, the count timm's model cards report (fvcore's convention).
    """

    parameters: int
    macs: int
    activations: int
    image_size: int


@dataclass(frozen=True)
class TrainingData:
    """What a run trained on, as far as its `run_args.json` records it (see `describe_training_data`).

    `eval_name` / `eval_type` name the data of the Trainer's own evaluation (`all_results.json`,
    `eval_results.json`), which carries no dataset name of its own.
    """

    name: str
    eval_name: str
    eval_type: str
    hub_ids: tuple[str, ...] = ()
    web_images: bool = False  # labels from web search queries (WebVision)


def describe_training_data(run_args: Mapping[str, Any] | None) -> TrainingData:
    """The training data of a run from its `run_args.json` (`{"data_args": DataArguments as a dict, ...}`, written by
    `training.run_mopro`); "not recorded" when the file is absent or says nothing about the data."""
    data = (run_args or {}).get("data_args")
    if not isinstance(data, Mapping):
        return TrainingData(NOT_RECORDED, f"validation set ({NOT_RECORDED})", "not-recorded")
    if data.get("webvision_dir"):
        name = _WEBVISION_NAMES.get(str(data.get("webvision_version", "v1")), "WebVision")
        return TrainingData(name, f"{name} (val)", "webvision", web_images=True)
    if data.get("shard_dir"):
        folder = os.path.basename(os.path.normpath(str(data["shard_dir"])))
        return TrainingData(f"WebDataset shards `{folder}`", f"shards `{folder}` (validation)", "shards")
    if data.get("dataset_name"):
        hub_id = str(data["dataset_name"])
        config = f" ({data['dataset_config_name']})" if data.get("dataset_config_name") else ""
        return TrainingData(f"`{hub_id}`{config}", f"{hub_id}{config} (validation)", hub_id, hub_ids=(hub_id,))
    if data.get("train_dir"):
        train = os.path.basename(os.path.normpath(str(data["train_dir"])))
        val = data.get("validation_dir")
        val = os.path.basename(os.path.normpath(str(val))) if val else NOT_RECORDED
        return TrainingData(f"image folder `{train}`", f"image folder {val}", "imagefolder")
    # No data source: `training.data.sources`'s default, the noisy Fashion-MNIST demo, evaluated on the clean test set.
    noise = ", ".join(
        f"{label} {data[key]}"
        for key, label in (("noise_rate", "label noise rate"), ("ood_fraction", "out-of-distribution fraction"))
        if data.get(key) is not None
    )
    size = f"{data['num_train']} images, " if data.get("num_train") is not None else ""
    return TrainingData(
        f"the noisy Fashion-MNIST demo ({size}{noise})", "Fashion-MNIST (clean test set)", "fashion_mnist"
    )


def build_model_card(
    config: MoProConfig,
    repo_id: str,
    eval_results: Sequence[EvalResult] = (),
    noise_summary: Mapping[str, Any] | None = None,
    *,
    model_name: str | None = None,
    num_parameters: int | None = None,
    license: str = "bsd-3-clause",
    datasets: Sequence[str] | None = None,
    training_state: Mapping[str, Any] | None = None,
    description: str | None = None,
    timm_repo_id: str | None = None,
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bilinear",
    resize_size: int | None = None,
    run_args: Mapping[str, Any] | None = None,
    complexity: ModelComplexity | None = None,
    curves_file: str | None = None,
) -> ModelCard:
    """The model card of a release.

    Args:
        config: the released model's config (architecture, hyperparameters, labels).
        repo_id: Hub id used in the code snippets (`org/name`).
        eval_results: the `model-index` entries (see `evaluation.release.read_results`).
        noise_summary: statistics of the training set's noise decisions (name -> number or string), if any.
        model_name: name in the `model-index` (required by the Hub with results); the repo name by default.
        num_parameters: parameter count of the release model, for the description.
        license: Hub license id of the weights.
        datasets: Hub dataset ids of the training data, for the metadata.
        training_state: `trainer_state.json` facts (`epoch`, `global_step`) if the model was trained here.
        description: an extra paragraph for the description (e.g. "Converted from the official MoPro-V1 checkpoint").
        timm_repo_id: Hub repo of the timm export (None: no timm export).
        image_mean / image_std: the normalisation of the saved image processor (default: the project's one ImageNet
            mean / std, transformers' `IMAGENET_DEFAULT_MEAN` / `_STD`, which the data floor re-exports).
        interpolation / resize_size: the resize filter and short-side size of the saved image processor (default
            size: the official 256/224 ratio at `config.image_size`).
        run_args: the run's `run_args.json` (`model_args`, `data_args`, `training_args` as dicts), if saved. The card
            states only what it records: the data, schedule and epochs of a run without it are "not recorded".
        complexity: parameters, MACs and activations at the image size (`measure_complexity`), for the summary.
        curves_file: the run's training-curve picture, relative to the card (None: the run has none).
    """
    model_name = model_name or repo_id.split("/")[-1]
    data = describe_training_data(run_args)
    datasets = datasets or list(data.hub_ids) or None
    tags = ["image-classification", "mopro", "webly-supervised-learning", "noisy-labels", "pytorch"]
    if timm_repo_id:
        tags.append("timm")
    card_data = ModelCardData(
        model_name=model_name,
        license=license,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=tags,
        datasets=list(datasets) if datasets else None,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
        eval_results=list(eval_results) or None,
    )
    sections = [
        f"# {model_name}",
        _at_a_glance(config, complexity, data, noise_summary, eval_results),
        _description(config, num_parameters, description, image_mean, image_std, interpolation, resize_size),
        _intended_use(data),
        _how_to_use(config, repo_id, timm_repo_id),
        _training(config, noise_summary, training_state, data, (run_args or {}).get("training_args"), curves_file),
        _results(eval_results),
        _limitations(config, data),
        f"## Citation\n\n```bibtex\n{CITATION}\n```",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _at_a_glance(
    config: MoProConfig,
    complexity: ModelComplexity | None,
    data: TrainingData,
    noise_summary: Mapping[str, Any] | None,
    eval_results: Sequence[EvalResult],
) -> str:
    """The summary a visitor reads first, as timm's cards give it: size and cost at the image size, the data, and the
    headline results (every result is in the `model-index` and the results section)."""
    rows = [("backbone", _backbone_text(config)), ("classes", config.num_labels)]
    if complexity is not None:
        rows += [
            ("parameters (M)", f"{complexity.parameters / 1e6:.3g}"),
            ("GMACs", f"{complexity.macs / 1e9:.3g}"),
            ("activations (M)", f"{complexity.activations / 1e6:.3g}"),
        ]
    rows.append(("image size", f"{config.image_size} x {config.image_size}"))
    num_samples = (noise_summary or {}).get("num_samples")
    size = f"; {num_samples} training samples" if isinstance(num_samples, int) else ""
    rows.append(("training data", f"{data.name}{size}"))
    for result in [r for r in eval_results if r.metric_type != "loss"][:3]:
        metric = result.metric_name or result.metric_type
        rows.append((f"{metric} ({result.dataset_name})", _format_value(result.metric_value)))
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    note = (
        f"\n\nComputed for one {complexity.image_size}-px image through the released model (backbone, classifier and "
        "projection): GMACs are 10^9 multiply-accumulates (one MAC = two FLOPs), activations the elements output by "
        "its convolutions and matrix products, as timm's model cards count them."
        if complexity is not None
        else ""
    )
    return f"## At a glance\n\n{table}{note}"


def _backbone_text(config: MoProConfig) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(config.backbone_kwargs.items()))
    return f"`{config.backbone}`" + (f" ({kwargs})" if kwargs else "")


def _description(
    config: MoProConfig,
    num_parameters: int | None,
    extra: str | None,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str,
    resize_size: int | None,
) -> str:
    size = ""
    if num_parameters:
        size = (
            f" ({num_parameters / 1e6:.1f}M parameters)"
            if num_parameters >= 1e5
            else f" ({num_parameters} parameters)"
        )
    text = f"""## Model description

A {config.backbone} image classifier trained with **MoPro** ([Li, Xiong & Hoi, ICLR 2021]({PAPER_URL})),
webly supervised learning with momentum prototypes: a classifier and a low-dimensional contrastive embedding are
trained together on images with noisy labels; per-class prototypes (moving averages of the embeddings) correct
wrong labels and discard out-of-distribution images during training.

- Backbone: timm {_backbone_text(config)}, global average pooling{size}.
- Classifier: linear, {config.num_labels} classes.
- Projection: {config.projection_hidden_size}-d hidden layer, ReLU, {config.embedding_size}-d L2-normalised embedding.
- Class prototypes: {config.num_labels} x {config.embedding_size}, stored with the weights (`mopro.prototypes`).
- Input: RGB, resize the short side to {resize_size or int(config.image_size / (224 / 256))} px, centre-crop {config.image_size} px
  ({interpolation}), normalise with mean {list(mean)} and std {list(std)}. The saved image
  processor does this."""
    return text + (f"\n\n{extra}" if extra else "")


def _intended_use(data: TrainingData) -> str:
    synsets = " (WebVision's classes are ImageNet's WordNet synsets)" if data.web_images else ""
    return f"""## Intended use

- Image classification over the training label set{synsets}.
- A pretrained backbone for transfer: fine-tuning, low-shot linear classifiers, detection.
- The embeddings and their cosine similarity to the class prototypes (`MoProModel` outputs
  `prototype_similarities`) as a simple signal of how typical an image is for its class.

Not intended for decisions about people, or for any use where a wrong label causes harm: the training labels are
noisy and were never verified by hand."""


def _how_to_use(config: MoProConfig, repo_id: str, timm_repo_id: str | None) -> str:
    text = f"""## How to use

The model code ships with the weights (remote code), or comes from the `mopro-hf` package, which registers the
MoPro classes with the Auto classes on import (then `trust_remote_code` is not needed).

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{repo_id}")
model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True).eval()
inputs = processor(Image.open("image.jpg").convert("RGB"), return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
label = model.config.id2label[outputs.logits.argmax(-1).item()]
embedding = outputs.embeddings  # ({config.embedding_size},)-d, L2-normalised
```

With the pipeline:

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)
classifier("image.jpg")
```"""
    if timm_repo_id:
        text += f"""

With timm: the backbone and classifier as a plain timm `{config.backbone}`, in its own repo (timm reads the
`config.json` at a repo's root, which here is the transformers config):

```python
import timm

model = timm.create_model("hf-hub:{timm_repo_id}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
```

transformers' timm wrapper loads that repo too: `AutoModelForImageClassification.from_pretrained("{timm_repo_id}")`."""
    return text


# Training arguments the card reports (TrainingArguments / MoProTrainingArguments names) -> their row label.
_SCHEDULE_ROWS = {
    "baseline": "method",
    "num_train_epochs": "epochs (planned)",
    "max_steps": "optimizer steps (planned)",
    "global_batch_size": "global batch size",
    "optim": "optimizer",
    "optim_args": "optimizer arguments",
    "learning_rate": "learning rate",
    "weight_decay": "weight decay",
    "lr_scheduler_type": "learning-rate schedule",
    "lr_milestones": "learning-rate milestones (epochs)",
    "lr_gamma": "learning-rate factor at each milestone",
    "prototype_start_epoch": "prototypical loss from epoch",
    "noise_correction_start_epoch": "noise correction from epoch",
    "seed": "seed",
}


def _schedule_rows(training_args: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    if not isinstance(training_args, Mapping):
        return [("training schedule (epochs, learning rate, batch)", NOT_RECORDED)]
    # MoProTrainer's step schedule replaces `lr_scheduler_type` when milestones are given (`create_scheduler`).
    skip = {"lr_scheduler_type"} if training_args.get("lr_milestones") else {"lr_milestones", "lr_gamma"}
    rows = []
    for key, label in _SCHEDULE_ROWS.items():
        value = training_args.get(key)
        if key in skip or value in (None, "") or (key == "max_steps" and value in (-1, 0)):
            continue
        rows.append((label, value))
    # What ran: MoProTrainer writes the accelerator's precision and its compile decision into these arguments, so
    # an accelerate config asking for bf16 or dynamo shows here too (`MoProTrainer._record_effective_precision`).
    reduced = next((name for name in ("bf16", "fp16") if training_args.get(name)), None)
    rows.append(("precision", f"{reduced} autocast in the backbones, fp32 heads and losses" if reduced else "fp32"))
    if training_args.get("torch_compile"):
        rows.append(("torch.compile", f"backbones, backend {training_args.get('torch_compile_backend')}"))
    return rows


def _training(
    config: MoProConfig,
    noise_summary: Mapping[str, Any] | None,
    training_state: Mapping[str, Any] | None,
    data: TrainingData,
    training_args: Mapping[str, Any] | None,
    curves_file: str | None = None,
) -> str:
    rows = [("training data", data.name), *_schedule_rows(training_args)]
    rows += [
        ("loss", "cross-entropy + instance contrastive (MoCo queue) + prototypical contrastive"),
        ("loss weights (instance, prototype)", f"{config.instance_loss_weight}, {config.prototype_loss_weight}"),
        ("temperature", config.temperature),
        ("queue size", config.queue_size),
        ("momentum encoder / prototype momentum", f"{config.encoder_momentum} / {config.prototype_momentum}"),
        ("soft label: classifier weight alpha", config.alpha),
        ("relabelling threshold", config.pseudo_label_threshold),
        ("out-of-distribution rule", config.ood_rule),
    ]
    if training_state:
        rows += [(f"{k.replace('_', ' ')} (completed)", v) for k, v in training_state.items()]
    else:
        rows.append(("epochs / optimizer steps completed", f"{NOT_RECORDED} (no trainer_state.json)"))
    table = "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"""## Training procedure

Each step encodes a weakly augmented view with the network and a strongly augmented view with its momentum (EMA)
copy. After a warm-up on the given labels, a soft label (alpha x the classifier's softmax + (1 - alpha) x the
softmax over prototype similarities) replaces the given label when its top score exceeds the threshold, and a sample
whose given label scores at most 1/K is dropped as out-of-distribution; the prototypes follow the embeddings of the
kept samples. The table gives this model's own settings: its config, and the data and schedule of its run as far as
the run recorded them (`{RUN_ARGS_FILE}`, `trainer_state.json`).

{table}"""
    if curves_file:
        text += f"""

### Training curves

Per epoch: clean accuracy, the loss components, the training samples kept, relabelled and dropped as
out-of-distribution, and the correction schedule's signals; the dashed line marks where noise correction starts
(`python -m evaluation.training_curves RUN` draws it from the run's `trainer_state.json`).

![training curves]({curves_file})"""
    if noise_summary:
        noise_summary = dict(noise_summary)
        repo = noise_summary.pop("dataset_repo", None)
        stats = "\n".join(f"| {k} | {_format_value(v)} |" for k, v in noise_summary.items())
        published = (
            f" The per-sample report (suggested labels, label-quality and OOD scores) is the dataset "
            f"[{repo}](https://huggingface.co/datasets/{repo}); the images it relabelled or dropped are its "
            f"[`flagged_images` configuration](https://huggingface.co/datasets/{repo}/viewer/flagged_images) and "
            f"its gallery page [`index.html`](https://huggingface.co/datasets/{repo}/blob/main/index.html) "
            "(download the repo and open it in a browser)."
            if repo
            else " The per-sample report and its image gallery are in the run's output folder: `noise_report/` "
            "(`datasets.load_from_disk`) and `noise_report/index.html`."
        )
        text += f"""

### Training data noise

The model's noise decisions on its training set (clean / relabelled / out-of-distribution), from the noise report
of this release.{published}

| statistic | value |
|---|---|
{stats}"""
    return text


def _results(eval_results: Sequence[EvalResult]) -> str:
    if not eval_results:
        return "## Evaluation results\n\nNo evaluation results were supplied with this release."
    with_split = any(r.dataset_split for r in eval_results)
    header = "| task | dataset |" + (" split |" if with_split else "") + " metric | value |"
    rows = [header, "|---" * header.count(" | ") + "|---|"]
    for r in eval_results:
        split = f" {r.dataset_split or ''} |" if with_split else ""
        metric = r.metric_name or r.metric_type
        rows.append(f"| {r.task_type} | {r.dataset_name} |{split} {metric} | {_format_value(r.metric_value)} |")
    table = "\n".join(rows)
    return f"""## Evaluation results

Also in the `model-index` metadata of this card. Accuracies are in percent where the evaluation script wrote
percent, and in [0, 1] where the transformers Trainer wrote them (`accuracy`).

{table}"""


def _limitations(config: MoProConfig, data: TrainingData) -> str:
    generic_labels = all(name == f"LABEL_{i}" for i, name in config.id2label.items())
    if data.web_images:
        source = """- The training labels are web search queries: noisy and biased towards what search engines return for each
  class name. Web images over-represent some regions, people and styles; the model inherits these biases. The
  images keep their own terms of use, usually research only.
- Accuracy on other distributions (sketches, renditions, adversarially filtered images) is markedly lower."""
    else:
        source = f"""- Training data: {data.name}. The model knows only its classes and the kind of images it was trained on."""
    text = f"""## Limitations

{source}
- Label correction reduces label noise but also reinforces the model's own early mistakes on similar classes, and
  the out-of-distribution rule can relabel an unrelated image instead of discarding it."""
    if generic_labels:
        text += "\n- The class names were not supplied: labels are `LABEL_<index>` in the training class order."
    return text


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


__all__ = [
    "CITATION",
    "CURVES_FILE",
    "NOT_RECORDED",
    "RUN_ARGS_FILE",
    "ModelComplexity",
    "TrainingData",
    "build_model_card",
    "describe_training_data",
]
