"""Compute dtype by capability (`raymoe.precision`): the rule, the training step and the serving
model it drives. The bf16 paths run on any CPU (slowly where bf16 is emulated), so they are
checked here whatever this machine's flags are."""

import pytest
import torch
import torch.nn as nn

from raymoe.config import ConfigError, from_dict
from raymoe.models import MoETransformer, flavour
from raymoe.parallel.groups import build_groups
from raymoe.parallel.layout import ParallelLayout
from raymoe.precision import AUTO_BF16_MIN_DIM, cpu_flags, resolve_precision
from raymoe.serve.app import build_core, engine_dtype_label, load_model
from raymoe.serve.debug_artifact import make_debug_artifact
from raymoe.serve.engine import EngineConfig
from raymoe.serve.request import GenerationRequest
from raymoe.serve.serve_config import ServeConfig
from raymoe.train.config import OptimConfig, TrainConfig
from raymoe.train.step import build_optimizer, train_step
from tests.unit.engine_streams import greedy

AVX2_EPYC = frozenset({"fpu", "sse4_2", "avx2", "fma"})
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
ZEN4 = AVX2_EPYC | {"avx512f", "avx512_bf16"}


@pytest.mark.parametrize(
    "flags,expected,why",
    [
        (AVX2_EPYC, "fp32", "neither amx_bf16 nor avx512_bf16"),
        (AVX2_EPYC | {"avx512f"}, "fp32", "neither"),
        (SAPPHIRE_RAPIDS, "bf16", "amx_bf16 and avx512_bf16"),
        (ZEN4, "bf16", "avx512_bf16"),
    ],
)
def test_auto_picks_bf16_only_where_the_cpu_has_bf16_units(flags, expected, why):
    precision = resolve_precision("auto", "cpu", flags=flags)
    assert precision.name == expected and why in precision.reason
    assert precision.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


@pytest.mark.parametrize(
    "model_dim,expected", [(128, "fp32"), (256, "fp32"), (AUTO_BF16_MIN_DIM, "bf16"), (4096, "bf16")]
)
def test_auto_keeps_narrow_models_in_fp32_on_a_bf16_cpu(model_dim, expected):
    precision = resolve_precision("auto", "cpu", flags=SAPPHIRE_RAPIDS, model_dim=model_dim)
    assert precision.name == expected
    if expected == "fp32":
        assert f"d{model_dim} model" in precision.reason and "amx_bf16" in precision.reason
    # Without the units the width does not matter; a forced setting is kept.
    assert resolve_precision("auto", "cpu", flags=AVX2_EPYC, model_dim=model_dim).name == "fp32"
    assert resolve_precision("bf16", "cpu", flags=SAPPHIRE_RAPIDS, model_dim=model_dim).name == "bf16"


def test_auto_serves_in_bf16_only_where_the_start_up_measurement_finds_it_faster():
    calls = []

    def probe(fp32_s, bf16_s):
        def measure():
            calls.append((fp32_s, bf16_s))
            return {"fp32": fp32_s, "bf16": bf16_s}

        return measure

    def decode(flags, decode_probe=None, setting="auto"):
        return resolve_precision(setting, "cpu", flags=flags, model_dim=512, cpu_decode=True, decode_probe=decode_probe)

    # Without packed kernels to measure, a bf16 CPU serves fp32 (unpacked bf16 decode lost).
    assert decode(SAPPHIRE_RAPIDS).name == "fp32" and "unpacked bf16 decode" in decode(SAPPHIRE_RAPIDS).reason
    # Measured 1.30x: bf16, and the reason says so; 1.05x (within BF16_DECODE_MIN_SPEEDUP): fp32.
    fast = decode(SAPPHIRE_RAPIDS, probe(0.013, 0.010))
    assert fast.name == "bf16" and "1.30x" in fast.reason and "amx_bf16" in fast.reason
    slow = decode(SAPPHIRE_RAPIDS, probe(0.0105, 0.010))
    assert slow.name == "fp32" and "1.05x" in slow.reason
    # A model narrower than AUTO_BF16_MIN_DIM stays fp32 unmeasured (its decode is not GEMM-bound).
    narrow = resolve_precision(
        "auto", "cpu", flags=SAPPHIRE_RAPIDS, model_dim=256, cpu_decode=True, decode_probe=probe(1.0, 0.1)
    )
    assert narrow.name == "fp32" and "d256" in narrow.reason
    # A CPU without bf16 units is not measured; a forced setting is kept, unmeasured.
    assert decode(AVX2_EPYC, probe(1.0, 0.1)).name == "fp32"
    assert decode(SAPPHIRE_RAPIDS, probe(0.01, 1.0), setting="bf16").name == "bf16"
    assert calls == [(0.013, 0.010), (0.0105, 0.010)]


