"""`python -m training cv` refuses, before caching or training anything, a recipe whose stages disagree."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.__main__ import main as training_main

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "training" / "configs" / "siim-smoke.yaml"


@pytest.mark.parametrize("stage2,args,message", [
    ("data: {holdout: 0.1, folds: 2}\nseed: 2019\n", [],
     ("stage 2 (later) has data.holdout 0.1, stage 1 (siim-smoke-128) 0.2: every stage must split the films the "
     "same way")),
    ("data: {holdout: 0.2}\nseed: 7\n", [], "stage 2 (later) has seed 7, stage 1 (siim-smoke-128) 2019"),
    ("data: {holdout: 0.2, folds: 2}\nseed: 2019\nsegmenter: {init_from: nowhere}\n", [],
     "file(s) named in the config not found: segmenter.init_from: nowhere"),
    ("data: {holdout: 0.2, folds: 2}\nseed: 2019\n", ["--fold", "2"], "--fold 2 is not one of the 2 folds"),
])
def test_stages_that_disagree_are_refused_up_front(stage2, args, message, tmp_path, capsys) -> None:
    later = tmp_path / "later.yaml"
    later.write_text(f"name: later\n{stage2}")
    code = training_main(["cv", "--config", str(SMOKE), "--config", str(later), "--data", str(tmp_path / "none"),
                          "--work", str(tmp_path / "work"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_an_existing_ensemble_is_refused_before_training(tmp_path, capsys) -> None:
    taken = tmp_path / "models" / "ptx-segmenter-siim-smoke-256-ensemble" / "0.0.1"
    taken.mkdir(parents=True)
    code = training_main(["cv", "--config", str(SMOKE), "--config", str(SMOKE.with_name("siim-smoke-256.yaml")),
                          "--data", str(tmp_path / "none"), "--work", str(tmp_path / "work"),
                          "--models", str(tmp_path / "models")])
    assert code == 2
    assert f"{taken} already exists: a released model is never overwritten" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
