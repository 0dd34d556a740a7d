"""MoProConfig: official defaults, validation of every hyper-parameter, and the save/load round trip."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from modeling_mopro import MoProConfig

INVALID = [
    ("alpha", -0.1),
    ("alpha", 1.5),
    ("alpha", float("nan")),
    ("pseudo_label_threshold", 0.0),
    ("pseudo_label_threshold", 1.2),
    ("projection_hidden_size", 0),
    ("projection_hidden_size", -3),
    ("embedding_size", 0),
    ("embedding_size", -3),
    ("queue_size", 0),
    ("queue_size", -3),
    ("image_size", 0),
    ("image_size", -3),
    ("encoder_momentum", 1.0),
    ("encoder_momentum", -0.1),
    ("prototype_momentum", 1.0),
    ("prototype_momentum", -0.1),
    ("temperature", 0.0),
    ("temperature", -0.5),
    ("instance_loss_weight", -1.0),
    ("prototype_loss_weight", -1.0),
    ("backbone", "not_a_model"),
    ("ood_rule", "not_a_rule"),
    ("ood_similarity_threshold", 1.5),
]

VALID_EDGES = [
    ("alpha", 0.0),
    ("alpha", 1.0),
    ("pseudo_label_threshold", 1.0),
    ("encoder_momentum", 0.0),
    ("prototype_momentum", 0.0),
    ("instance_loss_weight", 0.0),
    ("prototype_loss_weight", 0.0),
    ("ood_rule", "prototype_distance"),
    ("queue_size", 1),
]


def test_defaults_are_the_official_ones():
    # salesforce/MoPro train.py: low_dim 128, moco_queue 8192, moco_m = proto_m = 0.999, temperature 0.1,
    # alpha 0.5, pseudo_th 0.8, w_inst = w_proto = 1, and a 2048-wide fc1 on ResNet-50.
    config = MoProConfig()
    assert (config.backbone, config.projection_hidden_size, config.embedding_size) == ("resnet50", 2048, 128)
    assert (config.queue_size, config.encoder_momentum, config.prototype_momentum) == (8192, 0.999, 0.999)
    assert (config.temperature, config.alpha, config.pseudo_label_threshold) == (0.1, 0.5, 0.8)
    assert (config.instance_loss_weight, config.prototype_loss_weight, config.ood_rule) == (1.0, 1.0, "official")


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_value_raises_naming_the_field(field, value):
    # \b...\b: "backbone" must not be satisfied by a message about "backbone_kwargs".
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        MoProConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), VALID_EDGES)
def test_valid_edge_value_is_accepted(field, value):
    assert getattr(MoProConfig(**{field: value}), field) == value


def test_invalid_value_in_a_saved_config_raises_on_load(tmp_path):
    MoProConfig().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    values = json.loads(path.read_text())
    values["alpha"] = 2.0
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"\balpha\b"):
        MoProConfig.from_pretrained(tmp_path)


def test_round_trip_keeps_every_field(tmp_path):
    fields = dict(
        backbone="resnet18",
        backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [4, 8, 16, 32]},
        projection_hidden_size=7,
        embedding_size=5,
        queue_size=11,
        encoder_momentum=0.9,
        prototype_momentum=0.8,
        temperature=0.2,
        alpha=0.3,
        pseudo_label_threshold=0.7,
        instance_loss_weight=0.5,
        prototype_loss_weight=2.0,
        ood_rule="prototype_distance",
        ood_similarity_threshold=-0.2,
        image_size=48,
        backbone_zero_init_last=True,
        id2label={0: "cat", 1: "dog", 2: "bird"},
    )
    config = MoProConfig(**fields)
    config.save_pretrained(tmp_path)
    for loaded in (MoProConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is MoProConfig
        for name, value in fields.items():
            assert getattr(loaded, name) == value, name
        assert loaded.num_labels == 3
        ignore = {"_name_or_path", "transformers_version"}
        original = {k: v for k, v in config.to_dict().items() if k not in ignore}
        assert {k: v for k, v in loaded.to_dict().items() if k not in ignore} == original
