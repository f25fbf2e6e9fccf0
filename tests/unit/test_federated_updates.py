"""Silo updates at the edge: expert names, flatten/unflatten, update norms, and every rejection reason."""

import pytest
import torch

from raymoe.federated.updates import (
    REJECT_BAD_COUNTS,
    REJECT_MISSING_TENSOR,
    REJECT_NON_FINITE,
    REJECT_NORM,
    REJECT_WRONG_SHAPE,
    ClientUpdate,
    check_update,
    expert_of,
    filter_updates,
    flatten,
    unflatten,
    update_norm,
)

ATTN = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
EXPERT = "base_model.model.model.layers.1.block_sparse_moe.experts.3.w1.lora_A.weight"
COUNTS_SHAPE = (2, 4)  # 2 layers, 4 routed experts


def _global() -> dict[str, torch.Tensor]:
    return {ATTN: torch.zeros(2, 3), EXPERT: torch.zeros(4)}


def _update(silo="a", params=None, num_examples=5, counts=None) -> ClientUpdate:
    return ClientUpdate(
        silo=silo,
        params=_global() if params is None else params,
        num_examples=num_examples,
        tokens_per_expert_LE=torch.zeros(COUNTS_SHAPE, dtype=torch.int64) if counts is None else counts,
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (EXPERT, (1, 3)),
        ("base_model.model.model.layers.12.mlp.experts.0.down_proj.lora_B.weight", (12, 0)),  # DeepSeek naming
        (ATTN, None),
        ("base_model.model.model.layers.0.mlp.shared_experts.gate_proj.lora_A.weight", None),  # shared, not routed
        ("base_model.model.model.layers.2.block_sparse_moe.gate.lora_A.weight", None),  # the router
    ],
)
def test_expert_of(name, expected):
    assert expert_of(name) == expected


def test_flatten_is_sorted_key_order_and_unflatten_inverts_it():
    # Prepare: "b" is inserted first but sorts after "a".
    params = {"b": torch.tensor([[3.0, 4.0]]), "a": torch.tensor([1.0, 2.0])}
    # Execute
    vec = flatten(params)
    back = unflatten(vec, params)
    # Assert: a's two values, then b's; shapes restored.
    assert vec.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert back.keys() == params.keys()
    for k in params:
        assert torch.equal(back[k], params[k])


def test_update_norm_is_one_l2_norm_over_all_tensors():
    # Deltas (0, 3) and (4,) together: sqrt(3^2 + 4^2) = 5, not the sum of per-tensor norms (7).
    global_params = {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([-2.0])}
    params = {"x": torch.tensor([1.0, 4.0]), "y": torch.tensor([2.0])}
    assert update_norm(params, global_params) == pytest.approx(5.0)


def test_good_update_passes():
    params = {ATTN: torch.full((2, 3), 0.1), EXPERT: torch.full((4,), -0.1)}
    counts = torch.tensor([[0, 0, 0, 0], [7, 0, 0, 9]])
    assert check_update(_update(params=params, counts=counts), _global(), 1.0, COUNTS_SHAPE) is None


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _update(params={ATTN: torch.zeros(2, 3)}), REJECT_MISSING_TENSOR),
        (lambda: _update(params={**_global(), "extra.lora_A.weight": torch.zeros(1)}), REJECT_MISSING_TENSOR),
        (lambda: _update(params={ATTN: torch.zeros(3, 2), EXPERT: torch.zeros(4)}), REJECT_WRONG_SHAPE),
        (
            lambda: _update(params={ATTN: torch.zeros(2, 3), EXPERT: torch.tensor([0.0, float("nan"), 0, 0])}),
            REJECT_NON_FINITE,
        ),
        (lambda: _update(params={ATTN: torch.full((2, 3), float("inf")), EXPERT: torch.zeros(4)}), REJECT_NON_FINITE),
        (lambda: _update(num_examples=0), REJECT_BAD_COUNTS),
        (lambda: _update(counts=torch.tensor([[0, 0, 0, 0], [0, -1, 0, 0]])), REJECT_BAD_COUNTS),
        (lambda: _update(counts=torch.zeros(2, 3, dtype=torch.int64)), REJECT_BAD_COUNTS),
        (lambda: _update(counts=torch.zeros(COUNTS_SHAPE)), REJECT_BAD_COUNTS),  # float32, not int64 counts
        # Delta norm sqrt(6 * 1^2 + 4 * 1^2) = sqrt(10) ~ 3.16 > 3.
        (lambda: _update(params={ATTN: torch.ones(2, 3), EXPERT: torch.ones(4)}), REJECT_NORM),
    ],
    ids=[
        "missing",
        "extra",
        "shape",
        "nan",
        "inf",
        "no-examples",
        "negative-count",
        "counts-shape",
        "counts-dtype",
        "norm",
    ],
)
def test_each_rejection_reason(make, reason):
    assert check_update(make(), _global(), 3.0, COUNTS_SHAPE) == reason


def test_norm_bound_is_off_when_none():
    huge = _update(params={ATTN: torch.full((2, 3), 1e6), EXPERT: torch.zeros(4)})
    assert check_update(huge, _global(), None, COUNTS_SHAPE) is None


def test_filter_updates_keeps_order_and_groups_rejections_by_reason():
    # Prepare: two good silos around two bad ones.
    nan = {ATTN: torch.full((2, 3), float("nan")), EXPERT: torch.zeros(4)}
    updates = [_update("a"), _update("b", params=nan), _update("c", num_examples=0), _update("d")]
    # Execute
    accepted, rejected = filter_updates(updates, _global(), None, COUNTS_SHAPE)
    # Assert
    assert [u.silo for u in accepted] == ["a", "d"]
    assert rejected == {REJECT_NON_FINITE: ["b"], REJECT_BAD_COUNTS: ["c"]}
