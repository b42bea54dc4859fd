"""What counts as a chest radiograph is set by `PTX_ACCEPT_*`, not code; the defaults are today's rules."""

from __future__ import annotations

import pytest

from service.imaging.acceptance import AcceptancePolicy
from service.imaging.radiograph import RadiographError, RejectionCode
from service.imaging.reader import read_radiograph
from service.settings import load_settings
from tests.dicom_factory import chest_like, dataset, to_bytes


def film(**attributes: object) -> bytes:
    return to_bytes(dataset(chest_like(), **attributes))


def policy(**environ: str) -> AcceptancePolicy:
    return AcceptancePolicy.from_settings(load_settings(environ=environ))


def test_the_default_settings_are_the_built_in_rules() -> None:
    built_in, configured = AcceptancePolicy(), policy()
    for name in ("modalities", "sop_classes", "body_part_tokens", "min_side", "max_side", "max_pixels",
                 "max_file_bytes"):
        assert getattr(configured, name) == getattr(built_in, name), name


def test_a_site_accepts_a_new_body_part_spelling_by_setting_alone() -> None:
    spelling = film(BodyPartExamined="KLATKA")  # a chest film labelled in a language the defaults do not know
    with pytest.raises(RadiographError) as refused:
        read_radiograph(spelling, policy())
    assert refused.value.code is RejectionCode.NOT_CHEST
    accepted = read_radiograph(spelling, policy(PTX_ACCEPT_BODY_PARTS="CHEST,THORAX,KLATKA"))
    assert accepted.body_part == "KLATKA"
    with pytest.raises(RadiographError) as still:  # the list replaced the defaults: a hip is still no chest
        read_radiograph(film(BodyPartExamined="HIP"), policy(PTX_ACCEPT_BODY_PARTS="CHEST,KLATKA"))
    assert still.value.code is RejectionCode.NOT_CHEST


def test_modalities_and_any_value() -> None:
    mammo = film(Modality="MG")
    with pytest.raises(RadiographError) as refused:
        read_radiograph(mammo, policy())
    assert refused.value.code is RejectionCode.NOT_RADIOGRAPH
    assert read_radiograph(mammo, policy(PTX_ACCEPT_MODALITIES="CR,MG")).modality == "MG"
    assert policy(PTX_ACCEPT_BODY_PARTS="*").body_part_tokens is None
    assert policy(PTX_ACCEPT_MODALITIES="*").modalities is None


def test_an_empty_list_is_refused_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="PTX_ACCEPT_MODALITIES"):
        policy(PTX_ACCEPT_MODALITIES=" , ")
