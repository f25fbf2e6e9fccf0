"""`python -m pipelines.demo` end to end at reduced size, as a user runs it, then again.

The first run goes through every stage (ingest, train, export, finetune, federated, serve, load,
drift, rebalance, report, dashboards) on its own embedded Ray cluster; each stage's artifact is
checked. The second run, same work_dir and arguments, reuses every stage: nothing is trained,
exported or written again.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from raymoe.demo.runner import ORDER
from tests.integration.local_processes import free_port as _free_port

ROOT = Path(__file__).resolve().parents[2]
TRAIN_STEPS = 20


def _demo(work: Path, port: int) -> subprocess.CompletedProcess:
    args = [
        f"work_dir={work}",
        f"train.overrides=[steps={TRAIN_STEPS}, checkpoint.every_steps=10]",
        # Two steps; no held-out evaluation (the pipelines' own tests cover it).
        "finetune.overrides=[steps=2, eval_path=]",
        "federated.overrides=[rounds=1, local_steps=1, local_batch_size=2, eval_path=]",
        "serve.overrides=[app.ep=2, app.num_cpus=0.25, app.shard_num_cpus=0.5, app.shard_num_threads=1, "
        f"http.port={port}]",
        "load.requests_per_window=4",
        "load.concurrency=2",
        "load.max_tokens=4",
        "max_tokens=4",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--config", "pipelines/configs/demo.debug.yaml", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _mtimes(*paths: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths}


def test_demo_runs_every_stage_then_reuses_them_all(tmp_path):
    work, port = tmp_path / "demo", _free_port()

    # Execute: the first run.
    first = _demo(work, port)

    # Assert: every stage finished, in order, with its one line.
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    done = [line.split(":")[0][2:] for line in first.stdout.splitlines() if line.startswith("✓ ")]
    assert done == ORDER, first.stdout
    # ingest: the manifest of the shards training read.
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert manifest["seq_len"] == 128 and manifest["shards"]
    # train + export: the checkpoint of the last step, exported.
    assert (work / "checkpoints" / f"step-{TRAIN_STEPS:08d}").is_dir()
    exported = json.loads((work / "model" / "raymoe_manifest.json").read_text())
    assert exported["checkpoint"]["step"] == TRAIN_STEPS
    assert json.loads((work / "model" / "config.json").read_text())["n_routed_experts"] == 8
    # finetune and federated: peft adapters of the exported model.
    for adapter in (work / "finetune" / "adapter", work / "federated" / "adapter"):
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert (adapter / "adapter_model.safetensors").is_file()
    # serve + load: the app wrote the clean and the shifted window; the load kept both.
    windows = sorted((work / "load" / "windows").glob("window-*.parquet"))
    assert len(windows) == 2 and len(list((work / "traffic").glob("window-*.parquet"))) >= 2
    # drift: the shifted (newest) window against the clean one, every compared feature scored.
    drift = json.loads((work / "drift" / "drift.json").read_text())
    assert drift["meta"]["reference_files"] == [str(windows[0])]
    assert drift["meta"]["current_files"] == [str(windows[1])]
    features = drift["summary"]["features"]
    assert "token_histogram" in features and "expert_load" in features
    assert all(isinstance(r["score"], float) for f in features.values() for r in f["detectors"].values())
    assert (work / "drift" / "report.html").read_text().startswith("<!DOCTYPE html>")
    # rebalance: a placement of 8 experts + 2 hot copies over 2 workers, from both windows, and the
    # app served with the one it computed.
    placement = json.loads((work / "rebalance" / "placement.json").read_text())
    assert placement["num_workers"] == 2 and placement["num_slots"] == 10
    assert len(placement["source"]["files"]) == 2
    assert sorted(set(placement["serving"]["slot_expert"])) == list(range(8))
    # report and dashboards.
    for png in ("train/loss.png", "train/expert_load.png", "federated/loss.png", "drift/drift_scores.png"):
        assert (work / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    boards = list((work / "dashboards").glob("*.json"))
    assert len(boards) >= 5 and (work / "dashboards" / "provisioning" / "dashboards.yaml").is_file()
    # The closing summary: every path it names exists; peak memory, curl and chat lines printed.
    summary = json.loads((work / "demo-summary.json").read_text())
    for name, shown in summary["paths"].items():
        assert Path(shown.split(" (")[0]).exists(), name
    assert "peak RSS" in first.stdout and "(limit 8 GiB)" in first.stdout
    assert f"curl http://127.0.0.1:{port}/v1/completions" in first.stdout
    assert f"raymoe chat --model {work / 'model'}" in first.stdout
    assert summary["answer"]["prompt"] == "def fibonacci(n):"

    # Execute: the same demo again.
    kept = [
        work / "checkpoints" / f"step-{TRAIN_STEPS:08d}",
        work / "model" / "model.safetensors",
        work / "finetune" / "adapter" / "adapter_model.safetensors",
        work / "federated" / "adapter" / "adapter_model.safetensors",
        *windows,
        work / "drift" / "drift.json",
        work / "rebalance" / "placement.json",
    ]
    before = _mtimes(*kept)
    second = _demo(work, port)

    # Assert: every stage reused, nothing written again, no app started (so no answer).
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    reused = [line.split(":")[0][2:] for line in second.stdout.splitlines() if line.startswith("↺ ")]
    assert reused == ORDER and "✓ " not in second.stdout
    assert _mtimes(*kept) == before
    assert not list((work / "checkpoints").glob(f"step-{TRAIN_STEPS + 1:08d}*"))
    assert json.loads((work / "demo-summary.json").read_text())["answer"] is None
