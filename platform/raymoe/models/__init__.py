"""The MoE model: architecture, KV cache and Hugging Face checkpoint interop. Imports torch only."""

from raymoe.models.config import FLAVOURS, ModelConfig, MoEConfig, RopeConfig, flavour
from raymoe.models.hf_config import CheckpointError
from raymoe.models.hf_io import load_hf, read_hf_config, save_hf
from raymoe.models.kv_cache import KVCache
from raymoe.models.moe import MoE
from raymoe.models.transformer import MoETransformer

__all__ = [
    "FLAVOURS", "CheckpointError", "KVCache", "MoE", "MoEConfig", "MoETransformer", "ModelConfig",
    "RopeConfig", "flavour", "load_hf", "read_hf_config", "save_hf",
]
