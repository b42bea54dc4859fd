"""Fuzzing the HTTP upload path and the multipart parser through a real `bentoml serve`.

Raw sockets, so nothing in between tidies the request: mutated real films under every accepted and some
refused content types, random bodies, multipart bodies with mutated, truncated, missing or surplus parts and
odd boundaries, declared lengths that lie. The only answers are 2xx or 4xx, every 4xx in our JSON error
shape, never a 5xx, never a hang; afterwards the server still triages a good film and has counted no
internal error. One server for the module, with small limits so they are reachable quickly.
"""

from __future__ import annotations

import collections
import json
import socket
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_cases import deflate_bomb, load_files, mutated, nested_sequences
from tests.http.test_app_triage import metrics_text
from tests.servers import bento_server

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MAX_BYTES = 8 * 1024 * 1024
MAX_FILES = 4
DECODE_TIMEOUT_S = 0.5
EXAMPLES = 400
FILMS = ("chest/siim_cr_jpegbaseline_mono2.dcm", "other/MR_small_RLE.dcm", "other/CT_small.dcm",
         "corrupt/MR_truncated.dcm", "other/image_dfl.dcm")
GOOD = "chest/siim_cr_jpegbaseline_mono2.dcm"
STATUSES: collections.Counter[int] = collections.Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, realdata: Path):
    env = {"PTX_DATA_DIR": str(tmp_path_factory.mktemp("ptx-data")), "PTX_MAX_FILE_BYTES": str(MAX_BYTES),
           "PTX_MAX_FILES_PER_REQUEST": str(MAX_FILES), "PTX_DECODE_TIMEOUT_S": str(DECODE_TIMEOUT_S),
           "PTX_MAX_BATCH_SIZE": "4",
           # full-size decodes: the decode limit is tested with a codestream whose FULL decode is slow (a reduced
           # one takes a fraction of it; tests/imaging/test_reduced_decode.py covers that path)
           "PTX_REDUCED_DECODE": "false"}
    with bento_server(tmp_path_factory.mktemp("bento") / "server.log", env=env, timeout_s=180) as base:
        yield base


@pytest.fixture(scope="module")
def films(realdata: Path) -> dict[str, bytes]:
    return load_files(realdata, FILMS)


def address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


def exchange(base: str, request: bytes, half_close: bool = False, timeout_s: float = 60) -> tuple[int | None, bytes]:
    """Send raw bytes, read the answer until the server closes. (None, b"") when it answered nothing."""
    with socket.create_connection(address(base), timeout=timeout_s) as sock:
        try:
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered (413) and closed before the rest was sent: read what it said
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        except socket.timeout:
            pytest.fail(f"no answer within {timeout_s} s (a hang): {request[:120]!r}")
    if not answer:
        return None, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def request_bytes(path: str, body: bytes, content_type: str | None, length: int | None = None) -> bytes:
    headers = [f"POST {path} HTTP/1.1", "Host: fuzz", "Connection: close",
               f"Content-Length: {len(body) if length is None else length}"]
    if content_type is not None:
        headers.append(f"Content-Type: {content_type}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body


def check_answer(status: int | None, body: bytes, path: str) -> None:
    """2xx or 4xx; a 4xx is exactly our error shape; a 200 is a finding, a batch or an inspection."""
    assert status is not None, "the server closed the connection without answering"
    STATUSES[status] += 1
    assert status < 500, f"{status}: {body[:300]!r}"
    answer = json.loads(body)
    if status >= 400:
        assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message"}, answer
        assert answer["error"]["code"] and answer["error"]["message"]
        return
    assert status == 200
    if path.startswith("/v1/triage/batch"):
        assert 1 <= len(answer["results"]) <= MAX_FILES
        for item in answer["results"]:
            assert "score" in item or set(item["error"]) == {"code", "message"}, item
    elif path.startswith("/v1/triage"):
        assert 0.0 <= answer["score"] <= 1.0
    else:
        assert answer["rows"] > 0


BOUNDARY = st.sampled_from(["b0undary", "x", "-" * 70, "a b", "=?utf-8?", "'quoted'", "b" * 200])  # ASCII: h11 refuses other header bytes before our app
PATH = st.sampled_from(["/v1/triage", "/v1/triage?mask=rle", "/v1/triage?mask=bogus", "/v1/inspect",
                        "/v1/triage/batch", "/v1/triage/batch?mask=none"])


@st.composite
def multipart_body(draw: st.DrawFn, films: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = draw(BOUNDARY)
    parts = []
    for _ in range(draw(st.integers(0, MAX_FILES + 3))):
        field = draw(st.sampled_from(["file", "file", "file", "image", ""]))
        payload = draw(mutated(films)) if draw(st.booleans()) else films[draw(st.sampled_from(sorted(films)))]
        disposition = draw(st.sampled_from([f'form-data; name="{field}"; filename="f.dcm"', f'form-data; name="{field}"',
                                            "attachment", ""]))
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: application/dicom\r\n\r\n"
                     .encode() + payload + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]  # truncated anywhere
    declared = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", f'multipart/form-data; boundary="{boundary}"',
                                     "multipart/form-data", "multipart/form-data; boundary=", "multipart/mixed; boundary=x"]))
    return body, declared


