"""Federated job configs that cannot work are refused at load, naming the keys involved."""

import subprocess
import sys
from pathlib import Path

import pytest

from raymoe.config import ConfigError, from_dict
from raymoe.federated.config import FederatedConfig

ROOT = Path(__file__).resolve().parents[2]


def _data(**over):
    data = {"base": "b", "rounds": 2, "output_dir": "o",
            "silos": [{"name": "a", "data_path": "a.jsonl"}, {"name": "b", "data_path": "b.jsonl"}]}
    data.update(over)
    return data


@pytest.mark.parametrize("over, needle", [
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
])
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
    run = subprocess.run([sys.executable, "-m", "pipelines.federated", "--config",
                          "pipelines/configs/federated.debug.yaml", "strategy.name=median",
                          "privacy.secure_aggregation=true", f"output_dir={tmp_path / 'out'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("config error: privacy.secure_aggregation=true cannot be combined")
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
