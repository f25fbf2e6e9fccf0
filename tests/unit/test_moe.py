"""MoE pieces against hand-worked numbers and a naive per-token reference."""

import math

import pytest
import torch

from raymoe.models.config import MoEConfig
from raymoe.models.moe import LocalDispatcher, MoE, Router, capacity_drop


def _router(cfg: MoEConfig, weight_ED: torch.Tensor) -> Router:
    router = Router(weight_ED.shape[1], cfg)
    with torch.no_grad():
        router.weight.copy_(weight_ED)
    return router


def test_softmax_topk_renormalised_by_hand():
    # Prepare: identity router weight, so logits equal the input.
    cfg = MoEConfig(num_experts=4, num_experts_per_tok=2, expert_hidden_dim=4, norm_topk_prob=True)
    router = _router(cfg, torch.eye(4))
    x = torch.tensor([[0.0, math.log(3.0), 0.0, math.log(2.0)]])  # softmax -> (1, 3, 1, 2) / 7
    # Execute
    weights, ids, scores, _ = router(x)
    # Assert: picks experts 1 and 3; renormalised weights 3/5 and 2/5.
    assert ids.tolist() == [[1, 3]]
    assert torch.allclose(weights, torch.tensor([[0.6, 0.4]]), atol=1e-6)
    assert torch.allclose(scores, torch.tensor([[1, 3, 1, 2]]) / 7, atol=1e-6)


def test_sigmoid_group_limited_routing_uses_bias_for_choice_only():
    # 4 experts in 2 groups; one group may be used, 2 experts per token.
    cfg = MoEConfig(
        num_experts=4,
        num_experts_per_tok=2,
        expert_hidden_dim=4,
        score_func="sigmoid",
        num_groups=2,
        topk_groups=1,
        norm_topk_prob=False,
        routed_scaling_factor=2.0,
        balance_bias=True,
    )
    router = _router(cfg, torch.eye(4))
    # sigmoid scores ~ (0.88, 0.12, 0.73, 0.73): group 0 sums to 1.00, group 1 to 1.46 -> group 1 wins
    # even though expert 0 is the single best expert.
    x = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    weights, ids, _scores, _ = router(x)
    assert sorted(ids[0].tolist()) == [2, 3]
    expected = 2.0 * torch.sigmoid(torch.tensor([1.0, 1.0]))  # scaled, not renormalised
    assert torch.allclose(weights[0].sort().values, expected, atol=1e-6)
    # A bias that makes group 0 win changes the choice but not the weights' source (raw scores).
    router.bias_E.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    weights, ids, _, _ = router(x)
    assert sorted(ids[0].tolist()) == [0, 1]
    assert torch.allclose(weights[0].sort().values, 2.0 * torch.sigmoid(torch.tensor([-2.0, 2.0])), atol=1e-6)


def test_bias_update_raises_underloaded_lowers_overloaded():
    cfg = MoEConfig(num_experts=4, num_experts_per_tok=1, expert_hidden_dim=4, balance_bias=True, bias_update_rate=0.1)
    router = _router(cfg, torch.zeros(4, 4))
    router.update_bias(torch.tensor([10, 2, 4, 4]))  # mean 5
    assert torch.allclose(router.bias_E, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_capacity_drop_keeps_first_tokens_per_expert():
    # 4 tokens, top-1, 2 experts, factor 1.0 -> capacity ceil(4*1/2) = 2 per expert.
    ids = torch.tensor([[0], [0], [0], [1]])
    assert capacity_drop(ids, num_experts=2, capacity_factor=1.0).tolist() == [[0], [0], [-1], [1]]


def test_local_dispatcher_groups_rows_and_combines_back_with_drops():
    x = torch.arange(3.0)[:, None].repeat(1, 2)  # token t has value t
    ids = torch.tensor([[1, 0], [-1, 1], [0, 1]])
    dispatcher = LocalDispatcher(num_local_experts=2)
    x_sd, counts, state = dispatcher.dispatch(x, ids)
    assert counts == [2, 3]
    assert x_sd[:, 0].tolist() == [0.0, 2.0, 0.0, 1.0, 2.0]  # expert 0: tokens 0, 2; expert 1: 0, 1, 2
    y = dispatcher.combine(x_sd * 10, state)
    assert y[..., 0].tolist() == [[0.0, 0.0], [0.0, 10.0], [20.0, 20.0]]  # dropped pair -> 0


def _naive_moe(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert: the textbook formula, no sorting or grouping."""
    weights, ids, _, _ = moe.router(x_TD)
    out = torch.zeros_like(x_TD)
    e = moe.experts
    for t in range(x_TD.shape[0]):
        for k in range(ids.shape[1]):
            i = ids[t, k]
            h = torch.nn.functional.silu(e.w_gate_EFD[i] @ x_TD[t]) * (e.w_up_EFD[i] @ x_TD[t])
            out[t] += weights[t, k] * (e.w_down_EDF[i] @ h)
    if moe.shared_experts is not None:
        out += moe.shared_experts(x_TD)
    return out


@pytest.mark.parametrize("score_func,groups", [("softmax", 1), ("sigmoid", 2)])
def test_moe_matches_naive_reference_and_counts_tokens(score_func, groups):
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=6,
        num_experts_per_tok=2,
        expert_hidden_dim=8,
        num_shared_experts=1,
        score_func=score_func,
        num_groups=groups,
        topk_groups=1,
    )
    moe = MoE(16, cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 16)
    y = moe(x)
    assert y.shape == x.shape
    assert torch.allclose(y.view(10, 16), _naive_moe(moe, x.view(10, 16)), atol=1e-5)
    assert moe.last_tokens_per_expert_E.sum().item() == 10 * 2
    moe.eval()  # one token in eval mode takes the decode path without sort and scatter
    with torch.no_grad():
        one = moe(x[:1, :1])
    assert torch.allclose(one.view(1, 16), _naive_moe(moe, x[0, :1]), atol=1e-5)
    assert moe.last_tokens_per_expert_E.sum().item() == 2


def test_aux_loss_matches_switch_formula_by_hand():
    # 2 experts, top-1, uniform router (zero weights): probs 0.5 each; ties pick expert 0 for all
    # tokens -> fraction (1, 0); aux = coef * E * sum(f * P) = 0.1 * 2 * (1 * 0.5) = 0.1.
    cfg = MoEConfig(num_experts=2, num_experts_per_tok=1, expert_hidden_dim=4, aux_loss_coef=0.1)
    moe = MoE(4, cfg).train()
    for p in moe.parameters():
        torch.nn.init.zeros_(p)
    moe(torch.randn(3, 4))
    assert moe.last_tokens_per_expert_E.tolist() == [3, 0]
    assert moe.last_aux_loss.item() == pytest.approx(0.1, abs=1e-6)
