"""`python -m pipelines.drift` on its debug config, as a user runs it: the serving engine writes a
window of code prompts and one of prose prompts through the serving app's traffic sampler; the
job finds the shift, writes its report, evaluates held-out quality twice and logs the actions it
would take."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pipelines.drift",
        "--config",
        "pipelines/configs/drift.debug.yaml",
        f"output_dir={out}",
        f"current.dir={out / 'traffic'}",
        f"quality.artifact={out / 'model'}",
        f"debug_traffic.dir={out / 'traffic'}",
        f"debug_traffic.artifact={out / 'model'}",
        "quality.max_new_tokens=4",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_debug_config_finds_the_corpus_shift_and_tracks_quality(tmp_path):
    first = _run(tmp_path, "--eval")
    assert first.returncode == 3, first.stderr[-2000:]
    windows = sorted((tmp_path / "traffic").glob("window-*.parquet"))
    assert len(windows) == 2
    record = json.loads((tmp_path / "drift.json").read_text())
    assert record["meta"]["reference_files"] == [str(windows[0])]
    assert record["meta"]["current_files"] == [str(windows[1])]
    # Prose after code: other tokens and other hidden states. (How far the routing moves depends
    # on the random weights: a Jensen-Shannon distance near the 0.1 line, not asserted.)
    drifted = set(record["summary"]["drifted_features"])
    assert {"token_histogram", "embedding"} <= drifted, record["summary"]
    assert "expert_load" in record["summary"]["features"]
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "token_histogram" in html
    # Input drift calls for a fine-tune (logged, not run: actions are off by default).
    actions = [json.loads(line) for line in (tmp_path / "actions.jsonl").read_text().splitlines()]
    assert ("finetune", False) in [(a["action"], a["enabled"]) for a in actions]

    # A second check with --eval: the same artifact, so the second point equals the first.
    second = _run(tmp_path, "--eval")
    assert second.returncode == 3, second.stderr[-2000:]
    points = [json.loads(line) for line in (tmp_path / "quality-history.jsonl").read_text().splitlines()]
    assert len(points) == 2 and points[0]["perplexity"] > 1 and "exact_match" in points[0]
    assert points[1]["perplexity"] == points[0]["perplexity"] and points[1]["decay"] == 1.0
    assert len((tmp_path / "drift-history.jsonl").read_text().splitlines()) == 2
    assert "quality: perplexity" in second.stdout
