"""Hub release of a trained or converted MoPro model: weights, config, code, image processor, model card, timm export.

    python -m evaluation.release --model_dir runs/mopro --release_dir release/mopro-r50 --repo_id org/mopro-r50 \
        [--results_dir runs/eval] [--push_to_hub]

`model_dir` is any folder written by `save_pretrained` of a MoPro model: the release model
(`MoProForImageClassification`) or the training model (`MoProForPreTraining`, reduced with `to_release_model()`).

Release folder:
    model.safetensors, config.json, *.py    the release model with `auto_map` and its code (remote code)
    preprocessor_config.json                the image processor (resize short side to 256/224 x size, centre crop)
    README.md                               the model card (`evaluation.model_card`), `model-index` in its YAML
    training_curves.png                     the run's curves (`evaluation.training_curves`), when model_dir has them
    results/                                copies of the result files the card was built from
    timm/model.safetensors, timm/config.json
                                            backbone + classifier as a plain timm model (`export_timm`)
`push` uploads the folder without `timm/` to `repo_id`, and `timm/` to its own repo `timm_repo_id` (default
`<repo_id>-timm`): `timm.create_model("hf-hub:<repo_id>-timm", pretrained=True)`. Locally:
`timm.create_model("local-dir:<release_dir>/timm", pretrained=True)`.
Why two repos: timm's `hf-hub:` reads `config.json` at the repo root, where the transformers config is. A root
config carrying both (timm's keys beside MoPro's, `pretrained_cfg.hf_hub_filename` pointing into `timm/`) loads in
timm and in `AutoModelForImageClassification`, but transformers 5.24 takes any local folder whose config.json has
"pretrained_cfg" for a timm checkpoint (`is_timm_local_checkpoint`): `AutoImageProcessor` then reads config.json
instead of preprocessor_config.json and fails ("Unrecognized image processor"), and so does `pipeline` on the
release folder or a downloaded copy. Tried and rejected.

transformers' `TimmWrapperForImageClassification` loads the timm export: `AutoModelForImageClassification
.from_pretrained("<release_dir>/timm")` (or `from_pretrained("<repo_id>-timm")`, or the release folder with
`subfolder="timm"`) gives identical logits, `id2label` from `label_names`, and `pipeline("image-classification")`
works on it (checked offline by `tests/test_release.py`). One adjustment makes that possible: timm 1.0.31's
`save_for_hf` writes `num_classes` into `model_args`, and transformers 5.24's wrapper passes `num_classes` itself,
which fails with "got multiple values for keyword argument 'num_classes'"; `export_timm` drops it from `model_args`
(timm still reads the top-level `num_classes`).

Result files (the convention the evaluation scripts follow; `evaluation.features.save_eval_results` writes it):
- Found in `model_dir` and any extra `results_dirs`, by name: `*results*.json` (the Trainer's `all_results.json`,
  `eval_results.json`, ...) and `eval_*.json` (`eval_<protocol>[_<dataset>].json`).
- Each file is a JSON object (or a list of objects): metric name -> number, plus optional string keys
  `"task"` (Hub task type, default `"image-classification"`), `"task_name"`, `"dataset_name"` (alias `"dataset"`),
  `"dataset_type"` (a Hub dataset id or short slug; default: slug of the name), `"dataset_config"`,
  `"dataset_split"` (alias `"split"`). A nested `"metrics"` object is read as the metrics.
- Without `"dataset_name"`, a file is taken as an evaluation on the training data's validation set (the Trainer's
  files): `default_dataset_name` / `default_dataset_type` of `make_release`, by default the validation data named
  by the run's `run_args.json` (`evaluation.model_card.describe_training_data`), or "validation set (not
  recorded)" without one: never a dataset the run did not use.
- Metric names lose an `eval_` / `test_` prefix. Not metrics: booleans, non-finite numbers, other strings and
  lists, and bookkeeping numbers (`epoch`, `step`, `total_flos`, `num_samples`, `*_runtime`, `*_per_second`,
  `*_samples`, and every `train_*` key). Keys `noise_*` are training-set noise statistics, not results.
- The same metric on the same dataset twice (e.g. `all_results.json` and `eval_results.json`) is kept once.
Noise statistics: the first of `noise_report_summary.json`, `*noise*summary*.json`, `noise_report/*summary*.json`
(a flat object of statistic -> number or string); else the `noise_*` keys of the result files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from huggingface_hub import EvalResult, HfApi, ModelCard, constants, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from modeling_mopro.cli import check_output_dir

from .model_card import CURVES_FILE, RUN_ARGS_FILE, ModelComplexity, build_model_card, describe_training_data

if TYPE_CHECKING:
    from modeling_mopro import MoProForImageClassification

# torch, timm and modeling_mopro are imported where they are used: they take seconds to import, and
# `--push_to_hub` must fail within seconds when the Hub is out of reach.

logger = logging.getLogger(__name__)

RESULT_PATTERNS = ("*results*.json", "eval_*.json")
NOISE_SUMMARY_PATTERNS = ("noise_report_summary.json", "*noise*summary*.json", "noise_report/*summary*.json")
_METADATA_ALIASES = {
    "task": "task_type",
    "task_name": "task_name",
    "dataset_name": "dataset_name",
    "dataset": "dataset_name",
    "dataset_type": "dataset_type",
    "dataset_config": "dataset_config",
    "dataset_split": "dataset_split",
    "split": "dataset_split",
}
_BOOKKEEPING_KEYS = {"epoch", "step", "total_flos", "num_samples"}
_BOOKKEEPING_SUFFIXES = ("_runtime", "_per_second", "_flos", "_samples", "_epoch")
TIMM_SUBFOLDER = "timm"
# timm's default pretrained_cfg describes timm's ImageNet weights (tag, license, paper, test-time size): not ours.
_TIMM_PROVENANCE_KEYS = frozenset(
    "tag hf_hub_id hf_hub_filename url file source license description origin_url paper_name paper_ids notes "
    "test_input_size test_crop_pct label_names label_descriptions".split()
)


class HubUnavailableError(ConnectionError):
    """The Hub cannot be reached (offline mode or no network); raised before any upload is attempted."""


@dataclass
class Release:
    """What `make_release` produced."""

    release_dir: Path
    card: ModelCard
    eval_results: list[EvalResult]
    noise_summary: dict[str, Any] | None
    timm_dir: Path | None
    urls: dict[str, str] | None = None


# --------------------------------------------------------------------------------------------------- results
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _is_metric_value(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_bookkeeping(key: str) -> bool:
    return key in _BOOKKEEPING_KEYS or key.endswith(_BOOKKEEPING_SUFFIXES) or key.startswith("train_")


def _json_objects(path: Path) -> list[dict]:
    """The objects of a result file; unreadable files are skipped with a warning (a release is not blocked by one)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("Skipping %s: %s", path, error)
        return []
    objects = data if isinstance(data, list) else [data]
    return [o for o in objects if isinstance(o, dict)]


