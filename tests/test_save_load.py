"""Save/load round trips: in-package, as remote code in a fresh Python without `modeling_mopro`, and the pipeline."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision import transforms
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    pipeline,
)

from modeling_mopro import (
    MoProForImageClassification,
    MoProForPreTraining,
    MoProModel,
    MoProPhase,
    build_image_processor,
)
from tests._tiny import MoProModelTester

ID2LABEL = {0: "cat", 1: "dog", 2: "bird", 3: "fish"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
tester = MoProModelTester()


@pytest.fixture(scope="module")
def trained_model() -> MoProForPreTraining:
    """A model with every kind of state away from its initial value: a few SGD steps through all phases, so the
    queue, pointer, prototypes, phase, BN statistics and momentum encoder all differ from a fresh model."""
    model = tester.create_pretraining_model(tester.get_config(id2label=ID2LABEL, encoder_momentum=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, phase in enumerate([MoProPhase.WARMUP, MoProPhase.PROTOTYPES, MoProPhase.NOISE_CORRECTION]):
        model.set_phase(phase)
        optimizer.zero_grad()
        model(*tester.prepare_inputs(seed=step)).loss.backward()
        optimizer.step()
        model.update_momentum_encoder()
    assert int(model.queue_ptr) != 0 and model.mopro.prototypes.abs().sum() > 0
    return model.eval()


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return tester.prepare_inputs(seed=10)[0]


def assert_only_safetensors_weights(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    assert [n for n in names if n.endswith(".safetensors")] == ["model.safetensors"], names
    assert not [n for n in names if Path(n).suffix in PICKLE_SUFFIXES], names
    assert {"config.json", "modeling_mopro.py", "configuration_mopro.py"} <= set(names)


def assert_same_state(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    expected, actual = original.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert different == []


@torch.no_grad()
def test_pretraining_round_trip(trained_model, pixel_values, tmp_path):
    trained_model.save_pretrained(tmp_path)
    assert_only_safetensors_weights(tmp_path)
    for loaded in (MoProForPreTraining.from_pretrained(tmp_path), AutoModelForPreTraining.from_pretrained(tmp_path)):
        assert type(loaded) is MoProForPreTraining
        assert_same_state(loaded, trained_model)  # queue, pointer, prototypes, phase, momentum encoder, BN stats
        assert loaded.current_phase == MoProPhase.NOISE_CORRECTION
        loaded.eval()
        out, expected = loaded(pixel_values), trained_model(pixel_values)
        assert torch.equal(out.logits, expected.logits) and torch.equal(out.embeddings, expected.embeddings)
        assert torch.equal(out.prototype_logits, expected.prototype_logits)

    # Training continues identically from the reloaded model: same losses, same new queue and prototypes.
    original, loaded = copy.deepcopy(trained_model).train(), loaded.train()
    inputs = tester.prepare_inputs(seed=11)
    # The same draw for both: the key encoder's BatchNorm groups take a permutation from the global RNG.
    torch.manual_seed(0)
    out = loaded(*inputs)
    torch.manual_seed(0)
    expected = original(*inputs)
    assert torch.equal(out.loss, expected.loss) and torch.equal(out.keep_mask, expected.keep_mask)
    assert_same_state(loaded, original)


@torch.no_grad()
def test_image_classification_round_trip(trained_model, pixel_values, tmp_path):
    release = trained_model.to_release_model().eval()
    assert torch.equal(release(pixel_values).logits, trained_model(pixel_values).logits)
    release.save_pretrained(tmp_path)
    assert_only_safetensors_weights(tmp_path)
    loaded = MoProForImageClassification.from_pretrained(tmp_path).eval()
    assert_same_state(loaded, release)
    assert torch.equal(loaded(pixel_values).logits, release(pixel_values).logits)


@torch.no_grad()
def test_release_folder(trained_model, pixel_values, tmp_path):
    trained_model.save_release_model(tmp_path)
    assert_only_safetensors_weights(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as weights:
        keys = set(weights.keys())
    assert not [k for k in keys if k.startswith("momentum_encoder") or k in {"queue", "queue_ptr", "phase"}]
    assert keys == set(MoProForImageClassification(trained_model.config).state_dict())
    saved, full_state = load_file(tmp_path / "model.safetensors"), trained_model.state_dict()
    assert [k for k in keys if not torch.equal(saved[k], full_state[k])] == []

    expected = trained_model(pixel_values)
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(classifier) is MoProForImageClassification
    assert torch.equal(classifier(pixel_values).logits, expected.logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is MoProModel
    out = base(pixel_values)
    assert torch.equal(out.embeddings, expected.embeddings)
    assert torch.equal(out.pooler_output, trained_model.mopro.backbone(pixel_values))
    assert torch.equal(out.prototype_similarities, expected.embeddings @ trained_model.mopro.prototypes.T)


CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_mopro"] = None  # the package must not be importable: only the folder's code may run
    try:
        import modeling_mopro  # noqa: F401
        raise SystemExit("modeling_mopro is importable")
    except ImportError:
        pass
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

    release, full, inputs, outputs = sys.argv[1:5]
    pixel_values = load_file(inputs)["pixel_values"]
    classifier = AutoModelForImageClassification.from_pretrained(release, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(release, trust_remote_code=True).eval()
    pretraining = AutoModelForPreTraining.from_pretrained(full, trust_remote_code=True).eval()
    for model in (classifier, base, pretraining):
        print(type(model).__name__, type(model).__module__)
    with torch.no_grad():
        save_file(
            {
                "logits": classifier(pixel_values).logits,
                "embeddings": base(pixel_values).embeddings,
                "pretraining_logits": pretraining(pixel_values).logits,
                "queue": pretraining.queue,
            },
            outputs,
        )
    """
)


