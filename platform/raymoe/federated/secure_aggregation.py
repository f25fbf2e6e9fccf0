"""Secure aggregation of silo updates with pairwise additive masks (Bonawitz et al. 2017).

One attempt of a round among participants P (string ids, ordered by Python string order):
  1. every silo makes a fresh X25519 key pair and sends its public key to the server;
  2. the server hands every silo the public keys of the others;
  3. silo i derives for each peer j a 32-byte seed s_ij = HKDF-SHA256(X25519(sk_i, pk_j),
     info = round, min(i, j), max(i, j)); silo j derives the same s_ij (Diffie-Hellman symmetry),
     and s_ij keys an AES-256-CTR keystream read as uint64 masks m_ij;
  4. silo i sends y_i = enc(x_i) + sum_{j > i} m_ij - sum_{j < i} m_ij   (mod 2^64);
  5. the server adds the y_i: every m_ij enters once with + and once with -, so the sum is
     sum_i enc(x_i) mod 2^64, which it decodes.
A lone y_i is one-time-padded by masks the server cannot derive, so it is uniform on uint64.

The masks come from AES-CTR rather than numpy's PCG64 or Philox: those are statistical
generators, and PCG64's seed is recoverable from its outputs (Bouillaguet, Martinez, Sauvage
2020), while the masks must be unpredictable, which is the secure PRG Bonawitz et al. assume.

Fixed point: enc(x) = round(x * 2^frac_bits) as int64, held as uint64 so sums wrap mod 2^64;
the sum decodes (two's complement) correctly while |sum| < 2^(63 - frac_bits). Each value must
satisfy |x| < 2^(62 - frac_bits) / n (one spare bit covers rounding), checked before masking.
DEFAULT_FRAC_BITS = 24: resolution 2^-24 ~ 6e-8 per value (a sum of n is within n * 2^-25 of the
float sum), range |x| < 2^38 / n ~ 2.7e11 / n. Clipped adapter deltas are O(1) and the DP noise
std is orders of magnitude above 6e-8, so more fraction bits would buy no accuracy that survives.

Dropouts: the attempt is ABORTED. If a participant that was given keys does not return a masked
vector, its masks cannot be cancelled and unmask_sum raises SecureAggregationAborted(missing=...);
the server retries among the survivors with NEW key pairs (re-using keys would let the server
subtract two attempts' vectors and strip masks). Bonawitz et al. instead Shamir-share every seed
so survivors can rebuild a dropped silo's masks; that adds a second round trip, a threshold to
choose and a self-mask per silo, which buys little for a handful of long-lived silos where a
dropout is rare and a retry only re-masks the same update. Not implemented.

Threat model: honest-but-curious server; public keys are relayed unauthenticated (the paper's
active-adversary variant signs them). A server that lied about dropouts could obtain sums over
two subsets and difference them; the distributed DP noise each silo adds (privacy.py) bounds
what that reveals.

Reference: Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, IACR ePrint 2017/281.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DEFAULT_FRAC_BITS = 24
_HKDF_LABEL = b"raymoe/secure-aggregation/v1"


class SecureAggregationAborted(RuntimeError):
    """Some participants did not answer; nothing was unmasked. Retry among `survivors`, new keys."""

    def __init__(self, missing: Sequence[str], survivors: Sequence[str] = ()) -> None:
        self.missing = sorted(missing)
        self.survivors = sorted(survivors)
        super().__init__(
            f"secure aggregation aborted: no answer from {self.missing}; retry among {self.survivors} with fresh keys"
        )


@dataclass(frozen=True)
class SiloKeys:
    """One silo's X25519 key pair for one attempt of one round; never reuse it."""

    private_key: X25519PrivateKey = field(repr=False)
    public_bytes: bytes

    @classmethod
    def generate(cls) -> SiloKeys:
        return cls.from_private_key(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SiloKeys:
        """Deterministic keys from 32 raw bytes (tests)."""
        return cls.from_private_key(X25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_private_key(cls, key: X25519PrivateKey) -> SiloKeys:
        return cls(key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def max_abs_value(num_parties: int, frac_bits: int = DEFAULT_FRAC_BITS) -> float:
    """Largest |x| (exclusive) one party may encode so that n parties' sum cannot wrap."""
    return 2.0 ** (62 - frac_bits) / num_parties


def encode_fixed_point(values: np.ndarray, num_parties: int, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
    """float64 1-D -> uint64 holding round(x * 2^frac_bits) in two's complement.

    Raises:
        ValueError: a value is NaN, infinite or |x| >= max_abs_value(num_parties, frac_bits).
    """
    values = np.asarray(values, dtype=np.float64)
    bound = max_abs_value(num_parties, frac_bits)
    bad = ~(np.abs(values) < bound)  # the negated form also catches NaN
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"value {values[i]!r} at index {i} is outside the secure-aggregation range "
            f"|x| < {bound:.6g} (2**(62 - frac_bits) / num_parties, frac_bits={frac_bits}, "
            f"num_parties={num_parties}); clip the update or lower frac_bits"
        )
    return np.rint(values * 2.0**frac_bits).astype(np.int64).view(np.uint64)


def decode_fixed_point(total: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
    """uint64 sum (mod 2^64) -> float64, reading it as two's complement."""
    return total.view(np.int64).astype(np.float64) / 2.0**frac_bits


def _length_prefixed(*fields: str) -> bytes:
    # Length prefixes keep ("a|b", "c") and ("a", "b|c") from yielding the same HKDF info.
    out = b""
    for text in fields:
        raw = text.encode("utf-8")
        out += len(raw).to_bytes(4, "big") + raw
    return out


def pairwise_seed(
    private_key: X25519PrivateKey, peer_public_bytes: bytes, *, round: int, silo_id: str, peer_id: str
) -> bytes:
    """32-byte seed shared by silo_id and peer_id for this round (both sides derive the same)."""
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_bytes))
    low, high = sorted((silo_id, peer_id))
    info = _HKDF_LABEL + _length_prefixed(str(round), low, high)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask_from_seed(seed: bytes, size: int) -> np.ndarray:
    """`size` uniform uint64 masks: the AES-256-CTR keystream under key `seed`.

    A zero nonce is safe because each seed keys exactly one stream (fresh per pair, round, key).
    """
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * size)), dtype="<u8").astype(np.uint64)


