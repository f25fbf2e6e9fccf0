"""Every user error is caught before Ray starts: exit status 2, one line naming the key, the value and
what was expected, no traceback, nothing started and nothing written.

Each case runs `python -m pipelines.<name>` in a fresh interpreter from an empty working directory
(the shipped configs by absolute path; their relative data paths then name nothing), with
RAY_TMPDIR pointing at a regular file: a pipeline that started Ray would fail to create its
session directory under it, loudly, instead of exiting 2. After each run every file under the
test's directory (working directory, inputs and that file) is exactly as it was.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "pipelines" / "configs"


class Place:
    """The test's directory: `cwd` (empty) and `inputs` (what a case reads), made on demand."""

    def __init__(self, root: Path):
        self.root = root
        self.cwd = root / "cwd"
        self.inputs = root / "inputs"
        self.cwd.mkdir()
        self.inputs.mkdir()
        # Ray's session directory would go under this path; as a file, it cannot.
        self.ray_tmpdir = root / "ray-must-not-start"
        self.ray_tmpdir.write_text("a pipeline started Ray\n")

    def bad_yaml(self) -> Path:
        path = self.inputs / "serve.yaml"
        # Line 3 opens a flow sequence that line 4 never closes.
        path.write_text("app:\n  model_path: m\n  redundant_experts: [1, 2\nhttp: {port: 8000}\n")
        return path

    def ingest_output(self, seq_len: int) -> Path:
        """An ingest output of rows of seq_len + 1 tokens (what pack.seq_len=seq_len writes)."""
        from tests.unit.ingest_output import write_ingest_output

        rows = np.arange(16 * (seq_len + 1), dtype=np.int32).reshape(16, seq_len + 1) % 2048
        return write_ingest_output(self.inputs / f"ingest-{seq_len}", rows)

    def artifact_with_small_vocab(self) -> Path:
        """config.json of a 64-token model beside a byte-level tokenizer of more than 256 tokens."""
        return self._config_only_artifact("small-vocab", vocab_size=64, dim=32, num_layers=1)

    def artifact_config_only(self) -> Path:
        """config.json of a 4-layer d256 model and its tokenizer, no weights (checks read only these)."""
        return self._config_only_artifact("config-only", vocab_size=512, dim=256, num_layers=4)

    def _config_only_artifact(self, name: str, **shape) -> Path:
        from raymoe.data.tokenizer import save_tokenizer, train_tokenizer
        from raymoe.models.hf_config import config_to_hf
        from raymoe.serve.debug_artifact import debug_config

        path = self.inputs / name
        save_tokenizer(train_tokenizer(["def add(a, b):\n    return a + b\n"] * 20, vocab_size=300), path)
        hf = config_to_hf(debug_config(**shape), "MixtralForCausalLM")
        (path / "config.json").write_text(json.dumps(hf))
        return path

    def files(self) -> dict[str, bytes | None]:
        """Every path under the test's directory, with a file's bytes (None for a directory)."""
        return {
            str(p.relative_to(self.root)): p.read_bytes() if p.is_file() else None for p in sorted(self.root.rglob("*"))
        }


