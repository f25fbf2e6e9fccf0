"""LoRA adapters (peft files, per-row selection in the engine) and INT8 weight quantization."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from raymoe.inference.quantize import Int8GroupedExperts, Int8Linear, _reduce_range, quantize_int8, quantize_rows
from raymoe.models import MoETransformer
from raymoe.models.lora import attach_adapters, load_peft_adapter, save_peft_adapter, set_row_adapters
from raymoe.serve.debug_artifact import debug_config
from raymoe.serve.engine import EngineConfig, EngineCore, generate_alone
from raymoe.serve.request import GenerationRequest, SamplingParams

RANK, ALPHA = 4, 8.0  # peft scaling = alpha / r = 2


# Median relative change per token, INT8 vs fp32. Without VNNI fbgemm quantizes activations to
# 7 bits (`_reduce_range`), which doubles their rounding step and so the bound (medians measured
# on an AVX2-only EPYC: 0.082 and 0.118).
MEDIAN_BOUND = 0.16 if _reduce_range() else 0.08


@pytest.fixture(scope="module")
def base():
    model = MoETransformer(debug_config(96, dim=64, num_layers=2, max_seq_len=64))
    model.init_weights(seed=3)
    return model.eval()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, base):
    """A peft adapter written by hand with Mixtral's HF module names."""
    gen = torch.Generator().manual_seed(5)
    targets = {
        "model.layers.0.self_attn.q_proj": base.layers[0].attn.q_proj,
        "model.layers.1.self_attn.v_proj": base.layers[1].attn.v_proj,
    }
    tensors = {}
    for hf, linear in targets.items():
        tensors[f"base_model.model.{hf}.lora_A.weight"] = torch.randn(RANK, linear.in_features, generator=gen) * 0.3
        tensors[f"base_model.model.{hf}.lora_B.weight"] = torch.randn(linear.out_features, RANK, generator=gen) * 0.3
    path = tmp_path_factory.mktemp("adapter") / "sql"
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj"]})
    )
    return path, tensors


