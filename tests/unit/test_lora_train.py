"""Trainable LoRA: base frozen, start equals base, peft loads what we write with equal logits,
expert adapters equal their merged weights, and `merge_adapter` folds any adapter into an artifact.

References: peft + transformers on the same artifact (peft's own loader and LoRA layers), and the
LoRA formula W + (alpha / r) * B @ A written out in the test.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from raymoe.models import MoETransformer, load_hf
from raymoe.models.expert_lora import LoRAGroupedExperts
from raymoe.models.lora import LoRAConfig, add_trainable_lora, lora_state, set_lora_state, write_peft_adapter
from raymoe.models.lora_merge import merge_adapter
from raymoe.models.moe import GroupedExperts
from raymoe.serve.debug_artifact import debug_config

IDS = torch.tensor([[3, 17, 42, 5, 9, 60, 2, 11], [8, 1, 77, 23, 23, 4, 90, 31]])


def _random_adapter(model, seed):
    """Non-zero A and B for every pair (a fresh adapter has B = 0 and changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in lora_state(model).items()}
    set_lora_state(model, tensors)
    return tensors


@pytest.fixture(scope="module")
def qwen_artifact(tmp_path_factory):
    """A Qwen2-MoE artifact (shared experts, one dense layer) written by transformers itself."""
    cfg = Qwen2MoeConfig(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=40,
        num_experts=6,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        norm_topk_prob=False,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    path = tmp_path_factory.mktemp("qwen") / "base"
    model.save_pretrained(path)
    return path


def test_fresh_adapter_leaves_the_model_unchanged_and_only_adapters_train():
    base = MoETransformer(debug_config(96, dim=64, num_layers=2, max_seq_len=64))
    base.init_weights(seed=1)
    model = copy.deepcopy(base)
    trainable = add_trainable_lora(model, LoRAConfig(rank=4, alpha=8, routed_experts=True), seed=0)
    # 2 layers x 4 attention projections x (A, B) + 2 MoE layers x 3 stacked expert matrices x (A, B)
    assert len(trainable) == 2 * 4 * 2 + 2 * 3 * 2
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base(IDS), rtol=0, atol=0)


def test_unknown_attention_module_is_refused():
    model = MoETransformer(debug_config(96, dim=64, num_layers=1, max_seq_len=64))
    with pytest.raises(ValueError, match=r"lora\.attention_modules"):
        add_trainable_lora(model, LoRAConfig(attention_modules=["query"]), seed=0)


def test_expert_adapter_equals_experts_with_merged_weights():
    # Prepare: 3 experts, rows split 2 / 0 / 3.
    torch.manual_seed(0)
    experts = GroupedExperts(dim=8, hidden_dim=12, expert_ids=[4, 5, 6])
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    lora = LoRAGroupedExperts(experts, rank=2, scaling=1.5)
    with torch.no_grad():
        for bank in (lora.lora_A, lora.lora_B):
            for p in bank.values():
                p.normal_(0, 0.4)
    reference = GroupedExperts(dim=8, hidden_dim=12, expert_ids=[4, 5, 6])
    with torch.no_grad():
        for proj in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
            # W + s * B @ A per expert, the LoRA update folded in by hand.
            w = getattr(experts, proj) + 1.5 * lora.lora_B[proj] @ lora.lora_A[proj]
            getattr(reference, proj).copy_(w)
    x = torch.randn(5, 8)
    # Execute / Assert
    torch.testing.assert_close(lora(x, [2, 0, 3]), reference(x, [2, 0, 3]), rtol=1e-5, atol=1e-5)


def test_peft_loads_our_adapter_onto_transformers_with_equal_logits(qwen_artifact, tmp_path):
    from peft import PeftModel

    # Prepare: our model + an attention and shared-expert adapter with random values.
    model = load_hf(qwen_artifact)
    cfg = LoRAConfig(rank=4, alpha=8, shared_experts=True)
    add_trainable_lora(model, cfg, seed=0)
    tensors = _random_adapter(model, seed=7)
    assert any("shared_expert." in k for k in tensors)
    write_peft_adapter(tmp_path / "adapter", cfg, tensors)
    # Execute: peft's own loader on transformers' model of the same artifact.
    hf = AutoModelForCausalLM.from_pretrained(qwen_artifact)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        ours, theirs = model(IDS), peft_model(IDS).logits
    # Assert: equal logits, and the adapter really changed them.
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)
    with peft_model.disable_adapter(), torch.no_grad():
        plain = peft_model(IDS).logits
    assert (plain - theirs).abs().max() > 1e-2


