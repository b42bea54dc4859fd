"""Files added to an exported model folder after the export: listed and hashed in its manifest.

Why through the manifest: the service trusts a model folder only as far as its manifest's sha256 go, and a
file beside the model that the manifest does not cover (the films it was trained on, an ensemble's members)
could be swapped without anyone noticing. Roles other than the export's own are free-form in the schema.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.models.manifest import load_manifest, sha256_file, write_manifest


def attach(directory: Path, files: Mapping[str, str], metrics: Mapping[str, Any] | None = None) -> None:
    """List `files` (role -> file name, already written in `directory`) in its manifest with their sha256,
    and merge `metrics` into its metrics; the manifest is validated and re-checked against every file."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    taken = {role: name for role, name in files.items() if manifest.files.get(role, name) != name}
    if taken:
        raise ValueError(f"{directory}: role(s) {', '.join(sorted(taken))} already name other files")
    update = {"files": {**manifest.files, **files},
              "sha256": {**manifest.sha256, **{name: sha256_file(directory / name) for name in files.values()}},
              "metrics": {**manifest.metrics, **(metrics or {})}}
    write_manifest(manifest.model_copy(update=update), directory)


def write_json(directory: Path, name: str, content: Any) -> str:
    """`content` as indented JSON in `directory/name`; returns the name (for `attach`)."""
    (Path(directory) / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return name
