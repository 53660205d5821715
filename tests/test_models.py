"""UNet2DModel presets: sizes, shapes, resolution checks, user overrides."""

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from ddpm_hf.config import TrainingConfig
from ddpm_hf.errors import UserError
from ddpm_hf.models import build_unet, count_parameters, unet_config, use_plain_attention_on_cpu


def test_cifar10_preset_is_ho_et_al_35_7m():
    unet = build_unet(unet_config(TrainingConfig(model_preset="cifar10"), channels=3, resolution=32))
    assert count_parameters(unet) == pytest.approx(35.7e6, rel=0.01)
    assert unet.config.block_out_channels == (128, 256, 256, 256) and unet.config.layers_per_block == 2
    assert unet.config.down_block_types[1] == "AttnDownBlock2D"  # attention at 16x16
    assert unet.config.dropout == 0.1


def test_micro_preset_is_narrow_at_full_resolution_with_attention_only_in_the_middle():
    unet = build_unet(unet_config(TrainingConfig(model_preset="micro"), channels=1, resolution=28))
    assert count_parameters(unet) == 267_313
    assert unet.config.block_out_channels == (16, 32, 32) and unet.config.layers_per_block == 1
    assert not any("Attn" in block for block in (*unet.config.down_block_types, *unet.config.up_block_types))
    assert len(unet.mid_block.attentions) == 1  # at 7x7, 32 channels


@pytest.mark.parametrize("preset, low, high", [("micro", 0.2e6, 0.5e6), ("tiny", 0.3e6, 2e6), ("mnist", 2e6, 10e6)])
@pytest.mark.parametrize("resolution", [28, 32])
def test_digit_presets_run_at_28_and_32(preset, low, high, resolution):
    unet = build_unet(unet_config(TrainingConfig(model_preset=preset), channels=1, resolution=resolution))
    assert low < count_parameters(unet) < high
    x = torch.randn(2, 1, resolution, resolution)
    assert unet(x, torch.tensor([0, 999])).sample.shape == x.shape


def test_resolution_the_net_cannot_take_is_refused_with_a_fix():
    with pytest.raises(UserError, match="multiple of 8; use --resolution 32 --resize_mode pad"):
        unet_config(TrainingConfig(model_preset="cifar10"), channels=1, resolution=28)


def test_a_json_model_config_overrides_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "block_out_channels": [16, 32, 32], "norm_num_groups": 8}))
    values = unet_config(TrainingConfig(model_config_name_or_path=str(tmp_path)), channels=3, resolution=16)
    unet = build_unet(values)
    assert list(unet.config.block_out_channels) == [16, 32, 32] and unet.config.in_channels == 3
    with pytest.raises(UserError, match="no config.json"):
        unet_config(TrainingConfig(model_config_name_or_path=str(tmp_path / "missing")), channels=1, resolution=28)


def test_on_a_cpu_attention_is_multiplied_out_and_computes_the_same():
    torch.manual_seed(0)
    unet = build_unet(unet_config(TrainingConfig(model_preset="tiny"), channels=1, resolution=28))
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    assert len(attentions) == 4  # tiny: the 7x7 down and up blocks and the middle
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
    with torch.no_grad():
        fused = unet(x, t).sample
    use_plain_attention_on_cpu(unet, torch.device("cuda"))  # a GPU keeps the fused kernels
    assert all(type(m.processor) is AttnProcessor2_0 for m in attentions)
    use_plain_attention_on_cpu(unet, torch.device("cpu"))
    assert all(type(m.processor) is AttnProcessor for m in attentions)
    with torch.no_grad():
        assert torch.allclose(unet(x, t).sample, fused, atol=1e-5)
