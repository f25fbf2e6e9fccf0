"""The drift job's pieces that need no traffic windows: config checks, quality decay, actions."""

import json
import sys

import pytest

from raymoe.config import ConfigError, from_dict
from raymoe.monitor.drift_actions import act_on
from raymoe.monitor.drift_job_config import ActionConfig, ActionsConfig, DriftJobConfig
from raymoe.monitor.quality_history import judge, perplexity, read_history


def _cfg(**overrides) -> dict:
    return {"current": {"dir": "traffic"}, "output_dir": "out", **overrides}


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"current": {"dir": "t", "latest": 0}}, "current.latest"),
        ({"reference": {"kind": "training"}}, "reference.kind"),
        ({"reference": {"kind": "manifest"}}, "reference.manifest"),
        ({"features": ["prompt_length", "colour"]}, "features"),
        ({"quality": {"decay_threshold": 0}}, "quality.decay_threshold"),
        (
            {"actions": {"finetune": {"enabled": True, "mode": "ray_job", "entrypoint": ["x"]}}},
            "actions.finetune.address",
        ),
        ({"actions": {"rebalance": {"mode": "kubectl"}}}, "actions.rebalance.mode"),
        ({"interval_s": -1}, "interval_s"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(DriftJobConfig, _cfg(**overrides))


def test_debug_config_loads():
    from raymoe.config import load_config

    cfg = load_config(DriftJobConfig, "pipelines/configs/drift.debug.yaml")
    assert cfg.reference.kind == "windows" and not cfg.actions.rebalance.enabled
    assert cfg.actions.finetune.entrypoint[:3] == ["python", "-m", "pipelines.finetune"]


def test_decay_is_measured_against_the_first_point_of_the_same_model():
    # Prepare: ln(ppl) 1.0 -> ppl e; later points for the same model at +5% and +20%.
    history = [
        {"model": "m", "adapter": None, "perplexity": 10.0, "time": 1.0},
        {"model": "other", "adapter": None, "perplexity": 2.0, "time": 2.0},
    ]
    # Execute / Assert
    assert perplexity(1.0) == pytest.approx(2.718281828)
    small = judge(history, {"model": "m", "adapter": None, "perplexity": 10.5}, threshold=0.1)
    big = judge(history, {"model": "m", "adapter": None, "perplexity": 12.0}, threshold=0.1)
    assert small["decay"] == pytest.approx(1.05) and not small["decayed"]
    assert big["decay"] == pytest.approx(1.2) and big["decayed"] and big["baseline_time"] == 1.0
    first = judge(history, {"model": "new", "adapter": "a", "perplexity": 7.0}, threshold=0.1)
    assert first["decay"] == 1.0 and not first["decayed"]


def test_history_rejects_a_corrupt_line(tmp_path):
    path = tmp_path / "quality-history.jsonl"
    assert read_history(path) == []
    path.write_text(json.dumps({"perplexity": 3.0}) + "\n" + '{"perplexity": -1}\n')
    with pytest.raises(ValueError, match=r"quality-history.jsonl:2"):
        read_history(path)


def _touch(path) -> list[str]:
    return [sys.executable, "-c", f"open({str(path)!r}, 'a').write('ran\\n')"]


def test_router_drift_runs_rebalance_only(tmp_path):
    log = tmp_path / "actions.jsonl"
    actions = ActionsConfig(
        rebalance=ActionConfig(enabled=True, entrypoint=_touch(tmp_path / "rebalanced")),
        finetune=ActionConfig(enabled=True, entrypoint=_touch(tmp_path / "tuned")),
    )
    records = act_on(
        actions,
        router_drift=True,
        input_drift=False,
        quality_decay=False,
        drifted_features=["expert_load"],
        log_path=log,
    )
    assert [r["action"] for r in records] == ["rebalance"] and records[0]["returncode"] == 0
    assert (tmp_path / "rebalanced").read_text() == "ran\n" and not (tmp_path / "tuned").exists()
    assert [json.loads(line)["action"] for line in log.read_text().splitlines()] == ["rebalance"]


def test_input_drift_and_decay_start_one_finetune(tmp_path):
    actions = ActionsConfig(
        rebalance=ActionConfig(enabled=True, entrypoint=_touch(tmp_path / "rebalanced")),
        finetune=ActionConfig(enabled=True, entrypoint=_touch(tmp_path / "tuned")),
    )
    records = act_on(
        actions,
        router_drift=False,
        input_drift=True,
        quality_decay=True,
        drifted_features=["prompt_length", "token_histogram"],
        log_path=tmp_path / "a.jsonl",
    )
    assert [r["action"] for r in records] == ["finetune"]
    assert records[0]["reason"] == "input drift (prompt_length, token_histogram) and quality decay"
    assert (tmp_path / "tuned").read_text() == "ran\n" and not (tmp_path / "rebalanced").exists()


def test_disabled_actions_are_logged_not_run(tmp_path):
    actions = ActionsConfig(finetune=ActionConfig(enabled=False, entrypoint=_touch(tmp_path / "tuned")))
    records = act_on(
        actions,
        router_drift=False,
        input_drift=False,
        quality_decay=True,
        drifted_features=[],
        log_path=tmp_path / "a.jsonl",
    )
    assert records[0]["enabled"] is False and "returncode" not in records[0]
    assert not (tmp_path / "tuned").exists()
    assert (
        act_on(
            actions,
            router_drift=False,
            input_drift=False,
            quality_decay=False,
            drifted_features=[],
            log_path=tmp_path / "b.jsonl",
        )
        == []
    )


def test_python_in_an_entrypoint_is_this_jobs_interpreter(tmp_path, monkeypatch):
    # No `python` on PATH (a venv that is not activated): the action still runs.
    monkeypatch.setenv("PATH", "")
    command = ["python", "-c", f"open({str(tmp_path / 'ran')!r}, 'w').write('yes')"]
    actions = ActionsConfig(finetune=ActionConfig(enabled=True, entrypoint=command))
    records = act_on(
        actions,
        router_drift=False,
        input_drift=True,
        quality_decay=False,
        drifted_features=["prompt_length"],
        log_path=tmp_path / "a.jsonl",
    )
    assert records[0]["returncode"] == 0 and (tmp_path / "ran").read_text() == "yes"