def read_result_file(
    path: str | os.PathLike, default_dataset_name: str, default_dataset_type: str | None = None
) -> list[EvalResult]:
    """`EvalResult`s of one result file (see the module docstring for the convention)."""
    path = Path(path)
    results = []
    for entry in _json_objects(path):
        meta = {ours: entry[key] for key, ours in _METADATA_ALIASES.items() if isinstance(entry.get(key), str)}
        if "dataset_name" not in meta:
            meta["dataset_name"] = default_dataset_name
            meta.setdefault("dataset_type", default_dataset_type or _slug(default_dataset_name))
        meta.setdefault("dataset_type", _slug(meta["dataset_name"]))
        meta.setdefault("task_type", "image-classification")
        metrics = entry["metrics"] if isinstance(entry.get("metrics"), dict) else entry
        for key, value in metrics.items():
            if key in _METADATA_ALIASES or not _is_metric_value(value) or _is_bookkeeping(key):
                continue
            if key.startswith("noise_"):
                continue  # training-set statistics (read by `read_noise_summary`)
            name = re.sub(r"^(eval|test)_", "", key)
            results.append(EvalResult(metric_type=name, metric_value=float(value), **meta))
    return results


def _result_files(folders: Iterable[Path]) -> list[Path]:
    files: dict[Path, None] = {}  # ordered, without duplicates (a file can match both patterns)
    for folder in folders:
        for pattern in RESULT_PATTERNS:
            for path in sorted(folder.glob(pattern)):
                if path.is_file():
                    files[path] = None
    return list(files)


