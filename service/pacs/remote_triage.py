"""The intake's triage over HTTP (PTX_TRIAGE_URL): a listener's films triaged by the triage replicas.

    Intake ─▶ RemoteTriage(bytes) ─POST {url}/v1/triage?mask=rle&record=false─▶ Service / nginx ─▶ a replica
       200                    ─▶ Finding: mask from the RLE at the film's Rows x Columns, UIDs from the local header
       503                    ─▶ wait its Retry-After (1..60 s), again       outcome busy
       502, 504, no connection ─▶ wait, again                                  outcome unreachable
       4xx, a rejection code  ─▶ RadiographError(code): the intake fails the film with it   outcome rejected
       anything else          ─▶ RemoteTriageError: the intake spends one of the film's attempts   outcome failed

Why HTTP: listeners (each with its own volume and spool) and triage replicas (the model workers) scale apart,
and a film from the PACS then joins a replica's adaptive batches exactly like a film posted by a client.
Why waiting is not failing: a 503 is a replica that is full, draining or whose model is out of service, and a
502/504 or a refused connection is a replica gone (a rolling update, nginx without an upstream); none says
anything about the film, which was acknowledged to its sender and must stay spooled until a replica takes it
(the in-process path waits the same way: `cascade.served.until_available`). The wait ends when the intake
stops (cancellation). A reply that never comes within PTX_TRIAGE_TIMEOUT_S does spend an attempt: a film that
hangs every replica must end failed (internal_error, its file kept for a retry) rather than loop for ever.
Only the rejection codes of the film's content (`RejectionCode`: 400/413/422) fail it for good: a 401 (a wrong
PTX_TRIAGE_TOKEN) or another 4xx is about our request, not the film, and spends an attempt instead.

`record=false`: a replica that puts HTTP films on the worklist (PTX_RECORD_HTTP) must not record this one too:
the intake records it, with its listener and spool file. The UIDs come from the local file, not the answer,
because a replica may answer de-identified (PTX_DEIDENTIFY_RESPONSES). The Finding has no `source` (no parsed
header, no pixels crossed the network): `Pacs._write_results` parses and decodes the film once more for the
SEG/SR/SC, the price of not shipping pixels back.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from pydicom import dcmread

from service.cascade import rle
from service.cascade.finding import Finding, Priority
from service.cascade.masks import Instance
from service.cascade.scoring import Ood
from service.errors import ServiceError
from service.imaging.radiograph import RadiographError, RejectionCode
from service.settings import Settings

log = logging.getLogger("ptx.intake")

OK, BUSY, UNREACHABLE, REJECTED, FAILED = "ok", "busy", "unreachable", "rejected", "failed"
OUTCOMES = (OK, BUSY, UNREACHABLE, REJECTED, FAILED)  # ptx_remote_triage_total{outcome}
MIN_WAIT_S, MAX_WAIT_S = 1.0, 60.0  # a Retry-After outside these is clamped: no busy loop, no hour-long wait
CONNECT_TIMEOUT_S = 10.0
GONE_STATUSES = (502, 504)  # nginx / a proxy without a live upstream
HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns"]
REJECTIONS = {code.value: code for code in RejectionCode}
LABELS = {"pneumothorax": True, "no_pneumothorax": False}


class TriageUrlError(ValueError):
    """PTX_TRIAGE_URL is not an http(s) URL naming a host (the message never repeats credentials)."""


class RemoteTriageError(ServiceError):
    """An answer from the triage service that is neither a finding nor a rejection of the film: the intake
    spends one of the film's attempts on it. `code` is the answer's error code where it had one."""

    code, http_status = "remote_triage_failed", 502


def check_url(url: str) -> str:
    """The triage service's base URL (its root, without `/v1`), checked: http(s), a host, a valid port, no
    credentials (PTX_TRIAGE_TOKEN carries the token), no query or fragment. TriageUrlError otherwise."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port  # ValueError for a port that is not a number in 0..65535
    except ValueError:
        raise TriageUrlError("PTX_TRIAGE_URL has an invalid port; expected http(s)://host[:port]") from None
    if parts.scheme not in ("http", "https"):
        raise TriageUrlError(f"PTX_TRIAGE_URL must start with http:// or https://, got scheme {parts.scheme!r}")
    if not parts.hostname:
        raise TriageUrlError("PTX_TRIAGE_URL names no host; expected http(s)://host[:port], e.g. "
                             "http://ptx-triage:3000")
    if parts.username is not None or parts.password is not None:
        raise TriageUrlError("PTX_TRIAGE_URL must not carry credentials; set PTX_TRIAGE_TOKEN instead")
    if parts.query or parts.fragment:
        raise TriageUrlError("PTX_TRIAGE_URL must be the service's root without query or fragment, e.g. "
                             "http://ptx-triage:3000")
    if port == 0:
        raise TriageUrlError("PTX_TRIAGE_URL names port 0; give the triage service's port or none")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def check_settings(settings: Settings) -> None:
    """PTX_TRIAGE_URL checked where it is set (at import in service/app.py: a bad URL stops `bentoml serve`
    in one line, instead of a PACS side that never starts); TriageUrlError names the setting."""
    if settings.triage_url:
        check_url(settings.triage_url)


