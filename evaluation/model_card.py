"""The Hub model card (README.md) of a MoPro release, built with `huggingface_hub.ModelCard`.

The YAML header carries the `model-index` (one `EvalResult` per metric found by `evaluation.release.read_results`),
which `ModelCard.load(path).data.eval_results` reads back; the body has the sections a reader of the Hub page
needs: description, intended use, how to use (transformers, pipeline, timm), training procedure and data (with the
noise statistics of the training set when a noise report was written), evaluation results, limitations, citation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

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
    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
    image_std: Sequence[float] = (0.229, 0.224, 0.225),
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
        image_mean / image_std: the normalisation of the saved image processor (ImageNet's by default).
    """
    model_name = model_name or repo_id.split("/")[-1]
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
        _description(config, num_parameters, description, image_mean, image_std),
        _intended_use(),
        _how_to_use(config, repo_id, timm_repo_id),
        _training(config, noise_summary, training_state),
        _results(eval_results),
        _limitations(config),
        f"## Citation\n\n```bibtex\n{CITATION}\n```",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _backbone_text(config: MoProConfig) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(config.backbone_kwargs.items()))
    return f"`{config.backbone}`" + (f" ({kwargs})" if kwargs else "")


def _description(
    config: MoProConfig, num_parameters: int | None, extra: str | None, mean: Sequence[float], std: Sequence[float]
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
trained together on web images with noisy labels; per-class prototypes (moving averages of the embeddings) correct
wrong labels and discard out-of-distribution images during training.

- Backbone: timm {_backbone_text(config)}, global average pooling{size}.
- Classifier: linear, {config.num_labels} classes.
- Projection: {config.projection_hidden_size}-d hidden layer, ReLU, {config.embedding_size}-d L2-normalised embedding.
- Class prototypes: {config.num_labels} x {config.embedding_size}, stored with the weights (`mopro.prototypes`).
- Input: RGB, resize the short side to {int(config.image_size / (224 / 256))} px, centre-crop {config.image_size} px
  (bilinear), normalise with mean {list(mean)} and std {list(std)}. The saved image
  processor does this."""
    return text + (f"\n\n{extra}" if extra else "")


def _intended_use() -> str:
    return """## Intended use

- Image classification over the training label set (WebVision's 1000 classes are ImageNet-1k's WordNet synsets).
- A pretrained backbone for transfer: fine-tuning, low-shot linear classifiers, detection.
- The embeddings and their cosine similarity to the class prototypes (`MoProModel` outputs
  `prototype_similarities`) as a simple signal of how typical an image is for its class.

Not intended for decisions about people, or for any use where a wrong label causes harm: the training labels come
from web search queries and were never verified by hand."""


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


def _training(
    config: MoProConfig, noise_summary: Mapping[str, Any] | None, training_state: Mapping[str, Any] | None
) -> str:
    rows = [
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
        rows += [(k.replace("_", " "), v) for k, v in training_state.items()]
    table = "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"""## Training procedure

Each step encodes a weakly augmented view with the network and a strongly augmented view with its momentum (EMA)
copy. After a warm-up on the given labels, a soft label (alpha x the classifier's softmax + (1 - alpha) x the
softmax over prototype similarities) replaces the given label when its top score exceeds the threshold, and a sample
whose given label scores at most 1/K is dropped as out-of-distribution; the prototypes follow the embeddings of the
kept samples. The official schedule
(`{OFFICIAL_CODE_URL}`): SGD (momentum 0.9, weight decay 1e-4, learning rate 0.1 for a batch of 256), 90 epochs,
learning rate divided by 10 at epochs 40 and 80, prototypical loss from epoch 1, label correction from epoch 11.

{table}"""
    if noise_summary:
        stats = "\n".join(f"| {k} | {_format_value(v)} |" for k, v in noise_summary.items())
        text += f"""

### Training data noise

The model's noise decisions on its training set (clean / relabelled / out-of-distribution), from the noise report
of this release:

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


def _limitations(config: MoProConfig) -> str:
    generic_labels = all(name == f"LABEL_{i}" for i, name in config.id2label.items())
    text = """## Limitations

- The training labels are web search queries: noisy and biased towards what search engines return for each
  class name. Label correction reduces the noise but also reinforces the model's own early mistakes on similar
  classes, and the out-of-distribution rule can relabel an unrelated image instead of discarding it.
- Web images over-represent some regions, people and styles; the model inherits these biases. The images (e.g.
  WebVision's) keep their own terms of use, usually research only.
- Accuracy on other distributions (sketches, renditions, adversarially filtered images) is markedly lower."""
    if generic_labels:
        text += "\n- The class names were not supplied: labels are `LABEL_<index>` in the training class order."
    return text


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


__all__ = ["CITATION", "build_model_card"]