def read_results(
    folders: Sequence[str | os.PathLike],
    default_dataset_name: str = "validation set (not recorded)",
    default_dataset_type: str = "not-recorded",
) -> tuple[list[EvalResult], list[Path]]:
    """Every evaluation result in the result files of `folders`, de-duplicated.

    Returns:
        The results (file order, then key order) and the files they came from.
    """
    results: dict[tuple, EvalResult] = {}
    sources = []
    for path in _result_files(map(Path, folders)):
        found = read_result_file(path, default_dataset_name, default_dataset_type)
        if found:
            sources.append(path)
        for result in found:
            key = (*result.unique_identifier, result.metric_type)
            if key in results and results[key].metric_value != result.metric_value:
                logger.warning(
                    "%s: %s on %s is %s here but %s in an earlier file; keeping the first.",
                    path,
                    result.metric_type,
                    result.dataset_name,
                    result.metric_value,
                    results[key].metric_value,
                )
            results.setdefault(key, result)
    return list(results.values()), sources


def read_noise_summary(folders: Sequence[str | os.PathLike]) -> tuple[dict[str, Any] | None, Path | None]:
    """Training-set noise statistics (scalar entries only) and the file they came from, or (None, None)."""
    folders = [Path(f) for f in folders]
    for pattern in NOISE_SUMMARY_PATTERNS:
        for folder in folders:
            for path in sorted(folder.glob(pattern)):
                objects = _json_objects(path) if path.is_file() else []
                if objects:
                    summary = {k: v for k, v in objects[0].items() if isinstance(v, (int, float, str))}
                    return summary, path
    # The training script also logs the summary as `noise_*` keys of all_results.json.
    for path in _result_files(folders):
        for entry in _json_objects(path):
            summary = {k.removeprefix("noise_"): v for k, v in entry.items() if k.startswith("noise_")}
            if summary:
                return summary, path
    return None, None


def read_training_state(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Epochs and optimizer steps from the Trainer's `trainer_state.json`, if the model was trained here."""
    path = Path(model_dir) / "trainer_state.json"
    objects = _json_objects(path) if path.is_file() else []
    if not objects:
        return None
    state = {"epochs": objects[0].get("epoch"), "optimizer_steps": objects[0].get("global_step")}
    return {k: v for k, v in state.items() if v is not None} or None


def read_run_args(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's arguments from `run_args.json` (`{"model_args": ..., "data_args": ..., "training_args": ...}`,
    plain JSON: a pickled `training_args.bin` is never read), or None when the run did not save them."""
    path = Path(model_dir) / RUN_ARGS_FILE
    objects = _json_objects(path) if path.is_file() else []
    return objects[0] if objects else None


def measure_complexity(model) -> ModelComplexity:
    """Parameters, MACs and activations of one forward of `model` on one `config.image_size` image, counted (not
    looked up): MACs are half the FLOPs `torch.utils.flop_counter` counts for convolutions and matrix products (it
    counts 2 per multiply-accumulate); activations are the elements those layers output (`nn.Conv*` and
    `nn.Linear` forward hooks), the figure timm's model cards give."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.image_size
    parameter = next(model.parameters())
    pixel_values = torch.zeros(1, 3, size, size, dtype=parameter.dtype, device=parameter.device)
    activations = []

    def count(module, inputs, output):
        activations.append(output.numel())

    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, layers)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return ModelComplexity(
        parameters=sum(p.numel() for p in model.parameters()),
        macs=counter.get_total_flops() // 2,
        activations=sum(activations),
        image_size=size,
    )


