"""Which DICOM objects the service accepts as a chest radiograph: selection rules as data.

A site that labels chest films `THORAX` or sends `DR` as modality changes this policy, not code. The
defaults follow what chest radiography actually arrives as: CR and DX images, and Secondary Capture
objects whose Modality says CR/DX (the SIIM-ACR dataset ships its films that way).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import UID

from service.settings import Settings

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")

# Body Part Examined is free text in practice; these tokens, found in the upper-cased value, mean chest.
CHEST_TOKENS = ("CHEST", "THORAX", "THORAC", "LUNG", "TORAX", "TORACE", "BRUST", "POITRINE", "PECHO")


@dataclass(frozen=True)
class AcceptancePolicy:
    """Rules applied to every incoming object before its pixels are decoded (decoding is the costly part).

    `modalities` and `sop_classes` are the accepted values (None: any); an object whose SOP Class is not
    listed is refused even with an accepted Modality, so that an RT Dose or a waveform never reaches a model.
    `body_part_tokens` (None: any): an absent or empty Body Part Examined is accepted, a present one must
    contain a token. Sizes are per side in pixels; `max_pixels` and `max_file_bytes` guard memory before
    anything is decoded.
    """

    modalities: frozenset[str] | None = frozenset({"CR", "DX", "DR"})
    sop_classes: frozenset[str] | None = frozenset(
        {CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING, SECONDARY_CAPTURE}
    )
    body_part_tokens: tuple[str, ...] | None = CHEST_TOKENS
    min_side: int = 256
    max_side: int = 8192
    max_pixels: int = 40_000_000
    max_file_bytes: int = 96 * 1024 * 1024  # 40 M px x 2 bytes = 76 MiB + header (as PTX_MAX_FILE_BYTES)
    reject_inverted: bool = False
    # Refuse a film with nothing to see (constant, near-constant, a few grey levels): `degenerate_image`. Off
    # only for reading what is not a film, such as a training mask PNG (binary, empty for a negative).
    reject_degenerate: bool = True
    # Compressed pixel data decoded in killable worker processes (service.imaging.decode_pool) when set: the
    # service sets it (PTX_DECODE_TIMEOUT_S); None decodes in the calling thread (training, tools).
    decode_timeout_s: float | None = None
    decode_memory_mb: int = 2048  # address space a decode worker may add (PTX_DECODE_MEMORY_MB)
    decode_workers: int = 2  # decode worker processes at most (the service: PTX_DECODE_THREADS)
    # JPEG 2000 and JPEG films decoded only at the resolution the models need (at least this many pixels a side:
    # the service's flow sets the models' input size where PTX_REDUCED_DECODE is on); None decodes in full
    # (training, tools: a mask drawn on the film needs its every pixel).
    decode_min_side: int | None = None
    frontal_views: frozenset[str] = frozenset({"PA", "AP", ""})

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side ({self.max_side}) must be >= min_side ({self.min_side})")
        if self.max_pixels < self.min_side * self.min_side:
            raise ValueError(f"max_pixels ({self.max_pixels}) is below min_side squared ({self.min_side ** 2})")
        if self.decode_min_side is not None and self.decode_min_side < 1:
            raise ValueError(f"decode_min_side must be >= 1 or None, got {self.decode_min_side}")

    @classmethod
    def from_settings(cls, settings: Settings) -> AcceptancePolicy:
        """The service's policy: the `PTX_ACCEPT_*` selection rules and the decode and size limits."""
        return cls(modalities=_any_or(settings.accept_modalities, str.upper, "PTX_ACCEPT_MODALITIES"),
                   sop_classes=_any_or(settings.accept_sop_classes, UID, "PTX_ACCEPT_SOP_CLASSES"),
                   body_part_tokens=_tokens(settings.accept_body_parts), min_side=settings.accept_min_side,
                   max_side=settings.accept_max_side, max_pixels=settings.accept_max_pixels,
                   max_file_bytes=settings.max_file_bytes, reject_inverted=settings.reject_inverted,
                   decode_timeout_s=settings.decode_timeout_s or None, decode_memory_mb=settings.decode_memory_mb,
                   decode_workers=settings.decode_threads)

    def is_chest(self, body_part: str) -> bool:
        if self.body_part_tokens is None:
            return True
        value = body_part.upper()
        return any(token in value for token in self.body_part_tokens)


def _values(text: str, name: str) -> list[str]:
    values = [value.strip() for value in text.split(",") if value.strip()]
    if not values:
        raise ValueError(f"{name} lists no value; give comma-separated values or '*' for any")
    return values


def _any_or(text: str, convert: type | object, name: str) -> frozenset[str] | None:
    """"*": any value (None); otherwise the comma-separated values, converted."""
    if text.strip() == "*":
        return None
    return frozenset(convert(value) for value in _values(text, name))  # type: ignore[operator]


def _tokens(text: str) -> tuple[str, ...] | None:
    if text.strip() == "*":
        return None
    return tuple(token.upper() for token in _values(text, "PTX_ACCEPT_BODY_PARTS"))


def permissive_policy() -> AcceptancePolicy:
    """Any modality, SOP class, body part and size: for tools and tests that exercise decoding itself."""
    return AcceptancePolicy(modalities=None, sop_classes=None, body_part_tokens=None, min_side=1)