def wait_s(retry_after: str | None, default_s: float) -> float:
    """Seconds to wait before asking again: the answer's Retry-After in seconds (an HTTP-date, or none, gives
    `default_s`), clamped to MIN_WAIT_S..MAX_WAIT_S."""
    seconds = default_s
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:
            pass
    if not math.isfinite(seconds):
        seconds = default_s
    return min(max(seconds, MIN_WAIT_S), MAX_WAIT_S)


@dataclass(frozen=True)
class FilmHeader:
    """What the finding needs of the spooled file itself: its UIDs and the size its mask is decoded at."""

    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    rows: int
    columns: int

    @classmethod
    def read(cls, data: bytes) -> FilmHeader:
        """From the file's header alone (no pixel data read); RemoteTriageError where Rows or Columns is missing."""
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True, specific_tags=HEADER_TAGS)

        def uid(keyword: str) -> str | None:
            return str(ds.get(keyword, "") or "") or None

        try:
            rows, columns = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError):
            raise RemoteTriageError("the spooled film has no usable Rows (0028,0010) / Columns (0028,0011) to "
                                    "decode the triage service's mask at") from None
        return cls(uid("StudyInstanceUID"), uid("SeriesInstanceUID"), uid("SOPInstanceUID"), rows, columns)


def finding_from_answer(body: Mapping[str, Any], header: FilmHeader) -> Finding:
    """The Finding of a triage answer (`Finding.to_json("rle")`'s shape) for the film `header` describes.
    KeyError / TypeError / ValueError (RLEError among them) for an answer that does not fit."""
    mask = rle.decode(body["rle"], header.rows, header.columns)
    if body["label"] not in LABELS:
        raise ValueError(f"label {body['label']!r} is none of {', '.join(LABELS)}")
    return Finding(
        study_uid=header.study_uid, series_uid=header.series_uid, sop_uid=header.sop_uid,
        score=float(body["score"]), positive=LABELS[body["label"]], priority=Priority(body["priority"]),
        threshold=float(body["threshold"]), mask=mask, rle=str(body["rle"]),
        instances=[_instance(item) for item in body["instances"]],
        warnings=tuple(str(w) for w in body["warnings"]), models=dict(body["models"]), ood=_ood(body["ood"]),
        timings_ms={str(k): float(v) for k, v in dict(body.get("timings_ms") or {}).items()})


def _instance(item: Mapping[str, Any]) -> Instance:
    x, y, w, h = (int(v) for v in item["bbox_px"])
    cx, cy = (float(v) for v in item["centroid_px"])
    mm = item["bbox_mm"]
    return Instance(bbox_px=(x, y, w, h), area_px=int(item["area_px"]), centroid_px=(cx, cy),
                    bbox_mm=None if mm is None else tuple(float(v) for v in mm),  # type: ignore[arg-type]
                    area_mm2=None if item["area_mm2"] is None else float(item["area_mm2"]))


def _ood(value: Mapping[str, Any] | None) -> Ood | None:
    """The answer's OOD reading. Its distance is rounded to 3 places, which can move it across the threshold:
    the replica's `flag` is kept (it set the priority cap and the warning), the distance nudged to agree."""
    if value is None:
        return None
    distance, threshold, flag = float(value["distance"]), float(value["threshold"]), bool(value["flag"])
    if flag != (distance > threshold):
        distance = math.nextafter(threshold, math.inf) if flag else threshold
    return Ood(distance, threshold)