# ----------------------------------------------------------------------------------------------------- model
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_dir(model_dir: str | os.PathLike) -> None:
    """Fail in milliseconds, with the fix, when `model_dir` is not a saved MoPro model folder."""
    model_dir = Path(model_dir)
    fix = "give the folder written by training.run_mopro (--output_dir) or modeling_mopro.convert_original_checkpoint"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model_dir {model_dir} does not exist or is not a folder; {fix}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"model_dir {model_dir} has no config.json, so it is not a saved model folder; {fix}")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{config_path} is not a JSON object ({error}); {fix}") from error
    if model_type != "mopro":
        raise ValueError(f"model_dir {model_dir} holds a {model_type!r} model, not a MoPro one; {fix}")
    if not any((model_dir / name).is_file() for name in _WEIGHT_FILES):
        raise ValueError(
            f"model_dir {model_dir} has a MoPro config.json but no weights (model.safetensors); save the model "
            "there with save_pretrained, or {fix}".replace("{fix}", fix)
        )


def check_repo_id(repo_id: str, flag: str = "--repo_id") -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{flag} {repo_id!r} is not a Hub repo id: {error} Use the form org/name.") from error


def load_release_model(model_dir: str | os.PathLike) -> MoProForImageClassification:
    """The release model of a saved MoPro folder, loaded as every protocol loads one (`features.load_model`: a
    pretraining folder loads without its momentum encoder and queue), on the CPU."""
    from .features import load_model

    model = load_model(model_dir, "cpu")
    if getattr(model, "classifier", None) is None:
        raise ValueError(f"{model_dir} holds a {type(model).__name__}: a release needs a classifier (a MoPro model)")
    return model


def export_timm(
    model: MoProForImageClassification,
    output_dir: str | os.PathLike,
    license: str = "bsd-3-clause",
) -> Path:
    """Save the backbone and classifier as a plain timm model (`model.safetensors` + timm's `config.json`).

    `timm.create_model("local-dir:<output_dir>", pretrained=True)` then loads it offline with the same logits, and so
    does `AutoModelForImageClassification.from_pretrained(output_dir)` (transformers' timm wrapper).

    Args:
        model: the release model.
        output_dir: the folder to write.
        license: license id recorded in timm's `pretrained_cfg`.
    """
    import timm
    from timm.models import save_for_hf

    from modeling_mopro import image_processor_for

    config = model.config
    processor = image_processor_for(config)
    timm_model = timm.create_model(
        config.backbone, pretrained=False, num_classes=config.num_labels, **config.backbone_kwargs
    )
    head = timm_model.get_classifier()
    head_name = next(name for name, module in timm_model.named_modules() if module is head)
    state = dict(model.mopro.backbone.state_dict())
    state |= {f"{head_name}.{k}": v for k, v in model.classifier.state_dict().items()}
    timm_model.load_state_dict(state, strict=True)

    timm_model.pretrained_cfg = {
        **{k: v for k, v in timm_model.pretrained_cfg.items() if k not in _TIMM_PROVENANCE_KEYS},
        "tag": "mopro",
        "license": license,
        "origin_url": "https://github.com/salesforce/MoPro",
        "paper_name": "MoPro: Webly Supervised Learning with Momentum Prototypes",
        "paper_ids": "arXiv:2009.07995",
    }
    # The saved transformers image processor's view (`build_image_processor` by default: the official resize 256 /
    # centre-crop 224, scaled, bilinear as torchvision's `Resize` in the official test transform).
    data_config = {
        "input_size": (3, config.image_size, config.image_size),
        "interpolation": _interpolation(processor),
        "crop_pct": processor.crop_pct,
        "crop_mode": "center",
        "mean": tuple(processor.image_mean),
        "std": tuple(processor.image_std),
    }
    label_names = [config.id2label[i] for i in range(config.num_labels)]
    output_dir = Path(output_dir)
    save_for_hf(
        timm_model,
        output_dir,
        model_config={"label_names": label_names},
        safe_serialization=True,
        data_config=data_config,
    )
    # transformers' TimmWrapper passes num_classes itself and fails when model_args repeats it (see module docstring).
    config_path = output_dir / "config.json"
    timm_config = json.loads(config_path.read_text())
    timm_config.get("model_args", {}).pop("num_classes", None)
    config_path.write_text(json.dumps(timm_config, indent=2) + "\n")
    return output_dir


