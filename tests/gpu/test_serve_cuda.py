"""Serving on a GPU: the debug artifact loaded as the Serve replica loads it with `num_gpus: 1`
runs on CUDA in fp32, unpacked, and a batch of greedy requests gets the CPU engine's tokens.

`build_core` is what the replica's engine process (or thread) runs: `load_model` (which moves the
model to CUDA when `num_gpus > 0` and packs weights for oneDNN only for fp32 on the CPU), then
`EngineCore`, whose KV cache and tensors follow the model's device. Both engines run fp32, so the
greedy tokens must be equal; the log-probabilities of the chosen tokens are compared too, which
shows how close the two are, not just that they pick the same argmax.

Skipped without CUDA. RAYMOE_GPU_TEST_ON_CPU=1 runs it on the CPU with the "GPU" engine's
oneDNN packing switched off, to check the test logic.
"""

import pytest
import torch

from raymoe.config import from_dict
from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.inference.packed import ExpertsOnThreads, PackedLinear, onednn_available
from raymoe.serve.app import build_core
from raymoe.serve.debug_artifact import make_debug_artifact
from raymoe.serve.request import GenerationRequest, SamplingParams
from raymoe.serve.serve_config import ServeConfig
from tests.gpu.target_device import DEVICE_TYPE, ON_CPU, requires_cuda

pytestmark = requires_cuda

PROMPTS = ["The quick brown fox", "Experts are sharded over workers and", "def add(a, b):"]
NEW_TOKENS = 8
# Chosen-token log-probabilities of two fp32 engines differ only by summation order (oneDNN on
# the CPU, cuBLAS on the GPU): ~1e-6 relative (packed against unpacked on the CPU: 2.6e-6 at
# most). The closest of this batch's 24 greedy decisions has its top two tokens 1.5e-3 apart in
# log-probability, so agreeing to 1e-4 also means the same argmax; TF32 matmuls (~1e-3 relative)
# would fail here before they flip a token.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_debug_artifact(tmp_path_factory.mktemp("serve-cuda") / "artifact", seed=0)


def _serve_batch(cfg: ServeConfig, prompts: list[list[int]]):
    """Loads the engine as the replica does; runs the prompts as one batch of greedy requests.

    Returns:
        (engine core, {request id: [(token id, logprob), ...]}).
    """
    core = build_core(cfg, adapters=[])
    for i, prompt_ids in enumerate(prompts):
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0)
        core.add_request(GenerationRequest(request_id=f"r{i}", prompt_ids=prompt_ids, params=params))
    outputs: dict[str, list[tuple[int, float | None]]] = {}
    while core.has_work():
        for rid, event in core.step():
            outputs.setdefault(rid, []).append((event.token_id, event.logprob))
    return core, outputs


def _packed_modules(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (PackedLinear, ExpertsOnThreads))]


def test_gpu_engine_serves_the_cpu_engines_greedy_tokens(artifact):
    # Prepare: the same artifact for both; the CPU engine with its default oneDNN packing.
    prompts = [ChatTokenizer.from_dir(artifact).encode(text) for text in PROMPTS]
    gpu_cfg = from_dict(
        ServeConfig,
        {
            "model_path": str(artifact),
            "num_gpus": 1,
            # On the CPU (the logic check) the "GPU" engine would be packed: keep PyTorch's kernels.
            "engine": {"cpu_kernels": "default"} if ON_CPU else {},
        },
    )
    cpu_cfg = from_dict(ServeConfig, {"model_path": str(artifact), "num_gpus": 0})

    # Execute: three requests decode side by side in each engine.
    gpu_core, gpu_out = _serve_batch(gpu_cfg, prompts)
    cpu_core, cpu_out = _serve_batch(cpu_cfg, prompts)

    # Assert: the GPU engine, its weights and its KV cache are on CUDA in fp32; the oneDNN
    # packing (a CPU-only path) was not applied there, while the CPU engine did get it.
    assert gpu_core.device.type == DEVICE_TYPE
    assert {(p.device.type, p.dtype) for p in gpu_core.model.parameters()} == {(DEVICE_TYPE, torch.float32)}
    assert gpu_core.cache.layers[0][0].device.type == DEVICE_TYPE
    assert _packed_modules(gpu_core.model) == []
    if onednn_available():
        assert _packed_modules(cpu_core.model)
    # Same greedy tokens for every request, full length, with close log-probabilities.
    assert sorted(gpu_out) == sorted(cpu_out) == ["r0", "r1", "r2"]
    for rid, expected in cpu_out.items():
        got = gpu_out[rid]
        assert [t for t, _ in got] == [t for t, _ in expected], rid
        assert len(got) == NEW_TOKENS
        for (_, lp_got), (_, lp_expected) in zip(got, expected):
            assert abs(lp_got - lp_expected) <= LOGPROB_ATOL, (rid, lp_got, lp_expected)
