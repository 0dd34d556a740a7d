"""The paper's recipe as a whole: each official YAML, read by the real argument parser, against the official value
of every recipe field, each with the salesforce/MoPro source line it comes from (read from the official code, not
from this project). Also the defaults a user gets without a YAML, the optimizer the Trainer builds from a YAML,
and the downstream recipes (fine-tuning, cRT)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from evaluation import classifier_retrain, finetune
from modeling_mopro import MoProConfig, MoProForPreTraining
from tests.trainer_fixtures import tiny_config, tiny_image_dataset, tiny_trainer
from training import plan
from training.arguments import MoProTrainingArguments
from training.run_mopro import build_config, parse_args
from training.trainer import MoProTrainer

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"
OFFICIAL_YAMLS = ["webvision_v1_r50.yaml", "webvision_v2_r50.yaml"]
PROCESSES = 8  # the paper's 8 GPUs; the global batch is the same on any count (tests/test_plan.py)

# name -> (official value, how the run reads it from (model_args, training_args, config)).
OFFICIAL = {
    # train.py L45: -b 256, "the total batch size of all GPUs on the current node"; L187 splits it per GPU
    "global_batch_size": (
        256,
        lambda m, t, c: t.per_device_train_batch_size * PROCESSES * t.gradient_accumulation_steps,
    ),
    # train.py L49: --lr 0.1
    "learning_rate": (0.1, lambda m, t, c: t.learning_rate),
    # train.py L53: --cos default False -> step schedule; L396-405 adjust_learning_rate, no warm-up
    "lr_schedule": ("step", lambda m, t, c: "step" if t.lr_milestones else str(t.lr_scheduler_type)),
    # train.py L51: --schedule 40 80
    "lr_milestones": ([40, 80], lambda m, t, c: list(t.lr_milestones)),
    # train.py L403: lr *= 0.1 if epoch >= milestone
    "lr_gamma": (0.1, lambda m, t, c: t.lr_gamma),
    # train.py L208: torch.optim.SGD(model.parameters(), ...)
    "optimizer": ("sgd", lambda m, t, c: str(t.optim.value)),
    # train.py L55: --momentum 0.9 (the Trainer passes optim_args to SGD)
    "momentum": ("momentum=0.9", lambda m, t, c: t.optim_args),
    # train.py L57: --wd 1e-4
    "weight_decay": (1e-4, lambda m, t, c: t.weight_decay),
    # train.py L41: --epochs 90
    "num_train_epochs": (90, lambda m, t, c: t.num_train_epochs),
    # train.py L284: is_proto=(epoch>0), 0-indexed epochs
    "prototype_start_epoch": (1, lambda m, t, c: t.prototype_start_epoch),
    # train.py L100: --start_clean_epoch 11; L284: is_clean=(epoch>=args.start_clean_epoch)
    "noise_correction_start_epoch": (11, lambda m, t, c: t.noise_correction_start_epoch),
    # train.py L284: correction from that fixed epoch, at full strength (no adaptive start)
    "noise_correction_schedule": ("fixed", lambda m, t, c: t.noise_correction_schedule),
    # train.py L307-309: optimizer.zero_grad(); loss.backward(); optimizer.step() -- no clipping
    "max_grad_norm": (0.0, lambda m, t, c: t.max_grad_norm),
    # train.py L308: a plain fp32 backward, no autocast or GradScaler anywhere
    "bf16": (False, lambda m, t, c: t.bf16),
    "fp16": (False, lambda m, t, c: t.fp16),
    # DataLoader/dataloader.py L125: drop_last=True
    "dataloader_drop_last": (True, lambda m, t, c: t.dataloader_drop_last),
    # train.py L169: MoPro(resnet50, args, width=1), trained from scratch
    "initialisation": ("random", lambda m, t, c: m.model_name_or_path or "random"),
    "baseline": ("mopro", lambda m, t, c: t.baseline),
    # train.py L38: --arch resnet50; L169: width=1
    "backbone": ("resnet50", lambda m, t, c: c.backbone),
    "backbone_kwargs": ({}, lambda m, t, c: c.backbone_kwargs),
    # DataLoader/dataloader.py L85: RandomResizedCrop(224, ...)
    "image_size": (224, lambda m, t, c: c.image_size),
    # train.py L83: --low-dim 128
    "embedding_size": (128, lambda m, t, c: c.embedding_size),
    # resnet.py L130-131: fc1 = Linear(2048, 2048), fc2 = Linear(2048, low_dim)
    "projection_hidden_size": (2048, lambda m, t, c: c.projection_hidden_size),
    # train.py L85: --moco_queue 8192
    "queue_size": (8192, lambda m, t, c: c.queue_size),
    # train.py L87: --moco_m 0.999
    "encoder_momentum": (0.999, lambda m, t, c: c.encoder_momentum),
    # train.py L89: --proto_m 0.999
    "prototype_momentum": (0.999, lambda m, t, c: c.prototype_momentum),
    # train.py L92: --temperature 0.1
    "temperature": (0.1, lambda m, t, c: c.temperature),
    # train.py L95: --w-inst 1
    "instance_loss_weight": (1.0, lambda m, t, c: c.instance_loss_weight),
    # train.py L97: --w-proto 1
    "prototype_loss_weight": (1.0, lambda m, t, c: c.prototype_loss_weight),
    # train.py L102: --pseudo_th 0.8
    "pseudo_label_threshold": (0.8, lambda m, t, c: c.pseudo_label_threshold),
    # train.py L104: --alpha 0.5
    "alpha": (0.5, lambda m, t, c: c.alpha),
    # model.py L141-150: kept if the given label's soft score > 1/K, or relabelled if max score > pseudo_th
    "ood_rule": ("official", lambda m, t, c: c.ood_rule),
    # model.py L141-150: the soft label is alpha * classifier + (1 - alpha) * prototypes, no neighbour vote
    "noise_correction_rule": ("official", lambda m, t, c: c.noise_correction_rule),
    # resnet.py L137-138: every BatchNorm weight filled with 1 (no zero-init of the last gamma)
    "backbone_zero_init_last": (False, lambda m, t, c: c.backbone_zero_init_last),
}


def read_yaml(name: str, *flags: str):
    # use_cpu: this machine has no GPU; it changes no recipe field (and lets a bf16 YAML parse, to be caught below)
    model_args, data_args, training_args = parse_args([str(CONFIGS / name), *flags, "--use_cpu", "true"])
    training_args.resolve_batch_size(PROCESSES)
    return model_args, training_args, build_config(model_args, {0: "0"})


@pytest.mark.parametrize("yaml_name", OFFICIAL_YAMLS)
@pytest.mark.parametrize("field", list(OFFICIAL))
def test_official_yaml_field(yaml_name, field):
    official, read = OFFICIAL[field]
    model_args, training_args, config = read_yaml(yaml_name)
    value = read(model_args, training_args, config)
    assert value == (pytest.approx(official) if isinstance(official, float) else official), field


def test_a_changed_field_is_caught():
    """The comparison above looks at the parsed run, not at the YAML text: a flag that changes it is seen."""
    model_args, training_args, config = read_yaml(OFFICIAL_YAMLS[0], "--max_grad_norm", "1.0", "--alpha", "0.6")
    assert OFFICIAL["max_grad_norm"][1](model_args, training_args, config) == 1.0
    assert OFFICIAL["alpha"][1](model_args, training_args, config) == 0.6


@pytest.mark.parametrize("yaml_name", OFFICIAL_YAMLS)
def test_official_yaml_keeps_the_official_crop(yaml_name):
    # DataLoader/dataloader.py L85: RandomResizedCrop(224, scale=(crop_size, 1.0)), crop_size=0.2 by default
    _, data_args, _ = parse_args([str(CONFIGS / yaml_name), "--use_cpu", "true"])
    assert data_args.crop_min_scale == 0.2
    departures = plan.plan([str(CONFIGS / yaml_name), "--crop_min_scale", "1.0"], PROCESSES, 2_439_574)
    assert [d["name"] for d in departures["departures_from_official"]] == ["crop_min_scale"]


def test_the_plan_knows_the_same_official_values():
    for name, (official, source) in plan.OFFICIAL_RECIPE.items():
        assert ".py L" in source, name  # the official line is named
        if name == "momentum":
            assert official == 0.9
        elif name == "precision":
            assert official == "fp32"
        elif name == "crop_min_scale":
            assert official == 0.2
        else:
            assert official == OFFICIAL[name][0], name


def test_defaults_without_a_yaml_are_official(tmp_path):
    args = MoProTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.max_grad_norm == 0.0 and args.dataloader_drop_last
    assert (args.prototype_start_epoch, args.noise_correction_start_epoch, args.lr_gamma) == (1, 11, 0.1)
    assert not args.scale_lr_with_global_batch and args.global_batch_size is None
    config = MoProConfig()
    for field, (official, read) in OFFICIAL.items():
        if field in MoProConfig.__dataclass_fields__:
            assert read(None, None, config) == official, field


def test_the_trainer_builds_the_official_optimizer_and_schedule(tmp_path):
    """From the V1 YAML: SGD(lr 0.1, momentum 0.9, wd 1e-4 on every parameter), x0.1 at epochs 40 and 80."""
    _, _, training_args = parse_args([str(CONFIGS / OFFICIAL_YAMLS[0]), "--use_cpu", "true", "--report_to", "none",
                                      "--output_dir", str(tmp_path), "--global_batch_size", "4", "--eval_strategy", "no"])  # fmt: skip
    model = MoProForPreTraining(tiny_config())
    trainer = MoProTrainer(model=model, args=training_args, train_dataset=tiny_image_dataset(8))
    trainer.create_optimizer_and_scheduler(num_training_steps=180)  # 2 steps per epoch
    optimizer = trainer.optimizer
    assert type(optimizer) is torch.optim.SGD
    groups = [group for group in optimizer.param_groups if group["params"]]  # the Trainer's no-decay group is empty
    for group in groups:
        assert group["momentum"] == 0.9 and not group["nesterov"] and group["lr"] == pytest.approx(0.1)
        assert group["weight_decay"] == 1e-4  # train.py L208: model.parameters(), BN and biases included
    trained = sum(p.numel() for group in groups for p in group["params"])
    assert trained == sum(p.numel() for p in model.parameters() if p.requires_grad)
    rates = []
    for _ in range(161):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        trainer.lr_scheduler.step()
    factors = [rates[step] / 0.1 for step in (0, 79, 80, 159, 160)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_gradients_are_not_clipped_unless_asked(tmp_path, max_grad_norm):
    """The Trainer measures the gradient norm through `clip_grad_norm_(max_norm=inf)` (no change to the gradients)
    when clipping is off; only an explicit `max_grad_norm` clips."""
    extra = {} if max_grad_norm is None else {"max_grad_norm": max_grad_norm}
    trainer = tiny_trainer(str(tmp_path), tiny_image_dataset(12), max_steps=2, **extra)
    max_norms = []
    clip = trainer.accelerator.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        max_norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = spy
    trainer.train()
    assert max_norms == ([math.inf] * 2 if max_grad_norm is None else [1.0] * 2)


# ----------------------------------------------------------------------------------- downstream recipes
def _defaults(options) -> dict:
    return {field.name: field.default for field in dataclasses.fields(options)}


def test_finetune_recipe_is_official():
    """finetune_imagenet.py: L34 --epochs 40, L38 -b 256, L42 --lr 0.005, L44 --decay-rate 0.2,
    L45 --schedule 20 30, L47 --momentum 0.9, L49 --wd 0; L248-249 the best top-1 over the epochs is kept."""
    defaults = _defaults(finetune.FinetuneOptions)
    assert defaults["epochs"] == 40 and defaults["batch_size"] == 256 and defaults["learning_rate"] == 0.005
    assert defaults["gamma"] == 0.2 and tuple(defaults["milestones"]) == (20, 30)
    assert defaults["momentum"] == 0.9 and defaults["weight_decay"] == 0.0
    assert defaults["select_best_epoch"] is True


def test_classifier_retrain_recipe_is_official():
    """classifier_retrain.py: L46 --epochs 15 and L229 `range(start_epoch, epochs + 1)`: 16 epochs are run;
    L50 -b 256, L54 --lr 0.01, L56 --schedule 5 10 (x0.1, L405), L58 --momentum 0.9, L60 --wd 0."""
    defaults = _defaults(classifier_retrain.ClassifierRetrainOptions)
    assert defaults["epochs"] == 16 and defaults["batch_size"] == 256 and defaults["learning_rate"] == 0.01
    assert defaults["gamma"] == 0.1 and tuple(defaults["milestones"]) == (5, 10)
    assert defaults["momentum"] == 0.9 and defaults["weight_decay"] == 0.0 and defaults["finetune"] is False


def test_every_model_hyperparameter_is_declared_once_in_the_config():
    """`ModelArguments`, the field tuples and the plan's recipe rows come from `MoProConfig`: a new config field is a
    flag (with the config's own help text), and an official model value is the config's default."""
    import dataclasses

    from modeling_mopro import MoProConfig
    from training.arguments import ARCHITECTURE_FIELDS, HYPERPARAMETER_FIELDS, MODEL_FIELDS, ModelArguments

    own = [f.name for f in dataclasses.fields(MoProConfig) if f.name in vars(MoProConfig)["__annotations__"]]
    assert list(MODEL_FIELDS) == own and sorted(ARCHITECTURE_FIELDS + HYPERPARAMETER_FIELDS) == sorted(own)
    flags = {f.name: f for f in dataclasses.fields(ModelArguments)}
    for name in own:
        assert flags[name].default is None  # "not given": a loaded model keeps its own value
        assert flags[name].metadata["help"].split()[0] in MoProConfig.__doc__
    assert "EMA coefficient of the momentum encoder" in flags["encoder_momentum"].metadata["help"]
    for name in ("backbone", "queue_size", "alpha", "backbone_zero_init_last"):
        assert plan.OFFICIAL_RECIPE[name][0] == getattr(MoProConfig(), name)