def _interpolation(processor) -> str:
    """The resize filter of a saved image processor, as timm and the card name it ("bilinear", "bicubic")."""
    from PIL.Image import Resampling

    return Resampling(processor.resample).name.lower()  # an int once the processor is re-loaded from json


# ------------------------------------------------------------------------------------------------------- Hub
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _can_connect(host: str, port: int, timeout: float) -> bool:
    """A TCP connection within `timeout` seconds, DNS included (run in a thread: name resolution has no timeout)."""
    outcome: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])


def check_hub_reachable(timeout: float = 3.0, output: str = "release folder") -> None:
    """Fail fast (without any Hub request) when pushing cannot work; the message says that `output` can still be
    built without pushing.

    Raises:
        HubUnavailableError: offline mode is on (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`), or the Hub endpoint
            does not accept a connection within `timeout` seconds.
    """
    if constants.is_offline_mode() or _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        raise HubUnavailableError(
            f"Cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1). The {output} can be built "
            "offline without --push_to_hub; to push, unset HF_HUB_OFFLINE, log in (`hf auth login`) and rerun."
        )
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    if not _can_connect(url.hostname or "", port, timeout):
        raise HubUnavailableError(
            f"Cannot push to the Hub: {constants.ENDPOINT} did not answer within {timeout:g} s (no network?). "
            f"The {output} can be built without --push_to_hub and uploaded later."
        )


def check_hub_login(output: str = "release folder") -> None:
    """Fail before any work when no Hub token is set: the upload would be refused after `output` is built."""
    if get_token() is None:
        raise HubUnavailableError(
            "Cannot push to the Hub: not logged in (no token). Run `hf auth login` or set HF_TOKEN and rerun; the "
            f"{output} can be built without --push_to_hub and uploaded later."
        )


def push_release(
    release_dir: str | os.PathLike,
    repo_id: str,
    timm_repo_id: str | None = None,
    private: bool = False,
    commit_message: str = "Upload MoPro release",
) -> dict[str, str]:
    """Upload the release folder to `repo_id` and its `timm/` export to `timm_repo_id` (created if needed;
    credentials: the huggingface_hub login).

    Returns:
        repo id -> URL of the commit.
    """
    check_hub_reachable()
    check_hub_login()
    api = HfApi()
    release_dir = Path(release_dir)
    uploads = [(repo_id, release_dir, [f"{TIMM_SUBFOLDER}/*"])]
    if timm_repo_id and (release_dir / TIMM_SUBFOLDER).is_dir():
        uploads.append((timm_repo_id, release_dir / TIMM_SUBFOLDER, None))
    urls = {}
    for repo, folder, ignore in uploads:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo,
            repo_type="model",
            commit_message=commit_message,
            ignore_patterns=ignore,
        )
        urls[repo] = str(getattr(commit, "commit_url", commit))
    return urls


