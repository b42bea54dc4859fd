"""The HL7 v2.5.1 ORU^R01 a RIS receives for a notified finding, and the reading of its acknowledgement.

Built with hl7apy (the structures and data types of v2.5.1), which also escapes our values (| ^ ~ \\ &), and
then parsed back and validated against the ORU_R01 structure of v2.5.1 before it is sent: a message that
would not validate is our bug, raised as such, never sent. Why hl7apy and not python-hl7: python-hl7 parses
messages but does not build them, and hl7apy builds and validates v2.5.1 structures (its MLLP server is the
test's RIS); the MLLP framing on our side is three bytes (service/pacs/notify/mllp.py).

    MSH  sending application PTX-TRIAGE, our AE title as facility, ORU^R01^ORU_R01, control ID, P, 2.5.1
    SFT  our software and version
    PID  Patient ID (issuer) and Name: only with PTX_NOTIFY_HL7_PATIENT_IDS, else no PID at all
    ORC  RE, filler order number = Accession Number
    OBR  Accession Number (OBR-3 and OBR-18, IHE's place for it), service PTX-TRIAGE, RAD, status P
    TQ1  priority (HL7 table 0485: S stat, A ASAP for URGENT, R routine)
    OBX  score (NM), priority (ST), finding text (TX), Study Instance UID (DCM 110180), one per model (ST);
         all with result status P: an AI triage result is preliminary, never a final report

The acknowledgement (original mode, HL7 v2.5.1 chapter 2.9): MSA-1 AA (or CA) accepted; AR / CR rejected for
reasons unrelated to the content (the receiver down or busy): sent again later; AE / CE an error in the
message's content: it will not pass by itself, so it is kept and retried rarely, visibly. MSA-2 must echo our
control ID. The receiver's free text (MSA-3, ERR) is neither kept nor logged: it may quote the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.factories import datatype_factory
from hl7apy.parser import parse_message

from service.cascade.finding import Priority
from service.pacs.notify.content import (
    FilmIdentifiers,
    NotificationContent,
    PatientIdentity,
)

HL7_VERSION = "2.5.1"
SENDING_APPLICATION = "PTX-TRIAGE"
SERVICE = "PTX-TRIAGE^Pneumothorax triage (AI)^L"
PRELIMINARY = "P"  # HL7 tables 0123 (OBR-25) and 0085 (OBX-11)
STUDY_UID_CODE = "110180^Study Instance UID^DCM"
_PRIORITY_CODES = {Priority.STAT: "S^Stat^HL70485", Priority.URGENT: "A^ASAP^HL70485",
                   Priority.ROUTINE: "R^Routine^HL70485"}
ACCEPTED, REJECTED, ERROR = frozenset({"AA", "CA"}), frozenset({"AR", "CR"}), frozenset({"AE", "CE"})


def hl7_time(moment: datetime) -> str:
    """DTM in UTC with its offset, to the second."""
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def oru_r01(content: NotificationContent, identifiers: FilmIdentifiers, *, sending_facility: str,
            now: datetime) -> str:
    """The ORU^R01 in ER7 (segments ended by CR), validated against HL7 v2.5.1."""
    message = Message("ORU_R01", version=HL7_VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    msh = message.msh
    _put(msh.msh_3, "hd_1", SENDING_APPLICATION)
    _put(msh.msh_4, "hd_1", sending_facility)
    msh.msh_7 = hl7_time(now)
    msh.msh_9 = "ORU^R01^ORU_R01"
    _put(msh, "msh_10", content.control_id)
    msh.msh_11 = "P"
    msh.msh_12 = HL7_VERSION
    msh.msh_18 = "UNICODE UTF-8"
    product, _, version = content.software.partition(" ")
    sft = message.add_segment("SFT")
    _put(sft.sft_1, "xon_1", product)
    _put(sft, "sft_2", version or "unknown")
    _put(sft, "sft_3", product)
    _put(sft, "sft_4", content.software)

    result = message.add_group("ORU_R01_PATIENT_RESULT")
    if identifiers.patient is not None:
        _patient(result.add_group("ORU_R01_PATIENT").add_segment("PID"), identifiers.patient)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    orc = order.add_segment("ORC")
    orc.orc_1 = "RE"
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    if identifiers.accession_number:
        _put(orc.orc_3, "ei_1", identifiers.accession_number)
        _put(obr.obr_3, "ei_1", identifiers.accession_number)
        _put(obr, "obr_18", identifiers.accession_number)
    obr.obr_4 = SERVICE
    recorded = hl7_time(datetime.fromisoformat(content.recorded_at))
    obr.obr_7 = recorded
    obr.obr_22 = recorded
    obr.obr_24 = "RAD"
    obr.obr_25 = PRELIMINARY
    order.add_group("ORU_R01_TIMING_QTY").add_segment("TQ1").tq1_9 = _PRIORITY_CODES[content.priority]

    observations = [("NM", "PTX-SCORE^Pneumothorax score^L", f"{content.score:.6g}", ""),
                    ("ST", "PTX-PRIORITY^Triage priority^L", content.priority.value, ""),
                    ("TX", "PTX-FINDING^AI triage finding^L", content.text, ""),
                    ("ST", STUDY_UID_CODE, content.study_uid, "")]
    observations += [("ST", "PTX-MODEL^AI model^L", f"{role}: {model['name']} {model['version']}", str(n))
                     for n, (role, model) in enumerate(sorted(content.models.items()), start=1)]
    for number, (kind, code, value, sub_id) in enumerate(observations, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        obx.obx_1 = str(number)
        obx.obx_2 = kind
        obx.obx_3 = code
        if sub_id:
            obx.obx_4 = sub_id
        observed = obx.obx_5
        observed.datatype = kind  # OBX-5 "varies": typed by OBX-2
        observed.value = datatype_factory(kind, value, version=HL7_VERSION)
        obx.obx_11 = PRELIMINARY
        obx.obx_14 = recorded
    text = message.to_er7()
    _validated(text)
    return text


def _patient(pid: object, patient: PatientIdentity) -> None:
    """PID-3 (CX: ID, assigning authority) and PID-5 (XPN: family, given, middle, suffix, prefix)."""
    if patient.id:
        _put(pid.pid_3, "cx_1", patient.id)  # type: ignore[attr-defined]
        if patient.issuer:
            _put(pid.pid_3.cx_4, "hd_1", patient.issuer)  # type: ignore[attr-defined]
    name = pid.pid_5  # type: ignore[attr-defined]
    if patient.family:
        _put(name.xpn_1, "fn_1", patient.family)
    for component, value in (("xpn_2", patient.given), ("xpn_3", patient.middle), ("xpn_4", patient.suffix),
                             ("xpn_5", patient.prefix)):
        if value:
            _put(name, component, value)


def _put(parent: object, name: str, value: str) -> None:
    """Set a leaf to `value` as its own data type, so hl7apy escapes it (a plain string would be parsed as
    ER7: a '^' in a name would split it into components)."""
    element = getattr(parent, name)
    setattr(parent, name, datatype_factory(element.datatype, value, version=HL7_VERSION))


def _validated(text: str) -> None:
    """Parse our message back strictly and validate it against the v2.5.1 ORU_R01 structure."""
    parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    parsed.validate()  # raises hl7apy's ValidationError: a bug of ours, never a message sent


@dataclass(frozen=True)
class Acknowledgement:
    """MSA-1 (the acknowledgement code) and MSA-2 (the control ID it answers): all that is kept of an answer."""

    code: str
    control_id: str


class UnreadableAcknowledgement(ValueError):
    """The answer is not an HL7 acknowledgement we can read; the message says so in our words only."""


def read_acknowledgement(text: str) -> Acknowledgement:
    """MSA-1 and MSA-2 of an HL7 v2 answer (any version hl7apy knows, 2.1 to 2.8.2), read with hl7apy."""
    try:
        message = parse_message(text.strip("\r\n"), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
        msa = message.msa
        code, control_id = str(msa.msa_1.value or "").strip(), str(msa.msa_2.value or "").strip()
    except Exception as error:  # noqa: BLE001 -- hl7apy's errors may quote the answer: its type only
        raise UnreadableAcknowledgement(f"the answer is not an HL7 acknowledgement ({type(error).__name__})") from None
    if not code:
        raise UnreadableAcknowledgement("the acknowledgement has no MSA-1 code")
    return Acknowledgement(code=code.upper(), control_id=control_id)
