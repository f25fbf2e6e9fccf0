"""The storage root (raymoe.storage): how paths resolve, that every path key of every job config is
classified, and that each pipeline ends with `wrote <what>: <absolute path>` lines.

Pipelines run in-process here with their expensive parts (Ray, training, serving) replaced by
fakes: what is tested is the config flow (load -> resolve -> checks) and the printed locations.
"""

import dataclasses
import os
import re
import types
import typing
from pathlib import Path

import numpy as np
import pytest

from raymoe import storage
from raymoe.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "pipelines" / "configs"
# Field names that hold a filesystem location (the classification must cover every one of them).
PATH_SUFFIXES = ("path", "paths", "dir", "uri", "artifact", "base", "manifest", "adapter", "file")
WROTE = re.compile(r"^wrote (.+?): (.+)$", re.M)


def job_config_classes() -> list[type]:
    from raymoe.data.ingest_config import IngestConfig
    from raymoe.demo.config import DemoConfig
    from raymoe.deploy.rebalance_config import RebalanceJobConfig
    from raymoe.federated.config import FederatedConfig
    from raymoe.monitor.drift_job_config import DriftJobConfig
    from raymoe.serve.serve_config import ServeJobConfig
    from raymoe.train.config import TrainConfig
    from raymoe.train.finetune_config import FinetuneConfig

    return [
        IngestConfig,
        TrainConfig,
        FinetuneConfig,
        FederatedConfig,
        ServeJobConfig,
        DriftJobConfig,
        RebalanceJobConfig,
        DemoConfig,
    ]


def string_fields(cls: typing.Any, prefix: str = "") -> dict[str, str]:
    """{dotted key: field name} of every str / list[str] field, through nested and optional
    dataclasses and lists of dataclasses (`key[]`)."""
    found = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(tp):
            found.update(string_fields(tp, f"{key}."))
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            found.update(string_fields(typing.get_args(tp)[0], f"{key}[]."))
        elif tp is str or tp == list[str]:
            found[key] = field.name
    return found


def wrote(out: str) -> dict[str, str]:
    return dict(WROTE.findall(out))


# ---- resolution rules ----


def test_relative_paths_join_the_root_and_absolute_paths_and_uris_stay():
    # Prepare: a local root and an object-store root.
    local, remote = "/data/raymoe", "s3://bucket/raymoe"

    # Execute / Assert: hand-written expectations for each kind of value.
    assert storage.resolve("runs/train/ckpt", local) == "/data/raymoe/runs/train/ckpt"
    assert storage.resolve("./runs/../runs/x", local) == "/data/raymoe/runs/x"
    assert storage.resolve("/mnt/ckpt", local) == "/mnt/ckpt"
    assert storage.resolve("gs://b/ckpt", local) == "gs://b/ckpt"
    assert storage.resolve("file:///mnt/x%20y", local) == "/mnt/x y"
    assert storage.resolve("", local) == ""
    assert storage.resolve("runs/train/ckpt", remote) == "s3://bucket/raymoe/runs/train/ckpt"
    assert storage.resolve("/mnt/ckpt", remote) == "/mnt/ckpt"


def test_root_comes_from_the_option_then_the_environment_then_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(storage.STORAGE_ROOT_ENV, raising=False)
    assert storage.choose_root() == (str(tmp_path), "working directory")

    monkeypatch.setenv(storage.STORAGE_ROOT_ENV, "s3://bucket/prefix/")
    assert storage.choose_root() == ("s3://bucket/prefix", storage.STORAGE_ROOT_ENV)

    # A relative root is made absolute; the option wins over the environment.
    assert storage.choose_root("out") == (str(tmp_path / "out"), "--storage-root")
    assert storage.choose_root("file:///srv/raymoe") == ("/srv/raymoe", "--storage-root")


@pytest.mark.parametrize(
    "inside",
    ["session_2026-01-01_00-00-00_1/runtime_resources/working_dir_files/_ray_pkg_ab", "raytmp/ray/session_latest"],
)
def test_inside_a_ray_temporary_folder_the_default_root_is_in_home(tmp_path, monkeypatch, inside):
    # Prepare: Ray's unpacked working directory (any --temp-dir), or a folder under $RAY_TMPDIR/ray.
    cwd = tmp_path / "temp" / inside
    cwd.mkdir(parents=True)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "temp" / "raytmp"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(storage.STORAGE_ROOT_ENV, raising=False)
    monkeypatch.chdir(cwd)

    # Execute
    root, source = storage.choose_root()

    # Assert
    assert (root, source) == (str(tmp_path / "home" / "raymoe"), "default")
    assert not storage.inside_ray_temp(root)