# ---------------------------------------------------------------------------------------------------- release
def _check_release_dir(model_dir: Path, release_dir: Path, overwrite: bool) -> None:
    """Refuse a release_dir that would lose something: a file, the model itself, or a previous release."""
    model, release = model_dir.resolve(), release_dir.resolve()
    if model == release or model.is_relative_to(release) or release.is_relative_to(model):
        raise ValueError(f"release_dir {release_dir} must be outside model_dir {model_dir} (and not contain it).")
    previous = any((release_dir / name).exists() for name in ("README.md", "config.json"))
    held = lambda folder: sorted(p.name for p in folder.iterdir())  # noqa: E731
    what = "a previous release: {names}" if previous else "files: {names}"
    check_output_dir(release_dir, overwrite, held, what, "--release_dir")


def _prepare_release_dir(release_dir: Path) -> None:
    if release_dir.exists() and any(release_dir.iterdir()):
        shutil.rmtree(release_dir)  # checked by `_check_release_dir`: asked for with overwrite
    release_dir.mkdir(parents=True, exist_ok=True)


def make_release(
    model_dir: str | os.PathLike,
    release_dir: str | os.PathLike,
    repo_id: str = "org/mopro-r50",
    push: bool = False,
    *,
    timm_repo_id: str | None = None,
    results_dirs: Sequence[str | os.PathLike] = (),
    default_dataset_name: str | None = None,
    default_dataset_type: str | None = None,
    model_name: str | None = None,
    license: str = "bsd-3-clause",
    datasets: Sequence[str] | None = None,
    description: str | None = None,
    timm_export: bool = True,
    private: bool = False,
    overwrite: bool = False,
) -> Release:
    """Turn a saved MoPro folder and its result files into a Hub-ready folder, and push it when asked.

    Args:
        model_dir: folder of `save_pretrained` (release or pretraining model), with the result files.
        release_dir: the folder to write (must be empty or absent unless `overwrite`).
        repo_id: Hub repo (`org/name`), used in the card and for the push.
        timm_repo_id: Hub repo of the timm export (default `<repo_id>-timm`).
        push: upload to the Hub. Checked first: offline or unreachable, it fails before any work or request.
        results_dirs: more folders to read result files from (see the module docstring).
        default_dataset_name / default_dataset_type: dataset of result files without `dataset_name` (the Trainer's);
            by default the validation data of the run's `run_args.json`, else "validation set (not recorded)".
        model_name: `model-index` name (default: the repo name).
        license: Hub license id of the weights.
        datasets: Hub dataset ids of the training data, for the card metadata.
        description: an extra paragraph for the card (provenance, e.g. "Converted from MoPro_V1_epoch90.tar").
        timm_export: also write the timm export in `timm/` (pushed to `timm_repo_id`).
        private: create the Hub repo as private.
        overwrite: replace a non-empty `release_dir`.

    Raises:
        ValueError / OSError: a bad `model_dir`, `release_dir` or repo id, before anything is loaded or written.
        HubUnavailableError: `push` while the Hub cannot be reached or no token is set, before any work.
    """
    model_dir, release_dir = Path(model_dir), Path(release_dir)
    check_repo_id(repo_id)
    if timm_repo_id is not None:
        check_repo_id(timm_repo_id, "--timm_repo_id")
    check_model_dir(model_dir)
    _check_release_dir(model_dir, release_dir, overwrite)
    missing = [str(folder) for folder in results_dirs if not Path(folder).is_dir()]
    if missing:
        raise FileNotFoundError(f"--results_dir {', '.join(missing)} is not a folder; give folders of eval_*.json")
    if push:
        check_hub_reachable()
        check_hub_login()
    from modeling_mopro import image_processor_for

    model = load_release_model(model_dir)
    processor = image_processor_for(model.config)  # model_dir's own, so the release normalises as it was trained
    _prepare_release_dir(release_dir)
    model.save_pretrained(release_dir)
    processor.save_pretrained(release_dir)

    timm_dir = export_timm(model, release_dir / TIMM_SUBFOLDER, license=license) if timm_export else None
    timm_repo_id = (timm_repo_id or f"{repo_id}-timm") if timm_export else None

    run_args = read_run_args(model_dir)
    data = describe_training_data(run_args)
    folders = [model_dir, *map(Path, results_dirs)]
    eval_results, sources = read_results(
        folders, default_dataset_name or data.eval_name, default_dataset_type or data.eval_type
    )
    noise_summary, noise_source = read_noise_summary(folders)
    for source in [*sources, *([noise_source] if noise_source else [])]:
        (release_dir / "results").mkdir(exist_ok=True)
        shutil.copy2(source, release_dir / "results" / source.name)
    curves = model_dir / CURVES_FILE  # written by run_mopro.py (or `python -m evaluation.training_curves`)
    if curves.is_file():
        shutil.copy2(curves, release_dir / CURVES_FILE)
    card = build_model_card(
        model.config,
        repo_id,
        eval_results,
        noise_summary,
        model_name=model_name,
        num_parameters=sum(p.numel() for p in model.parameters()),
        license=license,
        datasets=datasets,
        training_state=read_training_state(model_dir),
        description=description,
        timm_repo_id=timm_repo_id,
        image_mean=processor.image_mean,
        image_std=processor.image_std,
        interpolation=_interpolation(processor),
        resize_size=int(processor.size["shortest_edge"] / processor.crop_pct),
        run_args=run_args,
        complexity=measure_complexity(model),
        curves_file=CURVES_FILE if curves.is_file() else None,
    )
    card.save(release_dir / "README.md")
    logger.info("Release in %s: %d results from %s", release_dir, len(eval_results), [s.name for s in sources])

    urls = push_release(release_dir, repo_id, timm_repo_id, private=private) if push else None
    return Release(release_dir, card, eval_results, noise_summary, timm_dir, urls)