@torch.no_grad()
def test_remote_code_loads_in_a_fresh_python_without_the_package(trained_model, pixel_values, tmp_path):
    release, full, work = tmp_path / "release", tmp_path / "full", tmp_path / "cwd"
    work.mkdir()
    trained_model.save_release_model(release)
    trained_model.save_pretrained(full)
    save_file({"pixel_values": pixel_values}, tmp_path / "inputs.safetensors")
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # never ~/.cache
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
    }
    # -I: no PYTHONPATH, no user site, no cwd on sys.path; the editable install is blocked inside the child.
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            CHILD,
            str(release),
            str(full),
            str(tmp_path / "inputs.safetensors"),
            str(tmp_path / "out.safetensors"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    loaded_from = dict(line.split() for line in result.stdout.splitlines() if line.startswith("MoPro"))
    assert set(loaded_from) == {"MoProForImageClassification", "MoProModel", "MoProForPreTraining"}
    assert all(module.startswith("transformers_modules.") for module in loaded_from.values()), loaded_from
    assert any((tmp_path / "modules").rglob("modeling_mopro.py"))

    outputs = load_file(tmp_path / "out.safetensors")
    expected = trained_model(pixel_values)
    assert torch.equal(outputs["logits"], expected.logits)
    assert torch.equal(outputs["embeddings"], expected.embeddings)
    assert torch.equal(outputs["pretraining_logits"], expected.logits)
    assert torch.equal(outputs["queue"], trained_model.queue)


@torch.no_grad()
def test_pipeline_returns_label_names(trained_model, tmp_path):
    release = trained_model.to_release_model().eval()
    release.classifier.weight.mul_(20)  # well-separated scores, so the ranking is not decided by rounding
    release.save_pretrained(tmp_path)
    build_image_processor(release.config.image_size).save_pretrained(tmp_path)  # as run_mopro and release do
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))

    classify = pipeline("image-classification", model=str(tmp_path), top_k=len(ID2LABEL))
    predictions = classify(image)
    assert sorted(p["label"] for p in predictions) == sorted(ID2LABEL.values())

    processor = AutoImageProcessor.from_pretrained(tmp_path)
    inputs = processor(image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    probabilities = release(inputs["pixel_values"]).logits.softmax(dim=-1)[0]
    assert predictions[0]["label"] == ID2LABEL[int(probabilities.argmax())]
    assert abs(predictions[0]["score"] - float(probabilities.max())) < 1e-5
    label2id = {name: i for i, name in ID2LABEL.items()}
    for prediction in predictions:
        assert abs(prediction["score"] - float(probabilities[label2id[prediction["label"]]])) < 1e-5


def test_saved_processor_is_the_official_test_transform():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    official = transforms.Compose(  # salesforce/MoPro DataLoader/dataloader.py, transform_test
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    pixel_values = build_image_processor(224)(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixel_values, official(image), rtol=0, atol=1e-4)
