"""Admission before the body, through a real `bentoml serve` (issue 13 §7, §8): an upload beyond
PTX_MAX_IN_FLIGHT is refused before its body is read, so 32 concurrent maximum-size uploads keep the edge's
resident memory under a bound set by the admitted ones; and early refusals reach the client as answers,
not as a broken pipe, even from a client that asked for `Connection: close` (urllib does).

Run with `-s` to see the figures. The bodies are junk (refused 400 `not_dicom` once read): what is measured
is what the edge holds for bodies, not a decode (decodes are bounded by PTX_DECODE_THREADS and the decode
workers' own memory cap).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from tests.servers import bento_server, descendants

MIB = 1024 * 1024
MAX_FILE_BYTES = 16 * MIB  # small, so the test is fast; the bound below scales with it
MAX_IN_FLIGHT = 4
UPLOADS = 32
JUNK = memoryview(bytes(range(256)) * (2 * MAX_FILE_BYTES // 256))  # not DICOM: refused 400 once read
# What the edge may add while the 32 uploads are at their peak: each admitted request holds its body once,
# plus transient copies (chunks on their way, the join), and a fixed allowance for Python's arenas and the
# 32 connections' buffers. Without admission before the body it holds all 32 (≥ 32 × MAX_FILE_BYTES).
BOUND = MAX_IN_FLIGHT * 3 * MAX_FILE_BYTES + 64 * MIB


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, int]]:
    env = {"PTX_DATA_DIR": str(tmp_path_factory.mktemp("ptx-data")), "PTX_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
           "PTX_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT), "PTX_RETRY_AFTER_S": "3"}
    started: list = []
    with bento_server(tmp_path_factory.mktemp("bento") / "server.log", env=env, started=started) as base:
        yield base, started[0].pid


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def edge_rss(server_pid: int) -> int:
    """Resident bytes of the HTTP edge: its worker process and everything below it (decode workers)."""
    total = 0
    for process in descendants(server_pid):
        try:
            if "ptx-triage" in process.cmdline():
                total += sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
    assert total, "no ptx-triage worker found below the server"
    return total


@contextmanager
def peak_sampler(server_pid: int) -> Iterator[list[int]]:
    """Samples the edge's RSS every 20 ms while the block runs; the list gets the samples."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(edge_rss(server_pid))
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(10)


