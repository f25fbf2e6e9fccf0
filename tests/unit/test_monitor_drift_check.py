"""One drift check over window files written to the format (no serving code): which files are
compared, the manifest reference's bucketing, the outputs and quarantine, and the exit codes of
`pipelines.drift` for a drifted pair, a config error and a data mismatch."""

import json

import numpy as np
import pytest

from raymoe.config import ConfigError, from_dict
from raymoe.monitor.drift_check import manifest_reference, run_check, write_outputs
from raymoe.monitor.drift_job_config import DriftJobConfig, check_before_launch, window_files
from raymoe.monitor.traffic_windows import read_window
from tests.unit.test_monitor_traffic_windows import row, write_window


def _windows(tmp_path, shifted: bool):
    """Two windows of 40 prompts over a 10-token vocabulary in 4 buckets; the second shifted
    (longer prompts, other buckets, another expert hot) or drawn like the first."""
    rng = np.random.default_rng(0)
    paths = []
    for i, end in enumerate((70.0, 130.0)):
        shift = shifted and i == 1
        rows = [
            row(
                int(rng.integers(40, 60) if shift else rng.integers(5, 25)),
                4,
                float(rng.normal(-1, 0.2)),
                (0, 1, 8, 6) if shift else (6, 8, 1, 0),
            )
            for _ in range(40)
        ]
        load = [[900, 100], [500, 500]] if shift else [[500, 500], [500, 500]]
        paths.append(
            write_window(
                tmp_path / "traffic" / f"window-{int(end * 1000):013d}-r.parquet", rows, end=end, expert_load=load
            )
        )
    return paths


def _cfg(tmp_path, **over):
    return from_dict(
        DriftJobConfig, {"current": {"dir": str(tmp_path / "traffic")}, "output_dir": str(tmp_path / "out"), **over}
    )


@pytest.fixture
def traffic(tmp_path):
    (tmp_path / "traffic").mkdir()
    return tmp_path


def test_newest_is_current_oldest_is_reference(traffic):
    old, new = _windows(traffic, shifted=True)
    cfg = _cfg(traffic)
    check_before_launch(cfg)
    assert window_files(cfg) == ([old], [new])
    # Both needed, only two files: with latest=2 they would overlap.
    with pytest.raises(ConfigError, match="overlap"):
        check_before_launch(_cfg(traffic, current={"dir": str(traffic / "traffic"), "latest": 2}))


