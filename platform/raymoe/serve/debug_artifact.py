"""A tiny random-weight artifact for tests, the debug serve config and the serving benchmark.

A Mixtral-shaped model (GQA, softmax top-2, no shared experts) so that transformers'
`AutoModelForCausalLM` loads the same weights and can serve as the reference; the tokenizer is
raymoe's byte-level BPE trained on a small built-in corpus, with the ChatML chat template.
Weights are drawn with std 1/sqrt(dim) rather than the training init (0.02), so logits are far
from uniform and greedy decoding is not decided by rounding noise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from raymoe.models.config import ModelConfig, MoEConfig

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts out of many.",
    "Ray Serve runs an OpenAI compatible server with continuous batching.",
    "def add(a, b):\n    return a + b\n",
    "Experts are sharded over workers and tokens travel by all-to-all.",
    "Hello world! How are you today? I am fine, thank you.",
] * 30


def debug_config(
    vocab_size: int, dim: int = 128, num_layers: int = 4, max_seq_len: int = 512, num_experts: int = 8
) -> ModelConfig:
    """Mixtral-shaped ModelConfig of the given size (transformers can load what save_hf writes)."""
    return ModelConfig(
        vocab_size=vocab_size,
        dim=dim,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
        init_std=dim**-0.5,
        moe=MoEConfig(num_experts=num_experts, num_experts_per_tok=2, expert_hidden_dim=2 * dim),
    )


def make_debug_artifact(
    path: str | Path,
    seed: int = 0,
    vocab_size: int = 512,
    corpus: list[str] | None = None,
    model_vocab_size: int = 0,
    **shape,
) -> Path:
    """Writes a random-weight HF-format artifact (weights, config, tokenizer) to `path`.

    Args:
        path: output directory (created).
        seed: weight seed; the same seed gives the same artifact.
        vocab_size: tokenizer and model vocabulary.
        corpus: texts the tokenizer is trained on (default: the built-in sentences).
        model_vocab_size: a model vocabulary larger than the tokenizer's (benchmarks at a
            published shape); 0 = the tokenizer's.
        **shape: overrides for `debug_config` (dim, num_layers, max_seq_len, num_experts).

    Returns:
        `path`.
    """
    from raymoe.data.tokenizer import save_tokenizer, train_tokenizer
    from raymoe.models import MoETransformer, save_hf

    path = Path(path)
    tok = train_tokenizer(corpus or CORPUS, vocab_size=vocab_size)
    model = MoETransformer(debug_config(max(model_vocab_size, tok.get_vocab_size()), **shape))
    model.init_weights(seed=seed)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tok_dir:
        save_tokenizer(tok, tok_dir, model_max_length=model.cfg.max_seq_len)
        save_hf(model, path, tokenizer_dir=tok_dir)
    return path
