"""SIIM run-length encoding: hand cases, the complete SIIM label file, and random masks."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.cascade import rle


def test_hand_made_mask_column_major_relative_starts():
    mask = np.zeros((4, 3), dtype=bool)
    mask[1:3, 0] = True  # column 0, rows 1-2: column-major pixels 1, 2
    mask[0, 1] = True  # column 1, row 0: pixel 4 (run joins nothing: pixel 3 is background)
    mask[3, 1] = True  # pixel 7
    mask[0, 2] = True  # pixel 8: adjacent to pixel 7 in column-major order, so one run 7-8
    # runs: [1,3) [4,5) [7,9) → relative starts 1, 4-3=1, 7-5=2
    assert rle.encode(mask) == "1 2 1 1 2 2"
    np.testing.assert_array_equal(rle.decode("1 2 1 1 2 2", 4, 3), mask)


def test_empty_mask_is_minus_one():
    assert rle.encode(np.zeros((5, 5), bool)) == "-1"
    assert not rle.decode("-1", 5, 5).any()
    assert not rle.decode(" -1 ", 5, 5).any()


def test_run_reaching_the_last_pixel_is_kept():
    """The reference mask2rle dropped this run; we keep it, and still read strings without it."""
    mask = np.zeros((4, 4), dtype=bool)
    mask[2:, 3] = True  # the last two pixels in column-major order
    assert rle.encode(mask) == "14 2"
    np.testing.assert_array_equal(rle.decode("14 2", 4, 4), mask)
    full = np.ones((4, 4), dtype=bool)
    assert rle.encode(full) == "0 16"


def test_union_of_rows():
    a = rle.encode(np.pad(np.ones((2, 2), bool), ((0, 6), (0, 6))))
    b = rle.encode(np.pad(np.ones((2, 2), bool), ((6, 0), (6, 0))))
    union = rle.decode_union([a, b, "-1"], 8, 8)
    assert union.sum() == 8 and union[0, 0] and union[7, 7]


@pytest.mark.parametrize(
    "text,match",
    [("1 2 3", "odd count"), ("1 x", "not an integer"), ("-2 3", "start -2 is negative"),
     ("0 0", "length 0 is not positive"), ("10 7", "beyond the 4x4 mask")],
)
def test_malformed_strings_are_refused_with_the_reason(text, match):
    with pytest.raises(rle.RLEError, match=match):
        rle.decode(text, 4, 4)


def test_non_2d_mask_is_refused():
    with pytest.raises(rle.RLEError, match="2-D"):
        rle.encode(np.zeros(5, bool))


def test_every_row_of_the_siim_label_file_round_trips(realdata):
    """All 12,954 rows: each decodes in bounds on 1024x1024 and re-encodes to the identical string."""
    path = realdata / "labels/siim-pneumothorax-train-rle.csv.gz"
    rows = positives = 0
    with gzip.open(path, "rt", newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["ImageId", " EncodedPixels"]
        for image_id, encoded in reader:
            mask = rle.decode(encoded, 1024, 1024)
            assert rle.encode(mask) == encoded.strip(), image_id
            rows += 1
            positives += bool(mask.any())
    assert (rows, positives) == (12954, 3576)  # the counts the dataset's README states


@settings(max_examples=300, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_random_masks_round_trip(mask):
    text = rle.encode(mask)
    np.testing.assert_array_equal(rle.decode(text, *mask.shape), mask)
    assert rle.encode(rle.decode(text, *mask.shape)) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 30), st.integers(2, 30), st.data())
def test_masks_touching_first_and_last_pixel_round_trip(height, width, data):
    mask = data.draw(arrays(np.bool_, (height, width)))
    mask[0, 0] = mask[-1, -1] = True
    decoded = rle.decode(rle.encode(mask), height, width)
    assert decoded[0, 0] and decoded[-1, -1]
    np.testing.assert_array_equal(decoded, mask)
