"""Suite-wide settings: deterministic torch on the CPU, Ray told explicitly how to behave, and
what `make test`'s two pytest workers (pytest-xdist, `--dist loadfile`) need."""

import os

# Decided here, not left to Ray's defaults: local test clusters run without token auth, bound to
# loopback, and send no usage stats.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under `make test` two test modules run at once, some with a Ray cluster each, on 2 cores: Ray
# Train's 60 s default for its worker group to start was measured too short there (the group
# was up, late). Clusters started from this process (and their pipelines) inherit the setting.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

import torch

# `make test` runs two pytest workers (pytest-xdist), one per core: a torch thread each. Alone,
# a process gets both cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
