"""Fuzzing the SIIM RLE decoder: any string gives a mask of the asked size or an RLEError (a ValueError) that
says why, and no string makes it allocate beyond the mask (huge numbers are refused before any array)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.cascade import rle

EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=2_000)
HEIGHT, WIDTH = 64, 48
HUGE = st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, HEIGHT * WIDTH + 1])
TOKEN = st.one_of(st.integers(-10, HEIGHT * WIDTH), HUGE, st.integers()).map(str) | st.sampled_from(
    ["-1", "", "x", "1.5", "1e3", "0x10", "١٢", "1_0", "+3", "nan", "\x00", " " * 3, "٣"])


def _check(text: str, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray | rle.RLEError:
    try:
        mask = rle.decode(text, height, width)
    except rle.RLEError as exc:
        assert str(exc), "an RLE error must say why"
        return exc
    assert mask.shape == (height, width) and mask.dtype == bool
    # A decoded mask encodes back to a string that decodes to the same mask.
    assert np.array_equal(rle.decode(rle.encode(mask), height, width), mask)
    return mask


@FUZZ
@given(text=st.text(max_size=200))
def test_arbitrary_text(text: str) -> None:
    _check(text)


@FUZZ
@given(tokens=st.lists(TOKEN, max_size=12), separator=st.sampled_from([" ", "  ", "\t", "\n"]))
def test_token_lists_with_huge_and_malformed_numbers(tokens: list[str], separator: str) -> None:
    outcome = _check(separator.join(tokens))
    if isinstance(outcome, np.ndarray):
        assert all(t.strip().lstrip("-").isdigit() for t in tokens if t.strip()), "a malformed token was accepted"


@FUZZ
@given(bits=st.binary(min_size=HEIGHT * WIDTH // 8, max_size=HEIGHT * WIDTH // 8), sparse=st.booleans())
def test_every_mask_round_trips(bits: bytes, sparse: bool) -> None:
    """The oracle is not vacuous: masks survive encode → decode exactly."""
    mask = np.unpackbits(np.frombuffer(bits, dtype=np.uint8)).astype(bool).reshape(HEIGHT, WIDTH)
    if sparse:
        mask[:, : WIDTH // 2] = False
    assert np.array_equal(rle.decode(rle.encode(mask), HEIGHT, WIDTH), mask)


@pytest.mark.parametrize("text", [
    "99999999999999999999999 1",  # beyond int64: was OverflowError, not a ValueError
    "4611686018427387904 4611686018427387904 1 1",  # sums wrap around int64: was a huge allocation attempt
    "0 9223372036854775807", "1 2 " * 10 + "0 9223372036854775807",
])
def test_huge_numbers_are_refused_before_any_allocation(text: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(rle.RLEError, match="exceeds the mask"):
            rle.decode(text, 1024, 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak} bytes allocated to refuse it"


def test_a_full_mask_allocates_about_the_image() -> None:
    """The largest valid run costs O(image) (about 17 bytes a pixel), the bound the decoder promises."""
    tracemalloc.start()
    try:
        mask = rle.decode(f"0 {1024 * 1024}", 1024, 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mask.all() and peak < 20 * 1024 * 1024  # int64 offsets and indices (16 B/px) and the mask
