"""Packing documents into seq_len + 1 rows."""

import numpy as np
import pytest

from raymoe.data.pack import pack_documents


def test_hand_worked_packing():
    # Stream: 1 2 3 EOS 4 5 EOS (7 tokens); rows of seq_len + 1 = 4 -> one full row, 3 dropped.
    rows, dropped = pack_documents([np.array([1, 2, 3]), np.array([4, 5])], seq_len=3, eos_id=0)
    assert rows.tolist() == [[1, 2, 3, 0]]
    assert dropped == 3
    assert rows.dtype == np.int32


def test_pad_last_keeps_every_token():
    rows, dropped = pack_documents([[1, 2, 3], [4, 5]], seq_len=3, eos_id=9, pad_last=True)
    assert rows.tolist() == [[1, 2, 3, 9], [4, 5, 9, 9]]
    assert dropped == 0


def test_documents_span_rows():
    rows, dropped = pack_documents([list(range(1, 8))], seq_len=3, eos_id=0)
    assert rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert dropped == 0


def test_empty_input_and_bad_seq_len():
    rows, dropped = pack_documents([], seq_len=4, eos_id=0)
    assert rows.shape == (0, 5) and dropped == 0
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        pack_documents([[1]], seq_len=0, eos_id=0)