@st.composite
def fuzz_request(draw: st.DrawFn, films: dict[str, bytes]) -> tuple[str, bytes, str | None]:
    path = draw(PATH)
    kind = draw(st.sampled_from(["film", "film", "multipart", "multipart", "random"]))
    if kind == "multipart":
        body, content_type = draw(multipart_body(films))
        return path, body, content_type
    body = draw(mutated(films)) if kind == "film" else draw(st.binary(max_size=2048))
    content_type = draw(st.sampled_from(["application/dicom", "application/octet-stream", "image/png",
                                         "application/dicom; charset=binary", "APPLICATION/DICOM", "text/plain",
                                         "", None, "application/json", "image/png; x=\"y\""]))
    return path, body, content_type


def test_fuzzed_uploads_get_only_2xx_or_named_4xx(server: str, films: dict[str, bytes]) -> None:
    STATUSES.clear()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=fuzz_request(films))
    def run(case: tuple[str, bytes, str | None]) -> None:
        path, body, content_type = case
        status, answer = exchange(server, request_bytes(path, body, content_type))
        check_answer(status, answer, path)

    run()
    assert sum(STATUSES.values()) == EXAMPLES
    assert STATUSES[200] > 0 and len([s for s in STATUSES if 400 <= s < 500]) >= 3, STATUSES
    print(f"\nfuzz HTTP: {EXAMPLES} requests, statuses {dict(sorted(STATUSES.items()))}")


@pytest.mark.parametrize("case", ["nested", "deflate_bomb", "lying_length_huge", "chunked_over_limit",
                                  "too_many_parts", "many_fields", "empty_multipart"])
def test_crafted_requests(server: str, films: dict[str, bytes], case: str) -> None:
    good = films[GOOD]
    if case == "nested":
        status, body = exchange(server, request_bytes("/v1/triage", nested_sequences(1000, True), "application/dicom"))
        expected = (400, "not_dicom")
    elif case == "deflate_bomb":
        status, body = exchange(server, request_bytes("/v1/inspect", deflate_bomb(600 * 1024 * 1024), "application/dicom"))
        expected = (413, "too_large")
    elif case == "lying_length_huge":  # announces a terabyte, sends a kilobyte
        status, body = exchange(server, request_bytes("/v1/triage", good[:1024], "application/dicom", length=10**12))
        expected = (413, "too_large")
    elif case == "chunked_over_limit":  # no length announced: refused while streaming
        chunk = b"%x\r\n" % len(good) + good + b"\r\n"
        request = (b"POST /v1/triage HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\nContent-Type: application/dicom\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n" + chunk * (MAX_BYTES // len(good) + 2) + b"0\r\n\r\n")
        status, body = exchange(server, request)
        expected = (413, "too_large")
    elif case == "too_many_parts":
        parts = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nx\r\n"
                         for _ in range(MAX_FILES + 1))
        status, body = exchange(server, request_bytes("/v1/triage/batch", parts + b"--b--\r\n",
                                                      "multipart/form-data; boundary=b"))
        expected = (400, "invalid_multipart")
    elif case == "many_fields":
        parts = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nx\r\n" % i for i in range(5000))
        status, body = exchange(server, request_bytes("/v1/triage", parts + b"--b--\r\n", "multipart/form-data; boundary=b"))
        expected = (400, "invalid_multipart")
    else:
        status, body = exchange(server, request_bytes("/v1/triage/batch", b"--b--\r\n", "multipart/form-data; boundary=b"))
        expected = (400, "missing_file")
    check_answer(status, body, "/v1/triage")
    assert (status, json.loads(body)["error"]["code"]) == expected, body[:300]


def test_a_client_that_leaves_mid_body_is_not_an_internal_error(server: str, films: dict[str, bytes]) -> None:
    before = metrics_text(server)
    request = request_bytes("/v1/triage", films[GOOD][:1000], "application/dicom", length=200_000)
    status, _ = exchange(server, request, half_close=True)
    assert status in (None, 400)  # nobody is there to read it; what matters is how the server counts it
    deadline = time.monotonic() + 10
    while 'code="incomplete_body"' not in metrics_text(server):
        assert time.monotonic() < deadline, "the disconnect was not counted as incomplete_body"
        time.sleep(0.2)
    assert 'code="internal_error"' not in before and 'code="internal_error"' not in metrics_text(server)


def test_a_slow_codestream_is_cut_off_at_the_decode_limit(server: str) -> None:
    """A real JPEG 2000 film whose decode takes longer than PTX_DECODE_TIMEOUT_S (0.5 s here) through HTTP:
    422 decode_timeout well before the decode would have finished, and the edge goes on serving."""
    from tests.imaging.test_fuzz_decode_limits import _big_j2k

    data = _big_j2k(2048)
    status, body = exchange(server, request_bytes("/v1/inspect", data, "application/dicom"))
    check_answer(status, body, "/v1/inspect")
    answer = json.loads(body)["error"]
    assert (status, answer["code"]) == (422, "decode_timeout") and "PTX_DECODE_TIMEOUT_S" in answer["message"]


def test_the_server_still_triages_a_good_film_and_counted_no_internal_error(server: str, films: dict[str, bytes]
                                                                          ) -> None:
    """Runs last in the module: after all of the above, a good film is still triaged."""
    status, body = exchange(server, request_bytes("/v1/triage?mask=none", films[GOOD], "application/dicom"))
    check_answer(status, body, "/v1/triage")
    assert status == 200
    text = metrics_text(server)
    assert 'code="internal_error"' not in text and 'code="model_error"' not in text
    served = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if (line.startswith("ptx_http_requests_total{") and 'status="5xx"' in line)
                 or (line.startswith("bentoml_service_request_total{") and 'http_response_code="5' in line))
    assert served == 0, "a 5xx answer was counted (the edge's ptx_http_requests_total or the model worker's)"