class RemoteTriage:
    """`await triage(data)` → Finding, as `ServedCascade.triage_spooled`, through the triage service at `url`.

    One `httpx.AsyncClient` shared by the intake's workers, made on first use on the running loop and closed
    by `aclose` (Pacs.stop). `default_wait_s`: the pause where an answer gives no Retry-After (PTX_RETRY_AFTER_S).
    `on_outcome(outcome)` counts each answer or failure to connect by `OUTCOMES` (ptx_remote_triage_total).
    """

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 120.0, *, default_wait_s: float = 2.0,
                 on_outcome: Callable[[str], None] | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"PTX_TRIAGE_TIMEOUT_S must be positive, got {timeout_s}")
        self.base = check_url(url)
        self.endpoint = f"{self.base}/v1/triage"
        self.timeout_s, self.default_wait_s = float(timeout_s), float(default_wait_s)
        self._headers = {"Content-Type": "application/dicom", "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.on_outcome = on_outcome
        self._http: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never the token
        return f"RemoteTriage({self.base!r})"

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                headers=self._headers, follow_redirects=False,
                timeout=httpx.Timeout(self.timeout_s, connect=min(CONNECT_TIMEOUT_S, self.timeout_s)))
        return self._http

    async def aclose(self) -> None:
        """Close the shared client (its connections); a later call opens a new one."""
        client, self._http = self._http, None
        if client is not None:
            await client.aclose()

    async def __call__(self, data: bytes) -> Finding:
        warned: set[str] = set()
        while True:
            try:
                response = await self._client().post(self.endpoint, content=data,
                                                      params={"mask": "rle", "record": "false"})
            except (httpx.ConnectTimeout, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                # Refused, reset, cut off mid-answer (a replica killed), no route: nobody has the film.
                await self._wait(UNREACHABLE, type(exc).__name__, None, warned)
                continue
            except httpx.TimeoutException:
                self._count(FAILED)
                raise RemoteTriageError(f"no answer from PTX_TRIAGE_URL within PTX_TRIAGE_TIMEOUT_S="
                                        f"{self.timeout_s:g} s") from None
            except httpx.HTTPError as exc:
                self._count(FAILED)
                raise RemoteTriageError(f"the call to PTX_TRIAGE_URL failed ({type(exc).__name__})") from None
            if response.status_code == 503:
                await self._wait(BUSY, "503", response.headers.get("Retry-After"), warned)
            elif response.status_code in GONE_STATUSES:
                await self._wait(UNREACHABLE, str(response.status_code), response.headers.get("Retry-After"), warned)
            else:
                return await self._judge(response, data)

    async def _wait(self, outcome: str, what: str, retry_after: str | None, warned: set[str]) -> None:
        """Count, log once per film and kind, and sleep (cancelled when the intake stops)."""
        self._count(outcome)
        pause = wait_s(retry_after, self.default_wait_s)
        if outcome not in warned:
            warned.add(outcome)
            log.warning("triage service at PTX_TRIAGE_URL %s (%s); the film stays spooled, asked again every "
                        "%.0f s", "busy" if outcome == BUSY else "unreachable", what, pause)
        await asyncio.sleep(pause)

    async def _judge(self, response: httpx.Response, data: bytes) -> Finding:
        """A final answer: the finding, the film's rejection, or a RemoteTriageError (an attempt spent)."""
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if status == 200 and isinstance(body, dict):
            try:
                header = await asyncio.to_thread(FilmHeader.read, data)
                finding = finding_from_answer(body, header)
            except RemoteTriageError:
                self._count(FAILED)
                raise
            except (KeyError, TypeError, ValueError) as exc:
                self._count(FAILED)
                raise RemoteTriageError(f"the triage service's answer could not be read as a finding "
                                        f"({type(exc).__name__}: {exc})"[:300]) from None
            self._count(OK)
            return finding
        error = body.get("error") if isinstance(body, dict) else None
        code = str(error.get("code", "")) if isinstance(error, dict) else ""
        message = str(error.get("message", "")) if isinstance(error, dict) else ""
        if 400 <= status < 500 and code in REJECTIONS:
            self._count(REJECTED)
            raise RadiographError(REJECTIONS[code], message or f"rejected by the triage service ({code})")
        self._count(FAILED)
        hint = (" (is PTX_TRIAGE_TOKEN the triage service's PTX_API_TOKEN?)" if status in (401, 403) else
                " (is PTX_TRIAGE_URL the triage service's root?)" if status == 404 else "")
        raise RemoteTriageError(f"the triage service answered {status}{f' {code}' if code else ''}{hint}"
                                f"{f': {message}' if message else ''}"[:300], code=code or None)

    def _count(self, outcome: str) -> None:
        if self.on_outcome is None:
            return
        try:
            self.on_outcome(outcome)
        except Exception:
            log.warning("remote triage on_outcome failed", exc_info=True)


__all__ = ["OUTCOMES", "FilmHeader", "RemoteTriage", "RemoteTriageError", "TriageUrlError", "check_settings",
           "check_url", "finding_from_answer", "wait_s"]
