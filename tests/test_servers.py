"""The test-server helpers themselves: ports that no other server or connection can take, and a server that
fails to start tells why in the error (CI keeps only pytest's output)."""

from __future__ import annotations

import socket
import sys

import pytest

from tests.servers import _ephemeral_low, free_port, server_process


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert max(ports) < _ephemeral_low()
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_someone_listens_on_is_never_handed_out(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy, busy, busy + 1 if busy + 1 < _ephemeral_low() else busy - 1])
        monkeypatch.setattr("tests.servers._RANDOM.randint", lambda low, high: next(picks))
        assert free_port() != busy


def test_a_server_that_exits_before_it_is_ready_shows_the_end_of_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('bind failed: address already in use'); sys.exit(1)"]
    with pytest.raises(RuntimeError) as failure:
        with server_process(command, tmp_path / "server.log", timeout_s=10):
            pass
    assert "exited with 1" in str(failure.value)
    assert "bind failed: address already in use" in str(failure.value)
