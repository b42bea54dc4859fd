"""Sending by C-STORE (pynetdicom): one association per object, statuses judged per PS3.4 Annex B.

A failure is stored and logged as its status code and our words for it, never the receiver's Error
Comment (0000,0902): that is the peer's free text and may quote the object's values, patient name
included (issue 13 §11a). Library messages about our own object are left out for the same reason.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

from service.pacs.delivery.destinations import (
    DEFAULT_CALLING_AE,
    Destination,
    _host_for_url,
)
from service.pacs.delivery.sender import DeliveryError, _read_bytes

LOG = logging.getLogger("service.pacs.delivery")


_CSTORE_RETRYABLE = {0x0110, 0x0210, 0x0213, 0xFE00}  # processing failure, duplicate invocation, resources, cancel
_DUPLICATE_SOP_INSTANCE = 0x0111  # the receiver already has this SOP instance (our earlier send got through)


def _status_retryable(status: int) -> bool:
    return status in _CSTORE_RETRYABLE or 0xA700 <= status <= 0xA7FF


def _status_name(status: int) -> str:
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    return {0x0110: "processing failure", 0x0111: "duplicate SOP instance", 0x0117: "invalid SOP instance",
            0x0122: "SOP class not supported", 0x0124: "not authorised", 0x0210: "duplicate invocation",
            0x0211: "unrecognised operation", 0x0212: "mistyped argument", 0x0213: "resource limitation",
            0xFE00: "cancelled"}.get(status, "failure")


class CStoreSender:
    """C-STORE SCU for one `dicom://` destination: one association per object, proposing the object's SOP
    class in its own transfer syntax (and, for an uncompressed one, the other uncompressed syntaxes, which
    pynetdicom converts between losslessly). Every step is bounded: TCP connect by `connect_timeout_s`,
    the association, the C-STORE response and the network by `timeout_s`."""

    def __init__(self, destination: Destination, *, calling_ae: str = DEFAULT_CALLING_AE,
                 connect_timeout_s: float = 5.0, timeout_s: float = 30.0) -> None:
        if destination.protocol != "dicom":
            raise ValueError(f"CStoreSender needs a dicom:// destination, got {destination.name!r}")
        if not 1 <= len(calling_ae.strip()) <= 16 or "\\" in calling_ae or not calling_ae.isascii():
            raise ValueError(f"calling AE title {calling_ae!r} must be 1 to 16 ASCII characters without '\\'")
        self.destination = destination
        self.calling_ae = calling_ae.strip()
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s

    def send(self, path: str | Path) -> None:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, evt

        name = self.destination.name
        data = _read_bytes(path)  # the same missing / not-Part-10 errors as STOW
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except (InvalidDicomError, OSError, ValueError, EOFError) as error:
            raise DeliveryError(f"cannot read {path} as DICOM ({type(error).__name__})", retryable=False) from None
        try:
            sop_class = UID(dataset.SOPClassUID)
            syntax = UID(dataset.file_meta.TransferSyntaxUID)
            dataset.SOPInstanceUID  # noqa: B018 - C-STORE needs it; fail here with a clear message
        except AttributeError as error:
            raise DeliveryError(f"{path} lacks what C-STORE needs: {error}", retryable=False) from None
        syntaxes = [syntax]
        if not syntax.is_compressed and syntax.is_little_endian:
            syntaxes += [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != syntax]

        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = self.connect_timeout_s
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.add_requested_context(sop_class, syntaxes)
        connected = threading.Event()  # pynetdicom reports a refused connection as an abort; this tells them apart
        assoc = ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.set())])
        try:
            if not assoc.is_established:
                raise self._association_error(assoc, sop_class, syntax, connected.is_set())
            status = assoc.send_c_store(dataset)
            code = int(status.Status) if "Status" in status else None
        except ValueError:  # pynetdicom: no usable accepted context, or the dataset cannot be encoded
            raise DeliveryError(f"{name}: cannot send {sop_class.name} in any accepted presentation context "
                                "(ValueError from pynetdicom)", retryable=False) from None
        finally:
            if assoc.is_established:  # otherwise pynetdicom has already closed it
                assoc.release()
        if code is None:
            raise DeliveryError(f"{name}: no C-STORE response within {self.timeout_s:g} s "
                                "(timeout, abort or invalid response)", retryable=True, destination_down=True)
        if code == 0x0000:
            return
        if code == _DUPLICATE_SOP_INSTANCE or 0xB000 <= code <= 0xBFFF:
            LOG.warning("delivery to %s: C-STORE succeeded with status 0x%04X (%s)", name, code,
                        "duplicate SOP instance, already stored" if code == _DUPLICATE_SOP_INSTANCE
                        else "warning: coercion or elements discarded")
            return
        raise DeliveryError(f"{name}: C-STORE failed with status 0x{code:04X} ({_status_name(code)})",
                            retryable=_status_retryable(code))  # the Error Comment is the peer's text: left out

    def _association_error(self, assoc: object, sop_class: object, syntax: object, connected: bool) -> DeliveryError:
        name = self.destination.name
        rejected_contexts = getattr(assoc, "rejected_contexts", [])
        primitive = getattr(getattr(assoc, "acceptor", None), "primitive", None)
        if getattr(assoc, "is_rejected", False) and primitive is not None:
            transient = getattr(primitive, "result", None) == 0x02
            return DeliveryError(f"{name}: association rejected ({primitive.result_str}, {primitive.source_str}: "
                                 f"{primitive.reason_str})", retryable=transient, destination_down=True)
        if rejected_contexts and not getattr(assoc, "accepted_contexts", None):
            return DeliveryError(f"{name}: the receiver accepted no presentation context for "
                                 f"{getattr(sop_class, 'name', sop_class)} in {getattr(syntax, 'name', syntax)}",
                                 retryable=False)
        if connected:
            return DeliveryError(f"{name}: association aborted or no answer within {self.timeout_s:g} s",
                                 retryable=True, destination_down=True)
        return DeliveryError(f"{name}: could not connect to {_host_for_url(self.destination.host)}:"
                             f"{self.destination.port} (refused, unreachable or no answer within "
                             f"{self.connect_timeout_s:g} s)", retryable=True, destination_down=True)

    def close(self) -> None:
        """Nothing held between sends (one association per object)."""


# STOW-RS (PS3.18 10.5): HTTP statuses by what they say about a retry and about the destination.
