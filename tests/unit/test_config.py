"""Config loading: errors name the dotted key and the value; overrides and round trips work."""

import dataclasses

import pytest

from raymoe.config import ConfigError, from_dict, load_config, to_dict
from raymoe.models.config import FLAVOURS, ModelConfig, MoEConfig, flavour


@dataclasses.dataclass(kw_only=True)
class Inner:
    size: int
    rate: float = 0.5


@dataclasses.dataclass(kw_only=True)
class Outer:
    name: str
    inner: Inner
    tags: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = None


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"unknown key inner\.sise"):
        from_dict(Outer, {"name": "a", "inner": {"sise": 3}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"inner\.size: expected an integer, got 'three'"):
        from_dict(Outer, {"name": "a", "inner": {"size": "three"}})
    with pytest.raises(ConfigError, match=r"inner\.size: expected an integer, got True"):
        from_dict(Outer, {"name": "a", "inner": {"size": True}})


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required key inner\.size"):
        from_dict(Outer, {"name": "a", "inner": {}})


def test_yaml_with_overrides_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: a\ninner:\n  size: 3\n")
    cfg = load_config(Outer, path, ["inner.rate=2", "tags=[x, y]", "limit=7"])
    assert cfg == Outer(name="a", inner=Inner(size=3, rate=2.0), tags=["x", "y"], limit=7)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_model_config_validation_names_fields():
    with pytest.raises(ConfigError, match=r"moe\.num_groups=3 must divide moe\.num_experts=8"):
        MoEConfig(num_experts=8, num_experts_per_tok=2, expert_hidden_dim=4, num_groups=3)
    with pytest.raises(ConfigError, match=r"num_kv_heads=3 must divide num_heads=4"):
        ModelConfig(vocab_size=8, dim=8, num_layers=1, num_heads=4, num_kv_heads=3,
                    moe=MoEConfig(num_experts=2, num_experts_per_tok=1, expert_hidden_dim=4))


@pytest.mark.parametrize("name", FLAVOURS)
def test_every_flavour_round_trips_through_plain_data(name):
    cfg = flavour(name)
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_published_shapes_have_the_published_sizes():
    # DeepSeek-V3: 671B total, 37B active (paper, table 1); Mixtral-8x7B: 46.7B total, 12.9B active.
    from raymoe.models.param_count import parameter_counts

    total, active = parameter_counts(flavour("deepseek-v3"))
    assert 660e9 < total < 675e9 and 36e9 < active < 39e9
    total, active = parameter_counts(flavour("mixtral-8x7b"))
    assert 46e9 < total < 47.5e9 and 12.5e9 < active < 13.2e9


def test_parameter_counts_agree_with_a_built_model():
    import torch

    from raymoe.models import MoETransformer
    from raymoe.models.param_count import parameter_counts

    model = MoETransformer(flavour("debug"))
    total, active = parameter_counts(model.cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert active == model.num_params(active=True)
    assert isinstance(total, int) and torch.is_tensor(model.embed.weight)