def run(place: Place, pipeline: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PYTHONDONTWRITEBYTECODE="1",
        RAY_TMPDIR=str(place.ray_tmpdir),
    )
    return subprocess.run(
        [sys.executable, "-m", f"pipelines.{pipeline}", *args],
        cwd=place.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def config(name: str) -> list[str]:
    return ["--config", str(CONFIGS / f"{name}.debug.yaml")]


# (pipeline, arguments given the Place, what the one line must contain). The expected texts are
# the key, the value as given and what was expected, written from the inputs, not copied from a run.
CASES = {
    # Missing input paths, one per pipeline.
    "ingest-missing-source": (
        "ingest",
        lambda p: [*config("ingest"), "sources=[{name: web, paths: [crawl/web]}]"],
        ["sources[web].paths", "'crawl/web'", "matches no input file"],
    ),
    "train-missing-data": (
        "train",
        lambda p: [*config("train"), f"data.path={p.cwd / 'ingest-typo'}"],
        ["data.path=", "ingest-typo", "does not exist"],
    ),
    "finetune-missing-data": (
        "finetune",
        lambda p: [*config("finetune"), "data.path=records/train.jsonl"],
        ["data.path='records/train.jsonl'", "is not a file"],
    ),
    "finetune-mistyped-base": (
        "finetune",
        lambda p: [*config("finetune"), f"base={p.cwd / 'base-typo'}"],
        ["base=", "base-typo", "no such directory", "expected an HF-format artifact"],
    ),
    "federated-missing-silo-data": (
        "federated",
        lambda p: [*config("federated"), f"eval_path={ROOT / 'data/sft/silos/heldout.jsonl'}"],
        ["silos[0].data_path='data/sft/silos/code/train.jsonl'", "is not a file"],
    ),
    "drift-missing-windows": (
        "drift",
        lambda p: [*config("drift"), f"current.dir={p.cwd / 'traffic'}"],
        ["current.dir=", "traffic", "no such directory"],
    ),
    "rebalance-missing-windows": (
        "rebalance",
        lambda p: [*config("rebalance"), f"windows.dir={p.cwd / 'traffic'}"],
        ["windows.dir", "traffic", "holds no traffic windows"],
    ),
    "serve-missing-lora-dir": (
        "serve",
        lambda p: [*config("serve"), f"app.lora_dir={p.cwd / 'adapters'}"],
        ["app.lora_dir", "adapters", "is not a directory"],
    ),
    # A mistyped model path with the debug config: an error, and no random model written there.
    "serve-mistyped-model-path": (
        "serve",
        lambda p: [*config("serve"), f"app.model_path={p.cwd / 'tiny-moe-typo'}"],
        ["app.model_path=", "tiny-moe-typo", "no such directory", "expected an HF-format artifact"],
    ),
    # Cross-config: train vs ingest sequence length; tokenizer vs artifact vocabulary.
    "train-seq-len-vs-ingest": (
        "train",
        lambda p: [*config("train"), f"data.path={p.ingest_output(256)}", "data.seq_len=128"],
        ["data.seq_len=128", "row_len=257", "pack.seq_len=256"],
    ),
    "demo-seq-len-train-vs-ingest": (
        "demo",
        lambda p: [
            *config("demo"),
            *(f"{s}.config={CONFIGS / f'{s}.debug.yaml'}" for s in ("ingest", "train", "serve")),
            "ingest.overrides=[pack.seq_len=64, "
            f"'sources=[{{name: docs, paths: [{ROOT / 'data/corpus/README.md'}]}}]']",
        ],
        ["train stage data.seq_len=128", "ingest stage pack.seq_len=64"],
    ),
    "serve-tokenizer-vs-artifact": (
        "serve",
        lambda p: [*config("serve"), f"app.model_path={p.artifact_with_small_vocab()}"],
        [
            "app.model_path=",
            "small-vocab",
            "vocab_size=64",
            "expected a tokenizer no larger than the model's vocabulary",
        ],
    ),
    # A shard worker's share of the model against its memory budget, from the artifact's config.
    "serve-memory-budget": (
        "serve",
        lambda p: [
            *config("serve"),
            f"app.model_path={p.artifact_config_only()}",
            "app.ep=2",
            "app.memory_per_worker_gb=0.01",
        ],
        ["layout ep=2", "4 of 8 experts per MoE layer", "memory_per_worker_gb=0.01", "raise ep"],
    ),
    # YAML syntax: the file and the line.
    "malformed-yaml": ("serve", lambda p: ["--config", str(p.bad_yaml())], ["config file '", "serve.yaml' line 4"]),
    # Numeric bounds of the serve and engine config, and resources.
    "serve-num-gpus": ("serve", lambda p: [*config("serve"), "app.num_gpus=-1"], ["app.num_gpus must be >= 0, got -1"]),
    "serve-num-cpus": ("serve", lambda p: [*config("serve"), "app.num_cpus=-1"], ["app.num_cpus must be >= 0, got -1"]),
    "serve-fractional-gpus": (
        "serve",
        lambda p: [*config("serve"), "app.num_gpus=1.5"],
        ["app.num_gpus=1.5", "expected a fraction of one GPU or a whole number"],
    ),
    "engine-num-slots": (
        "serve",
        lambda p: [*config("serve"), "app.engine.num_slots=0"],
        ["app.engine.num_slots must be >= 1, got 0"],
    ),
    "engine-block-size": (
        "serve",
        lambda p: [*config("serve"), "app.engine.block_size=0"],
        ["app.engine.block_size must be >= 1, got 0"],
    ),
    "engine-expert-threads": (
        "serve",
        lambda p: [*config("serve"), "app.engine.expert_threads=0"],
        ["app.engine.expert_threads must be >= 1, got 0"],
    ),
    "autoscaling-delay": (
        "serve",
        lambda p: [*config("serve"), "app.autoscaling.upscale_delay_s=-5"],
        ["app.autoscaling.upscale_delay_s must be >= 0, got -5"],
    ),
    "http-port": (
        "serve",
        lambda p: [*config("serve"), "http.port=70000"],
        ["http.port must be in 1..65535, got 70000"],
    ),
    "train-cpus-per-worker": (
        "train",
        lambda p: [*config("train"), "num_cpus_per_worker=-0.5"],
        ["num_cpus_per_worker must be >= 0, got -0.5"],
    ),
    "federated-fraction-fit": (
        "federated",
        lambda p: [*config("federated"), "strategy.fraction_fit=0"],
        ["strategy.fraction_fit must be in (0, 1], got 0"],
    ),
    # Types, unknown keys, override syntax (and the README's two examples).
    "wrong-type": (
        "serve",
        lambda p: [*config("serve"), "app.engine.num_slots=two"],
        ["app.engine.num_slots: expected an integer, got 'two'"],
    ),
    "unknown-key": (
        "serve",
        lambda p: [*config("serve"), "app.engine.num_slotz=4"],
        ["unknown key app.engine.num_slotz for EngineConfig"],
    ),
    "readme-unknown-key": (
        "train",
        lambda p: [*config("train"), "optim.lrr=0.1"],
        ["unknown key optim.lrr for OptimConfig"],
    ),
    "readme-layout": (
        "train",
        lambda p: [*config("train"), "layout.ep=3"],
        ["layout.ep=3 must divide model.moe.num_experts=8"],
    ),
    "override-without-value": (
        "serve",
        lambda p: [*config("serve"), "app.engine.num_slots"],
        ["override 'app.engine.num_slots': expected key.sub=value"],
    ),
    "override-bad-yaml": (
        "serve",
        lambda p: [*config("serve"), "app.redundant_experts=[1,"],
        ["override 'app.redundant_experts=[1,': the value is not valid YAML"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_and_nothing_starts(tmp_path, case):
    # Prepare
    pipeline, make_args, needles = CASES[case]
    place = Place(tmp_path)
    args = make_args(place)
    before = place.files()
    # Execute
    run_ = run(place, pipeline, *args)
    # Assert: exit 2, one line on stderr naming key and value, no traceback, nothing written.
    assert run_.returncode == 2, run_.stderr[-3000:]
    assert "Traceback" not in run_.stderr and run_.stdout == ""
    lines = run_.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), run_.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0]
    assert place.files() == before


def test_debug_flag_adds_the_traceback(tmp_path):
    place = Place(tmp_path)
    run_ = run(place, "serve", *config("serve"), "--debug", "app.engine.num_slots=0")
    assert run_.returncode == 2
    assert "Traceback (most recent call last)" in run_.stderr and "ConfigError" in run_.stderr
    assert run_.stderr.strip().splitlines()[-1] == "config error: app.engine.num_slots must be >= 1, got 0"
    assert place.files() == {"cwd": None, "inputs": None, "ray-must-not-start": b"a pipeline started Ray\n"}


def test_the_debug_config_writes_its_artifact_where_it_says(tmp_path, monkeypatch):
    # Prepare: the shipped debug config from an empty directory (its debug_artifact is relative).
    import socket

    from pipelines.serve import prepare
    from raymoe.config import load_config
    from raymoe.serve.serve_config import ServeJobConfig

    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(ServeJobConfig, CONFIGS / "serve.debug.yaml", [f"http.port={port}"])
    # Execute
    application, _ = prepare(cfg)
    # Assert: written at the debug path (and nowhere else), and the app was built from it.
    assert cfg.writes_debug_artifact and application is not None
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.iterdir()) == ["artifacts"]
    assert (tmp_path / "artifacts/serve-debug/tiny-moe/config.json").is_file()
