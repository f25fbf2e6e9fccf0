"""The `raymoe` command: pipeline verbs, --version, inspect, config show, chat."""

import dataclasses
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import yaml

from raymoe.cli import build_parser, main
from raymoe.cli_chat import LocalBackend, RemoteBackend, chat_loop
from raymoe.cli_pipelines import PIPELINES, config_class
from raymoe.config import from_dict, to_dict
from tests.unit.ingest_output import write_ingest_output

REPO = Path(__file__).resolve().parents[2]
PIPELINE_VERBS = ["ingest", "train", "finetune", "federated", "drift", "rebalance", "serve"]
OTHER_VERBS = [
    "demo",
    "export",
    "merge",
    "inspect",
    "config",
    "chat",
    "plan",
    "manifests",
    "deploy",
    "dashboards",
    "report",
]


def _raymoe_command() -> list[str]:
    script = Path(sys.executable).parent / "raymoe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "raymoe.cli"]


# --- verbs and help -------------------------------------------------------------------------------


def test_help_lists_every_verb():
    text = build_parser().format_help()
    listed = {
        line.split()[0]
        for line in text.split("verbs:")[1].split("examples:")[0].splitlines()[2:]
        if line.startswith("    ") and line.split()
    }
    assert listed >= set(PIPELINE_VERBS) | set(OTHER_VERBS)
    # For users: no notes on how to add a verb.
    assert "Adding a verb" not in text and "COMMANDS" not in text


@pytest.mark.parametrize("name", [*PIPELINE_VERBS, "demo"])
def test_pipeline_verb_help_is_the_pipelines_own(name, capsys):
    with pytest.raises(SystemExit) as direct:
        importlib.import_module(f"pipelines.{name}").main(["--help"])
    expected = capsys.readouterr().out
    with pytest.raises(SystemExit) as via_cli:
        main([name, "--help"])
    assert direct.value.code == via_cli.value.code == 0
    # The same help under the name it was invoked by (the usage lines wrap to that name).
    got = capsys.readouterr().out
    assert expected.startswith(f"usage: python -m pipelines.{name} ")
    assert got.startswith(f"usage: raymoe {name} ") and "pipelines" not in got.split("\n\n")[0]
    assert got.split("\n\n", 1)[1] == expected.split("\n\n", 1)[1]


