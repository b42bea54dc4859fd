"""Films decoded at the models' resolution (issue 15 §1): the same grey scale, the same answers as the full decode.

JPEG 2000 films are decoded at the coarsest resolution level still at least the model input, JPEG films by DCT
scaling to at least twice it; the film's geometry still sizes the mask. Checked on the real chest films of
../shared/realdata and on a small synthetic set with mixed encodings made here (`training synth` films, each
also as JPEG 2000 and as JPEG); `python -m load_tests.bench_reduced_decode` is the big run (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from prometheus_client import REGISTRY

from load_tests.bench_reduced_decode import (
    Film,
    accuracy,
    as_j2k,
    as_jpeg,
    compare,
    demo_cascade,
    dice,
)
from service.imaging import reduced
from service.imaging.acceptance import AcceptancePolicy, permissive_policy
from service.imaging.decoding import decode_pixels
from service.imaging.radiograph import PixelGrid, Radiograph, RadiographError
from service.imaging.reader import read_radiograph
from service.imaging.reduced import first_frame, j2k_header, level_for, pillow_agrees
from tests import realdata as registry
from tests.servers import REPO

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MODEL_SIDE = 256  # a model input for the level rules below (GRIDS); the answers are compared at the models' own
REDUCED = dataclasses.replace(permissive_policy(), decode_min_side=MODEL_SIDE)
CANON, PHILIPS = "chest/canon_dx_j2k_lossless_mono1_inverse.dcm", "chest/philips_cr_j2k_lossy_mono1.dcm"
SIIM = "chest/siim_cr_jpegbaseline_mono2.dcm"
# (rows, columns) the pixels are decoded at, and the grid's factor and centring, per real chest film.
GRIDS = {
    CANON: ((532, 500), 4, True),  # 2128x2000 at level 2: level 3 (266x250) would be under 256 a side
    PHILIPS: ((978, 921), 2, True),  # lossy (9/7): twice the model input, so level 1
    SIIM: ((512, 512), 2, False),  # DCT scaling by 1/2: twice the model input
    "chest/siim_cr_jpegbaseline_mono1_flagged.dcm": ((512, 512), 2, False),
}


@pytest.fixture(scope="module")
def cascade():
    return demo_cascade(threads=2)


def fallbacks(reason: str) -> float:
    return REGISTRY.get_sample_value("ptx_reduced_decode_fallbacks_total", {"reason": reason}) or 0.0


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_each_real_chest_film_is_decoded_at_the_coarsest_level_the_models_allow(realdata: Path, name: str) -> None:
    full, small = read_radiograph(realdata / name), read_radiograph(realdata / name, REDUCED)
    shape, factor, centred = GRIDS[name]
    assert small.grid == PixelGrid(full.rows, full.columns, factor, centred)
    assert small.pixels.shape == shape and small.shape == full.shape == full.pixels.shape
    assert small.metadata() == full.metadata(), "the answer describes the film, not the pixels decoded"
    # The grey scale applies to stored values, which a level or a DCT scaling keeps (Pillow's 12- and 15-bit
    # samples, shifted to 16 bits, are shifted back): the reduced display is the full one averaged.
    rows, columns = full.rows // factor, full.columns // factor
    averaged = full.pixels[: rows * factor, : columns * factor].reshape(rows, factor, columns, factor).mean(axis=(1, 3))
    assert np.abs(small.pixels[:rows, :columns] - averaged).mean() < 0.01


def test_every_real_file_has_the_same_outcome_reduced_as_in_full(realdata: Path) -> None:
    """Accepted or refused with the same code: a reduced decode changes no decision about a file."""
    for entry in registry.CHEST + registry.OTHER + registry.CORRUPT:
        outcomes = []
        for policy in (AcceptancePolicy(), dataclasses.replace(AcceptancePolicy(), decode_min_side=MODEL_SIDE)):
            try:
                read_radiograph(realdata / entry.path, policy)
                outcomes.append(None)
            except RadiographError as error:
                outcomes.append(error.code.value)
        assert outcomes[0] == outcomes[1] == entry.code, entry.path


def test_the_real_films_get_the_full_decodes_answers(realdata: Path, cascade) -> None:
    films = [Film(name, name, (realdata / name).read_bytes()) for name in sorted(GRIDS)]
    outcomes = compare(films, cascade)  # reduced as the service reduces for the bundled models (512 px: Canon's 1/2)
    assert any(outcome.reduced_shape != outcome.full_mask.shape for outcome in outcomes), "no film was reduced"
    for outcome in outcomes:
        assert abs(outcome.full_score - outcome.reduced_score) <= 0.01, outcome.film.name
        ds = pydicom.dcmread(io.BytesIO(outcome.film.data), stop_before_pixels=True)
        assert outcome.reduced_mask.shape == outcome.full_mask.shape == (ds.Rows, ds.Columns), "the film's size"
        assert dice(outcome.full_mask, outcome.reduced_mask) >= 0.98, outcome.film.name


def test_a_failed_reduced_decode_falls_back_to_the_full_one_and_is_counted(realdata: Path, monkeypatch) -> None:
    """Pillow fails ("broken data stream") on the Philips codestream at level 2 (1841 columns: 460 for Pillow, 461
    for OpenJPEG), the case `pillow_agrees` keeps it from; with that guard off, and a model small enough for
    level 2, the film is decoded in full, counted as a decoder error."""
    policy = dataclasses.replace(REDUCED, decode_min_side=200)
    assert read_radiograph(realdata / PHILIPS, policy).pixels.shape == (978, 921), "guarded: level 1"
    monkeypatch.setattr(reduced, "pillow_agrees", lambda side, level: True)
    before = fallbacks("decoder_error")
    fell_back = read_radiograph(realdata / PHILIPS, policy)
    assert fallbacks("decoder_error") == before + 1
    assert fell_back.grid is None
    np.testing.assert_array_equal(fell_back.pixels, read_radiograph(realdata / PHILIPS).pixels)
    decoded = decode_pixels(pydicom.dcmread(realdata / PHILIPS), min_side=200)
    assert decoded.fallback == "decoder_error" and "broken data stream" in (decoded.detail or "")


def test_the_decode_workers_decode_reduced_as_the_thread_does(realdata: Path) -> None:
    ds = pydicom.dcmread(realdata / CANON)
    in_worker = decode_pixels(ds, timeout_s=30, min_side=MODEL_SIDE)
    here = decode_pixels(ds, min_side=MODEL_SIDE)
    assert in_worker.grid == here.grid and in_worker.fallback is None
    np.testing.assert_array_equal(in_worker.stored, here.stored)


def test_the_codestream_header_and_the_level_rules(realdata: Path) -> None:
    header = j2k_header(first_frame(pydicom.dcmread(realdata / CANON)))
    assert header is not None
    assert (header.rows, header.columns, header.precision, header.levels, header.signed) == (2128, 2000, 12, 5, False)
    assert j2k_header(b"\xff\xd8\xff\xe0" + bytes(60)) is None  # a JPEG, not a JPEG 2000 codestream
    assert level_for(2128, 2000, 256, 5) == 2 and level_for(2128, 2000, 512, 5) == 1
    assert level_for(1024, 1024, 256, 5) == 2 and level_for(1024, 1024, 256, 1) == 1
    assert level_for(300, 300, 256, 5) == 0, "no level is still 256 a side: decoded in full"
    # Pillow sizes a level by rounding, OpenJPEG by ceiling: 1841 at level 2 is 460 for one, 461 for the other.
    assert not pillow_agrees(1841, 2) and pillow_agrees(1841, 1) and pillow_agrees(2000, 3)
    assert level_for(1955, 1841, 256, 5, lambda level: pillow_agrees(1841, level)) == 1


def test_a_reduced_radiograph_is_checked_against_its_grid() -> None:
    grid = PixelGrid(2128, 2000, 4, centred=True)
    assert grid.reduced_shape == (532, 500)
    with pytest.raises(ValueError, match=r"do not match their grid"):
        Radiograph(pixels=np.zeros((500, 532), np.float32), spacing_mm=None, grid=grid)
    with pytest.raises(ValueError, match=r"a factor that is a power of 2 above 1"):
        PixelGrid(2128, 2000, 3, centred=False)


def synthetic_set(folder: Path, count: int) -> list[Film]:
    """`count` synthetic films in the generator's lossless mix, each also as JPEG 2000 lossless and as JPEG."""
    from service.cascade import rle
    from training.data import index_siim

    subprocess.run([sys.executable, "-m", "training", "synth", "--out", str(folder), "--count", str(count),
                    "--seed", "515", "--prevalence", "0.5", "--quiet", "--workers", "1"], cwd=REPO, check=True)
    films = []
    for sample in index_siim(folder):
        data = sample.path.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data))
        truth = rle.decode_union(sample.rles, int(ds.Rows), int(ds.Columns))
        films += [Film(sample.image_id, str(ds.file_meta.TransferSyntaxUID.name), data, truth),
                  Film(sample.image_id, "JPEG 2000", as_j2k(data), truth),
                  Film(sample.image_id, "JPEG", as_jpeg(data, read_radiograph(data).pixels), truth)]
    return films


