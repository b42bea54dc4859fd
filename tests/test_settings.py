"""Settings: defaults, TOML file, environment over file, unknown keys and bad values refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import REPO_ROOT, load_settings


def test_defaults_are_the_embedded_ones():
    settings = load_settings(environ={})
    assert settings.models_dir == REPO_ROOT / "models" and settings.database_url is None
    assert settings.max_batch_size == 16 and settings.hflip_tta is True and settings.backend == "auto"


def test_environment_wins_over_file(tmp_path):
    file = tmp_path / "service.toml"
    file.write_text('max_batch_size = 16\nstat_score = 0.8\ndatabase_url = "postgresql://db/ptx"\n')
    settings = load_settings(environ={"PTX_CONFIG_FILE": str(file), "PTX_MAX_BATCH_SIZE": "4", "PTX_HFLIP_TTA": "false"})
    assert settings.max_batch_size == 4 and settings.stat_score == 0.8 and settings.hflip_tta is False
    assert settings.database_url == "postgresql://db/ptx"


def test_unknown_and_invalid_settings_are_refused(tmp_path):
    file = tmp_path / "service.toml"
    file.write_text("max_bach_size = 16\n")
    with pytest.raises(ValueError, match="unknown setting.*max_bach_size"):
        load_settings(file, environ={})
    with pytest.raises(ValidationError, match="max_batch_size"):
        load_settings(environ={"PTX_MAX_BATCH_SIZE": "0"})
    with pytest.raises(ValueError, match="not found"):
        load_settings(Path("/nonexistent.toml"), environ={})


def test_choices_are_checked():
    assert load_settings(environ={"PTX_BACKEND": "torch"}).backend == "torch"
    with pytest.raises(ValidationError, match="backend"):
        load_settings(environ={"PTX_BACKEND": "tensorflow"})
    with pytest.raises(ValidationError, match="mask_default"):
        load_settings(environ={"PTX_MASK_DEFAULT": "jpeg"})


def test_models_in_the_edge_need_a_single_edge_process():
    """Each edge process would load both models and batch on its own: refused with both settings named."""
    assert load_settings(environ={"PTX_MODELS_IN_EDGE": "true"}).models_in_edge is True
    with pytest.raises(ValidationError, match="PTX_MODELS_IN_EDGE needs PTX_EDGE_WORKERS=1"):
        load_settings(environ={"PTX_MODELS_IN_EDGE": "true", "PTX_EDGE_WORKERS": "2"})
    assert load_settings(environ={"PTX_EDGE_WORKERS": "2"}).edge_workers == 2  # with the model worker: fine


def test_several_model_instances_need_the_models_in_the_edge():
    """The model worker serves one batch at a time (BentoML threads=1): more instances there would be ignored."""
    settings = load_settings(environ={"PTX_MODELS_IN_EDGE": "true", "PTX_MODEL_INSTANCES": "2"})
    assert settings.model_instances == 2
    with pytest.raises(ValidationError, match="PTX_MODEL_INSTANCES=2 needs PTX_MODELS_IN_EDGE"):
        load_settings(environ={"PTX_MODEL_INSTANCES": "2"})
