"""MoPro behaves like any transformers vision model: the conventions transformers' own `ModelTesterMixin` checks
(initialisation of missing weights, problem types, `return_dict`, hidden states, config fields), the `AutoBackbone`
style backbone, the image processor on any PIL mode, `evaluate`'s evaluator, and the README's fine-tuning recipe.

Written from transformers' conventions, in its ModelTester style (`tests/_tiny.MoProModelTester`), not copied.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

from modeling_mopro import (
    MoProBackbone,
    MoProConfig,
    MoProForImageClassification,
    MoProForPreTraining,
    MoProModel,
    build_image_processor,
    image_processor_for,
)
from tests._tiny import MoProModelTester
from tests.fixtures_eval import class_image

REPO = Path(__file__).resolve().parent.parent
tester = MoProModelTester()


def save_folder(model, path: Path, **processor_kwargs) -> Path:
    """A MoPro folder as run_mopro / release write it: model plus image processor."""
    model.save_pretrained(path)
    build_image_processor(model.config.image_size, **processor_kwargs).save_pretrained(path)
    return path


def drop_weights(folder: Path, fragment: str) -> None:
    """Rewrite the folder's checkpoint without the tensors whose name contains `fragment`."""
    weights = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in weights.items() if fragment not in k}
    assert len(kept) < len(weights)
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


def nonfinite(model: torch.nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]


def bn_layers(backbone: torch.nn.Module) -> dict[str, torch.nn.BatchNorm2d]:
    return {n: m for n, m in backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}


