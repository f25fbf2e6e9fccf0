"""The server's state after each finished round, written atomically so a killed server resumes.

One file per round, `rounds/round-NNNNN.pt` (torch.save of plain data and tensors) plus its
SHA-256 in `round-NNNNN.sha256`, written after the state file: a round counts only when both
exist and agree, so a crash mid-write leaves the previous round as the newest valid one. The state
holds everything the next round depends on: the global adapter, the strategy's server-optimiser
moments, the privacy accountant's history and the per-round history; silo sampling draws from a
generator seeded by (seed, round, attempt), so a resumed run continues exactly as an
uninterrupted one (DP noise excepted: it is drawn from the OS's entropy, as it must be secret).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raymoe.atomic_io import atomic_write_bytes, sha256_bytes

ROUNDS_DIR = "rounds"


@dataclass
class RoundState:
    """The server's state after `round` rounds (round 0 = the initial adapter)."""

    round: int
    params: dict[str, torch.Tensor]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    accountant_state: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _paths(output_dir: str | Path, round: int) -> tuple[Path, Path]:
    base = Path(output_dir) / ROUNDS_DIR / f"round-{round:05d}"
    return base.with_suffix(".pt"), base.with_suffix(".sha256")


def save_round_state(output_dir: str | Path, state: RoundState, keep: int = 3) -> Path:
    """Writes the state of `state.round` (temp file, fsync, rename) and prunes all but `keep`."""
    buf = io.BytesIO()
    torch.save(
        {
            "round": state.round,
            "params": state.params,
            "strategy_state": state.strategy_state,
            "accountant_state": state.accountant_state,
            "history": state.history,
        },
        buf,
    )
    data = buf.getvalue()
    state_path, sum_path = _paths(output_dir, state.round)
    atomic_write_bytes(state_path, data)
    atomic_write_bytes(sum_path, sha256_bytes(data).encode())
    rounds = sorted(_rounds(output_dir))
    for old in rounds[:-keep] if keep > 0 else []:
        for p in _paths(output_dir, old):
            p.unlink(missing_ok=True)
    return state_path


def _rounds(output_dir: str | Path) -> list[int]:
    folder = Path(output_dir) / ROUNDS_DIR
    if not folder.is_dir():
        return []
    return [int(p.stem.split("-")[1]) for p in folder.glob("round-*.pt")]


def load_latest_round_state(output_dir: str | Path) -> RoundState | None:
    """The newest round whose state file matches its checksum (None if there is none)."""
    for round in sorted(_rounds(output_dir), reverse=True):
        state_path, sum_path = _paths(output_dir, round)
        if not sum_path.is_file():
            continue
        data = state_path.read_bytes()
        if sha256_bytes(data) != sum_path.read_text().strip():
            continue
        raw = torch.load(io.BytesIO(data), weights_only=True)
        return RoundState(
            round=raw["round"],
            params=raw["params"],
            strategy_state=raw["strategy_state"],
            accountant_state=raw["accountant_state"],
            history=raw["history"],
        )
    return None