def test_merged_artifact_equals_model_with_adapter(qwen_artifact, tmp_path):
    # Prepare: adapters on attention, shared and routed experts.
    model = load_hf(qwen_artifact)
    cfg = LoRAConfig(rank=4, alpha=8, shared_experts=True, routed_experts=True)
    add_trainable_lora(model, cfg, seed=0)
    tensors = _random_adapter(model, seed=3)
    assert any(".experts.5.down_proj.lora_B" in k for k in tensors)
    write_peft_adapter(tmp_path / "adapter", cfg, tensors)
    # Execute
    merge_adapter(qwen_artifact, tmp_path / "adapter", tmp_path / "merged")
    merged = load_hf(tmp_path / "merged")
    hf_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    # Assert: raymoe and transformers both read the merged artifact as the adapted model.
    model.eval()
    with torch.no_grad():
        expected = model(IDS)
        torch.testing.assert_close(merged(IDS), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hf_merged(IDS).logits.float(), expected, rtol=1e-4, atol=1e-4)


def test_merge_refuses_adapter_for_a_module_the_artifact_lacks(qwen_artifact, tmp_path):
    model = load_hf(qwen_artifact)
    cfg = LoRAConfig(rank=2, alpha=2)
    add_trainable_lora(model, cfg, seed=0)
    tensors = {k.replace("layers.0.", "layers.9."): v for k, v in lora_state(model).items()}
    write_peft_adapter(tmp_path / "adapter", cfg, tensors)
    with pytest.raises(ValueError, match=r"layers\.9"):
        merge_adapter(qwen_artifact, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_padding_mask_keeps_real_tokens_logits_and_takes_padding_off_the_experts():
    # Right padding is masked out: real tokens (causal attention never sees later positions) keep
    # their logits exactly; padding is neither counted nor computed by the experts.
    model = MoETransformer(debug_config(96, dim=64, num_layers=2, max_seq_len=64)).eval()
    mask = torch.ones_like(IDS, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        plain = model(IDS)
        counts_all = model.tokens_per_expert().sum()
        masked = model(IDS, count_mask_BT=mask)
        counts_masked = model.tokens_per_expert().sum()
    # (equal up to float summation order: the expert GEMMs see fewer rows)
    torch.testing.assert_close(masked[mask], plain[mask], rtol=1e-5, atol=1e-5)
    assert (masked[~mask] - plain[~mask]).abs().max() > 1e-3
    # 2 MoE layers x top-2 x (16 - 3 masked tokens)
    assert int(counts_all) == 2 * 2 * 16 and int(counts_masked) == 2 * 2 * 13


def test_trained_adapter_loads_per_request_in_serving_and_expert_adapters_point_to_merge(tmp_path):
    from raymoe.models.lora import load_peft_adapter, set_row_adapters

    # Prepare: a trained-looking attention adapter written by our writer.
    base = MoETransformer(debug_config(96, dim=64, num_layers=2, max_seq_len=64))
    base.init_weights(seed=2)
    model = copy.deepcopy(base)
    cfg = LoRAConfig(rank=4, alpha=8)
    add_trainable_lora(model, cfg, seed=0)
    write_peft_adapter(tmp_path / "a", cfg, _random_adapter(model, seed=1))
    # Execute: the serving path's loader, selected for the first row only.
    served = copy.deepcopy(base)
    assert load_peft_adapter(served, "tuned", tmp_path / "a") == 2 * 4
    model.eval()
    with torch.no_grad():
        set_row_adapters(served, ["tuned", None])
        mixed = served(IDS)
        expected, plain = model(IDS[:1]), base(IDS[1:])
    torch.testing.assert_close(mixed[:1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:], plain, rtol=1e-5, atol=1e-5)
    # An adapter with routed-expert pairs is refused with the way to serve it.
    with_experts = copy.deepcopy(base)
    cfg_e = LoRAConfig(rank=2, alpha=2, routed_experts=True)
    add_trainable_lora(with_experts, cfg_e, seed=0)
    write_peft_adapter(tmp_path / "e", cfg_e, lora_state(with_experts))
    with pytest.raises(ValueError, match="raymoe merge"):
        load_peft_adapter(copy.deepcopy(base), "e", tmp_path / "e")


def test_all_attention_targets_every_projection_of_gqa_and_mla_and_bad_names_fail_before_launch():
    from raymoe.config import ConfigError
    from raymoe.models import flavour
    from raymoe.train.finetune_config import check_lora_fits

    mla = flavour("debug")  # the native debug flavour uses MLA
    assert mla.attention == "mla"
    model = MoETransformer(mla)
    add_trainable_lora(model, LoRAConfig(rank=2, alpha=2), seed=0)
    adapted = {k.split(".self_attn.")[1].split(".lora_")[0] for k in lora_state(model) if ".self_attn." in k}
    assert adapted == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    # A GQA name on an MLA model is refused from the config alone (meta-device model, no weights).
    with pytest.raises(ConfigError, match=r"lora\.attention_modules: \['k_proj'\]"):
        check_lora_fits(mla, LoRAConfig(attention_modules=["q_a_proj", "k_proj"]))
    check_lora_fits(debug_config(96), LoRAConfig(attention_modules=["q_proj", "v_proj"]))