def upload(port: int, size: int, barrier: threading.Barrier | None = None, close: bool = False,
           declared: int | None = None) -> tuple[int | str, dict, str | None]:
    """POST `size` junk bytes to /v1/triage; all but the last byte, then the barrier, then the last one.
    The answer's status, JSON body and Retry-After; or the exception's name when the connection broke."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.putrequest("POST", "/v1/triage?mask=none")
        connection.putheader("Content-Type", "application/dicom")
        connection.putheader("Content-Length", str(size if declared is None else declared))
        if close:
            connection.putheader("Connection", "close")
        connection.endheaders()
        connection.send(JUNK[:size - 1])
        if barrier is not None:
            barrier.wait(timeout=120)
        connection.send(JUNK[size - 1:size])
        response = connection.getresponse()
        return response.status, json.loads(response.read()), response.getheader("Retry-After")
    except OSError as exc:  # BrokenPipeError, ConnectionResetError: the answer never reached the client
        return type(exc).__name__, {}, None
    finally:
        connection.close()


def test_uploads_beyond_admission_are_refused_before_their_body_and_memory_stays_bounded(server):
    base, pid = server
    port = port_of(base)
    upload(port, 1024)  # one small request first: the edge's lazy allocations happen before the baseline
    time.sleep(0.5)
    baseline = edge_rss(pid)
    barrier = threading.Barrier(UPLOADS + 1)
    answers: list[tuple[int | str, dict, str | None]] = []
    with peak_sampler(pid) as samples:
        threads = [threading.Thread(target=lambda n=n: answers.append(
            upload(port, MAX_FILE_BYTES, barrier, close=n % 2 == 0))) for n in range(UPLOADS)]
        for thread in threads:
            thread.start()
        barrier.wait(timeout=120)  # every body but its last byte is sent (or refused and discarded)
        time.sleep(0.3)
        for thread in threads:
            thread.join(120)
    peak = max(samples) - baseline
    print(f"\nedge RSS: baseline {baseline / MIB:.0f} MiB, peak +{peak / MIB:.0f} MiB over {len(samples)} samples "
          f"(bound +{BOUND / MIB:.0f} MiB = {MAX_IN_FLIGHT} × 3 × {MAX_FILE_BYTES // MIB} MiB + 64 MiB)")
    statuses = sorted(str(status) for status, _, _ in answers)
    assert len(answers) == UPLOADS
    # The admitted ones read their body (junk: 400); every other one was told 503 before its body was read.
    assert statuses.count("400") == MAX_IN_FLIGHT and statuses.count("503") == UPLOADS - MAX_IN_FLIGHT, statuses
    for status, body, retry_after in answers:
        if status == 503:
            assert body["error"]["code"] == "overloaded" and "PTX_MAX_IN_FLIGHT" in body["error"]["message"]
            assert retry_after == "3"
    assert peak < BOUND, f"edge grew by {peak / MIB:.0f} MiB for {UPLOADS} uploads of {MAX_FILE_BYTES // MIB} MiB"


def test_an_oversized_body_is_answered_413_not_a_broken_pipe(server):
    """The client sends the whole body before it reads (http.client, urllib) and asked to close: the edge
    refuses on the declared length, then reads and discards the rest so that closing sends no reset."""
    base, _ = server
    size = MAX_FILE_BYTES * 3 // 2
    for _ in range(3):  # a reset depends on timing: more than one try, each must be answered
        status, body, _ = upload(port_of(base), size, close=True)
        assert status == 413, f"the client got {status} instead of the answer"
        assert body["error"]["code"] == "too_large" and "PTX_MAX_FILE_BYTES" in body["error"]["message"]
    status, _, _ = upload(port_of(base), 1024)  # and the service carries on
    assert status == 400


def test_inspect_and_batch_are_admitted_before_their_body_too(server, realdata):
    """With every slot held by uploads still sending, each route refuses at once; a slot freed, it admits."""
    base, _ = server
    port = port_of(base)
    film = (realdata / "chest/siim_cr_jpegbaseline_mono2.dcm").read_bytes()
    holders = []
    for _ in range(MAX_IN_FLIGHT):
        holder = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        holder.putrequest("POST", "/v1/inspect")
        holder.putheader("Content-Type", "application/dicom")
        holder.putheader("Content-Length", str(len(film)))
        holder.endheaders()
        holder.send(film[:1000])
        holders.append(holder)
    try:
        deadline = time.monotonic() + 20
        while (status := post(port, "/v1/inspect", film, "application/dicom")[0]) != 503:
            assert time.monotonic() < deadline, f"inspect answered {status} with every slot held"
            time.sleep(0.1)
        boundary = "b0undary"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.dcm\"\r\n\r\n".encode()
                + film + f"\r\n--{boundary}--\r\n".encode())
        for path, body, kind in (("/v1/inspect", film, "application/dicom"),
                                 ("/v1/triage/batch", form, f"multipart/form-data; boundary={boundary}")):
            status, answer, retry_after = post(port, path, body, kind)
            assert (status, answer["error"]["code"], retry_after) == (503, "overloaded", "3"), path
    finally:
        for holder in holders:
            holder.send(film[1000:])
            assert holder.getresponse().status == 200
            holder.close()
    status, answer, _ = post(port, "/v1/triage/batch?mask=none", form, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and 0 <= answer["results"][0]["score"] <= 1


def post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, dict, str | None]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), response.getheader("Retry-After")
    finally:
        connection.close()


# --- the early-answer rule on its own (service/http/lingering.py) -----------------------------------------


def early_answer(headers: list[tuple[bytes, bytes]], chunks: list[bytes], limit: int, read_first: bool = False):
    """Run LingeringClose around an app that answers 413 at once (after one receive when `read_first`);
    the client side is a queue of body chunks. (sent messages, chunks the middleware drained)"""
    from service.http.lingering import LingeringClose

    pending = [{"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1}
               for n, chunk in enumerate(chunks)]
    taken, sent = [], []

    async def receive():
        message = pending.pop(0) if pending else {"type": "http.disconnect"}
        taken.append(message)
        return message

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        if read_first:
            await receive()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    scope = {"type": "http", "method": "POST", "path": "/v1/triage", "headers": headers}
    asyncio.run(LingeringClose(app, limit=limit)(scope, receive, send))
    return sent, len(taken)


def test_an_early_answer_is_sent_whole_then_the_rest_of_the_body_is_drained():
    sent, drained = early_answer([(b"content-length", b"30")], [b"x" * 10] * 3, limit=100)
    assert [m.get("more_body", False) for m in sent[1:]] == [True, False]  # answer out before the drain
    assert sent[1]["body"] == b"{}" and sent[2]["body"] == b"" and drained == 3
    assert (b"connection", b"close") not in sent[0]["headers"]  # drained in full: the connection stays usable


def test_a_rest_over_the_limit_is_not_read_and_the_connection_closes():
    sent, drained = early_answer([(b"content-length", b"1000")], [b"x" * 500] * 2, limit=100)
    assert drained == 0 and (b"connection", b"close") in sent[0]["headers"]


def test_a_client_waiting_for_100_continue_is_not_invited_to_send():
    headers = [(b"content-length", b"30"), (b"expect", b"100-continue")]
    sent, drained = early_answer(headers, [b"x" * 30], limit=100)
    assert drained == 0 and (b"connection", b"close") in sent[0]["headers"]
    sent, drained = early_answer(headers, [b"x" * 10] * 3, limit=100, read_first=True)  # it was asked: drain
    assert drained == 3


def test_a_chunked_body_is_drained_up_to_the_limit_then_closed():
    sent, drained = early_answer([(b"transfer-encoding", b"chunked")], [b"x" * 40] * 10, limit=100)
    assert drained == 3 and (b"connection", b"close") in sent[0]["headers"]  # 120 bytes read > 100: stopped


def test_a_request_without_a_body_is_passed_through():
    sent, drained = early_answer([], [], limit=100)
    assert drained == 0 and [m.get("more_body", False) for m in sent[1:]] == [False]
