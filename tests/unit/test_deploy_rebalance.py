"""Re-placement job, pure parts: load from traffic windows and Prometheus, the reduction to one
serving placement, placement.json, the config's errors and the job's exit codes (no app)."""

import json

import numpy as np
import pytest

from raymoe.config import ConfigError, from_dict
from raymoe.deploy.load_trace import (
    load_from_prometheus_result,
    prometheus_query,
    read_trace,
    windows_trace,
    write_trace,
)
from raymoe.deploy.rebalance_config import RebalanceJobConfig
from raymoe.deploy.serving_placement import (
    fit_experts,
    format_before_after,
    plan_placement,
    read_placement,
    step_imbalance,
    write_placement,
)
from raymoe.parallel.layout import ExpertPlacement
from tests.unit.test_monitor_traffic_windows import row, write_window

# --- load from traffic windows ---------------------------------------------------------------


def test_windows_become_steps_replicas_of_one_span_summed(tmp_path):
    # Prepare: replicas a and b write windows over 0-60 s, replica a another over 60-120 s; one
    # file is not a window at all.
    write_window(
        tmp_path / "window-0000000060000-a.parquet", [row()], start=0.0, end=60.0, expert_load=[[3, 1], [2, 2]]
    )
    write_window(
        tmp_path / "window-0000000061000-b.parquet", [row()], start=1.0, end=61.0, expert_load=[[1, 1], [0, 4]]
    )
    write_window(
        tmp_path / "window-0000000120000-a.parquet", [row()], start=60.0, end=120.0, expert_load=[[0, 5], [1, 1]]
    )
    (tmp_path / "window-0000000130000-c.parquet").write_bytes(b"not parquet")
    # Execute
    found = windows_trace(tmp_path)
    newest = windows_trace(tmp_path, latest=2)
    # Assert: the first two windows overlap in time (one step: [[4, 2], [2, 6]]), the third starts
    # at the first step's end (a new step); the bad file is reported, not used.
    assert found.trace_TLE.tolist() == [[[4, 2], [2, 6]], [[0, 5], [1, 1]]]
    assert found.load_LE.tolist() == [[4, 7], [3, 7]]
    assert len(found.files) == 3
    assert list(found.skipped) == [str(tmp_path / "window-0000000130000-c.parquet")]
    assert "not a readable Parquet file" in next(iter(found.skipped.values()))
    # latest=2: the newest two files (the third window and the bad one).
    assert newest.load_LE.tolist() == [[0, 5], [1, 1]]
    # The directory is a trace the simulator replays.
    assert read_trace(tmp_path).tolist() == found.trace_TLE.tolist()


def test_windows_without_expert_counts_say_so(tmp_path):
    write_window(tmp_path / "window-0000000060000-a.parquet", [row()], expert_load=[])
    with pytest.raises(ValueError, match=r"no traffic window with expert counts .*no expert counts"):
        windows_trace(tmp_path)


# --- load from Prometheus --------------------------------------------------------------------