def test_the_decode_probe_times_both_dtypes_with_the_threads_asked_and_restores_torchs():
    from raymoe.inference.decode_dtype_probe import decode_gemv_seconds

    before = torch.get_num_threads()
    seconds = decode_gemv_seconds(64, 1)
    assert set(seconds) == {"fp32", "bf16"} and all(s > 0 for s in seconds.values())
    assert torch.get_num_threads() == before
    assert decode_gemv_seconds(64, 1) is seconds  # measured once per process


def test_a_setting_forces_the_dtype_whatever_the_cpu():
    assert resolve_precision("bf16", "cpu", flags=AVX2_EPYC).name == "bf16"
    assert resolve_precision("fp32", "cpu", flags=SAPPHIRE_RAPIDS).name == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_configs_refuse_an_unknown_dtype_naming_the_key(tmp_path):
    train = {"precision": "fp16", "steps": 1, "data": {"path": str(tmp_path)}, "checkpoint": {"uri": str(tmp_path)}}
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        from_dict(TrainConfig, train)
    with pytest.raises(ConfigError, match="dtype must be one of auto, fp32, bf16, got 'half'"):
        from_dict(ServeConfig, {"model_path": str(tmp_path), "dtype": "half"})


# --- training ---------------------------------------------------------------------------------


def _step(bf16: bool):
    torch.manual_seed(0)
    model = MoETransformer(flavour("debug"))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0))
    seen: set[torch.dtype] = set()
    attention: nn.Module = model.layers[0].attn  # type: ignore[assignment]
    attention.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    ids_BT = torch.randint(0, model.cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    groups = build_groups(ParallelLayout())
    result = train_step(
        model, optimizer, [(ids_BT[:, :-1], ids_BT[:, 1:])], groups=groups, lr=1e-3, clip_norm=0.0, bf16=bf16
    )
    return result, model, seen


def test_bf16_training_step_computes_in_bf16_and_keeps_fp32_weights():
    # Execute
    fp32, _, fp32_seen = _step(bf16=False)
    bf16, bf16_model, bf16_seen = _step(bf16=True)
    # Assert: the attention ran in bf16 under autocast (and fp32 without), master weights stay
    # fp32, and the loss is fp32's within bf16's rounding (8 significant bits; measured ~1e-4).
    assert fp32_seen == {torch.float32} and bf16_seen == {torch.bfloat16}
    assert {p.dtype for p in bf16_model.parameters()} == {torch.float32}
    assert bf16.loss == pytest.approx(fp32.loss, rel=5e-3)
    assert bf16.loss != fp32.loss  # it did round


# --- serving ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_debug_artifact(
        tmp_path_factory.mktemp("art") / "tiny", vocab_size=300, dim=64, num_layers=2, max_seq_len=64
    )


def _serve_config(artifact, **over) -> ServeConfig:
    return ServeConfig(model_path=str(artifact), engine=EngineConfig(num_slots=2), **over)


def test_bf16_serving_holds_bf16_weights_and_cache_and_tracks_fp32(artifact):
    # Prepare
    fp32_cfg, bf16_cfg = _serve_config(artifact, dtype="fp32"), _serve_config(artifact, dtype="bf16")
    prompt = [5, 17, 42, 7, 99, 3]
    # Execute: logits of both models; a greedy request through the bf16 engine.
    fp32_model, bf16_model = load_model(fp32_cfg, []), load_model(bf16_cfg, [])
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        fp32_logits = fp32_model(ids)[0, -1].float()
        bf16_logits = bf16_model(ids)[0, -1].float()
    core = build_core(bf16_cfg, [])
    core.add_request(GenerationRequest(request_id="r", prompt_ids=prompt, params=greedy(8)))
    tokens = []
    while core.has_work():
        tokens += [event.token_id for _, event in core.step()]
    # Assert: every floating weight and the KV cache are bf16; the logits follow fp32's closely;
    # the engine decodes to the end and its first token is the bf16 model's own argmax.
    assert {p.dtype for p in bf16_model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    assert {t.dtype for layer in core.cache.layers for t in layer} == {torch.bfloat16}
    assert torch.cosine_similarity(fp32_logits, bf16_logits, dim=0) > 0.999
    assert not torch.equal(fp32_logits, bf16_logits)
    assert len(tokens) == 8 and tokens[0] == int(bf16_logits.argmax())
    assert engine_dtype_label(bf16_cfg) == "bf16" and engine_dtype_label(fp32_cfg) == "fp32"


def test_int8_keeps_its_own_path_and_label(artifact):
    cfg = _serve_config(artifact, dtype="bf16", int8=True)
    model = load_model(cfg, [])
    assert engine_dtype_label(cfg) == "int8"
    # The quantized layers hold no bf16: int8 ignores the dtype (its quality check is fp32-based).
    assert torch.bfloat16 not in {p.dtype for p in model.parameters()}
    assert any(isinstance(m, nn.Module) and "Int8" in type(m).__name__ for m in model.modules())
