"""Federated job configs that cannot work are refused at load, naming the keys involved."""

import subprocess
import sys
from pathlib import Path

import pytest

from raymoe.config import ConfigError, from_dict
from raymoe.federated.config import FederatedConfig

ROOT = Path(__file__).resolve().parents[2]


def _data(**over):
    data = {
        "base": "b",
        "rounds": 2,
        "output_dir": "o",
        "silos": [{"name": "a", "data_path": "a.jsonl"}, {"name": "b", "data_path": "b.jsonl"}],
    }
    data.update(over)
    return data


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"strategy": {"name": "median"}, "privacy": {"secure_aggregation": True}}, "secure_aggregation"),
        ({"strategy": {"name": "krum"}, "privacy": {"secure_aggregation": True}}, "strategy.name=krum"),
        ({"strategy": {"name": "trimmed_mean"}, "privacy": {"clip_norm": 1.0}}, "mean-based strategy"),
        ({"strategy": {"name": "fedavg", "moe_aware": True}, "privacy": {"clip_norm": 1.0}}, "moe_aware"),
        ({"privacy": {"noise_multiplier": 1.0}}, "privacy.clip_norm > 0"),
        ({"strategy": {"name": "fedprox", "options": {"mu": 0.1}}}, "unknown option 'mu'"),
        ({"strategy": {"name": "fedadam", "options": {"eta": -1.0}}}, "eta=-1.0"),
        ({"faults": {"quorum": 3}}, "faults.quorum=3 exceeds the 2 silos"),
        ({"silos": [{"name": "a", "data_path": "x"}, {"name": "a", "data_path": "y"}]}, "unique"),
        ({"silos": [{"name": "a b", "data_path": "x"}]}, "silos[0].name must be"),
    ],
)
def test_impossible_configs_are_refused(over, needle):
    with pytest.raises(ConfigError) as err:
        from_dict(FederatedConfig, _data(**over))
    assert needle in str(err.value)


def test_good_config_builds_its_strategy_with_flower_defaults():
    cfg = from_dict(FederatedConfig, _data(strategy={"name": "fedyogi"}, privacy={"secure_aggregation": True}))
    strategy = cfg.build_strategy()
    assert (strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau) == (0.01, 0.9, 0.99, 1e-3)
    assert cfg.silos[0].resource_name == "silo_a"


def test_pipeline_exits_2_with_one_line_for_secure_aggregation_with_median(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.federated",
            "--config",
            "pipelines/configs/federated.debug.yaml",
            "strategy.name=median",
            "privacy.secure_aggregation=true",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("config error: privacy.secure_aggregation=true cannot be combined")
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"strategy": {"fraction_fit": 0.0}}, "strategy.fraction_fit must be in (0, 1], got 0.0"),
        ({"strategy": {"min_fit_clients": 3}}, "strategy.min_fit_clients=3 exceeds the 2 silos"),
        ({"strategy": {"min_available_clients": 0}}, "strategy.min_available_clients must be >= 1, got 0"),
        ({"num_cpus_per_silo": -0.5}, "num_cpus_per_silo must be >= 0, got -0.5"),
        ({"num_threads_per_silo": 0}, "num_threads_per_silo must be >= 1, got 0"),
        ({"faults": {"quorum": 0}}, "faults.quorum must be >= 1, got 0"),
        ({"silos": [{"name": "a", "data_path": ""}]}, "silos[0].data_path must be set"),
    ],
)
def test_bounds_name_the_dotted_key(over, needle):
    with pytest.raises(ConfigError) as err:
        from_dict(FederatedConfig, _data(**over))
    assert needle in str(err.value)


def test_debug_base_is_written_only_at_the_debug_path(tmp_path):
    from raymoe.federated.job import check_before_launch

    # Prepare: the debug config's base path, then a mistyped one.
    debug = from_dict(
        FederatedConfig,
        _data(
            base=str(tmp_path / "base"),
            debug_base=str(tmp_path / "base"),
            eval_path=str(ROOT / "data/sft/silos/heldout.jsonl"),
        ),
    )
    typo = from_dict(FederatedConfig, _data(base=str(tmp_path / "bsae"), debug_base=str(tmp_path / "base")))
    # Execute / Assert: the debug base may be written; the mistyped path is a config error.
    assert debug.writes_debug_base and not typo.writes_debug_base
    with pytest.raises(ConfigError, match=r"base='.*bsae': no such directory"):
        check_before_launch(typo)
    assert not (tmp_path / "bsae").exists()


def test_missing_silo_data_is_named_before_the_silos_start(tmp_path, monkeypatch):
    from raymoe.federated.job import check_before_launch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = from_dict(
        FederatedConfig,
        _data(
            base=str(tmp_path / "base"),
            debug_base=str(tmp_path / "base"),
            eval_path=str(ROOT / "data/sft/silos/heldout.jsonl"),
        ),
    )
    with pytest.raises(ConfigError, match=r"silos\[0\].data_path='a.jsonl' is not a file \(silo 'a'\)"):
        check_before_launch(cfg)
