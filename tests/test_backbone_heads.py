"""`MoProBackbone` under transformers' backbone conventions: heads built from a `backbone_config` accept it, and the
stage choice (`out_indices` / `out_features`) stays linked through saving, reloading and setting."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation
from transformers.backbone_utils import BackboneMixin, BackboneType

from modeling_mopro import MoProBackbone, MoProForImageClassification
from tests._tiny import MoProModelTester

tester = MoProModelTester()


def upernet_config(**backbone_overrides) -> UperNetConfig:
    backbone_config = tester.get_config(**backbone_overrides)
    backbone_config.out_indices = [1, 2, 3, 4]
    return UperNetConfig(
        backbone_config=backbone_config, num_labels=3, hidden_size=16, auxiliary_in_channels=16, pool_scales=[1, 2]
    )


def test_backbone_follows_the_mixin():
    backbone = MoProBackbone(tester.get_config())
    assert isinstance(backbone, BackboneMixin) and backbone.backbone_type is BackboneType.TIMM
    pixel_values = torch.randn(2, 3, 32, 32)
    # How UperNet, DPT, ViTPose ... call a backbone: unknown keywords dropped, attentions not asked of a conv net.
    out = backbone.forward_with_filtered_kwargs(pixel_values, output_hidden_states=False, output_attentions=False)
    assert [m.shape[1] for m in out.feature_maps] == backbone.channels == [32]


def test_upernet_on_a_mopro_backbone_trains_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(upernet_config())
    assert type(model.backbone) is MoProBackbone and model.backbone.channels == [4, 8, 16, 32]
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    out = model(pixel_values=pixel_values, labels=labels)
    assert out.logits.shape == (2, 3, 32, 32) and torch.isfinite(out.loss)
    out.loss.backward()
    # The gradient reaches the MoPro body (its first convolution), not only UperNet's heads.
    stem = model.backbone.backbone.conv1.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    # The head saves its MoPro backbone config and comes back with the same weights and outputs.
    model.eval().save_pretrained(tmp_path)
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(reloaded.backbone) is MoProBackbone and reloaded.backbone.out_indices == [1, 2, 3, 4]
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, reloaded(pixel_values).logits)


@pytest.mark.parametrize("choice", [{"out_indices": [1, 2]}, {"out_features": ["layer1", "layer2"]}])
def test_saved_backbone_reloads_with_other_stages(choice, tmp_path):
    saved = MoProBackbone(tester.get_config(), out_indices=[1, 2, 3, 4]).eval()
    saved.save_pretrained(tmp_path)
    reloaded = MoProBackbone.from_pretrained(tmp_path, **choice).eval()
    assert reloaded.out_indices == [1, 2] and reloaded.out_features == ["layer1", "layer2"]
    assert reloaded.channels == [4, 8]
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = saved(pixel_values).feature_maps[:2]
        assert all(torch.equal(a, b) for a, b in zip(reloaded(pixel_values).feature_maps, expected, strict=True))
    # Without a choice, the saved one.
    assert MoProBackbone.from_pretrained(tmp_path).out_indices == [1, 2, 3, 4]


def test_out_indices_and_out_features_stay_linked(tmp_path):
    backbone = MoProBackbone(tester.get_config()).eval()
    backbone.out_indices = [2, -1]
    assert backbone.out_features == ["layer2", "layer4"] == backbone.config.out_features
    backbone.out_features = ["act1", "layer3"]
    assert backbone.out_indices == [0, 3] == backbone.config.out_indices
    assert backbone(torch.randn(1, 3, 32, 32)).feature_maps[1].shape[1] == 16
    with pytest.raises(ValueError, match="out_features"):
        backbone.out_features = ["layer9"]
    # From a classifier folder through the Auto class (config route), as a head's `load_backbone` builds it.
    MoProForImageClassification(tester.get_config()).save_pretrained(tmp_path)
    built = AutoBackbone.from_config(MoProBackbone.config_class.from_pretrained(tmp_path), out_indices=[3])
    assert type(built) is MoProBackbone and built.out_features == ["layer3"]
