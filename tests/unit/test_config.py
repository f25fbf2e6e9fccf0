"""Config loading: errors name the dotted key and the value; overrides and round trips work."""

import dataclasses

import pytest

from raymoe.config import (
    ConfigError,
    from_dict,
    load_config,
    parse_job_args,
    qualify,
    require,
    require_resource,
    to_dict,
)
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
        ModelConfig(
            vocab_size=8,
            dim=8,
            num_layers=1,
            num_heads=4,
            num_kv_heads=3,
            moe=MoEConfig(num_experts=2, num_experts_per_tok=1, expert_hidden_dim=4),
        )


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


# -- nested keys, YAML and override errors, the shared command line ------------------------------
@dataclasses.dataclass(kw_only=True)
class Engine:
    num_slots: int = 8

    def __post_init__(self):
        # Named under the section it usually sits in, as raymoe's component configs do.
        require(self.num_slots >= 1, f"engine.num_slots must be >= 1, got {self.num_slots}")


@dataclasses.dataclass(kw_only=True)
class Detectors:
    seed: int = 0

    def __post_init__(self):
        # Named under another section than where the job config puts it.
        require(self.seed >= 0, f"drift.seed must be >= 0, got {self.seed}")


@dataclasses.dataclass(kw_only=True)
class App:
    engine: Engine = dataclasses.field(default_factory=Engine)
    num_gpus: float = 0.0
    extra: Engine | None = None

    def __post_init__(self):
        require_resource("num_gpus", self.num_gpus, gpus=True)


@dataclasses.dataclass(kw_only=True)
class Job:
    app: App
    detectors: Detectors = dataclasses.field(default_factory=Detectors)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"app": {"engine": {"num_slots": 0}}}, "app.engine.num_slots must be >= 1, got 0"),
        ({"app": {"num_gpus": -1}}, "app.num_gpus must be >= 0, got -1.0"),
        ({"app": {"num_gpus": 1.5}}, "app.num_gpus=1.5: expected a fraction of one GPU or a whole number of GPUs"),
        ({"app": {"extra": {"num_slots": 0}}}, "app.extra.num_slots must be >= 1, got 0"),
        ({"app": {"extra": {"num_slotz": 1}}}, "unknown key app.extra.num_slotz for Engine; known keys: ['num_slots']"),
        ({"app": {}, "detectors": {"seed": -1}}, "detectors.seed must be >= 0, got -1"),
    ],
)
def test_nested_errors_name_the_whole_key_once(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Job, data)
    assert str(err.value) == message


def test_section_named_messages_keep_list_indices_and_outer_names():
    assert qualify("sources[0]", "sources[code].weight must be >= 0") == "sources[code].weight must be >= 0"
    assert qualify("sources[0]", "weight must be >= 0", ["weight"]) == "sources[0].weight must be >= 0"
    named_outside = "app.traffic.sample_rate must be in (0, 1]"
    assert qualify("traffic", named_outside) == named_outside
    assert (
        qualify("train", "missing required key data.path for X", ["data"])
        == "missing required key train.data.path for X"
    )


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: a\ninner:\n  size: [1, 2\nlimit: 3\n")
    with pytest.raises(ConfigError, match=r"config file '.*run\.yaml' line 4: expected ',' or '\]'"):
        load_config(Outer, path)


def test_a_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: a\ninner: {size: 3}\nname: b\n")
    with pytest.raises(ConfigError, match=r"run\.yaml' line 3: duplicate key 'name'"):
        load_config(Outer, path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("limit", "override 'limit': expected key.sub=value"),
        ("=3", "override '=3': expected key.sub=value"),
        ("inner..size=3", "override 'inner..size=3': expected key.sub=value"),
        ("tags=[x,", "override 'tags=[x,': the value is not valid YAML"),
        ("name.first=x", "override 'name.first=x': name is not a mapping, got 'a'"),
    ],
)
def test_bad_overrides_are_named(tmp_path, override, message):
    path = tmp_path / "run.yaml"
    path.write_text("name: a\ninner: {size: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, [override])
    assert str(err.value).startswith(message)


def test_job_args_exit_2_with_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("name: a\ninner: {size: 3}\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_job_args(Outer, ["--config", str(path), "inner.size=x"], prog="job", description="")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "config error: inner.size: expected an integer, got 'x'\n"
    with pytest.raises(SystemExit) as exit_info:
        parse_job_args(Outer, ["--config", str(path), "--debug", "inner.size=x"], prog="job", description="")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" in err
    assert err.splitlines()[-1] == "config error: inner.size: expected an integer, got 'x'"
    with pytest.raises(SystemExit) as exit_info:
        parse_job_args(Outer, ["--confg", str(path)], prog="job", description="")
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize(
    "value, ok",
    [
        (0, True),
        (0.5, True),
        (2, True),
        (2.0, True),
        (-1, False),
        (1.5, False),
        (1e-5, False),
        (float("nan"), False),
        (float("inf"), False),
    ],
)
def test_gpu_quantities_follow_rays_rules(value, ok):
    if ok:
        require_resource("num_gpus", value, gpus=True)
    else:
        with pytest.raises(ConfigError, match="num_gpus"):
            require_resource("num_gpus", value, gpus=True)
