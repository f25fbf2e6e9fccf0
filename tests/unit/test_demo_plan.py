"""The demo's plan: every stage's config under work_dir and checked before Ray starts; the hot
experts it serves with; the load's prompts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raymoe.config import ConfigError, load_config
from raymoe.demo.config import DemoConfig
from raymoe.demo.live import hottest_experts
from raymoe.demo.load import LoadConfig, window_prompts
from raymoe.demo.plan import load_plan

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "configs" / "demo.debug.yaml"


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped configs name their inputs relative to the repository


def test_every_stage_reads_and_writes_under_work_dir(in_repo, tmp_path):
    # Execute
    plan = load_plan(load_config(DemoConfig, DEMO, [f"work_dir={tmp_path}"]))
    # Assert: training reads ingest's output; everything downstream takes the exported model; the
    # app samples its traffic in windows of exactly one load phase; drift and re-placement read the
    # load's windows and re-place the app the serve stage runs.
    assert plan.train.data.path == str(tmp_path / "data")
    assert plan.finetune.base == plan.federated.base == plan.serve.app.model_path == str(tmp_path / "model")
    assert plan.finetune.debug_base == plan.federated.debug_base == ""
    traffic = plan.serve.app.traffic
    assert traffic.enabled and traffic.output_dir == str(tmp_path / "traffic")
    assert traffic.window_requests == plan.load.requests_per_window
    assert plan.drift.current.dir == plan.rebalance.windows.dir == str(tmp_path / "load" / "windows")
    assert plan.drift.debug_traffic is None and plan.rebalance.debug_traffic is None
    assert plan.rebalance.apply.enabled and plan.rebalance.apply.app_name == plan.serve.app_name
    assert plan.serve.app.ep == 2 and plan.num_experts == 8


def test_hot_experts_that_do_not_split_over_the_shard_workers_fail_before_anything(in_repo, tmp_path):
    # 8 experts + 1 hot copy = 9 slots over app.ep=2.
    cfg = load_config(DemoConfig, DEMO, [f"work_dir={tmp_path}", "serve.num_hot_experts=1"])
    with pytest.raises(
        ConfigError,
        match=r"8 experts \+ 1 hot copies = 9 expert slots do not split evenly over "
        r"the serve stage's app.ep=2",
    ):
        load_plan(cfg)


def test_an_adapter_layout_the_model_cannot_take_fails_naming_the_stage(in_repo, tmp_path):
    # 3 workers cannot split the 8 experts the exported model will have (checked before it exists).
    cfg = load_config(
        DemoConfig, DEMO, [f"work_dir={tmp_path}", "finetune.overrides=[layout.ep=3, global_batch_size=6]"]
    )
    with pytest.raises(
        ConfigError,
        match=r"finetune stage \(pipelines/configs/finetune.debug.yaml\): "
        r".*layout.ep=3 must divide .*num_experts=8",
    ):
        load_plan(cfg)


def test_the_load_needs_two_different_windows():
    with pytest.raises(ConfigError, match=r"load\.shifted='code' must differ from load\.clean='code'"):
        LoadConfig(clean="code", shifted="code")


def test_hot_experts_are_those_with_most_tokens_in_the_newest_steps(tmp_path):
    # Prepare: 3 experts, 2 MoE layers. An old step favoured expert 0; the newest 10 steps route
    # per step [1, 5, 3] and [0, 2, 4] tokens: totals 1, 7, 7 -> experts 1 and 2 (tie: lower id first).
    history = tmp_path / "train-history.jsonl"
    lines = [{"step": 0, "tokens_per_expert": [[1000, 0, 0], [1000, 0, 0]]}]
    lines += [{"step": s, "tokens_per_expert": [[1, 5, 3], [0, 2, 4]]} for s in range(1, 11)]
    history.write_text("\n".join(json.dumps(line) for line in lines) + "\n{torn")
    # Execute / Assert
    assert hottest_experts(history, 2, 3) == [1, 2]
    assert hottest_experts(history, 1, 3) == [1]
    assert hottest_experts(tmp_path / "none.jsonl", 2, 3) == [0, 1]


def test_prompts_are_cut_to_fit_the_context():
    # A whitespace "tokenizer": every word one token; at most 12 tokens and 200 characters.
    prompts = window_prompts("prose", 8, seed=0, max_chars=200, max_tokens=12, encode=str.split)
    assert len(prompts) == 8 and all(p for p in prompts)
    assert all(len(p) <= 200 and len(p.split()) <= 12 for p in prompts)
    assert prompts == window_prompts("prose", 8, seed=0, max_chars=200, max_tokens=12, encode=str.split)


def test_a_config_error_exits_2_before_ray_starts(tmp_path):
    # Prepare: Ray would create its session directory under RAY_TMPDIR, a file here: it cannot.
    ray_tmpdir = tmp_path / "ray-must-not-start"
    ray_tmpdir.write_text("the demo started Ray\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    # Execute
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.demo",
            "--config",
            str(DEMO),
            f"work_dir={tmp_path / 'w'}",
            "serve.num_hot_experts=3",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Assert: one line, nothing written.
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stdout == "" and run.stderr.count("\n") == 1
    assert run.stderr.startswith("config error: serve.num_hot_experts=3: 8 experts + 3 hot copies = 11")
    assert not (tmp_path / "w").exists()
