"""LatentKeyedNoise pinned by numbers: the row keys and the step noise against a reference built here from the
module docstring (BLAKE2b-8 with the "fewstep-noise" personalisation, little-endian integers masked to 63 bits,
float32 ``randn`` from a CPU generator, each element taking the entry of its value's rank among the row's distinct
values), plus the argument checks word for word and the dtype/device of the output.
"""

from __future__ import annotations

import hashlib
import re
import struct

import pytest
import torch

from fewstep.samplers.step_noise import LatentKeyedNoise


def _ref_hash(data: bytes) -> int:
    h = hashlib.blake2b(digest_size=8, person=b"fewstep-noise")
    h.update(data)
    (value,) = struct.unpack("<Q", h.digest())
    return value % (1 << 63)


def _ref_key(row: list[float]) -> int:
    return _ref_hash(struct.pack(f"<{len(row)}f", *sorted(row)))


def _ref_noise(row: list[float], index: int) -> torch.Tensor:
    seed = _ref_hash(struct.pack("<QQ", _ref_key(row), index))
    v = torch.randn(len(row), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    distinct = sorted(set(row))
    return torch.stack([v[distinct.index(x)] for x in row])


ROWS = [[0.5, -1.25, 2.0, 0.5, 3.0, 2.0], [1.0, 2.0, 2.0, 3.0, -4.0, 1.5]]


def test_keys_match_reference_hash():
    noise = LatentKeyedNoise(torch.tensor(ROWS))
    assert noise.keys == [_ref_key(r) for r in ROWS]
    assert all(0 <= k < 2**63 for k in noise.keys)


def test_single_part_hash_pinned():
    # the key of a row [1.0] is the hash of float32 1.0's bytes alone: 0000803f
    assert LatentKeyedNoise(torch.tensor([[1.0]])).keys == [_ref_hash(bytes.fromhex("0000803f"))]


@pytest.mark.parametrize("index", [0, 1, 7, 300])
def test_draw_matches_reference_with_ties(index):
    initial = torch.tensor(ROWS)
    out = LatentKeyedNoise(initial).draw(index, initial)
    expected = torch.stack([_ref_noise(r, index) for r in ROWS])
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    # tied values share their noise, distinct values don't
    assert out[0, 0] == out[0, 3] and out[0, 2] == out[0, 5] and out[1, 1] == out[1, 2]
    assert len(set(out[0].tolist())) == 4 and len(set(out[1].tolist())) == 5


def test_ties_away_from_the_minimum():
    row = [5.0, 1.0, 3.0, 3.0, 4.0, 2.0, 2.0]
    initial = torch.tensor([row])
    out = LatentKeyedNoise(initial).row_noise(0, 2)
    assert torch.equal(out, _ref_noise(row, 2))


def test_negative_zero_reads_as_zero():
    plus = LatentKeyedNoise(torch.tensor([[0.0, 1.0, -2.0]]))
    minus = LatentKeyedNoise(torch.tensor([[-0.0, 1.0, -2.0]]))
    assert minus.keys == plus.keys == [_ref_key([0.0, 1.0, -2.0])]
    assert torch.equal(minus.row_noise(0, 3), plus.row_noise(0, 3))


def test_row_noise_is_float32_whatever_the_default_dtype():
    noise = LatentKeyedNoise(torch.tensor(ROWS))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = noise.row_noise(1, 4)
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == torch.float32
    assert torch.equal(out, _ref_noise(ROWS[1], 4))


def test_draw_follows_like_dtype_and_device():
    initial = torch.tensor(ROWS, dtype=torch.float64)
    noise = LatentKeyedNoise(initial)
    out = noise.draw(1, initial)
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    assert torch.equal(out, torch.stack([_ref_noise(r, 1) for r in ROWS]).double())
    half = noise.draw(1, torch.zeros(2, 6, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16
    meta = noise.draw(1, torch.empty(2, 6, device="meta", dtype=torch.float16))
    assert meta.device.type == "meta" and meta.dtype == torch.float16


def test_initial_released_after_first_draw():
    noise = LatentKeyedNoise(torch.tensor(ROWS))
    assert noise._initial is not None
    noise.draw(0, torch.zeros(2, 6))
    assert noise._initial is None


def test_one_dimensional_batch_accepted():
    initial = torch.tensor([3.0, -1.0, 3.0])  # three rows of one element each
    noise = LatentKeyedNoise(initial)
    out = noise.draw(5, initial)
    assert out.shape == (3,)
    assert torch.equal(out, torch.cat([_ref_noise([x], 5) for x in [3.0, -1.0, 3.0]]))
    assert noise.keys == [_ref_key([3.0]), _ref_key([-1.0]), _ref_key([3.0])]


def test_empty_rows_accepted():
    noise = LatentKeyedNoise(torch.zeros(2, 0))
    assert noise.draw(0, torch.zeros(2, 0)).shape == (2, 0)


@pytest.mark.parametrize("shape", [(0, 3), (0,), ()])
def test_rejects_empty_batch(shape):
    message = f"LatentKeyedNoise needs a batch of initial states, got shape {shape}."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        LatentKeyedNoise(torch.zeros(shape))


def test_draw_rejects_other_shape():
    noise = LatentKeyedNoise(torch.zeros(2, 3))
    message = "step noise keyed on initial latents of shape (2, 3) asked for shape (3, 2)"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        noise.draw(0, torch.zeros(3, 2))
