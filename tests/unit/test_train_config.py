"""Bad training configs fail in the driver, before Ray or any worker starts, naming field and value."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raymoe.config import ConfigError, from_dict
from raymoe.train.config import TrainConfig, check_before_launch


def _base(tmp_path):
    return {
        "steps": 3,
        "layout": {"ep": 2, "dp": 1},
        "data": {"path": str(tmp_path), "seq_len": 32, "global_batch_size": 4},
        "checkpoint": {"uri": str(tmp_path / "ckpt")},
    }


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"layout": {"ep": 3, "dp": 1}}, ["layout.ep=3", "model.moe.num_experts=8"]),
        (
            {"model": {"moe": {"num_experts": 6}}, "layout": {"ep": 4, "dp": 1}},
            ["layout.ep=4", "model.moe.num_experts=6"],
        ),
        ({"num_workers": 3}, ["num_workers=3", "2 * 1 = 2"]),
        ({"data": {"path": "", "seq_len": 32}}, ["data.path"]),
        ({"bogus": 1}, ["unknown key bogus"]),
        ({"optim": {"lr": 1e-3, "betas": [0.9]}}, ["unknown key optim.betas"]),
        ({"model": {"hidden": 64}}, ["unknown key model.hidden"]),
        ({"flavour": "huge"}, ["flavour 'huge'"]),
        ({"data": {"path": "x", "seq_len": 512}}, ["data.seq_len=512", "max_seq_len=256"]),
        (
            {"data": {"path": "x", "global_batch_size": 3}, "layout": {"ep": 2, "dp": 1}},
            ["data.global_batch_size=3", "2"],
        ),
    ],
)
def test_bad_config_names_fields_and_values(tmp_path, change, needles):
    data = {**_base(tmp_path), **change}
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, data)
    for needle in needles:
        assert needle in str(exc.value)


def test_missing_data_path_fails_before_launch(tmp_path):
    cfg = from_dict(TrainConfig, {**_base(tmp_path), "data": {"path": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match=r"data.path=.*nope.* does not exist"):
        check_before_launch(cfg)


def test_model_overrides_apply_to_the_flavour(tmp_path):
    cfg = from_dict(TrainConfig, {**_base(tmp_path), "model": {"dim": 64, "moe": {"num_experts": 4}}})
    model = cfg.model_config()
    assert (model.dim, model.moe.num_experts, model.num_layers) == (64, 4, 4)


def test_pipeline_exits_with_config_error_before_ray_starts(tmp_path):
    # A fresh interpreter: this test process may already run Ray for other tests.
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(_base(tmp_path)))
    probe = (
        "import sys, ray\n"
        "from pipelines.train import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit as e:\n    print('exit', e.code, 'ray', ray.is_initialized())\n"
    )
    for override, message in [
        ("layout.ep=3", "layout.ep=3 must divide model.moe.num_experts=8"),
        (f"data.path={tmp_path / 'missing'}", "does not exist"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-c", probe, "--config", str(path), override],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        assert proc.stdout.strip() == "exit 2 ray False"
        assert message in proc.stderr


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"optim": {"lr": 0.0}}, ["optim.lr must be > 0, got 0.0"]),
        ({"optim": {"beta2": 1.0}}, ["optim.beta2 must be in [0, 1), got 1.0"]),
        ({"optim": {"weight_decay": -0.1}}, ["optim.weight_decay must be >= 0, got -0.1"]),
        ({"num_cpus_per_worker": -1}, ["num_cpus_per_worker must be >= 0, got -1.0"]),
        ({"num_workers": -2}, ["num_workers must be >= 0, got -2"]),
        ({"peak_tflops_per_worker": -1}, ["peak_tflops_per_worker must be >= 0, got -1.0"]),
    ],
)
def test_numeric_bounds_name_key_and_value(tmp_path, change, needles):
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {**_base(tmp_path), **change})
    for needle in needles:
        assert needle in str(exc.value)


def test_seq_len_must_match_the_ingest_output(tmp_path):
    # Prepare: an ingest output packed at pack.seq_len=64 (rows of 65 tokens); training at 32.
    import numpy as np

    from tests.unit.ingest_output import write_ingest_output

    data = write_ingest_output(tmp_path / "ingest", np.zeros((8, 65), dtype=np.int32))
    cfg = from_dict(TrainConfig, {**_base(tmp_path), "data": {"path": str(data), "seq_len": 32}})
    # Execute / Assert: one message naming both keys and both values.
    with pytest.raises(ConfigError) as exc:
        check_before_launch(cfg)
    message = str(exc.value)
    assert "data.seq_len=32" in message and "pack.seq_len=64" in message and "\n" not in message