def merged(base, tensors):
    """Reference: W + (alpha / r) * B @ A folded into a copy of the base weights."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for i, name in ((0, "q_proj"), (1, "v_proj")):
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            linear = getattr(model.layers[i].attn, name)
            linear.weight += (ALPHA / RANK) * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
    return model


def test_adapter_rows_equal_merged_weights_and_base_rows_equal_base(base, adapter_dir):
    path, tensors = adapter_dir
    model = copy.deepcopy(base)
    assert load_peft_adapter(model, "sql", path) == 2
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    with torch.no_grad():
        expect_adapter = merged(base, tensors)(ids[:1])
        expect_base = base(ids[:1])
        set_row_adapters(model, ["sql", None])
        mixed = model(ids)
        set_row_adapters(model, None)
        plain = model(ids[:1])
    torch.testing.assert_close(mixed[0], expect_adapter[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], expect_base[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, expect_base, rtol=1e-4, atol=1e-4)


def test_engine_serves_adapter_and_base_requests_in_one_batch(base, adapter_dir):
    path, tensors = adapter_dir
    model = copy.deepcopy(base)
    attach_adapters(model, {"sql": path})
    core = EngineCore(model, EngineConfig(num_slots=2))
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    core.add_request(GenerationRequest(request_id="a", prompt_ids=[1, 2, 3], params=greedy, adapter="sql"))
    core.add_request(GenerationRequest(request_id="b", prompt_ids=[1, 2, 3], params=greedy))
    out = {}
    while core.has_work():
        for rid, ev in core.step():
            out.setdefault(rid, []).append(ev.token_id)
    assert out["a"] == generate_alone(merged(base, tensors), [1, 2, 3], greedy)
    assert out["b"] == generate_alone(base, [1, 2, 3], greedy)
    assert out["a"] != out["b"]


def test_saved_adapter_loads_back_identically(base, adapter_dir, tmp_path):
    path, _ = adapter_dir
    first = copy.deepcopy(base)
    load_peft_adapter(first, "sql", path)
    save_peft_adapter(first, "sql", tmp_path / "copy", rank=RANK, alpha=ALPHA)
    second = copy.deepcopy(base)
    load_peft_adapter(second, "sql", tmp_path / "copy")
    ids = torch.tensor([[9, 8, 7]])
    with torch.no_grad():
        set_row_adapters(first, ["sql"])
        set_row_adapters(second, ["sql"])
        torch.testing.assert_close(first(ids), second(ids))


def test_adapter_for_a_module_the_model_lacks_is_refused(base, tmp_path):
    save_file(
        {
            "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
            "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(ValueError, match=r"layers\.7\.self_attn\.q_proj"):
        load_peft_adapter(copy.deepcopy(base), "bad", tmp_path)


def test_quantize_rows_per_output_channel_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, -0.4]])
    q, scale = quantize_rows(w)
    # scales max|row| / 127; w / s = [63.5, -127, 31.75], [31.75, 63.5, -127], rounded half to even
    torch.testing.assert_close(scale, torch.tensor([2.0 / 127, 0.4 / 127]))
    assert q.tolist() == [[64, -127, 32], [32, 64, -127]]
    assert q.dtype == torch.int8


def test_int8_linear_matches_dequantized_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    q, scale = quantize_rows(linear.weight)
    reference = x @ (q.float() * scale[:, None]).T + linear.bias
    out = Int8Linear(linear)(x)
    # activations are quantized per call (8 bits): error well under 2% of the output's scale
    assert (out - reference).abs().max() < 0.02 * reference.abs().max()


def test_int8_model_stays_close_to_fp32_and_serves(base):
    model = quantize_int8(copy.deepcopy(base))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert any(isinstance(m, Int8GroupedExperts) for m in model.modules())
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        a, b = base(ids), model(ids)
    # Most tokens move a few percent (weight rounding plus the kernel's 8-bit activations, in a
    # 64-wide random model); a few move a lot where rounding flips a near-tied routing choice,
    # so the bound is on the median token.
    per_token = (b - a).norm(dim=-1) / a.norm(dim=-1)
    assert per_token.median() < MEDIAN_BOUND
    out = generate_alone(model, [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=5))
    assert len(out) == 5


def test_served_int8_model_with_adapters(base, adapter_dir, tmp_path):
    """The replica's loader (adapters first, then INT8 of every base layer, q/k/v fused where no
    adapter wraps them): base rows equal the INT8 base model, adapter rows follow the merged
    fp32 model as closely as INT8 follows fp32."""
    from raymoe.models import save_hf
    from raymoe.models.lora import LoRALinear
    from raymoe.serve.app import load_model
    from raymoe.serve.serve_config import ServeConfig

    path, tensors = adapter_dir
    save_hf(base, tmp_path / "artifact")
    served = load_model(
        ServeConfig(model_path=str(tmp_path / "artifact"), int8=True, lora_dir=str(path.parent)), ["sql"]
    )
    q_proj = served.layers[0].attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base, Int8Linear)
    assert served.layers[0].attn.qkv_proj is None
    # 48 tokens: the median over a dozen is moved by one or two flipped routing choices.
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        set_row_adapters(served, [None, None])
        base_rows = served(ids)
        set_row_adapters(served, ["sql", None])
        sql_row = served(ids)[0]
        int8_base = quantize_int8(copy.deepcopy(base))(ids)  # q/k/v fused in every layer
        fp32_merged = merged(base, tensors)(ids[:1])[0]
    # INT8 quantizes each call's activations with one scale, so rows are compared in the same batch.
    torch.testing.assert_close(base_rows, int8_base, rtol=1e-5, atol=1e-5)
    per_token = (sql_row - fp32_merged).norm(dim=-1) / fp32_merged.norm(dim=-1)
    assert per_token.median() < MEDIAN_BOUND
    assert not torch.allclose(sql_row, base_rows[0], atol=1e-3)
