"""Conversion of an official MoPro checkpoint, built here in the official key layout from a torchvision ResNet-50."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.models import resnet50
from transformers import AutoModelForImageClassification

from modeling_mopro import MoProForImageClassification, MoProForPreTraining, MoProPhase
from modeling_mopro.convert_original_checkpoint import convert_original_checkpoint, infer_config, main
from tests._tiny import query_momentum_pairs

NUM_CLASSES, HIDDEN, EMBEDDING, QUEUE = 10, 64, 16, 32


def _randomise_batch_norm(model: torch.nn.Module) -> None:
    """Random affine and running statistics, so that eval-mode BatchNorm is exercised, not the identity."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(1234)


def _encoder_state(backbone: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One official `encoder_q`/`encoder_k`: torchvision ResNet-50 names without `fc`, plus classifier/fc1/fc2."""
    state = {k: v.clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    for name, shape in {
        "classifier.weight": (NUM_CLASSES, 2048),
        "classifier.bias": (NUM_CLASSES,),
        "fc1.weight": (HIDDEN, 2048),
        "fc1.bias": (HIDDEN,),
        "fc2.weight": (EMBEDDING, HIDDEN),
        "fc2.bias": (EMBEDDING,),
    }.items():
        state[name] = torch.randn(shape, generator=generator) * 0.05
    return state


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official checkpoint dict (`module.` prefix, epoch/arch/state_dict/optimizer) and the torchvision model."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    query = resnet50(weights=None)
    _randomise_batch_norm(query)
    key = resnet50(weights=None)  # a different momentum encoder, so that a q -> k copy would be caught
    _randomise_batch_norm(key)
    state = {f"module.encoder_q.{k}": v for k, v in _encoder_state(query, generator).items()}
    state |= {f"module.encoder_k.{k}": v for k, v in _encoder_state(key, generator).items()}
    state["module.queue"] = F.normalize(torch.randn(EMBEDDING, QUEUE, generator=generator), dim=0)
    state["module.queue_ptr"] = torch.tensor([8])
    state["module.prototypes"] = F.normalize(torch.randn(NUM_CLASSES, EMBEDDING, generator=generator), dim=1)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}]}
    path = tmp_path_factory.mktemp("official") / "MoPro_V1_epoch90.tar"
    torch.save({"epoch": 90, "arch": "resnet50", "state_dict": state, "optimizer": optimizer}, path)

    # The reference network: torchvision ResNet-50 whose `fc` is the MoPro classifier (as `finetune_imagenet.py`).
    query.fc = torch.nn.Linear(2048, NUM_CLASSES)
    query.fc.load_state_dict(
        {"weight": state["module.encoder_q.classifier.weight"], "bias": state["module.encoder_q.classifier.bias"]}
    )
    return {"path": path, "state": state, "torchvision": query.eval()}


@pytest.fixture(scope="module")
def release(official, tmp_path_factory):
    """The default conversion, through the CLI, with class names from a json file."""
    folder = tmp_path_factory.mktemp("release")
    names = [f"class_{i}" for i in range(NUM_CLASSES)]
    id2label_file = folder.parent / "classes.json"
    id2label_file.write_text(json.dumps(names))
    output_dir = folder / "mopro-r50"
    main(
        [
            "--checkpoint_path",
            str(official["path"]),
            "--output_dir",
            str(output_dir),
            "--id2label_file",
            str(id2label_file),
            "--num_labels",
            str(NUM_CLASSES),
        ]
    )
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    return {"dir": output_dir, "model": model, "names": names}


@pytest.fixture(scope="module")
def pixel_values():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_release_logits_match_torchvision(official, release, pixel_values):
    model = release["model"]
    assert isinstance(model, MoProForImageClassification)
    assert model.config.backbone == "resnet50" and model.config.backbone_kwargs == {}
    with torch.no_grad():
        expected = official["torchvision"](pixel_values)
        logits = model(pixel_values).logits
    assert logits.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_release_embeddings_are_the_official_projection(official, release, pixel_values):
    state, model = official["state"], release["model"]
    backbone = official["torchvision"]
    with torch.no_grad():
        pooled = torch.nn.Sequential(*list(backbone.children())[:-1])(pixel_values).flatten(1)  # all but `fc`
        hidden = F.relu(F.linear(pooled, state["module.encoder_q.fc1.weight"], state["module.encoder_q.fc1.bias"]))
        expected = F.normalize(
            F.linear(hidden, state["module.encoder_q.fc2.weight"], state["module.encoder_q.fc2.bias"])
        )
        embeddings = model(pixel_values).embeddings
    assert embeddings.shape == (2, EMBEDDING)
    torch.testing.assert_close(embeddings, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.mopro.prototypes, state["module.prototypes"])


def test_release_folder_reloads_with_identical_logits(official, release, pixel_values):
    folder = release["dir"]
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_mopro.py"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_mopro.MoProForImageClassification"
    assert config["id2label"]["3"] == "class_3"
    reloaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert reloaded.config.id2label[3] == "class_3" and reloaded.config.label2id["class_3"] == 3
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values).logits, release["model"](pixel_values).logits, atol=0, rtol=0
        )
    # The release folder holds the query side only.
    assert not any(k.startswith(("momentum_encoder", "queue")) for k in reloaded.state_dict())


def test_full_training_state_carries_every_tensor(official):
    state = official["state"]
    model = convert_original_checkpoint(official["path"], full_training_state=True)
    assert isinstance(model, MoProForPreTraining)
    assert model.current_phase == MoProPhase.NOISE_CORRECTION
    assert model.config.queue_size == QUEUE and model.config.projection_hidden_size == HIDDEN
    ours = model.state_dict()
    pairs = {
        "queue": "module.queue",
        "queue_ptr": "module.queue_ptr",
        "mopro.prototypes": "module.prototypes",
        "classifier.weight": "module.encoder_q.classifier.weight",
        "momentum_encoder.backbone.layer4.2.bn3.running_var": "module.encoder_k.layer4.2.bn3.running_var",
        "mopro.backbone.layer3.5.conv2.weight": "module.encoder_q.layer3.5.conv2.weight",
    }
    for ours_key, official_key in pairs.items():
        assert torch.equal(ours[ours_key], state[official_key]), ours_key
    # Every momentum-encoder buffer, not only the sampled ones, equals its `encoder_k` original; the parameters got
    # the pending update (test_full_training_state_applies_the_pending_momentum_update).
    momentum = {k: v for k, v in ours.items() if k.startswith("momentum_encoder.")}
    assert len(momentum) == sum(k.startswith("module.encoder_k.") for k in state)
    parameters = dict(model.named_parameters())
    for key, value in momentum.items():
        if key not in parameters:
            assert torch.equal(value, state[_official_momentum_key(key)]), key
    assert model.queue_ptr.dtype == torch.long and int(model.queue_ptr) == 8


def _official_momentum_key(key: str) -> str:
    """`momentum_encoder.backbone.layer1.0.bn1.weight` -> `module.encoder_k.layer1.0.bn1.weight` (and the heads)."""
    official_key = "module.encoder_k." + key.removeprefix("momentum_encoder.").removeprefix("backbone.")
    return official_key.replace("projection.", "")


@pytest.mark.parametrize("encoder_momentum", [None, 0.5])  # None: the official default moco_m = 0.999
def test_full_training_state_applies_the_pending_momentum_update(official, encoder_momentum):
    """The official forward runs `encoder_k <- m encoder_k + (1 - m) encoder_q` before anything else, so the
    checkpoint's encoder_k is one update behind; ours updates after the optimizer step, so the conversion applies
    it: the converted momentum parameters are what the official run's next forward would use."""
    state = official["state"]
    kwargs = {} if encoder_momentum is None else {"encoder_momentum": encoder_momentum}
    model = convert_original_checkpoint(official["path"], full_training_state=True, **kwargs)
    m = 0.999 if encoder_momentum is None else encoder_momentum
    assert model.config.encoder_momentum == m
    count = 0
    for name, _, momentum_param in query_momentum_pairs(model):
        k = state[_official_momentum_key(name)]
        q = state[_official_momentum_key(name).replace("encoder_k", "encoder_q")]
        expected = torch.add(m * k, q, alpha=1 - m)  # as torch evaluates the update (see test_modeling_mopro.ema)
        assert torch.equal(momentum_param.detach(), expected), name
        assert not torch.equal(momentum_param.detach(), k), f"{name}: the pending update was not applied"
        count += 1
    assert count == len(list(model.momentum_encoder.parameters())) > 0
    # Only parameters, as the official update: BatchNorm running statistics stay the checkpoint's.
    bn = "momentum_encoder.backbone.layer1.0.bn1.running_mean"
    assert torch.equal(model.state_dict()[bn], state["module.encoder_k.layer1.0.bn1.running_mean"])


def _save_bare(state: dict, path) -> str:
    torch.save(state, path)  # a bare state dict: no wrapper, no optimizer
    return str(path)


def test_unknown_key_raises_naming_it(official, tmp_path):
    state = {k: v for k, v in official["state"].items() if not k.startswith("module.encoder_k.")}
    state["module.encoder_q.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unknown keys.*module\.encoder_q\.extra_head\.weight"):
        convert_original_checkpoint(_save_bare(state, tmp_path / "bare.pth"))


def test_missing_key_raises_naming_it(official, tmp_path):
    state = {k: v for k, v in official["state"].items() if not k.startswith("module.encoder_k.")}
    del state["module.encoder_q.layer2.1.bn2.running_mean"]
    with pytest.raises(ValueError, match=r"missing keys.*module\.encoder_q\.layer2\.1\.bn2\.running_mean"):
        convert_original_checkpoint(_save_bare(state, tmp_path / "bare.pth"))
    # A state dict without encoder_k and queue cannot give a full training state; the missing encoder is summarised.
    state["module.encoder_q.layer2.1.bn2.running_mean"] = torch.zeros(128)
    del state["module.queue"]
    with pytest.raises(
        ValueError, match=r"missing keys: \[module\.encoder_k\.\* \(all \d+ tensors\), module\.queue\]"
    ):
        convert_original_checkpoint(_save_bare(state, tmp_path / "bare.pth"), full_training_state=True)


def test_wrong_num_labels_or_id2label_raise(official):
    with pytest.raises(ValueError, match="num_labels"):
        convert_original_checkpoint(official["path"], num_labels=NUM_CLASSES + 1)
    with pytest.raises(ValueError, match="id2label"):
        convert_original_checkpoint(official["path"], id2label=["only", "three", "names"])


@pytest.mark.parametrize(
    "backbone, backbone_kwargs",
    [
        ("resnet50", {"channels": [128, 256, 512, 1024]}),  # the official `resnet50x2` (width 2)
        ("resnet101", {}),
        ("resnet18", {"layers": [1, 1, 1, 1], "channels": [4, 8, 16, 32]}),
    ],
)
def test_backbone_is_inferred_from_the_tensors(backbone, backbone_kwargs):
    with torch.device("meta"):  # shapes only
        network = timm.create_model(backbone, num_classes=0, **backbone_kwargs)
    features = network.num_features
    state = {f"encoder_q.{k}": v for k, v in network.state_dict().items()}
    state["encoder_q.classifier.weight"] = torch.empty(3, features, device="meta")
    state["encoder_q.fc1.weight"] = torch.empty(5, features, device="meta")
    state["encoder_q.fc2.weight"] = torch.empty(2, 5, device="meta")
    config = infer_config(state)
    assert (config.backbone, config.backbone_kwargs) == (backbone, backbone_kwargs)
    assert (config.num_labels, config.projection_hidden_size, config.embedding_size) == (3, 5, 2)


# ------------------------------------------------------------------------------------------------- bad inputs
class _RunsCode:
    """A pickle that would create `marker` when unpickled: what `weights_only=True` exists to refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_that_is_missing_or_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope\.tar does not exist"):
        convert_original_checkpoint(tmp_path / "nope.tar")
    text = tmp_path / "notes.tar"
    text.write_text("these are not weights")
    with pytest.raises(ValueError, match=r"notes\.tar is not a torch checkpoint"):
        convert_original_checkpoint(text)
    text.write_text("x")  # a byte torch's unpickler reads as an opcode: still "not a checkpoint", not "unsafe"
    with pytest.raises(ValueError, match=r"notes\.tar is not a torch checkpoint \(torch.load: Unsupported operand"):
        convert_original_checkpoint(text)


def test_pickle_with_code_stays_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.tar"
    torch.save({"epoch": 90, "state_dict": {"module.queue": torch.zeros(2)}, "extra": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=r"evil\.tar holds pickled objects .* can run code \(it refers to \w+"):
        convert_original_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_without_state_dict(official, tmp_path):
    path = tmp_path / "other.tar"
    torch.save({"epoch": 90, "model": dict(official["state"])}, path)
    with pytest.raises(ValueError, match=r"has no 'state_dict' entry .*\['epoch', 'model'\]"):
        convert_original_checkpoint(path)


def test_wrong_shape_raises_naming_it(official, tmp_path):
    state = {k: v for k, v in official["state"].items() if not k.startswith("module.encoder_k.")}
    state["module.encoder_q.layer1.0.bn1.weight"] = torch.ones(3)
    with pytest.raises(
        ValueError, match=r"shape mismatches: \[module\.encoder_q\.layer1\.0\.bn1\.weight: \(3,\) in the checkpoint"
    ):
        convert_original_checkpoint(_save_bare(state, tmp_path / "bare.pth"))


def test_output_dir_holding_a_model_is_refused_unless_overwrite(official, release, tmp_path):
    weights = release["dir"] / "model.safetensors"
    before = weights.read_bytes()
    # Refused before the checkpoint is even read (this one does not exist).
    with pytest.raises(FileExistsError, match=r"already holds a model .*--overwrite"):
        convert_original_checkpoint(tmp_path / "nope.tar", output_dir=release["dir"])
    assert weights.read_bytes() == before
    output_dir = tmp_path / "again"
    convert_original_checkpoint(official["path"], output_dir=output_dir)
    convert_original_checkpoint(official["path"], output_dir=output_dir, overwrite=True, image_size=96)
    assert json.loads((output_dir / "config.json").read_text())["image_size"] == 96


def test_non_finite_weights_are_refused_naming_the_tensor(official, tmp_path):
    state = {k: v.clone() for k, v in official["state"].items() if not k.startswith("module.encoder_k.")}
    state["module.encoder_q.classifier.bias"][0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .* \['module\.encoder_q\.classifier\.bias'\]"):
        convert_original_checkpoint(_save_bare(state, tmp_path / "bare.pth"))
