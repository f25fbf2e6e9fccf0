"""LoRA fine-tuning on Ray Train (local test cluster, fractional CPUs).

- ep=2 on two Ray Train workers writes the same adapter as one process holding every expert
  (expert adapters live with their expert's shard and are gathered for the file);
- bad records are quarantined with their reason and line before training, the rest train;
- the pipeline refuses user errors with exit code 2, one line naming the key, nothing written.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from raymoe.config import from_dict
from raymoe.serve.debug_artifact import make_debug_artifact
from raymoe.train.finetune import run_finetune
from raymoe.train.finetune_config import FinetuneConfig
from raymoe.train.finetune_worker import run_finetune_worker

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "data" / "sft" / "function_qa" / "train.jsonl"
BAD_LINES = [
    '{"messages": [{"role": "user", "content": "hi"}]',
    '{"prompt": "q"}',
    '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
]


def _cfg(tmp_path, base, name, data, **over):
    return from_dict(
        FinetuneConfig,
        {
            "name": name,
            "base": str(base),
            "data": {"path": str(data), "max_seq_len": 256},
            "steps": 3,
            "global_batch_size": 4,
            "seed": 5,
            "output_dir": str(tmp_path / name),
            "lora": {"rank": 4, "alpha": 8, "routed_experts": True},
            "layout": {"ep": 2, "dp": 1},
            "optim": {"lr": 3e-3, "warmup_steps": 0},
            "num_cpus_per_worker": 0.5,
            "storage_path": str(tmp_path / "ray"),
            **over,
        },
    )


def test_ep2_adapter_equals_single_process_and_bad_records_are_quarantined(ray_cluster, tmp_path):
    # Prepare: a small artifact, 40 good records with 3 bad ones among them.
    base = tmp_path / "base"
    lines = TASK.read_text().splitlines()[:40]
    make_debug_artifact(base, seed=1, vocab_size=512, corpus=lines, dim=64, num_layers=2, max_seq_len=256)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines[:10] + BAD_LINES + lines[10:]) + "\n")
    # Execute
    summary = run_finetune(_cfg(tmp_path, base, "ep2", data))
    torch.set_num_threads(1)
    run_finetune_worker(_cfg(tmp_path, base, "single", data, layout={"ep": 1, "dp": 1}))
    # Assert: the same adapter, with every expert's pair present, from both layouts.
    ep2 = load_file(str(tmp_path / "ep2" / "adapter" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert set(ep2) == set(single)
    assert sum(".experts." in k for k in ep2) == 2 * 8 * 3 * 2  # layers x experts x matrices x (A, B)
    # Summation order differs between the layouts. Adam divides each update by sqrt(v) + 1e-8,
    # so an element whose gradient is within rounding of zero moves by an amount that depends on
    # its last bits: atol 5e-5 is 1.7% of one lr step (3e-3); everything else agrees to 1e-4.
    for key in single:
        torch.testing.assert_close(ep2[key], single[key], rtol=1e-4, atol=5e-5)
    assert summary["data"] == {
        "examples": 40,
        "quarantined": {"bad_json": 1, "bad_role": 1, "missing_field": 1},
        "answer_tokens": summary["data"]["answer_tokens"],
    }
    quarantine_file = tmp_path / "ep2" / "quarantine" / "quarantine.jsonl"
    quarantine = [json.loads(x) for x in quarantine_file.read_text().splitlines()]
    assert sorted((q["location"].rsplit(":", 1)[1], q["reason"]) for q in quarantine) == [
        ("11", "bad_json"),
        ("12", "missing_field"),
        ("13", "bad_role"),
    ]
    config = json.loads((tmp_path / "ep2" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


def test_pipeline_refuses_user_errors_before_anything_starts(tmp_path):
    out = tmp_path / "out"
    cases = [
        (["base=" + str(tmp_path / "missing")], "base="),
        (["lora.rank=0"], "lora.rank"),
        (["data.path=" + str(tmp_path / "none.jsonl")], "data.path="),
        (["layout.ep=3"], "layout"),
        (["strange_key=1"], "strange_key"),
    ]
    for overrides, key in cases:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines.finetune",
                "--config",
                "pipelines/configs/finetune.debug.yaml",
                f"output_dir={out}",
                *overrides,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2, (overrides, run.stderr)
        assert key in run.stderr and "Traceback" not in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
        assert not out.exists()