def main(argv: Sequence[str] | None = None) -> Release:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="Folder saved by save_pretrained of a MoPro model.")
    parser.add_argument("--release_dir", required=True, help="Folder to write the release to.")
    parser.add_argument("--repo_id", default="org/mopro-r50", help="Hub repo id (org/name).")
    parser.add_argument("--timm_repo_id", default=None, help="Hub repo of the timm export (default: <repo_id>-timm).")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the release folder to --repo_id.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument("--results_dir", action="append", default=[], help="More folders with result files.")
    parser.add_argument(
        "--default_dataset_name",
        default=None,
        help="Dataset of the Trainer's result files (default: the run's validation data from run_args.json).",
    )
    parser.add_argument("--default_dataset_type", default=None, help="Hub dataset type of --default_dataset_name.")
    parser.add_argument("--model_name", default=None, help="model-index name (default: the repo name).")
    parser.add_argument("--license", default="bsd-3-clause")
    parser.add_argument("--dataset", action="append", default=None, help="Hub dataset id of the training data.")
    parser.add_argument("--description", default=None, help="Extra paragraph for the model card.")
    parser.add_argument("--no_timm", action="store_true", help="Skip the timm export.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty release folder.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    release = make_release(
        args.model_dir,
        args.release_dir,
        repo_id=args.repo_id,
        push=args.push_to_hub,
        timm_repo_id=args.timm_repo_id,
        results_dirs=args.results_dir,
        default_dataset_name=args.default_dataset_name,
        default_dataset_type=args.default_dataset_type,
        model_name=args.model_name,
        license=args.license,
        datasets=args.dataset,
        description=args.description,
        timm_export=not args.no_timm,
        private=args.private,
        overwrite=args.overwrite,
    )
    print(f"release: {release.release_dir} ({len(release.eval_results)} results)")
    for repo, url in (release.urls or {}).items():
        print(f"pushed {repo}: {url}")
    return release


__all__ = [
    "HubUnavailableError",
    "Release",
    "check_hub_login",
    "check_hub_reachable",
    "check_model_dir",
    "check_repo_id",
    "export_timm",
    "load_release_model",
    "make_release",
    "measure_complexity",
    "push_release",
    "read_noise_summary",
    "read_result_file",
    "read_results",
    "read_run_args",
    "read_training_state",
]


if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
