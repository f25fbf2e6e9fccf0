"""The MoE model: architecture, KV cache and Hugging Face checkpoint interop. Imports torch only.

The names below load on first use (PEP 562), so that `raymoe.config`, which re-exports
`raymoe.models.config_checks`, does not make every config reader import torch.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers see; at run time `__getattr__` imports each name on first use
    from raymoe.models.config import FLAVOURS, ModelConfig, MoEConfig, RopeConfig, flavour
    from raymoe.models.hf_config import CheckpointError
    from raymoe.models.hf_io import load_hf, read_hf_config, save_hf
    from raymoe.models.kv_cache import KVCache
    from raymoe.models.moe import MoE
    from raymoe.models.transformer import MoETransformer

_EXPORTS = {
    "FLAVOURS": "config",
    "ModelConfig": "config",
    "MoEConfig": "config",
    "RopeConfig": "config",
    "flavour": "config",
    "CheckpointError": "hf_config",
    "load_hf": "hf_io",
    "read_hf_config": "hf_io",
    "save_hf": "hf_io",
    "KVCache": "kv_cache",
    "MoE": "moe",
    "MoETransformer": "transformer",
}

__all__ = [  # the keys of _EXPORTS, spelled out so linters see what the TYPE_CHECKING imports are for
    "FLAVOURS",
    "CheckpointError",
    "KVCache",
    "MoE",
    "MoEConfig",
    "MoETransformer",
    "ModelConfig",
    "RopeConfig",
    "flavour",
    "load_hf",
    "read_hf_config",
    "save_hf",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