def test_prometheus_answer_becomes_layer_by_expert_counts():
    # Prepare: increase() answers (fractional: extrapolated), expert 1 of layer 1 has no series.
    body = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"layer": "0", "expert": "0"}, "value": [1.0, "10.4"]},
                {"metric": {"layer": "0", "expert": "1"}, "value": [1.0, "2.6"]},
                {"metric": {"layer": "1", "expert": "0"}, "value": [1.0, "7"]},
            ],
        },
    }
    # Execute / Assert
    assert load_from_prometheus_result(body).tolist() == [[10, 3], [7, 0]]
    assert fit_experts([[10, 3], [7, 0]], 4).tolist() == [[10, 3, 0, 0], [7, 0, 0, 0]]
    assert prometheus_query("tiny", "1h") == (
        'sum by (layer, expert) (increase(ray_raymoe_serve_tokens_per_expert_total{model="tiny"}[1h]))'
    )
    with pytest.raises(ValueError, match="bad_data: parse error"):
        load_from_prometheus_result({"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(ValueError, match="no series"):
        load_from_prometheus_result({"status": "success", "data": {"result": []}})
    with pytest.raises(ValueError, match="model has 1 experts"):
        fit_experts([[1, 2]], 1)


# --- one placement for all layers ------------------------------------------------------------

# 4 experts, 2 workers, 4 slots, 2 layers. Layer 0 routes only to experts 0 and 1, layer 1 only
# to 2 and 3. Summed over layers every expert has 4 tokens, so any 2 + 2 split balances the sum;
# but {0, 1} | {2, 3} leaves one worker idle in each layer (max 8 per layer, mean 4: step 2.0),
# while each worker holding one of {0, 1} and one of {2, 3} balances both layers (step 1.0).
SPLIT_LOAD = np.array([[4, 4, 0, 0], [0, 0, 4, 4]])


def test_shared_placement_balances_every_layer_not_only_the_sum():
    # Execute
    plan = plan_placement(SPLIT_LOAD, num_workers=2, num_slots=4)
    # Assert
    w0, w1 = set(plan.serving.experts_of(0)), set(plan.serving.experts_of(1))
    assert len(w0 & {0, 1}) == 1 and len(w0 & {2, 3}) == 1 and w0 | w1 == {0, 1, 2, 3}
    assert step_imbalance(plan.serving, SPLIT_LOAD) == pytest.approx(1.0)
    assert plan.imbalance()["serving"] == pytest.approx([1.0, 1.0])
    # The contiguous placement ([0, 1] | [2, 3]) is the bad split.
    assert plan.imbalance()["contiguous"] == pytest.approx([2.0, 2.0])
    assert plan.step_imbalance()["contiguous"] == pytest.approx(2.0)


def test_running_placement_within_target_is_kept_and_a_bad_one_moves_few():
    # Prepare
    good = ExpertPlacement(num_experts=4, ep=2, slot_expert=[0, 2, 1, 3])
    bad = ExpertPlacement(num_experts=4, ep=2, slot_expert=[0, 1, 2, 3])
    # Execute
    kept = plan_placement(SPLIT_LOAD, num_workers=2, num_slots=4, current=good)
    moved = plan_placement(SPLIT_LOAD, num_workers=2, num_slots=4, current=bad)
    # Assert: the good one stays (nothing sent); from the bad one a single swap (one expert to
    # each worker, in each of the 2 layers: 4 copies sent) balances both layers.
    assert kept.serving.slot_expert == good.slot_expert and kept.moved() == 0
    assert step_imbalance(moved.serving, SPLIT_LOAD) == pytest.approx(1.0)
    assert moved.moved() == 4
    table = format_before_after(moved)
    assert "| 0 | 8 | 2.000 | 2.000 | 1.000 | 1.000 |" in table
    assert "| 0 | [0, 1] |" in table and "expert copies sent: 4" in table


def test_redundant_copy_goes_to_the_hot_expert():
    # One layer, expert 0 takes 6 of 10 tokens; 5 slots cannot split over 2 workers, 6 can.
    load = np.array([[6, 2, 1, 1]])
    plan = plan_placement(load, num_workers=2, num_slots=6)
    assert plan.serving.expert_slots[0] == [plan.serving.expert_slots[0][0], plan.serving.expert_slots[0][1]]
    assert {plan.serving.slot_rank(s) for s in plan.serving.expert_slots[0]} == {0, 1}
    with pytest.raises(ValueError, match="num_workers=2 must divide num_slots=5"):
        plan_placement(load, num_workers=2, num_slots=5)
    with pytest.raises(ValueError, match="does not match the load's 4 experts on 2 workers"):
        plan_placement(
            load, num_workers=2, num_slots=6, current=ExpertPlacement(num_experts=6, ep=2, slot_expert=list(range(6)))
        )


def test_placement_json_round_trip(tmp_path):
    # Prepare
    current = ExpertPlacement(num_experts=4, ep=2, slot_expert=[0, 1, 2, 3])
    plan = plan_placement(
        SPLIT_LOAD, num_workers=2, num_slots=4, current=current, source={"kind": "trace", "path": "t.jsonl"}
    )
    # Execute
    path = write_placement(tmp_path / "placement.json", plan)
    back = read_placement(path)
    # Assert
    assert back.serving.slot_expert == plan.serving.slot_expert
    assert back.current.slot_expert == [0, 1, 2, 3]
    assert back.per_layer.phy2log.tolist() == plan.per_layer.phy2log.tolist()
    assert back.load_LE.tolist() == SPLIT_LOAD.tolist() and back.source == {"kind": "trace", "path": "t.jsonl"}
    data = json.loads(path.read_text())
    assert data["schema"] == "raymoe.placement/v1" and data["moved_experts"] == plan.moved()
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temp file, renamed
    data["serving"]["slot_expert"] = [0, 0, 1, 2]  # expert 3 lost its slot
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"placement.json: ConfigError: placement: logical experts \[3\] have no slot"):
        read_placement(path)
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match=r"schema 'other', expected 'raymoe\.placement/v1'"):
        read_placement(path)