def tiny_vit_config(**overrides) -> MoProConfig:
    """A ViT backbone: Linear layers inside the backbone (timm's own init, not a head's), no `zero_init_last`."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    return tester.get_config(backbone="vit_tiny_patch16_224", backbone_kwargs=kwargs, **overrides)


# ------------------------------------------------------------------------------------ initialisation
def test_new_classifier_is_initialised_like_a_fresh_model(tmp_path):
    folder = save_folder(MoProForImageClassification(tester.get_config()), tmp_path)
    torch.manual_seed(0)
    fresh = MoProForImageClassification(tester.get_config(num_labels=42)).classifier
    biases = []
    for _ in range(20):
        model = AutoModelForImageClassification.from_pretrained(folder, num_labels=42, ignore_mismatched_sizes=True)
        classifier = model.classifier
        assert classifier.weight.shape == (42, model.mopro.num_features)
        assert torch.isfinite(classifier.weight).all() and torch.isfinite(classifier.bias).all()
        assert abs(float(classifier.weight.std()) / float(fresh.weight.std()) - 1) < 0.1
        assert float(classifier.bias.abs().max()) <= 1 / model.mopro.num_features**0.5  # PyTorch's bias bound
        biases.append(classifier.bias.detach())
        assert torch.equal(model.mopro.prototypes, torch.zeros(42, model.config.embedding_size))  # official start
    # 42 biases per load are too few for a stable std; pooled over the loads (840 values) it is.
    expected_bias_std = 1 / (3 * model.mopro.num_features) ** 0.5  # U(-b, b), b = 1/sqrt(fan_in)
    assert abs(float(torch.cat(biases).std()) / expected_bias_std - 1) < 0.1


@pytest.mark.parametrize("model_class", [MoProModel, MoProForImageClassification, MoProForPreTraining])
def test_checkpoint_without_backbone_gets_timm_initialisation(model_class, tmp_path):
    """Each missing tensor gets the value a freshly built timm backbone has: kaiming convolutions, BN gamma 1
    (official `backbone_zero_init_last=False`), reset running statistics; the momentum encoder copies the query."""
    config = tester.get_config()
    saved = MoProForPreTraining(config)
    with torch.no_grad():  # trained-looking BN statistics, which a reset must not keep
        for bn in bn_layers(saved.mopro.backbone).values():
            bn.running_var.fill_(7.0)
            bn.num_batches_tracked.fill_(100)
    saved.save_pretrained(tmp_path)
    drop_weights(tmp_path, "backbone.")
    model = model_class.from_pretrained(tmp_path)
    assert nonfinite(model) == []
    backbone = model.backbone if isinstance(model, MoProModel) else model.mopro.backbone
    fresh = MoProModel(config).backbone
    for name, tensor in backbone.state_dict().items():
        reference = fresh.state_dict()[name]
        if name.endswith("num_batches_tracked") or tensor.numel() == 1 or reference.std() == 0:
            assert torch.equal(tensor, reference), name  # constants: BN gamma 1, beta 0, statistics reset
        else:
            assert abs(float(tensor.std()) / float(reference.std()) - 1) < 0.35, name  # kaiming, not N(0, 0.02)
    if isinstance(model, MoProForPreTraining):
        assert all(torch.equal(q, k) for q, k in zip(model._query_state(), model._momentum_state(), strict=True))


def test_missing_vit_backbone_linears_get_timm_init_not_head_init(tmp_path):
    """Linear layers inside a timm backbone are timm's (ViT: truncated normal, std 0.02), not a head's."""
    config = tiny_vit_config()
    save_folder(MoProForImageClassification(config), tmp_path)
    drop_weights(tmp_path, "backbone.")
    model = MoProForImageClassification.from_pretrained(tmp_path)
    assert nonfinite(model) == []
    qkv = model.mopro.backbone.blocks[0].attn.qkv.weight
    assert abs(float(qkv.std()) - 0.02) < 0.004  # PyTorch's default Linear init would give ~0.14 here


@pytest.mark.parametrize("model_class", [MoProModel, MoProForImageClassification, MoProForPreTraining, MoProBackbone])
def test_model_built_on_meta_device_initialises_every_tensor(model_class):
    config = tester.get_config()
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert nonfinite(model) == []
    torch.manual_seed(0)
    fresh = model_class(config)
    for name, tensor in model.state_dict().items():
        reference = fresh.state_dict()[name]
        if not tensor.is_floating_point() or reference.numel() == 1 or reference.std() == 0:
            assert torch.equal(tensor, reference), name
        elif reference.numel() >= 64:  # fewer values give no stable std
            assert abs(float(tensor.std()) / float(reference.std()) - 1) < 0.35, name


# ------------------------------------------------------------------------------------ official BatchNorm init
def test_default_resnet_has_every_bn_gamma_one_and_zero_init_last_zeroes_the_last_bn_of_each_block():
    default = MoProForPreTraining(tester.get_config(backbone_zero_init_last=False))
    for backbone in (default.mopro.backbone, default.momentum_encoder.backbone):
        assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in bn_layers(backbone).values())
    zeroed = MoProModel(tester.get_config(backbone_zero_init_last=True))
    blocks = [m for m in zeroed.backbone.modules() if hasattr(m, "zero_init_last")]  # timm's residual blocks
    assert len(blocks) == 4
    for block in blocks:
        assert torch.equal(block.bn2.weight, torch.zeros_like(block.bn2.weight))  # BasicBlock's last BN
        assert torch.equal(block.bn1.weight, torch.ones_like(block.bn1.weight))


def test_zero_init_last_is_honoured_when_a_missing_backbone_is_reinitialised(tmp_path):
    config = tester.get_config(backbone_zero_init_last=True)
    save_folder(MoProForImageClassification(config), tmp_path)
    drop_weights(tmp_path, "backbone.")
    model = MoProForImageClassification.from_pretrained(tmp_path)
    assert float(model.mopro.backbone.layer1[0].bn2.weight.abs().max()) == 0.0
    assert float(model.mopro.backbone.layer1[0].bn1.weight.min()) == 1.0


def test_legacy_zero_init_last_in_backbone_kwargs_moves_to_the_field():
    kwargs = {"layers": [1, 1, 1, 1], "channels": [4, 8, 16, 32]}
    for value in (True, False):
        config = MoProConfig(backbone="resnet18", backbone_kwargs={**kwargs, "zero_init_last": value})
        assert config.backbone_zero_init_last is value and "zero_init_last" not in config.backbone_kwargs
    with pytest.raises(ValueError, match="backbone_zero_init_last"):
        MoProConfig(
            backbone="resnet18", backbone_kwargs={**kwargs, "zero_init_last": False}, backbone_zero_init_last=True
        )


def test_backbone_without_zero_init_last_builds():
    model = MoProModel(tiny_vit_config(backbone_zero_init_last=True))  # ViT's constructor has no such argument
    assert model(torch.randn(2, 3, 32, 32)).pooler_output.shape == (2, 16)


# ------------------------------------------------------------------------------------ losses and outputs
def test_problem_type_chooses_the_loss():
    config, pixel_values, _, labels = tester.prepare_config_and_inputs()
    n, k = pixel_values.shape[0], config.num_labels
    model = MoProForImageClassification(config).eval()
    logits = model(pixel_values).logits

    single = model(pixel_values, labels=labels)
    torch.testing.assert_close(single.loss, F.cross_entropy(logits, labels))
    assert model.config.problem_type == "single_label_classification"  # inferred from integer labels

    multi_labels = (torch.rand(n, k, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    model.config.problem_type = "multi_label_classification"
    multi = model(pixel_values, labels=multi_labels)
    torch.testing.assert_close(multi.loss, F.binary_cross_entropy_with_logits(logits, multi_labels))

    targets = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    model.config.problem_type = "regression"
    regression = model(pixel_values, labels=targets)
    torch.testing.assert_close(regression.loss, F.mse_loss(logits, targets))


def test_out_of_range_class_labels_raise():
    config, pixel_values, _, labels = tester.prepare_config_and_inputs()
    with pytest.raises(ValueError, match="labels must be in"):
        MoProForImageClassification(config)(pixel_values, labels=labels + config.num_labels)


@pytest.mark.parametrize("model_class", [MoProModel, MoProForImageClassification, MoProBackbone])
def test_return_dict_false_gives_the_same_values_as_a_tuple(model_class):
    config, pixel_values, _, labels = tester.prepare_config_and_inputs()
    model = model_class(config).eval()
    kwargs = {"labels": labels} if model_class is MoProForImageClassification else {}
    with torch.no_grad():
        as_dict = model(pixel_values, output_hidden_states=True, **kwargs)
        as_tuple = model(pixel_values, output_hidden_states=True, return_dict=False, **kwargs)
        model.config.return_dict = False  # the config default is honoured too
        from_config = model(pixel_values, output_hidden_states=True, **kwargs)
    expected = as_dict.to_tuple()
    for output in (as_tuple, from_config):
        assert isinstance(output, tuple) and len(output) == len(expected)
        for got, want in zip(output, expected, strict=True):
            if isinstance(want, tuple):
                assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
            else:
                assert torch.equal(got, want)


@pytest.mark.parametrize("model_class", [MoProModel, MoProForImageClassification])
def test_hidden_states_are_one_map_per_backbone_stage(model_class):
    config, pixel_values, _, _ = tester.prepare_config_and_inputs()
    model = model_class(config).eval()
    info = (model.mopro if model_class is MoProForImageClassification else model).backbone.feature_info
    n, size = pixel_values.shape[0], pixel_values.shape[-1]
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        assert model(pixel_values).hidden_states is None  # only when asked (config.output_hidden_states=False)
    assert len(out.hidden_states) == len(info) == 5  # ResNet: stem + 4 stages
    for state, stage in zip(out.hidden_states, info, strict=True):
        side = size // stage["reduction"]
        assert state.shape == (n, stage["num_chs"], side, side), stage
    if model_class is MoProModel:
        assert out.last_hidden_state.shape == out.hidden_states[-1].shape
        torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------ config and processor
def test_config_has_no_normalisation_fields_and_old_folders_keep_their_processor(tmp_path):
    assert not [k for k in MoProConfig().to_dict() if k.endswith(("_std", "_mean", "_range"))]
    mean, std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
    save_folder(MoProForImageClassification(tester.get_config()), tmp_path, image_mean=mean, image_std=std)
    path = tmp_path / "config.json"
    values = json.loads(path.read_text())
    path.write_text(json.dumps({**values, "image_mean": mean, "image_std": std}))  # as folders were saved before
    model = MoProForImageClassification.from_pretrained(tmp_path)
    assert "image_mean" not in model.config.to_dict() and "image_std" not in model.config.to_dict()
    processor = image_processor_for(model.config)
    assert list(processor.image_mean) == mean and list(processor.image_std) == std
    assert list(image_processor_for(tester.get_config()).image_mean) == [0.485, 0.456, 0.406]  # in memory


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_pipeline_classifies_greyscale_palette_and_rgba_images(mode, tmp_path):
    model = MoProForImageClassification(tester.get_config()).eval()
    save_folder(model, tmp_path)
    rgb = class_image(1, np.random.default_rng(0))
    image = rgb.convert(mode)
    predictions = pipeline("image-classification", model=str(tmp_path))(image)
    assert len(predictions) == tester.num_labels and abs(sum(p["score"] for p in predictions) - 1) < 1e-5
    # Converted to RGB, as the evaluation loaders do: the same scores as the RGB version of the image.
    expected = pipeline("image-classification", model=str(tmp_path))(image.convert("RGB"))
    assert predictions == expected
    # The processor alone too (the README's AutoModel snippet): no broadcast of a 3-value mean over 1 or 4 channels.
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values, processor(image.convert("RGB"), return_tensors="pt")["pixel_values"])
    assert pixel_values.shape == (1, 3, tester.image_size, tester.image_size)


# ------------------------------------------------------------------------------------ AutoBackbone
@pytest.mark.parametrize("saved_class", [MoProModel, MoProForImageClassification, MoProForPreTraining])
def test_backbone_loads_from_any_mopro_folder(saved_class, tmp_path):
    config, pixel_values, _, _ = tester.prepare_config_and_inputs()
    saved = saved_class(config).eval()
    save_folder(saved, tmp_path)
    backbone = MoProBackbone.from_pretrained(tmp_path, out_indices=[1, 2, 3, 4]).eval()
    reference = saved if isinstance(saved, MoProModel) else saved.mopro
    assert all(torch.equal(v, reference.backbone.state_dict()[k]) for k, v in backbone.backbone.state_dict().items())
    with torch.no_grad():
        out = backbone(pixel_values)
        stages = reference(pixel_values, output_hidden_states=True).hidden_states
    assert backbone.out_features == ["layer1", "layer2", "layer3", "layer4"]
    assert backbone.channels == [4, 8, 16, 32] == [m.shape[1] for m in out.feature_maps]
    assert all(torch.equal(m, s) for m, s in zip(out.feature_maps, stages[1:], strict=True))
    assert out.hidden_states is None


def test_backbone_out_features_out_indices_and_auto_class(tmp_path):
    config = tester.get_config()
    save_folder(MoProForImageClassification(config), tmp_path)
    by_name = AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path), out_features=["layer2", "layer4"])
    assert type(by_name) is MoProBackbone and by_name.out_indices == [2, 4] and by_name.channels == [8, 32]
    assert MoProBackbone(config).out_features == ["layer4"]  # the last stage by default, as in transformers
    assert MoProBackbone(config, out_indices=[-2, -1]).out_indices == [3, 4]
    # A saved backbone remembers its stages.
    by_name.save_pretrained(tmp_path / "backbone")
    assert MoProBackbone.from_pretrained(tmp_path / "backbone").out_features == ["layer2", "layer4"]
    for bad in ({"out_indices": [5]}, {"out_indices": [3, 1]}, {"out_features": ["layer9"]}):
        with pytest.raises(ValueError, match="out_"):
            MoProBackbone(config, **bad)


# ------------------------------------------------------------------------------------ evaluate and fine-tuning
def write_image_folder(root: Path, names: list[str], per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            class_image(label, rng).save(root / name / f"{i}.png")
    return root


def test_evaluator_top1_equals_evaluation_classification(tmp_path):
    import evaluate
    from datasets import load_dataset

    from evaluation.classification import main as classification_main

    names = ["ant", "bee", "cat", "dog"]
    torch.manual_seed(0)
    model = MoProForImageClassification(
        tester.get_config(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    ).eval()
    folder = save_folder(model, tmp_path / "model")
    data = write_image_folder(tmp_path / "val", names, per_class=6, seed=1)

    top1 = classification_main(
        ["--model_name_or_path", str(folder), "--data_dir", str(data), "--dataset", "val", "--device", "cpu",
         "--num_workers", "0", "--batch_size", "8", "--output_dir", str(tmp_path / "results")]
    )["top1"]  # fmt: skip

    # The README's recipe: the evaluator builds the pipeline from the folder; the metric loads by path, offline.
    result = evaluate.evaluator("image-classification").compute(
        model_or_pipeline=str(folder),
        data=load_dataset("imagefolder", data_dir=str(data), split="train"),
        metric=evaluate.load(str(REPO / "evaluation" / "metrics" / "accuracy")),
        label_mapping=AutoConfig.from_pretrained(folder).label2id,
    )
    assert 0 < top1 < 100  # not a degenerate model, so agreement means something
    assert result["accuracy"] * 100 == pytest.approx(top1, abs=1e-4)


def readme_finetune_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Fine-tune on your own labels") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_finetune_recipe_runs_end_to_end(tmp_path, monkeypatch):
    """Runs the README block as written, with only its folder names pointed at tiny ones."""
    block = readme_finetune_block()
    paths_line = next(line for line in block.splitlines() if line.startswith("model_dir, data_dir, output_dir ="))
    names = ["circle", "square", "triangle"]
    folder = save_folder(MoProForImageClassification(tester.get_config()), tmp_path / "mopro")
    write_image_folder(tmp_path / "my_images", names, per_class=4, seed=2)
    before = MoProForImageClassification.from_pretrained(folder).mopro.backbone.conv1.weight.clone()
    monkeypatch.chdir(tmp_path)
    block = block.replace(paths_line, 'model_dir, data_dir, output_dir = "mopro", "my_images", "my-classifier"')
    namespace: dict = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102  (the documented recipe itself)

    losses = [log["loss"] for log in namespace["trainer"].state.log_history if "loss" in log]
    assert np.isfinite(losses).all() or namespace["trainer"].state.global_step > 0
    tuned = AutoModelForImageClassification.from_pretrained(tmp_path / "my-classifier")
    assert type(tuned) is MoProForImageClassification and tuned.config.id2label == dict(enumerate(names))
    assert nonfinite(tuned) == []
    assert not torch.equal(tuned.mopro.backbone.conv1.weight, before)  # the backbone was fine-tuned too
    predictions = pipeline("image-classification", model=str(tmp_path / "my-classifier"))(
        class_image(0, np.random.default_rng(3))
    )
    assert {p["label"] for p in predictions} == set(names)