def test_a_synthetic_set_with_mixed_encodings_gets_the_full_decodes_answers(tmp_path: Path, cascade) -> None:
    films = synthetic_set(tmp_path / "synth", 8)
    outcomes = compare(films, cascade)
    reduced_films = [o for o in outcomes if o.reduced_shape != o.full_mask.shape]
    # At the demo's 512 px a 1024 px JPEG is not scaled (DCT scaling keeps twice the model input); JPEG's scaling
    # is checked at 256 px on the real films above (GRIDS)
    assert "JPEG 2000" in {o.film.encoding for o in reduced_films}
    for outcome in outcomes:
        if outcome.reduced_shape == outcome.full_mask.shape:  # not reduced: the very same answer
            assert outcome.reduced_score == outcome.full_score
            np.testing.assert_array_equal(outcome.reduced_mask, outcome.full_mask)
    differences = [abs(o.full_score - o.reduced_score) for o in reduced_films]
    masked = [dice(o.full_mask, o.reduced_mask) for o in reduced_films if o.full_mask.any() or o.reduced_mask.any()]
    print(f"max |Δscore| {max(differences):.4f}, mean {np.mean(differences):.4f}; mask Dice min {min(masked):.3f}, "
          f"mean {np.mean(masked):.3f}; {accuracy(outcomes)}")
    figures = accuracy(outcomes)
    assert max(differences) <= 0.02 and np.mean(differences) <= 0.005
    assert min(masked) >= 0.94 and np.mean(masked) >= 0.97
    assert abs(figures["auc_full"] - figures["auc_reduced"]) <= 0.005
    assert abs(figures["dice_pos_full"] - figures["dice_pos_reduced"]) <= 0.005
