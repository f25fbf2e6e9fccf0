"""oneDNN-packed fp32 and bf16 weights (`engine.cpu_kernels: onednn`) against the plain model."""

import copy

import pytest
import torch
from torch import nn

from raymoe.config import ConfigError
from raymoe.inference.packed import PackedGroupedExperts, PackedLinear, onednn_available, pack_onednn
from raymoe.inference.quantize import quantize_int8
from raymoe.models import MoETransformer
from raymoe.models.config import flavour
from raymoe.models.lora import LoRALinear, lora_context, set_row_adapters
from raymoe.models.moe import GroupedExperts
from raymoe.serve.debug_artifact import debug_config
from raymoe.serve.engine import EngineConfig, generate_alone
from raymoe.serve.request import SamplingParams

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def close(actual, expected, rel=1e-5):
    """Equal up to summation order: max error relative to the output's scale."""
    assert (actual - expected).abs().max() <= rel * expected.abs().max(), (actual - expected).abs().max()


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear_for_any_row_count(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias)
    packed = PackedLinear(linear)
    for shape in [(1, 96), (7, 96), (3, 5, 96), (300, 96)]:
        x = torch.randn(shape)
        close(packed(x), linear(x))
        assert packed(x).shape == linear(x).shape


def test_packed_experts_equal_grouped_experts_with_empty_experts():
    torch.manual_seed(1)
    experts = GroupedExperts(64, 48, [0, 1, 2, 3])
    for w in experts.parameters():
        nn.init.normal_(w, std=0.2)
    packed = PackedGroupedExperts(experts)
    counts = [3, 0, 5, 1]  # expert 1 receives nothing
    x = torch.randn(sum(counts), 64)
    with torch.no_grad():
        close(packed(x, counts), experts(x, counts))
        assert packed(torch.randn(0, 64), [0, 0, 0, 0]).shape == (0, 64)


@pytest.mark.parametrize(
    "cfg",
    [debug_config(160, dim=64, num_layers=2, max_seq_len=64), flavour("debug")],
    ids=["gqa-mixtral", "mla-deepseek"],
)
def test_packed_model_gives_the_same_logits_and_greedy_tokens(cfg):
    model = MoETransformer(cfg)
    model.init_weights(seed=4)
    model.eval()
    packed = pack_onednn(copy.deepcopy(model))
    assert not any(isinstance(m, (nn.Linear, GroupedExperts)) for m in packed.modules())
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close(packed(ids), model(ids))
    params = SamplingParams(temperature=0.0, max_tokens=12)
    assert generate_alone(packed, [3, 1, 4, 1, 5], params) == generate_alone(model, [3, 1, 4, 1, 5], params)


def test_lora_rows_survive_packing():
    model = MoETransformer(debug_config(96, dim=64, num_layers=2, max_seq_len=64))
    model.init_weights(seed=3)
    model.eval()
    gen = torch.Generator().manual_seed(5)
    wrapped = LoRALinear(model.layers[0].attn.q_proj, lora_context(model))
    wrapped.add_adapter("sql", torch.randn(4, 64, generator=gen) * 0.3, torch.randn(64, 4, generator=gen) * 0.3, 2.0)
    model.layers[0].attn.q_proj = wrapped
    model.lora_context.names.add("sql")
    packed = pack_onednn(copy.deepcopy(model))
    assert isinstance(packed.layers[0].attn.q_proj.base, PackedLinear)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    with torch.no_grad():
        for m in (model, packed):
            set_row_adapters(m, ["sql", None])
        close(packed(ids), model(ids))


def test_bf16_packed_model_gives_the_bf16_models_logits():
    model = MoETransformer(debug_config(160, dim=64, num_layers=2, max_seq_len=64))
    model.init_weights(seed=4)
    model = model.eval().to(torch.bfloat16)
    packed = pack_onednn(copy.deepcopy(model))
    assert not any(isinstance(m, (nn.Linear, GroupedExperts)) for m in packed.modules())
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = packed(ids), model(ids)
    assert {m._packed.dtype for m in packed.modules() if isinstance(m, PackedLinear)} == {torch.bfloat16}
    # bf16 keeps 8 bits of mantissa: equal up to bf16 rounding of differently ordered sums.
    close(got.float(), want.float(), rel=3e-2)


def test_mixed_or_other_dtypes_are_refused_naming_them():
    model = MoETransformer(debug_config(96, dim=64, num_layers=1, max_seq_len=32)).to(torch.float16)
    with pytest.raises(ValueError, match="float16"):
        pack_onednn(model)
    model = MoETransformer(debug_config(96, dim=64, num_layers=1, max_seq_len=32))
    model.layers[0].attn.o_proj.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"bfloat16.*float32"):
        pack_onednn(model)


def test_engine_config_names_a_bad_cpu_kernels_value():
    with pytest.raises(ConfigError, match=r"engine\.cpu_kernels.*'fast'"):
        EngineConfig(cpu_kernels="fast")


def test_serve_engine_packs_fp32_cpu_weights_unless_told_not_to(tmp_path):
    from raymoe.serve.app import load_model
    from raymoe.serve.debug_artifact import make_debug_artifact
    from raymoe.serve.serve_config import ServeConfig

    artifact = str(make_debug_artifact(tmp_path / "tiny", vocab_size=300, dim=64, num_layers=1, max_seq_len=64))
    configs = [
        ServeConfig(model_path=artifact, dtype="fp32"),
        ServeConfig(model_path=artifact, dtype="bf16"),
        ServeConfig(model_path=artifact, dtype="fp32", engine=EngineConfig(cpu_kernels="default")),
        ServeConfig(model_path=artifact, int8=True),
    ]
    kinds = [{type(m).__name__ for m in load_model(cfg, []).modules()} for cfg in configs]
    assert "PackedGroupedExperts" in kinds[0] and "Linear" not in kinds[0]
    assert "PackedGroupedExperts" in kinds[1] and "Linear" not in kinds[1]
    assert "GroupedExperts" in kinds[2] and "PackedLinear" not in kinds[2]
    assert "Int8GroupedExperts" in kinds[3] and "PackedLinear" not in kinds[3]


@pytest.mark.parametrize("convert", [pack_onednn, quantize_int8], ids=["packed-fp32", "int8"])
def test_experts_on_several_threads_give_exactly_the_serial_result(convert):
    torch.manual_seed(2)
    experts = GroupedExperts(64, 48, list(range(6)))
    for w in experts.parameters():
        nn.init.normal_(w, std=0.2)
    serial = convert(nn.ModuleList([copy.deepcopy(experts)]))[0]
    threaded = convert(nn.ModuleList([copy.deepcopy(experts)]), expert_threads=3)[0]
    for counts in ([3, 0, 5, 1, 2, 4], [1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]):
        x = torch.randn(sum(counts), 64)
        with torch.no_grad():
            assert torch.equal(threaded(x, counts), serial(x, counts))


def test_expert_threads_below_one_are_refused():
    with pytest.raises(ValueError, match="expert_threads must be >= 1, got 0"):
        pack_onednn(nn.Linear(4, 4), expert_threads=0)
    with pytest.raises(ConfigError, match=r"engine\.expert_threads.*0"):
        EngineConfig(expert_threads=0)
