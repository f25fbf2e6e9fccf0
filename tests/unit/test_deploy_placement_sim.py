"""Re-placement simulator and load traces: a hand-worked replay, trace files, a drifting Zipf trace."""

import json

import numpy as np
import pytest

from raymoe.deploy.load_trace import from_cumulative, read_trace, write_trace, zipf_trace
from raymoe.deploy.placement_sim import SimConfig, compare, simulate

# 4 experts, 2 workers, 6 slots, one MoE layer, a window of one step.
# Warm-up step [4, 4, 4, 4]: e0 and e1 get the two extra slots (ties go to the lower id) and the
# packing puts w0 = [e0, e1, e2], w1 = [e0, e1, e3] (8 tokens each).
# Steps 1 and 2 send all 8 tokens to e2, which only w0 holds: w0 = 8, w1 = 0.
# Re-placing on step 1's load gives e2 two copies (4 tokens on each worker); of w1's slots only
# e2 is new there: 1 expert sent.
TRACE = np.array([[[4, 4, 4, 4]], [[0, 0, 8, 0]], [[0, 0, 8, 0]]])


def hand_config(**changes) -> SimConfig:
    base = dict(
        num_workers=2,
        num_slots=6,
        window_steps=1,
        every_steps=1,
        check_every_steps=1,
        drift_imbalance=1.5,
        seconds_per_token=0.5,
        overhead_s=1.0,
        seconds_per_moved_expert=0.25,
        slo_step_s=4.0,
    )
    return SimConfig(**{**base, **changes})


def test_static_replay_by_hand():
    # Execute
    result = simulate(TRACE, hand_config(), "static")
    # Assert: steps 1 and 2 each take 1 + 0.5 * 8 = 5 s; max/mean = 8 / 4 = 2.
    assert result.mean_imbalance == pytest.approx(2.0)
    assert result.slo_attainment == 0.0
    assert result.worker_hours == pytest.approx(2 * 10.0 / 3600)
    assert (result.experts_moved, result.replacements) == (0, 0)


@pytest.mark.parametrize("strategy", ["periodic", "drift"])
def test_replacement_replay_by_hand(strategy):
    # Execute
    result = simulate(TRACE, hand_config(), strategy)
    # Assert: step 1 as static (5 s); before step 2 one expert moves (0.25 s) and the busiest
    # worker has 4 tokens: 1 + 0.5 * 4 + 0.25 = 3.25 s, within the 4 s SLO.
    assert result.mean_imbalance == pytest.approx((2.0 + 1.0) / 2)
    assert result.slo_attainment == pytest.approx(0.5)
    assert result.worker_hours == pytest.approx(2 * (5.0 + 3.25) / 3600)
    assert result.p99_step_ms == pytest.approx(np.percentile([5000.0, 3250.0], 99))
    assert (result.experts_moved, result.replacements) == (1, 1)


def test_drift_does_not_replace_below_its_threshold():
    result = simulate(TRACE, hand_config(drift_imbalance=2.5), "drift")
    assert result.replacements == 0


def test_drifting_zipf_trace_drift_strategy_balances_with_few_moves():
    # Prepare: 64 experts, 8 workers + 8 redundant slots, 4 layers; every 100 steps four pairs of
    # experts per layer trade popularity.
    trace = zipf_trace(
        num_steps=700,
        num_layers=4,
        num_experts=64,
        tokens_per_step=4096,
        zipf_s=1.0,
        drift_every=100,
        drift_swaps=4,
        seed=1,
    )
    cfg = SimConfig(
        num_workers=8,
        num_slots=72,
        window_steps=50,
        every_steps=100,
        check_every_steps=10,
        seconds_per_token=0.010 / 4096,
        overhead_s=0.010,
        seconds_per_moved_expert=0.0009,
        slo_step_s=0.0225,
    )
    # Execute
    static, periodic, drift = compare(trace, cfg)
    # Assert: re-placing beats never re-placing; drift-triggered, migration-aware re-placement
    # sends far fewer experts than re-placing from scratch on a fixed period.
    assert static.strategy == "static" and periodic.strategy == "periodic" and drift.strategy == "drift"
    assert drift.mean_imbalance < static.mean_imbalance and periodic.mean_imbalance < static.mean_imbalance
    assert drift.worker_hours < static.worker_hours
    assert drift.experts_moved < periodic.experts_moved


def test_zipf_trace_shape_counts_and_seed():
    a = zipf_trace(num_steps=5, num_layers=3, num_experts=16, tokens_per_step=1000, seed=7)
    b = zipf_trace(num_steps=5, num_layers=3, num_experts=16, tokens_per_step=1000, seed=7)
    assert a.shape == (5, 3, 16) and (a.sum(axis=2) == 1000).all()
    assert (a == b).all()


def test_trace_files_round_trip(tmp_path):
    trace = zipf_trace(num_steps=4, num_layers=2, num_experts=8, tokens_per_step=64, seed=0)
    assert (read_trace(write_trace(tmp_path / "t.jsonl", trace)) == trace).all()
    np.save(tmp_path / "t.npy", trace)
    assert (read_trace(tmp_path / "t.npy") == trace).all()


def test_trace_jsonl_ignores_other_keys_and_names_a_bad_line(tmp_path):
    path = tmp_path / "t.jsonl"
    good = json.dumps({"t": 1.5, "tokens_per_expert": [[1, 2], [3, 4]]})
    path.write_text(good + "\n" + json.dumps({"tokens_per_expert": [[1, 2, 3]]}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:2: tokens_per_expert has shape \(1, 3\)"):
        read_trace(path)
    path.write_text(good + "\n" + json.dumps({"tokens_per_expert": [[1, -2], [3, 4]]}) + "\n")
    with pytest.raises(ValueError, match="negative count at step 1, layer 0, expert 1"):
        read_trace(path)
    path.write_text(good + "\n")
    assert read_trace(path).tolist() == [[[1, 2], [3, 4]]]


def test_from_cumulative_handles_a_counter_reset():
    # Snapshots of one layer x 2 experts: +5/+1, then the process restarts (counters 2 and 0).
    snaps = [[[10, 4]], [[15, 5]], [[2, 0]]]
    assert from_cumulative(snaps).tolist() == [[[5, 1]], [[2, 0]]]


def test_sim_config_and_trace_length_are_checked():
    with pytest.raises(ValueError, match=r"sim\.window_steps must be >= 1"):
        hand_config(window_steps=0)
    with pytest.raises(ValueError, match=r"needs more than sim\.window_steps=3"):
        simulate(TRACE, hand_config(window_steps=3), "static")
