"""The source film as our DICOM results see it: its header without pixels, made safe for highdicom, and the
rule for the attributes our objects copy from it.

highdicom copies the Patient and Study modules from the source and reads a few of their attributes (Patient
ID, Patient's Name, Birth Date, Sex, Accession Number, Study ID, Study Date and Time) as Python attributes,
which fails on a film that lacks one. They are Type 2 (present, possibly empty) in every image IOD, so a film
without one gets it here, empty: never invented. The caller's dataset is never modified.

**Copied attributes whose source value is invalid.** Real films carry values that are not valid DICOM: the
anonymised Canon DX film in the test data has a 56-character hash as its Accession Number (SH: at most 16)
and as its Patient's Birth Date (DA), the SIIM films a Patient's Age of "62" (AS: "062Y"), some sites send
Patient's Sex "U". Our objects must be valid, and must not make anything up, so the rule is:

* a copied attribute whose value in the source is not valid for its VR (length, characters, a date or time
  that does not parse; for a sequence, any value inside it), or not one of its Enumerated Values where the
  standard lists them (`_ENUMERATED`, `patient_orientation`), is written **empty** (zero length): "unknown"
  for Type 2 and 2C, and allowed for Type 3 (the only Type 1 attributes copied are UIDs, below). It is
  never shortened, corrected or guessed: a truncated Accession Number would be a different, valid-looking
  identifier, possibly another patient's order; "62" might be years, months or a typing error;
* the object records which attributes were emptied, and not their values, in an item of the Original
  Attributes Sequence (0400,0561): Reason for the Attribute Modification "CORRECT", Modifying System our
  software, and the attributes in the Modified Attributes Sequence (0400,0550) with zero length, as
  PS3.3 C.12.1.1.9 asks for attributes changed because their value did not conform to the VR. The
  values stay out of our objects (the optional Nonconforming Modified Attributes Sequence is not written):
  they are invalid, and the film in the PACS still has them;
* UIDs are exempt: the Study Instance UID and the references to the film are what tie a result to its film,
  so they are copied as they are; an altered UID would file the result elsewhere.

Names are kept out of highdicom's hands altogether: its name check warns with the name in the message,
which would carry patient names into the service's logs. The header has them empty, and `finish` puts the
source's values, verbatim, on the finished object (empty, and recorded, where a name itself is invalid).
Nothing here logs a value from the film, or puts a patient or study attribute's value in an exception.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DA, DT, TM, validate_value

from service.cascade.finding import Finding
from service.imaging.reader import pixel_spacing

# Type 2 attributes of the Patient and General Study modules that highdicom reads by attribute access.
_TYPE_2_READ_BY_HIGHDICOM = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                             "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_NAMES = ("PatientName", "ReferringPhysicianName")
_PIXEL_DATA_TAGS = frozenset(Tag(keyword) for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
_PARSED = {"DA": DA, "TM": TM, "DT": DT}
_AS_STRING = frozenset({"PN", "DS", "IS"})  # pydicom keeps these as objects; their text is what was sent
# Enumerated Values (PS3.3) of the attributes our objects copy that have them.
_ENUMERATED = {
    "PatientSex": frozenset({"M", "F", "O"}),  # C.7.1.1
    "ImageLaterality": frozenset({"R", "L", "U", "B"}),  # C.7.6.1
    "Laterality": frozenset({"R", "L"}),  # C.7.3.1
}
_PATIENT_ORIENTATION_LETTERS = frozenset("LRAPHF")  # C.7.6.1.1.1, biped anatomical orientation
REASON = "CORRECT"  # Reason for the Attribute Modification: brought into conformance


def source_header(source: Dataset) -> Dataset:
    """A copy of `source`'s header (its own element objects, no pixel data) that highdicom can build from.

    The attributes highdicom reads (`_TYPE_2_READ_BY_HIGHDICOM`) are present, and empty where the source
    lacks them or has an invalid value (see the module docstring); names are empty (see `finish`).
    An unusable Pixel Spacing (zero, negative, non-numeric: the Philips film in the test data says 0\\0) is
    dropped, because highdicom would otherwise copy it into the SEG's pixel measures; the spacing our objects
    use comes from `service.imaging.reader.pixel_spacing`, the same function behind every millimetre in the API.
    """
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not source.get(keyword):
            raise ValueError(f"the source has no {keyword}: a DICOM result must reference its source film")
    header = Dataset()
    for element in source:
        if element.tag not in _PIXEL_DATA_TAGS:
            header.add(copy.copy(element))  # own element objects: setting a value below leaves the source alone
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    invalid = invalid_attributes(source)
    for keyword in _TYPE_2_READ_BY_HIGHDICOM:
        if keyword not in header or Tag(keyword) in invalid or keyword in _NAMES:
            setattr(header, keyword, None)
    _, spacing_source = pixel_spacing(source)
    if spacing_source != "PixelSpacing" and "PixelSpacing" in header:
        del header.PixelSpacing
    return header


def invalid_attributes(source: Dataset) -> frozenset[BaseTag]:
    """The top-level attributes of `source` whose value our objects may not copy (see the module docstring).

    Pixel data, private attributes and UIDs are not judged; an empty value is always valid.
    """
    return frozenset(element.tag for element in source
                     if element.tag not in _PIXEL_DATA_TAGS and not element.tag.is_private
                     and element.VR != "UI" and not _valid(element))


def _valid(element: DataElement) -> bool:
    if element.VR == "SQ":
        return all(_valid(inner) for item in element.value or () for inner in item
                   if not inner.tag.is_private and inner.VR != "UI")
    values = _values(element)
    enumerated = _ENUMERATED.get(element.keyword)
    if enumerated is not None and not all(str(value) in enumerated for value in values):
        return False
    if element.keyword == "PatientOrientation" and values and _orientation(values) is None:
        return False
    return all(_valid_value(element.VR, value, _PARSED.get(element.VR)) for value in values)


def _values(element: DataElement) -> list[Any]:
    value = element.value
    if value is None or value == "" or value == b"":
        return []
    return list(value) if isinstance(value, (list, MultiValue)) else [value]


def _valid_value(vr: str, value: Any, parse: Callable[[str], Any] | None) -> bool:
    text = str(value) if vr in _AS_STRING else value
    try:
        validate_value(vr, text, config.RAISE)  # the message names the value: caught, never passed on
        if parse is not None and isinstance(value, str) and value.strip():
            parse(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _orientation(values: Iterable[Any]) -> tuple[str, str] | None:
    values = [str(value) for value in values]
    if len(values) != 2 or not all(value and set(value) <= _PATIENT_ORIENTATION_LETTERS for value in values):
        return None
    return values[0], values[1]


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation where it is two valid values, else None.

    Our images keep the film's pixel grid (the SC adds rows above it), so the film's orientation is theirs.
    """
    return _orientation(_values(source["PatientOrientation"])) if "PatientOrientation" in source else None


