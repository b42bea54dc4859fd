"""Not open by default (issue 13 §7): a non-loopback address without a token stops start-up with one line,
unless PTX_ALLOW_ANONYMOUS says so (then a loud warning); `make serve` binds loopback.

The rule is checked on its own; how the address is learnt is checked with real sockets and click contexts
like the ones `bentoml serve` and its workers run under; and the whole command is run once with
`--host 0.0.0.0` (it stops before anything is bound)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import click
import pytest

from service.http import exposure
from service.settings import load_settings
from tests.servers import REPO, free_port

ANONYMOUS = load_settings(environ={"PTX_ALLOW_ANONYMOUS": "true"})
DEFAULTS = load_settings(environ={})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "unix", "localhost"])
def test_loopback_serves_without_a_token(host):
    assert exposure.check(DEFAULTS, authenticated=False, host=host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "fe80::1%eth0"])
def test_any_other_address_without_a_token_is_refused_with_the_ways_out(host):
    with pytest.raises(exposure.ExposureError) as caught:
        exposure.check(DEFAULTS, authenticated=False, host=host)
    message = str(caught.value)
    assert f"listening on {host} (not loopback)" in message
    assert all(way in message for way in ("PTX_API_TOKEN", "127.0.0.1", "PTX_ALLOW_ANONYMOUS=true"))


def test_a_token_or_an_explicit_anonymous_setting_lets_it_start():
    assert exposure.check(DEFAULTS, authenticated=True, host="0.0.0.0") is None
    warning = exposure.check(ANONYMOUS, authenticated=False, host="0.0.0.0")
    assert warning is not None and warning.startswith("ANONYMOUS ACCESS: listening on 0.0.0.0")
    assert exposure.check(ANONYMOUS, authenticated=True, host="0.0.0.0") is None
    assert exposure.check(DEFAULTS, authenticated=False, host=None) is None  # not serving (bentoml build)


def test_the_address_comes_from_the_serve_command_or_from_the_socket_a_worker_was_handed():
    serve = click.Context(click.Command("serve"))
    serve.params = {"host": "10.1.2.3", "port": 3000}
    with serve:
        assert exposure.serving_host() == "10.1.2.3"
    serve.params = {"host": None, "port": 3000}  # no --host: BentoML's configured default, all interfaces
    with serve:
        assert exposure.serving_host() == "0.0.0.0"
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        worker = click.Context(click.Command("main"))
        worker.params = {"fd": listening.fileno(), "service_name": "ptx-triage"}
        with worker:
            assert exposure.serving_host() == "127.0.0.1"
        assert listening.getsockname()[0] == "127.0.0.1"  # the worker's socket is still open
    assert exposure.serving_host() is None  # no command: nothing served


def test_bentoml_serve_on_all_interfaces_without_a_token_stops_with_one_line(tmp_path):
    env = {"PTX_DATA_DIR": str(tmp_path / "data"), "BENTOML_HOME": str(tmp_path / "bentoml-home")}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PTX_")}, **env}
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as exc:  # it served: the refusal is missing
        pytest.fail(f"`bentoml serve --host 0.0.0.0` without a token was still running after {exc.timeout} s")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-2000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("ptx-triage cannot start: listening on 0.0.0.0 (not loopback)"), output[-2000:]
    assert "Traceback" not in output


def test_make_serve_binds_loopback():
    plan = subprocess.run(["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    command = next(line for line in plan.splitlines() if "bentoml serve" in line)
    assert "--host 127.0.0.1" in command
