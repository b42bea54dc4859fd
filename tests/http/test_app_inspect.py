"""The HTTP edge, through a real `bentoml serve`: real chest films accepted, the rest refused with their code."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest

from tests import realdata as registry
from tests.servers import bento_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, realdata):
    with bento_server(tmp_path_factory.mktemp("bento") / "server.log") as base:
        yield base


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: application/dicom\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_every_real_file_gets_its_answer_and_the_server_stays_up(server, realdata):
    for entry in registry.ALL:
        status, body = post(f"{server}/v1/inspect", (realdata / entry.path).read_bytes(), "application/dicom")
        if entry.code is None:
            assert status == 200, (entry.path, body)
            assert body["rows"] > 0 and body["sop_uid"]
            assert ("appears_inverted" in body["warnings"]) is entry.inverted_flag
        else:
            assert body["error"]["code"] == entry.code, entry.path
            assert status == (413 if entry.code == "too_large" else 400 if entry.code == "not_dicom" else 422)
    with urllib.request.urlopen(f"{server}/healthz", timeout=10) as response:
        assert response.status == 200


def test_multipart_upload_and_media_type_errors(server, realdata):
    data = (realdata / "chest/siim_cr_jpegbaseline_mono2.dcm").read_bytes()
    body, content_type = multipart("file", "film.dcm", data)
    status, answer = post(f"{server}/v1/inspect", body, content_type)
    assert status == 200 and answer["spacing_mm"] == pytest.approx([0.168, 0.168])

    body, content_type = multipart("other", "film.dcm", data)
    status, answer = post(f"{server}/v1/inspect", body, content_type)
    assert (status, answer["error"]["code"]) == (400, "missing_file")

    status, answer = post(f"{server}/v1/inspect", b"hello", "text/plain")
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")

    status, answer = post(f"{server}/v1/inspect", b"not a dicom file at all", "application/dicom")
    assert (status, answer["error"]["code"]) == (400, "not_dicom")