def test_a_root_given_inside_rays_temporary_copy_is_refused(tmp_path, monkeypatch):
    cwd = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)

    with pytest.raises(ConfigError, match=r"--storage-root='out' is inside Ray's temporary folder"):
        storage.choose_root("out")


def test_storage_keys_resolve_and_working_directory_inputs_stay():
    # Prepare
    from raymoe.train.finetune_config import FinetuneConfig

    cfg = load_config(FinetuneConfig, CONFIGS / "finetune.debug.yaml")

    # Execute
    out = storage.resolve_config(cfg, "/srv/r")

    # Assert: outputs and the base artifact under the root; the shipped records as they were.
    assert (out.base, out.debug_base, out.output_dir, out.storage_path) == (
        "/srv/r/runs/finetune-debug/base",
        "/srv/r/runs/finetune-debug/base",
        "/srv/r/runs/finetune-debug",
        "/srv/r/runs/ray-train",
    )
    assert (out.data.path, out.eval_path) == ("data/sft/function_qa/train.jsonl", "data/sft/function_qa/heldout.jsonl")
    assert out.writes_debug_base
    assert cfg.output_dir == "runs/finetune-debug"  # the loaded config is not changed


def test_lists_and_optional_sections_resolve():
    from raymoe.monitor.drift_job_config import DriftJobConfig

    cfg = load_config(DriftJobConfig, CONFIGS / "drift.debug.yaml", ["reference.paths=[w/a.parquet, /abs/b.parquet]"])
    out = storage.resolve_config(cfg, "/srv/r")
    assert out.reference.paths == ["/srv/r/w/a.parquet", "/abs/b.parquet"]
    assert (out.debug_traffic.dir, out.current.dir) == ("/srv/r/runs/drift-debug/traffic",) * 2

    none = storage.resolve_config(
        load_config(DriftJobConfig, CONFIGS / "drift.debug.yaml", ["debug_traffic=null"]), "/srv/r"
    )
    assert none.debug_traffic is None


def test_a_uri_root_reaches_the_checkpoints_and_a_local_only_key_refuses_it():
    from raymoe.data.ingest_config import IngestConfig
    from raymoe.train.config import TrainConfig

    train = load_config(TrainConfig, CONFIGS / "train.debug.yaml", ["data.path=/mnt/ingest", "history_path="])
    out = storage.resolve_config(train, "s3://bucket/r")
    assert (out.checkpoint.uri, out.storage_path) == (
        "s3://bucket/r/runs/train-debug/checkpoints",
        "s3://bucket/r/runs/ray-train",
    )
    assert out.data.path == "/mnt/ingest"

    ingest = load_config(IngestConfig, CONFIGS / "ingest.debug.yaml")
    with pytest.raises(
        ConfigError,
        match=r"^output_dir='s3://bucket/r/runs/ingest/debug': this job reads and "
        r"writes output_dir with local file APIs only",
    ):
        storage.resolve_config(ingest, "s3://bucket/r")


# ---- every path key is classified ----


def test_every_path_key_of_every_job_config_is_storage_or_a_working_directory_input():
    for cls in job_config_classes():
        name = cls.__name__
        fields = string_fields(cls)
        store, local = set(storage.STORAGE_KEYS[name]), set(storage.WORKING_DIR_KEYS[name])
        path_keys = {key for key, field in fields.items() if field.endswith(PATH_SUFFIXES)}
        unclassified = path_keys - store - local
        assert not unclassified, (
            f"{name}: {sorted(unclassified)} neither in raymoe.storage.STORAGE_KEYS "
            "nor in WORKING_DIR_KEYS; add each to one of them"
        )
        assert store.isdisjoint(local), f"{name}: {sorted(store & local)} in both tables"
        stale = (store | local) - set(fields)
        assert not stale, f"{name}: {sorted(stale)} name no str field"
        assert set(storage.URI_KEYS.get(name, ())) <= store
    assert set(storage.STORAGE_KEYS) == set(storage.WORKING_DIR_KEYS) == {c.__name__ for c in job_config_classes()}


# ---- each pipeline prints where it wrote ----