def test_shifted_window_drifts_and_outputs_are_written(traffic):
    _windows(traffic, shifted=True)
    cfg = _cfg(traffic)
    result = run_check(cfg)
    drifted = set(result.summary["drifted_features"])
    assert {"prompt_length", "token_histogram", "expert_load"} <= drifted
    assert "output_length" not in drifted  # 4 tokens everywhere
    assert result.router_drift and result.input_drift
    paths = write_outputs(cfg, result)
    record = json.loads(paths["json"].read_text())
    assert record["summary"] == result.summary and record["meta"]["current_files"][0].endswith("130000-r.parquet")
    assert "NO DRIFT" not in paths["html"].read_text()
    history = (traffic / "out" / "drift-history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["summary"]["drifted"] is True


def test_same_windows_compared_raise_no_alarm(traffic):
    old, _ = _windows(traffic, shifted=False)
    result = run_check(_cfg(traffic, reference={"paths": [old]}, features=["prompt_length", "expert_load"]))
    assert set(result.summary["features"]) == {"prompt_length", "expert_load"}
    # Same load shares; lengths drawn from one distribution (KS / chi2 at alpha 0.05 may not alarm
    # on this seed, checked).
    assert result.summary["features"]["expert_load"]["drifted"] is False


def test_unreadable_window_is_quarantined_with_its_reason(traffic):
    old, _new = _windows(traffic, shifted=False)
    bad = traffic / "traffic" / "window-0000000200000-r.parquet"
    bad.write_bytes(b"not parquet")
    cfg = _cfg(traffic, current={"dir": str(traffic / "traffic"), "latest": 2}, reference={"paths": [old]})
    result = run_check(cfg)  # the newest two are `new` and the bad one; the bad one is skipped
    assert result.meta["current_files"][-1] == str(bad)
    entry = json.loads((traffic / "out" / "quarantine.jsonl").read_text())
    assert entry["path"] == str(bad) and str(bad) in entry["reason"]


def test_manifest_reference_buckets_the_unigram_like_the_serving_app(traffic):
    _, new = _windows(traffic, shifted=False)
    # Tokens 0..9 in 4 buckets: t * 4 // 10 -> [0,0,0,1,1,2,2,2,3,3].
    unigram = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    manifest = {
        "profile": {
            "token_unigram": {"vocab_size": 10, "counts": unigram},
            "doc_length_tokens": {"edges": [0, 16, 32], "counts": [5, 3, 2]},
        }
    }
    ref = manifest_reference(manifest, read_window(new))
    assert ref["token_histogram"].tolist() == [1 + 2 + 3, 4 + 5, 6 + 7 + 8, 9 + 10]
    assert ref["prompt_length_binned"].tolist() == [5, 3, 2]
    manifest["profile"]["token_unigram"]["counts"] = [*unigram, 1]
    with pytest.raises(ValueError, match="not the same tokenizer"):
        manifest_reference(manifest, read_window(new))


def test_manifest_check_bins_prompts_on_the_profile_edges(traffic):
    _windows(traffic, shifted=False)  # prompts of 5..24 tokens
    manifest = {
        "profile": {
            "token_unigram": {"vocab_size": 10, "counts": [1] * 10},
            "doc_length_tokens": {"edges": [0, 16, 32], "counts": [5, 3, 2]},
        }
    }
    (traffic / "ingest").mkdir()
    (traffic / "ingest" / "manifest.json").write_text(json.dumps(manifest))
    result = run_check(_cfg(traffic, reference={"kind": "manifest", "manifest": str(traffic / "ingest")}))
    assert set(result.summary["features"]) == {"token_histogram", "prompt_length_binned"}
    lengths = result.current["prompt_length_binned"]
    assert (
        lengths.sum() == 40
        and lengths[2] == 0
        and lengths[0] == np.sum(read_window(window_files(_cfg(traffic))[1][0]).features["prompt_length"] < 16)
    )


def test_pipeline_exit_codes(traffic, capsys):
    from pipelines.drift import main

    _windows(traffic, shifted=True)
    config = traffic / "drift.yaml"
    config.write_text(
        f"current: {{dir: {traffic / 'traffic'}}}\noutput_dir: {traffic / 'out'}\npublish_metrics: false\n"
    )
    assert main(["--config", str(config)]) == 3
    assert "DRIFT in" in capsys.readouterr().out
    # A config error names the key, exits 2 and writes nothing.
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), f"output_dir={traffic / 'other'}", "current.latest=0"])
    assert exit_info.value.code == 2
    assert "current.latest" in capsys.readouterr().err and not (traffic / "other").exists()
    # Data that cannot be compared (another tokenizer's manifest): one line, exit 2.
    (traffic / "ingest").mkdir()
    (traffic / "ingest" / "manifest.json").write_text(
        json.dumps(
            {
                "profile": {
                    "token_unigram": {"vocab_size": 3, "counts": [1, 1, 1]},
                    "doc_length_tokens": {"edges": [0, 16], "counts": [1, 1]},
                }
            }
        )
    )
    assert (
        main(
            [
                "--config",
                str(config),
                f"output_dir={traffic / 'third'}",
                "reference.kind=manifest",
                f"reference.manifest={traffic / 'ingest'}",
            ]
        )
        == 2
    )
    assert "not the same tokenizer" in capsys.readouterr().err