# --- config and the job ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "missing required key output_dir"),
        ({"output_dir": "o"}, "windows.dir must be set when source is 'windows'"),
        ({"output_dir": "o", "source": "prometheus"}, "prometheus.url must be set when source is 'prometheus'"),
        (
            {"output_dir": "o", "source": "windows", "windows": {"dir": "w"}},
            "placement.num_workers must be > 0 .*when apply.enabled is false",
        ),
        ({"output_dir": "o", "windows": {"dir": "w", "latest": -1}}, "windows.latest must be >= 0, got -1"),
        ({"output_dir": "o", "prometheus": {"window": "1hour"}}, "prometheus.window must be a PromQL duration"),
        ({"output_dir": "o", "placement": {"target_imbalance": 0.9}}, "placement.target_imbalance must be >= 1.0"),
        ({"output_dir": "o", "placement": {"policy": "best"}}, r"placement.policy: expected one of \['auto'"),
        ({"output_dir": "o", "apply": {"bogus": 1}}, "unknown key apply.bogus"),
    ],
)
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RebalanceJobConfig, data)


def test_job_on_a_trace_writes_placement_and_a_bad_config_exits_2(tmp_path, capsys):
    from pipelines.rebalance import main

    # Prepare: a recorded trace of three steps of SPLIT_LOAD.
    trace = write_trace(tmp_path / "trace.jsonl", np.stack([SPLIT_LOAD] * 3))
    out = tmp_path / "out"
    args = [
        "--config",
        "pipelines/configs/rebalance.debug.yaml",
        "source=trace",
        f"trace.path={trace}",
        "model_path=",
        f"output_dir={out}",
        "placement.num_redundant_experts=0",
    ]
    # Execute
    status = main(args)
    # Assert: written, and a second run against it as the running placement moves nothing.
    assert status == 0
    plan = read_placement(out / "placement.json")
    assert plan.load_LE.tolist() == (3 * SPLIT_LOAD).tolist()
    assert step_imbalance(plan.serving, SPLIT_LOAD) == pytest.approx(1.0)
    assert main([*args, f"placement.current={out / 'placement.json'}"]) == 0
    history = [json.loads(line) for line in (out / "rebalance-history.jsonl").read_text().splitlines()]
    assert [h["moved_experts"] for h in history] == [None, 0]
    # A config error exits 2 before anything is written.
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--config",
                "pipelines/configs/rebalance.debug.yaml",
                f"output_dir={tmp_path / 'none'}",
                "source=trace",
                "trace.path=/no/such/trace.jsonl",
            ]
        )
    assert exit_info.value.code == 2
    assert "trace.path '/no/such/trace.jsonl' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_raymoe_rebalance_verb_runs_the_job(tmp_path, capsys):
    from raymoe.cli import main

    trace = write_trace(tmp_path / "trace.jsonl", np.stack([SPLIT_LOAD]))
    assert (
        main(
            [
                "rebalance",
                "--config",
                "pipelines/configs/rebalance.debug.yaml",
                "source=trace",
                f"trace.path={trace}",
                "model_path=",
                f"output_dir={tmp_path}",
                "placement.num_redundant_experts=0",
            ]
        )
        == 0
    )
    assert "| all (step: sum of maxima / sum of means) | 16 | 2.000 |  | 1.000 |" in capsys.readouterr().out
