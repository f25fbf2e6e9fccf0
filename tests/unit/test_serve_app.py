"""Serve app config: builder args, validation, deployment options, API key sources, debug config."""

import pytest

from raymoe.config import ConfigError, from_dict, load_config
from raymoe.serve.app import _nest, build_app, deployment_options
from raymoe.serve.serve_config import ServeConfig, ServeJobConfig, read_api_key


def test_flat_cli_args_are_nested_and_parsed():
    args = {
        "model_path": "/m/123",
        "engine.num_slots": "4",
        "autoscaling.max_replicas": "3",
        "int8": "true",
        "api_key_file": "/run/key",
    }
    cfg = from_dict(ServeConfig, _nest(args))
    assert cfg.engine.num_slots == 4 and cfg.autoscaling.max_replicas == 3 and cfg.int8 is True
    assert cfg.model_path == "/m/123" and cfg.model_id == "123" and cfg.api_key_file == "/run/key"


@pytest.mark.parametrize(
    "args, match",
    [
        ({"model_path": "/m", "engine": {"num_slotz": 4}}, "engine.num_slotz"),
        ({"model_path": "/m", "backpressure_status": 500}, "backpressure_status"),
        ({"model_path": "/m", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas=2"),
        ({"model_path": "/m", "model_id": "a:b"}, "model_id"),
        ({}, "model_path"),
    ],
)
def test_bad_config_names_the_key(args, match):
    with pytest.raises(ConfigError, match=match):
        build_app(args)


def test_deployment_options_carry_autoscaling_and_leave_refusals_to_the_replica():
    cfg = from_dict(
        ServeConfig,
        {
            "model_path": "/m",
            "max_ongoing_requests": 8,
            "max_queued_requests": 5,
            "backpressure_status": 429,
            "retry_after_s": 3,
            "num_cpus": 0.5,
            "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6},
        },
    )
    opts = deployment_options(cfg)
    # The replica admits 8 + 5 and refuses beyond (OpenAI JSON); Serve lets in 10x that and
    # queues the rest instead of answering its own plain-text refusal.
    assert opts["max_ongoing_requests"] == 10 * (8 + 5) and opts["max_queued_requests"] == -1
    assert opts["autoscaling_config"].max_replicas == 4
    assert opts["autoscaling_config"].target_ongoing_requests == 6
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}


def test_api_key_from_env_then_file(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    cfg = ServeConfig(model_path="/m", api_key_env="TEST_RAYMOE_KEY", api_key_file=str(key_file))
    monkeypatch.delenv("TEST_RAYMOE_KEY", raising=False)
    assert read_api_key(cfg) == "from-file"
    monkeypatch.setenv("TEST_RAYMOE_KEY", "from-env")
    assert read_api_key(cfg) == "from-env"
    assert read_api_key(ServeConfig(model_path="/m", api_key_env="", api_key_file="")) is None


def test_debug_pipeline_config_loads():
    cfg = load_config(ServeJobConfig, "pipelines/configs/serve.debug.yaml", ["app.engine.num_slots=2"])
    assert cfg.app.engine.num_slots == 2 and cfg.writes_debug_artifact
    assert cfg.http.host == "127.0.0.1"


def test_expert_copies_follow_the_placement(tmp_path):
    from raymoe.serve.app import expert_copies
    from raymoe.serve.debug_artifact import make_debug_artifact
    from raymoe.serve.serve_config import ServeConfig

    path = make_debug_artifact(tmp_path / "m", dim=32, num_layers=1, num_experts=6)
    assert expert_copies(ServeConfig(model_path=str(path))) == [1] * 6
    # 6 experts + copies of 0 and 4 = 8 slots over 2 workers.
    assert expert_copies(ServeConfig(model_path=str(path), ep=2, redundant_experts=[0, 4])) == [2, 1, 1, 1, 2, 1]
    assert expert_copies(ServeConfig(model_path=str(tmp_path / "elsewhere"))) == []
