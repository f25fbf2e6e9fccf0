"""Suite-wide settings: deterministic torch on the CPU, Ray told explicitly how to behave, and
how `make test`'s two pytest workers share the tests."""

import os
from pathlib import Path

# Decided here, not left to Ray's defaults: local test clusters run without token auth, bound to
# loopback, and send no usage stats.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# `make test` runs two pytest workers (pytest-xdist), one per core: a torch thread each. Alone,
# a process gets both cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

TESTS = Path(__file__).resolve().parent
# Suites whose tests start Ray clusters, Serve, pipelines' processes or CUDA work.
CLUSTER_SUITES = ("integration", "gpu")


def pytest_collection_modifyitems(config, items):
    """Groups for `pytest -n 2 --dist loadgroup` (`make test`): every test that starts Ray
    clusters is in one group, run in order by one worker as a single process would run them; each
    unit module is a group of its own, for the other worker. Two Ray clusters side by side on two
    cores starve each other's control loops (measured: Ray Train's worker-group start timed out,
    and the suite took 29 min instead of 41 serially, with a failure); a cluster beside unit
    tests does not. Unit tests start no Ray (their Ray-facing code runs against fakes)."""
    for item in items:
        suite = Path(str(item.path)).relative_to(TESTS).parts[0]
        group = "ray-clusters" if suite in CLUSTER_SUITES else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
