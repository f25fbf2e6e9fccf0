"""Suite-wide settings: deterministic torch on the CPU, Ray told explicitly how to behave."""

import os

# Decided here, not left to Ray's defaults: local test clusters run without token auth, bound to
# loopback, and send no usage stats.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

# `make test` runs two pytest workers (pytest-xdist), one per core: a torch thread each. Alone,
# a process gets both cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