def test_bad_override_exits_2_from_any_directory_as_the_pipeline_does(tmp_path):
    # Prepare: a working directory outside the repository (no pipelines/ to import from there).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    shipped = "pipelines/configs/train.debug.yaml"
    # Execute
    direct = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--config", str(REPO / shipped), "bogus.key=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    via_cli = subprocess.run(
        [*_raymoe_command(), "train", "--config", shipped, "bogus.key=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Assert: the same error line and status; the CLI said which shipped file it used.
    assert direct.returncode == via_cli.returncode == 2
    error = "config error: unknown key bogus for TrainConfig"
    assert direct.stderr.startswith(error)
    assert error in via_cli.stderr and "using the shipped" in via_cli.stderr


def test_shipped_config_names_resolve_only_when_no_such_file_is_here(tmp_path, monkeypatch):
    from raymoe.cli_pipelines import resolve_config_args

    monkeypatch.chdir(tmp_path)
    shipped = str(REPO / "pipelines" / "configs" / "serve.debug.yaml")
    assert resolve_config_args(["--config", "serve.debug.yaml", "a.b=1"]) == ["--config", shipped, "a.b=1"]
    assert resolve_config_args(["--config=pipelines/configs/serve.debug.yaml"]) == [f"--config={shipped}"]
    # A file of that name here wins; unknown names and other directories are left for the pipeline.
    (tmp_path / "serve.debug.yaml").write_text("app: {model_path: x}\n")
    assert resolve_config_args(["--config", "serve.debug.yaml"]) == ["--config", "serve.debug.yaml"]
    assert resolve_config_args(["--config", "nope.yaml"]) == ["--config", "nope.yaml"]
    assert resolve_config_args(["--config", "elsewhere/train.debug.yaml"]) == ["--config", "elsewhere/train.debug.yaml"]


def test_version_is_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"raymoe {importlib.metadata.version('raymoe')}"


# --- inspect -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An ingest output, a 2-step checkpoint root (steps 1 and 2) and its exported artifact."""
    from raymoe.train.config import TrainConfig
    from raymoe.train.export import export_checkpoint
    from raymoe.train.worker import run_worker

    root = tmp_path_factory.mktemp("trained")
    rows = np.random.default_rng(3).integers(3, 2048, size=(32, 33))
    data = write_ingest_output(root / "data", rows, rows_per_shard=16)
    cfg = from_dict(
        TrainConfig,
        {
            "flavour": "debug",
            "steps": 2,
            "seed": 1,
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "data": {"path": str(data), "seq_len": 32, "global_batch_size": 4},
            "checkpoint": {"uri": str(root / "ckpt"), "every_steps": 1},
        },
    )
    # The data lineage a training run records (the Ray driver adds it in run_training).
    summary = run_worker(cfg, extra_manifest={"data": {"manifest": str(data / "manifest.json"), "tokenizer_dir": ""}})
    export_checkpoint(str(root / "ckpt"), str(root / "artifact"))
    return {"root": root, "data": data, "cfg": cfg, "losses": summary.losses}


def _inspect_json(path, capsys) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _num_params(model_cfg) -> int:
    import torch

    from raymoe.models import MoETransformer

    with torch.device("meta"):
        return sum(p.numel() for p in MoETransformer(model_cfg).parameters())


def test_inspect_checkpoint_root_and_step(trained, capsys):
    root = trained["root"]
    info = _inspect_json(root / "ckpt", capsys)
    assert info["kind"] == "checkpoint root" and info["steps"] == [1, 2] and info["step"] == 2
    assert info["layout"] == {"ep": 1, "dp": 1}
    assert info["loss"] == pytest.approx(trained["losses"][1])
    assert info["model"]["params"] == _num_params(trained["cfg"].model_config())
    assert info["lineage"]["data"]["manifest"] == str(trained["data"] / "manifest.json")
    assert info["lineage"]["data"]["shards"] == 2 and info["lineage"]["data"]["tokens"] == 32 * 33
    step1 = _inspect_json(root / "ckpt" / "step-00000001", capsys)
    assert step1["kind"] == "checkpoint" and step1["step"] == 1
    assert step1["loss"] == pytest.approx(trained["losses"][0])
    # The text form names the same facts.
    assert main(["inspect", str(root / "ckpt")]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^step +2 \(data position 2\)$", text, re.M) and re.search(r"^layout +ep=1 x dp=1$", text, re.M)
    assert re.search(rf"^loss +{trained['losses'][1]:.4f}$", text, re.M)


def test_inspect_exported_artifact_links_checkpoint_and_data(trained, capsys):
    artifact = trained["root"] / "artifact"
    info = _inspect_json(artifact, capsys)
    assert info["kind"] == "artifact" and info["step"] == 2 and info["layout"] == {"ep": 1, "dp": 1}
    assert info["loss"] == pytest.approx(trained["losses"][1])
    assert info["lineage"]["checkpoint"] == {"path": str(trained["root"] / "ckpt" / "step-00000002"), "exists": True}
    assert info["lineage"]["data"]["manifest"] == str(trained["data"] / "manifest.json")
    weights = (artifact / "model.safetensors").read_bytes()
    assert info["files"]["model.safetensors"] == "sha256:" + hashlib.sha256(weights).hexdigest()
    assert info["model"]["params"] == _num_params(trained["cfg"].model_config())
    # The manifest file itself is accepted too.
    assert _inspect_json(artifact / "raymoe_manifest.json", capsys)["step"] == 2


def test_inspect_ingest_output(trained, capsys):
    info = _inspect_json(trained["data"], capsys)
    assert info["kind"] == "ingest output" and info["seq_len"] == 32
    assert info["splits"] == {"train": {"shards": 2, "rows": 32, "tokens": 32 * 33}}
    assert set(info["files"]) == {"shards/train-00000.parquet", "shards/train-00001.parquet"}


def test_inspect_debug_artifact_and_adapter(tmp_path, capsys):
    import torch

    from raymoe.models import read_hf_config
    from raymoe.models.lora import LoRAConfig, write_peft_adapter
    from raymoe.serve.debug_artifact import make_debug_artifact

    make_debug_artifact(tmp_path / "base", vocab_size=300)
    info = _inspect_json(tmp_path / "base", capsys)
    assert info["kind"] == "artifact" and info["architecture"] == "MixtralForCausalLM"
    assert info["model"]["params"] == _num_params(read_hf_config(tmp_path / "base")[0])
    assert info["model"]["num_experts"] == 8 and info["model"]["top_k"] == 2
    # An adapter written by a fine-tuning run, with the run's metrics.json beside it.
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{key}.lora_A.weight": torch.zeros(4, 128), f"{key}.lora_B.weight": torch.zeros(128, 4)}
    adapter = write_peft_adapter(
        tmp_path / "run" / "adapter",
        LoRAConfig(rank=4, alpha=8.0),
        tensors,
        extra_config={"base_model_name_or_path": str(tmp_path / "base")},
    )
    (tmp_path / "run" / "metrics.json").write_text(
        json.dumps({"adapter": str(adapter), "data": {"examples": 10}, "train": {"final_loss": 1.25}})
    )
    info = _inspect_json(adapter, capsys)
    assert info["kind"] == "adapter" and info["loss"] == 1.25
    assert info["adapter"] == {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"]}
    assert info["lineage"]["base"] == str(tmp_path / "base")
    # The adapter folded into the base: the merged artifact names both and the adapter's checksum.
    assert main(["merge", str(tmp_path / "base"), str(adapter), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    info = _inspect_json(tmp_path / "merged", capsys)
    adapter_bytes = (adapter / "adapter_model.safetensors").read_bytes()
    assert info["kind"] == "merged artifact"
    assert info["lineage"]["merged"]["base"] == str(tmp_path / "base")
    assert info["lineage"]["merged"]["adapter_sha256"] == "sha256:" + hashlib.sha256(adapter_bytes).hexdigest()
    assert info["lineage"]["merged"]["scaling"] == 8.0 / 4


def test_inspect_unknown_path_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("raymoe inspect: ") and err.count("\n") == 1


def test_inspect_verify_names_a_corrupt_file(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(trained["root"] / "artifact", copy)
    assert main(["inspect", str(copy), "--verify"]) == 0
    assert "verified:" in capsys.readouterr().out
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert main(["inspect", str(copy), "--verify"]) == 1
    assert "model.safetensors: checksum mismatch" in capsys.readouterr().err


# --- config show ---------------------------------------------------------------------------------


def _show_json(pipeline, capsys) -> dict[str, dict]:
    assert main(["config", "show", pipeline, "--json"]) == 0
    return {row["key"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}


def test_config_show_train_lists_every_field_with_its_default(capsys):
    from raymoe.train.config import TrainConfig

    keys = _show_json("train", capsys)

    def check(cls, prefix):
        for f in dataclasses.fields(cls):
            row = keys[prefix + f.name]
            if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
                continue
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                assert row["required"], row
            elif row["section"]:
                check(type(f.default_factory()), prefix + f.name + ".")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert not row["required"] and row["default"] == to_dict(default), row

    check(TrainConfig, "")
    assert keys["data.path"]["required"] and keys["checkpoint.uri"]["required"] and keys["steps"]["required"]
    assert keys["layout.ep"]["default"] == 1 and keys["layout.ep"]["type"] == "int"
    # Help comes from the comment above the field; a field without one gets none.
    assert keys["steps"]["help"].startswith("Optimizer steps in the whole run")
    assert keys["seed"]["help"] == ""


def test_config_show_takes_defaults_a_parent_sets(capsys):
    from raymoe.train.finetune_config import FinetuneConfig

    optim = next(f for f in dataclasses.fields(FinetuneConfig) if f.name == "optim").default_factory()
    assert _show_json("finetune", capsys)["optim.lr"]["default"] == optim.lr


def test_config_show_yaml_skeleton_loads_once_required_keys_are_filled(capsys):
    from raymoe.train.config import TrainConfig

    assert main(["config", "show", "train", "--yaml"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data == {"data": {"path": None}, "checkpoint": {"uri": None}, "steps": None}
    data.update(data={"path": "d"}, checkpoint={"uri": "c"}, steps=3)
    assert to_dict(from_dict(TrainConfig, data)) == to_dict(
        from_dict(TrainConfig, {"data": {"path": "d"}, "checkpoint": {"uri": "c"}, "steps": 3})
    )


def test_config_show_reads_docstring_attributes_and_trailing_comments():
    from raymoe.cli_config_show import REQUIRED, config_keys

    keys = {k.key: k for k in config_keys(_Documented)}
    assert keys["rate"].help == "Requests per second, summed over replicas."
    assert keys["name"].help == "Who runs it."
    assert keys["width"].help == "0 = auto"
    assert keys["plain"].help == ""
    assert keys["name"].default is REQUIRED and keys["rate"].default == 1.5


@dataclasses.dataclass(kw_only=True)
class _Documented:
    """A config documented the Google way.

    Attributes:
        rate: Requests per second,
            summed over replicas.
        width: overridden by the comment on the field's line.
    """

    # Who runs it.
    name: str
    rate: float = 1.5
    width: int = 0  # 0 = auto
    plain: bool = False


@pytest.mark.parametrize("name", list(PIPELINES))
def test_config_show_class_is_the_one_the_pipeline_reads(name, capsys):
    cls = config_class(name)
    assert getattr(importlib.import_module(f"pipelines.{name}"), cls.__name__) is cls
    assert main(["config", "show", name]) == 0
    assert capsys.readouterr().out.startswith(f"{cls.__name__}: ")
    # The skeleton is YAML whose open keys are the required ones (null until filled in).
    assert main(["config", "show", name, "--yaml"]) == 0
    skeleton = yaml.safe_load(capsys.readouterr().out) or {}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    assert set(skeleton) == required


# --- chat ----------------------------------------------------------------------------------------


def test_chat_with_an_artifact_gives_the_engines_greedy_reply(tmp_path, monkeypatch, capsys):
    from raymoe.data.chat_tokenizer import ChatTokenizer
    from raymoe.models import load_hf
    from raymoe.serve.debug_artifact import make_debug_artifact
    from raymoe.serve.engine import generate_alone
    from raymoe.serve.request import SamplingParams

    # Prepare: a tiny artifact and the engine's own greedy continuation of the same chat prompt,
    # in fp32 (the reference's dtype; `auto` is bf16 on CPUs with AMX).
    path = make_debug_artifact(tmp_path / "m", vocab_size=300)
    tok = ChatTokenizer.from_dir(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=tok.stop_token_ids)
    ids = generate_alone(load_hf(path), tok.encode_chat(messages), params)
    expected = tok.decode([i for i in ids if i not in tok.stop_token_ids])
    # Execute: scripted stdin through the console entry, then end of input.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello world!\n"))
    assert (
        main(
            [
                "chat",
                "--model",
                str(path),
                "--dtype",
                "fp32",
                "--temperature",
                "0",
                "--max-tokens",
                "12",
                "--system",
                "Be brief.",
            ]
        )
        == 0
    )
    # Assert
    assert capsys.readouterr().out == expected + "\n"


def test_chat_keeps_the_conversation_and_stops_at_exit(tmp_path):
    from raymoe.serve.debug_artifact import make_debug_artifact

    backend = LocalBackend(str(make_debug_artifact(tmp_path / "m", vocab_size=300)), max_tokens=4, temperature=0)
    seen = []
    reply = backend.reply
    backend.reply = lambda messages: (seen.append([dict(m) for m in messages]), reply(messages))[1]
    out = io.StringIO()
    assert chat_loop(backend, io.StringIO("one\n\ntwo\n/exit\nthree\n"), out) == 0
    first, _second = out.getvalue().split("\n")[:2]
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][1]["content"] == first and seen[1][2]["content"] == "two"
    assert len(seen) == 2  # "three" came after /exit


class _FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/models and a streamed /v1/chat/completions, as the serving app answers them."""

    requests: ClassVar[list[dict]] = []  # every handler instance appends here

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "tiny-moe", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"body": body, "auth": self.headers.get("Authorization")})
        if body["messages"][-1]["content"] == "fail":
            self._json(400, {"error": {"message": "messages: too long", "type": "invalid_request_error"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        deltas = [
            {"role": "assistant", "content": ""},
            {"content": "Hel"},
            {"content": "lo, "},
            {"content": "wörld"},
            {},
        ]
        for delta in deltas:
            chunk = {
                "object": "chat.completion.chunk",
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": None if delta else "stop"}],
            }
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, status, data):
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def openai_server():
    _FakeOpenAI.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_chat_against_a_url_prints_the_streamed_text(openai_server, monkeypatch, capsys):
    monkeypatch.setenv("RAYMOE_API_KEY", "sk-test")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nfail\nagain\n"))
    assert main(["chat", "--url", openai_server + "/v1", "--max-tokens", "5", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello, wörld\nHello, wörld\n"
    assert "HTTP 400: messages: too long" in captured.err
    first, _failed, third = _FakeOpenAI.requests
    assert first["auth"] == "Bearer sk-test"
    assert first["body"] == {
        "model": "tiny-moe",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 5,
        "temperature": 0.0,
    }
    # The failed turn is not part of the conversation; the answered one is.
    assert [m["content"] for m in third["body"]["messages"]] == ["hi", "Hello, wörld", "again"]


def test_chat_with_an_unreachable_url_is_a_clear_error(capsys):
    backend_error = None
    try:
        RemoteBackend("http://127.0.0.1:9", timeout_s=5)
    except Exception as exc:  # noqa: BLE001 - the type is what is checked
        backend_error = exc
    assert type(backend_error).__name__ == "ChatError" and "cannot reach http://127.0.0.1:9" in str(backend_error)
    assert main(["chat", "--url", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err.startswith("raymoe chat: cannot reach")
