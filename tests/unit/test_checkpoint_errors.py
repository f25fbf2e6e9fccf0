"""A bad checkpoint fails with an error naming the key, the shapes or the architecture."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymoe.models import CheckpointError, MoETransformer, flavour, load_hf, save_hf


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    save_hf(MoETransformer(flavour("debug")), tmp_path)
    return tmp_path


def _edit_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(saved):
    _edit_weights(saved, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'"):
        load_hf(saved)


def test_wrong_shape_names_key_and_both_shapes(saved):
    def shrink(t):
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(128, 64)

    _edit_weights(saved, shrink)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight' has shape \(128, 64\), expected \(128, 128\)"):
        load_hf(saved)


def test_unexpected_tensor_is_named(saved):
    _edit_weights(saved, lambda t: t.__setitem__("model.layers.1.mlp.experts.99.up_proj.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*experts\.99"):
        load_hf(saved)


def test_unsupported_architecture_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unsupported architecture \['LlamaForCausalLM'\]"):
        load_hf(saved)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_hf(tmp_path)


def test_debug_flavour_exports_as_deepseek_v3_and_reloads_exactly(saved):
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]
    torch.manual_seed(0)
    original = MoETransformer(flavour("debug")).eval()
    ids = torch.randint(0, 2048, (1, 20))
    with torch.no_grad():
        assert torch.equal(load_hf(saved)(ids), original(ids))


def test_gqa_sigmoid_config_has_no_hf_architecture(tmp_path):
    cfg = flavour("debug").replace(attention="gqa", num_kv_heads=2, head_dim=32)
    with pytest.raises(CheckpointError, match="no Hugging Face architecture matches this GQA config"):
        save_hf(MoETransformer(cfg), tmp_path)