def mask_vector(
    values: np.ndarray,
    silo_id: str,
    private_key: X25519PrivateKey,
    peer_public_keys: Mapping[str, bytes],
    round: int,
    frac_bits: int = DEFAULT_FRAC_BITS,
) -> np.ndarray:
    """Silo side: encode a flat float64 update and add its pairwise masks.

    Args:
        values: 1-D float64 update.
        silo_id: this silo's id.
        private_key: this silo's key for this attempt.
        peer_public_keys: public keys of all participants (this silo's own entry is ignored).
        round: round number bound into every seed.
        frac_bits: fixed-point fraction bits; the server must use the same.

    Returns:
        uint64 vector enc(values) + sum_{j > silo_id} m_ij - sum_{j < silo_id} m_ij (mod 2^64).
    """
    peers = {p: k for p, k in peer_public_keys.items() if p != silo_id}
    masked = encode_fixed_point(values, len(peers) + 1, frac_bits)
    for peer_id in sorted(peers):
        seed = pairwise_seed(private_key, peers[peer_id], round=round, silo_id=silo_id, peer_id=peer_id)
        mask = mask_from_seed(seed, masked.size)
        # uint64 array arithmetic wraps mod 2^64, which is the group the masks live in.
        masked = masked + mask if silo_id < peer_id else masked - mask
    return masked


def unmask_sum(
    masked: Mapping[str, np.ndarray], participants: Sequence[str], frac_bits: int = DEFAULT_FRAC_BITS
) -> np.ndarray:
    """Server side: float64 sum of all participants' values, or abort if any is missing.

    Raises:
        SecureAggregationAborted: a participant that was given keys sent no vector.
        ValueError: a vector from a non-participant, or vectors of different sizes or dtypes.
    """
    missing = [p for p in participants if p not in masked]
    if missing:
        raise SecureAggregationAborted(missing, [p for p in participants if p in masked])
    strangers = sorted(set(masked) - set(participants))
    if strangers:
        raise ValueError(f"masked vectors from non-participants {strangers}")
    sizes = {(masked[p].dtype, masked[p].shape) for p in participants}
    if len(sizes) != 1 or next(iter(sizes))[0] != np.uint64:
        raise ValueError(f"masked vectors must be uint64 of one shape, got {sorted(map(str, sizes))}")
    total = np.zeros_like(masked[participants[0]])
    for p in participants:
        total += masked[p]
    return decode_fixed_point(total, frac_bits)


class SecureAggregationRound:
    """Server-side bookkeeping of one attempt: collect keys, hand out peers' keys, sum.

    It stores only public keys and masked vectors and returns only the sum of all participants,
    so no individual unmasked update can leave it; for the same reason it refuses fewer than two
    participants (a "sum" of one is that silo's update).
    """

    def __init__(self, round: int, participants: Sequence[str], frac_bits: int = DEFAULT_FRAC_BITS) -> None:
        if len(set(participants)) != len(participants):
            raise ValueError(f"duplicate participant ids in {list(participants)}")
        if len(participants) < 2:
            raise ValueError(f"secure aggregation needs >= 2 participants, got {list(participants)}")
        self.round = round
        self.participants = sorted(participants)
        self.frac_bits = frac_bits
        self._public_keys: dict[str, bytes] = {}
        self._masked: dict[str, np.ndarray] = {}

    def _check_member(self, silo_id: str) -> None:
        if silo_id not in self.participants:
            raise ValueError(f"silo {silo_id!r} is not a participant of round {self.round}")

    def register_public_key(self, silo_id: str, public_bytes: bytes) -> None:
        self._check_member(silo_id)
        if len(public_bytes) != 32:
            raise ValueError(f"X25519 public key must be 32 bytes, got {len(public_bytes)}")
        self._public_keys[silo_id] = bytes(public_bytes)

    def peer_keys(self, silo_id: str) -> dict[str, bytes]:
        """Public keys of the other participants; aborts if some never sent one."""
        self._check_member(silo_id)
        missing = [p for p in self.participants if p not in self._public_keys]
        if missing:
            raise SecureAggregationAborted(missing, sorted(self._public_keys))
        return {p: k for p, k in self._public_keys.items() if p != silo_id}

    def submit(self, silo_id: str, masked: np.ndarray) -> None:
        self._check_member(silo_id)
        if silo_id in self._masked:
            raise ValueError(f"silo {silo_id!r} already submitted in round {self.round}")
        self._masked[silo_id] = masked

    def aggregate(self) -> np.ndarray:
        """float64 sum of every participant's values (see unmask_sum for the errors)."""
        return unmask_sum(self._masked, self.participants, self.frac_bits)
