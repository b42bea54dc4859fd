"""The image's pinned requirements (requirements/serve.lock.txt, `make lock`) still satisfy requirements/serve.txt."""

from __future__ import annotations

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.servers import REPO


def _lines(name: str) -> list[str]:
    text = (REPO / "requirements" / name).read_text()
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def test_the_lock_pins_every_serving_requirement_within_its_range():
    pins: dict[str, str] = {}
    for line in _lines("serve.lock.txt"):
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{line}: the lock pins exact versions"
        assert canonicalize_name(requirement.name) not in pins, f"{requirement.name} pinned twice"
        pins[canonicalize_name(requirement.name)] = specifier.version
    assert "torch" not in pins, "the serving image runs ONNX Runtime: torch (GBs) must not be in it"
    stale = []
    for line in _lines("serve.txt"):
        requirement = Requirement(line)
        version = pins.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            stale.append(f"{line} (lock: {version})")
    assert not stale, f"requirements/serve.lock.txt is stale, run `make lock`: {stale}"