def copy_attributes(result: Dataset, source: Dataset, keywords: Iterable[str]) -> None:
    """Copy `keywords` that are present in `source` to `result` as they are; `finish` then applies the rule."""
    for keyword in keywords:
        if keyword in source:
            result.add(copy.deepcopy(source[keyword]))


def finish(result: Dataset, source: Dataset, modifying_system: str) -> list[str]:
    """Put the source's names on `result` and empty what it copied invalid from `source`; returns the keywords
    emptied, which are also recorded in `result`'s Original Attributes Sequence (see the module docstring).

    An attribute counts as copied where `result` has the source's value, or an empty one (left so by
    `source_header`, or by a builder that declined the value); a value of our own is never touched.
    """
    invalid = invalid_attributes(source)
    for keyword in _NAMES:
        tag = Tag(keyword)
        value = source[keyword].value if keyword in source and tag not in invalid else None
        result[keyword] = DataElement(tag, "PN", value)
    emptied = []
    for tag in sorted(invalid):
        if tag not in result:
            continue
        element = result[tag]
        if not _values(element) or element.value == source[tag].value:
            element.value = Sequence() if element.VR == "SQ" else None
            emptied.append(tag)
    if emptied:
        _record(result, emptied, modifying_system)
    return [result[tag].keyword or str(tag) for tag in emptied]


def _record(result: Dataset, tags: list[BaseTag], modifying_system: str) -> None:
    """One Original Attributes Sequence item naming the emptied attributes, each with a zero-length value."""
    modified = Dataset()
    for tag in tags:
        vr = result[tag].VR
        modified.add(DataElement(tag, vr, Sequence() if vr == "SQ" else None))
    item = Dataset()
    item.SourceOfPreviousValues = None  # Type 2; the values came from the referenced source film
    item.AttributeModificationDateTime = datetime.now().strftime("%Y%m%d%H%M%S.%f")
    item.ModifyingSystem = modifying_system
    item.ReasonForTheAttributeModification = REASON
    item.ModifiedAttributesSequence = [modified]
    result.OriginalAttributesSequence = [*result.get("OriginalAttributesSequence", []), item]


def check_source(source: Dataset, finding: Finding) -> None:
    """The finding must be this film's: same SOP Instance UID where the finding has one, mask on its grid."""
    if finding.sop_uid is not None and finding.sop_uid != str(source.SOPInstanceUID):
        raise ValueError(f"the finding is for SOP Instance UID {finding.sop_uid}, "
                         f"the source is {source.SOPInstanceUID}")
    film = (int(source.Rows), int(source.Columns))
    shape = tuple(finding.mask.shape)
    if shape != film:
        raise ValueError(f"the finding's mask has shape {shape} but the source film is {film[0]} x {film[1]} "
                         f"(Rows (0028,0010) x Columns (0028,0011)): every result is drawn on the film's own grid")