@pytest.fixture
def repo_cwd(monkeypatch):
    """The repo as the working directory (shipped inputs found), no storage root in the env."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(storage.STORAGE_ROOT_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_ingest_prints_its_output_and_manifest(tmp_path, monkeypatch, capsys, repo_cwd):
    import pipelines.ingest as job

    monkeypatch.setattr(job, "init_ray", lambda **_: None)
    manifest = {"shards": [{}, {}], "seq_len": 256, "counts": {"quarantined_total": 3}}
    monkeypatch.setattr(job, "run_ingest", lambda cfg: manifest)

    assert job.main(["--config", str(CONFIGS / "ingest.debug.yaml"), "--storage-root", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    assert "✓ ingest: 2 shards of 256-token rows, 3 records quarantined (" in out
    assert wrote(out) == {
        "ingest output": f"{tmp_path}/runs/ingest/debug",
        "manifest": f"{tmp_path}/runs/ingest/debug/manifest.json",
    }


def test_train_checks_the_resolved_data_path_before_ray(tmp_path, monkeypatch, capsys, repo_cwd):
    import pipelines.train as job

    monkeypatch.setenv(storage.STORAGE_ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(job, "init_ray", lambda: pytest.fail("Ray started before the checks"))

    with pytest.raises(SystemExit) as exit_:
        job.main(["--config", str(CONFIGS / "train.debug.yaml")])

    assert exit_.value.code == 2
    assert f"data.path='{tmp_path}/runs/ingest/debug-128' does not exist" in capsys.readouterr().err


def test_train_prints_checkpoints_and_history(tmp_path, monkeypatch, capsys, repo_cwd):
    import pipelines.train as job
    import raymoe.train.loop as loop

    def fake_training(cfg):
        Path(cfg.history_path).parent.mkdir(parents=True)
        Path(cfg.history_path).write_text("{}\n")
        return types.SimpleNamespace(error=None, metrics={"step": 2, "loss": 1.0})

    monkeypatch.setattr(job, "check_before_launch", lambda cfg: None)
    monkeypatch.setattr(job, "init_ray", lambda: None)
    monkeypatch.setattr(loop, "run_training", fake_training)

    assert job.main(["--config", str(CONFIGS / "train.debug.yaml"), "--storage-root", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    assert "✓ train: step 2, loss 1.0000, ep=2 x dp=1 (" in out
    assert wrote(out) == {
        "checkpoints": f"{tmp_path}/runs/train-debug/checkpoints",
        "history": f"{tmp_path}/runs/train-debug/train-history.jsonl",
    }


def test_a_failed_training_run_says_so_in_one_line_and_exits_1(tmp_path, monkeypatch, capsys, repo_cwd):
    import pipelines.train as job
    import raymoe.train.loop as loop

    monkeypatch.setattr(job, "check_before_launch", lambda cfg: None)
    monkeypatch.setattr(job, "init_ray", lambda: None)
    monkeypatch.setattr(loop, "run_training", lambda cfg: types.SimpleNamespace(error="worker 1 died", metrics=None))

    assert job.main(["--config", str(CONFIGS / "train.debug.yaml"), "--storage-root", str(tmp_path)]) == 1

    captured = capsys.readouterr()
    assert captured.err.startswith("✗ train failed after ") and "training failed: worker 1 died" in captured.err
    assert "Traceback" not in captured.err and "wrote " not in captured.out


def test_finetune_prints_the_debug_base_adapter_and_metrics(tmp_path, monkeypatch, capsys, repo_cwd):
    import pipelines.finetune as job
    import raymoe.train.finetune as finetune

    monkeypatch.setattr(job, "check_before_launch", lambda cfg: None)
    monkeypatch.setattr(job, "init_ray", lambda: None)
    monkeypatch.setattr(finetune, "make_debug_base", lambda cfg: None)
    monkeypatch.setattr(finetune, "prepare_data", lambda cfg: {"examples": 8})
    monkeypatch.setattr(finetune, "run_finetune", lambda cfg, data: {"adapter": cfg.adapter_dir})

    assert job.main(["--config", str(CONFIGS / "finetune.debug.yaml"), "--storage-root", str(tmp_path)]) == 0

    run = f"{tmp_path}/runs/finetune-debug"
    assert wrote(capsys.readouterr().out) == {
        "debug base artifact": f"{run}/base",
        "adapter": f"{run}/adapter",
        "metrics": f"{run}/metrics.json",
    }


def test_federated_prints_the_adapter_and_metrics(tmp_path, monkeypatch, capsys, repo_cwd):
    import pipelines.federated as job
    import raymoe.federated.job as federated

    monkeypatch.setattr(job, "check_before_launch", lambda cfg: None)
    monkeypatch.setattr(job, "init_ray", lambda **_: None)
    monkeypatch.setattr(
        federated, "run_federated", lambda cfg: {"rounds": 1, "adapter": os.path.join(cfg.output_dir, "adapter")}
    )

    assert job.main(["--config", str(CONFIGS / "federated.debug.yaml"), "--storage-root", str(tmp_path)]) == 0

    run = f"{tmp_path}/runs/federated-debug"
    assert wrote(capsys.readouterr().out) == {"adapter": f"{run}/adapter", "metrics": f"{run}/metrics.json"}


def test_serve_prints_the_artifact_it_serves_before_ray(tmp_path, monkeypatch, capsys, repo_cwd):
    import pipelines.serve as job

    class RayStarted(Exception):
        pass

    def start_ray():
        raise RayStarted

    monkeypatch.setattr(job, "prepare", lambda cfg: (None, None))
    monkeypatch.setattr(job, "init_ray", start_ray)

    with pytest.raises(RayStarted):
        job.main(
            [
                "--config",
                str(CONFIGS / "serve.debug.yaml"),
                "--storage-root",
                str(tmp_path),
                "app.traffic.enabled=true",
                "app.traffic.output_dir=runs/traffic",
            ]
        )

    out = capsys.readouterr().out
    assert f"serving artifact: {tmp_path}/artifacts/serve-debug/tiny-moe\n" in out
    assert f"traffic windows go to: {tmp_path}/runs/traffic\n" in out


def test_drift_prints_its_report_and_summary(tmp_path, monkeypatch, capsys, repo_cwd):
    import pipelines.drift as job
    import raymoe.monitor.drift_actions as actions
    import raymoe.monitor.drift_check as check
    import raymoe.serve.debug_traffic as debug_traffic

    result = types.SimpleNamespace(
        drifted=False,
        router_drift=False,
        input_drift=False,
        summary={"drifted_features": []},
        meta={"current_requests": 1, "reference": "w"},
    )
    out_dir = tmp_path / "runs" / "drift-debug"
    monkeypatch.setattr(job, "check_before_launch", lambda cfg, evaluate: None)
    monkeypatch.setattr(debug_traffic, "write_debug_traffic", lambda d, a: [])
    monkeypatch.setattr(check, "run_check", lambda cfg: result)
    monkeypatch.setattr(
        check,
        "write_outputs",
        lambda cfg, r: {"json": Path(cfg.output_dir) / "drift.json", "html": Path(cfg.output_dir) / "report.html"},
    )
    monkeypatch.setattr(actions, "act_on", lambda *a, **k: None)

    assert job.main(["--config", str(CONFIGS / "drift.debug.yaml"), "--storage-root", str(tmp_path)]) == 0

    assert wrote(capsys.readouterr().out) == {
        "drift report": f"{out_dir}/report.html",
        "drift summary": f"{out_dir}/drift.json",
    }


def test_rebalance_prints_the_placement(tmp_path, monkeypatch, capsys, repo_cwd):
    # Prepare: 8 experts on one layer, expert 0 hot; 8 + 2 slots over 2 workers.
    import pipelines.rebalance as job
    import raymoe.deploy.rebalance_job as rebalance

    load = np.array([[40, 1, 1, 1, 1, 1, 1, 1]])
    monkeypatch.setattr(rebalance, "prepare", lambda cfg: None)
    monkeypatch.setattr(rebalance, "read_load", lambda cfg: (load, {"kind": "windows"}))

    # Execute: the real placement, written under the storage root.
    assert (
        job.main(["--config", str(CONFIGS / "rebalance.debug.yaml"), "--storage-root", str(tmp_path), "model_path="])
        == 0
    )

    # Assert
    out_dir = tmp_path / "runs" / "rebalance-debug"
    assert wrote(capsys.readouterr().out) == {
        "placement": f"{out_dir}/placement.json",
        "placement table": f"{out_dir}/placement.md",
    }
    assert (out_dir / "placement.json").is_file()


def test_the_default_root_is_announced_on_stderr(tmp_path, monkeypatch, capsys):
    from raymoe.train.config import TrainConfig

    cwd = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(storage.STORAGE_ROOT_ENV, raising=False)

    cfg = storage.resolve_job_config(load_config(TrainConfig, CONFIGS / "train.debug.yaml"))

    assert cfg.checkpoint.uri == f"{tmp_path}/home/raymoe/runs/train-debug/checkpoints"
    assert (
        f"storage root: {tmp_path}/home/raymoe (the working directory {cwd} is Ray's temporary copy"
        in capsys.readouterr().err
    )
