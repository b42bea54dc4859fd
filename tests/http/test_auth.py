"""Bearer-token authentication (service/auth.py) and de-identified answers (service/deidentify.py).

The real-server part runs one `bentoml serve` with a token file of two tokens (a rotation), health and
metrics protected, and de-identified answers; the PHI module's server covers the defaults (env token,
health open, metrics protected). Unit tests cover the comparison, the token rules and the pseudonyms.
"""

from __future__ import annotations

import io
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydantic import SecretStr

from service.http import auth
from service.http.deidentify import Pseudonymiser
from service.http.deidentify import from_settings as deidentify_settings
from tests.servers import free_port, process_group

TOKEN_A = "tok-a-3f9c1e7d5b2a4c6e8f0a1b2c3d4e5f60"
TOKEN_B = "tok-b-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
TOKEN_R = "tok-r-77e1c2d3b4a5968778695a4b3c2d1e0f"  # role=read-only
KEY = "pseudonym-key-for-tests-0123456789"
SIIM = "chest/siim_cr_jpegbaseline_mono2.dcm"


# --------------------------------------------------------------------------------------------------------------
# Unit: our own logic


def settings(**values: object) -> SimpleNamespace:
    base = {"api_token": None, "api_token_file": None, "auth_open_health": True, "auth_open_metrics": False,
            "auth_open_docs": True}
    return SimpleNamespace(**{**base, **values})


def test_only_a_configured_token_is_accepted() -> None:
    config = auth.AuthConfig.from_tokens([TOKEN_A, TOKEN_B])
    assert config.accepts(TOKEN_A) and config.accepts(TOKEN_B)
    same_length = TOKEN_A[:-1] + ("1" if TOKEN_A[-1] != "1" else "2")
    for wrong in (same_length, TOKEN_A[:-1], TOKEN_A + "0", "", TOKEN_A.upper(), "é" * 40):
        assert not config.accepts(wrong), wrong
    assert TOKEN_A not in repr(config) and "2 token(s)" in repr(config)


def test_token_rules_and_messages_never_show_the_token(tmp_path: Path) -> None:
    for bad, why in (("", "empty"), ("short-token", "at least 16"), ("has a space in it!!", "whitespace"),
                     ("tab\tinside-the-token", "whitespace"), ("ünïcödé-token-value", "non-ASCII")):
        with pytest.raises(auth.TokenError, match=why) as caught:
            auth.check_token(bad, "PTX_API_TOKEN")
        assert not bad or bad not in str(caught.value)
    assert auth.from_settings(settings()) is None  # no token: auth off
    config = auth.from_settings(settings(api_token=SecretStr(TOKEN_A + "\n")))  # an env var from `echo`
    assert config is not None and config.accepts(TOKEN_A) and not config.open_metrics and config.open_health
    file = tmp_path / "tokens"
    file.write_text(f"# rotation: B replaces A\n{TOKEN_A}\n\n  {TOKEN_B}  \n")
    file.chmod(0o600)
    config = auth.from_settings(settings(api_token_file=file, auth_open_health=False))
    assert config is not None and config.accepts(TOKEN_A) and config.accepts(TOKEN_B) and not config.open_health
    with pytest.raises(auth.TokenError, match="not both"):
        auth.from_settings(settings(api_token=SecretStr(TOKEN_A), api_token_file=file))
    file.write_text("\n# nothing yet\n")
    with pytest.raises(auth.TokenError, match="holds no token"):
        auth.from_settings(settings(api_token_file=file))
    file.write_text(f"{TOKEN_A}\nshort\n")
    with pytest.raises(auth.TokenError, match="at least 16") as caught:
        auth.from_settings(settings(api_token_file=file))
    assert TOKEN_A not in str(caught.value)
    with pytest.raises(auth.TokenError, match="cannot be read"):
        auth.from_settings(settings(api_token_file=tmp_path / "missing"))


def test_bearer_header_parsing_and_open_paths() -> None:
    assert auth.bearer_token([(b"authorization", f"Bearer {TOKEN_A}".encode())]) == TOKEN_A
    assert auth.bearer_token([(b"Authorization", f"bearer   {TOKEN_A} ".encode())]) == TOKEN_A
    assert auth.bearer_token([(b"authorization", f"Basic {TOKEN_A}".encode())]) is None
    assert auth.bearer_token([(b"authorization", b"Bearer ")]) is None
    assert auth.bearer_token([(b"x-token", TOKEN_A.encode())]) is None
    config = auth.AuthConfig.from_tokens([TOKEN_A])
    assert config.is_open("/readyz") and config.is_open("/docs.json") and config.is_open("/static_content/x.js")
    assert not config.is_open("/metrics") and not config.is_open("/v1/triage") and not config.is_open("/readyz/")
    assert not config.is_open("/metrics/../v1/worklist") and not config.is_open("/v1/docs.json")
    closed = auth.AuthConfig.from_tokens([TOKEN_A], open_health=False, open_docs=False, open_metrics=True)
    assert not closed.is_open("/healthz") and not closed.is_open("/") and closed.is_open("/metrics")


def test_pseudonyms_are_keyed_stable_uids() -> None:
    body = {"study_uid": "1.2.3.4", "series_uid": "1.2.3.4.5", "sop_uid": "1.2.3.4.5.6", "score": 0.5,
            "filename": "DOE_JOHN.dcm"}
    keyed = Pseudonymiser(KEY).answer(body)
    again = Pseudonymiser(KEY).answer(body)
    other = Pseudonymiser(KEY + "x").answer(body)
    assert keyed == again and keyed["score"] == 0.5 and keyed["filename"] is None
    for name in ("study_uid", "series_uid", "sop_uid"):
        assert keyed[name] != body[name] and keyed[name] != other[name]
        assert keyed[name].startswith("2.25.") and len(keyed[name]) <= 64 and pydicom.uid.UID(keyed[name]).is_valid
    assert len({keyed["study_uid"], keyed["series_uid"], keyed["sop_uid"]}) == 3
    assert Pseudonymiser(None).answer(body) | {"score": 0.5} == {**dict.fromkeys(body), "score": 0.5}
    with pytest.raises(ValueError, match="at least 16"):
        Pseudonymiser("short")
    off = SimpleNamespace(deidentify_responses=False, deidentify_key=None)
    assert deidentify_settings(off) is None


def test_the_openapi_document_declares_the_scheme() -> None:
    spec = {"info": {"description": "BentoML", "contact": {"name": "BentoML Team"}, "version": "None"},
            "paths": {"/readyz": {"get": {}}, "/v1/triage": {"post": {}}}}
    auth.document_security(spec, auth.AuthConfig.from_tokens([TOKEN_A]))
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    assert spec["security"] == [{"bearerAuth": []}] and spec["paths"]["/readyz"]["get"]["security"] == []
    assert "security" not in spec["paths"]["/v1/triage"]["post"]
    assert "PTX_API_TOKEN" in spec["info"]["description"] and "is **on**" in spec["info"]["description"]
    assert spec["info"]["description"].startswith("# ptx-triage: pneumothorax triage")  # issue 14 §1: ours ...
    assert "BentoML" not in spec["info"]["description"] and "contact" not in spec["info"]  # ... not BentoML's
    assert "[Worklist](./worklist/)" in spec["info"]["description"] and spec["info"]["version"] == "source"
    off = auth.document_security({"paths": {}}, None)
    assert "is **off**" in off["info"]["description"] and "security" not in off


def asgi_app() -> object:
    """A stand-in for BentoML's app: /docs.json sent in two chunks, anything else a plain 200."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def docs(_: object) -> StreamingResponse:
        spec = json.dumps({"info": {"description": "BentoML"}, "paths": {"/readyz": {"get": {}}}}).encode()
        async def chunks():
            yield spec[:10]
            yield spec[10:]
        return StreamingResponse(chunks(), media_type="application/json")

    async def other(_: object) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/docs.json", docs), Route("/v1/worklist", other), Route("/readyz", other)])


def test_the_middleware_documents_auth_even_when_off() -> None:
    from starlette.testclient import TestClient

    with TestClient(auth.BearerAuth(asgi_app(), None)) as client:  # type: ignore[arg-type]
        assert client.get("/v1/worklist").status_code == 200  # off: nothing is refused
        spec = client.get("/docs.json").json()
        assert "is **off**" in spec["info"]["description"] and "security" not in spec
    with TestClient(auth.BearerAuth(asgi_app(), auth.AuthConfig.from_tokens([TOKEN_A]))) as client:
        response = client.get("/docs.json")
        assert response.json()["security"] == [{"bearerAuth": []}]
        assert int(response.headers["content-length"]) == len(response.content)
        assert client.get("/v1/worklist").status_code == 401
        assert client.get("/v1/worklist", headers={"Authorization": f"Bearer {TOKEN_A}"}).status_code == 200
        assert client.get("/readyz").status_code == 200


# --------------------------------------------------------------------------------------------------------------
# A real server: token file (two tokens), health and metrics protected, de-identified answers


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, realdata: Path) -> object:
    home = tmp_path_factory.mktemp("auth")
    token_file = home / "tokens"
    token_file.write_text(f"{TOKEN_A}\n{TOKEN_B}\n{TOKEN_R} role=read-only\n")
    token_file.chmod(0o600)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"BENTOML_HOME": str(home / "bentoml-home"), "PTX_DATA_DIR": str(home / "data"),
           "PTX_API_TOKEN_FILE": str(token_file), "PTX_AUTH_OPEN_HEALTH": "false",
           "PTX_DEIDENTIFY_RESPONSES": "true", "PTX_DEIDENTIFY_KEY": KEY, "PTX_MAX_BATCH_SIZE": "4"}
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    log = home / "server.log"
    ready = lambda process: wait_ready(f"{base}/readyz", process)
    with process_group(command, log, ready, env=env):
        yield SimpleNamespace(base=base, log=log)


def wait_ready(url: str, process: object, timeout_s: float = 180) -> None:
    """Like tests.servers.wait_http, with the token (the health endpoints are protected here)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:  # type: ignore[attr-defined]
            raise RuntimeError(f"server exited before {url} answered")
        if call(url, token=TOKEN_B)[0] == 200:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")


def call(url: str, token: str | None = None, body: bytes | None = None, scheme: str = "Bearer",
         content_type: str = "application/dicom") -> tuple[int, bytes, dict[str, str]]:
    headers = {"Authorization": f"{scheme} {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read(), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}
    except OSError:
        return 0, b"", {}


def test_without_a_token_every_protected_endpoint_answers_401(server: SimpleNamespace, realdata: Path) -> None:
    film = (realdata / SIIM).read_bytes()
    wrong = TOKEN_A[:-1] + ("1" if TOKEN_A[-1] != "1" else "2")  # same length, one character off
    for path, body in (("/v1/triage", film), ("/v1/inspect", film), ("/v1/worklist", None), ("/metrics", None),
                       ("/readyz", None), ("/healthz", None), ("/livez", None), ("/v1/studies/1.2.3", None)):
        for token, error in ((None, None), (wrong, "invalid_token"), (TOKEN_A[:20], "invalid_token")):
            status, raw, headers = call(f"{server.base}{path}", token=token, body=body)
            assert status == 401, (path, token, status)
            answer = json.loads(raw)
            assert answer["error"]["code"] == "unauthorized" and set(answer) == {"error"}
            assert headers["www-authenticate"].startswith("Bearer realm=")
            assert (f'error="{error}"' in headers["www-authenticate"]) == (error is not None)
    assert call(f"{server.base}/v1/worklist", token=TOKEN_A, scheme="Basic")[0] == 401


def test_either_token_of_the_file_opens_every_endpoint(server: SimpleNamespace) -> None:
    for token in (TOKEN_A, TOKEN_B):
        for path in ("/v1/worklist", "/metrics", "/readyz", "/healthz", "/livez"):
            status, _, _ = call(f"{server.base}{path}", token=token)
            assert status == 200, (path, status)
    status, raw, _ = call(f"{server.base}/v1/worklist", token=TOKEN_A, scheme="bearer")
    assert status == 200 and "items" in json.loads(raw)


def test_openapi_page_is_open_and_declares_the_bearer_scheme(server: SimpleNamespace) -> None:
    status, raw, _ = call(f"{server.base}/docs.json")
    assert status == 200
    spec = json.loads(raw)
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearerAuth": []}]
    assert "PTX_API_TOKEN" in spec["info"]["description"] and "is **on**" in spec["info"]["description"]
    assert "security" not in spec["paths"]["/v1/triage"]["post"]  # inherits the global requirement
    assert "security" not in spec["paths"]["/readyz"]["get"]  # protected on this server (health closed)
    status, page, headers = call(f"{server.base}/", token=None)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"swagger-ui" in page and b"googletagmanager" not in page and b"github-corner" not in page
    assert spec["info"]["description"].startswith("# ptx-triage") and "contact" not in spec["info"]
    assert "created with BentoML" not in raw.decode() and "img.shields.io" not in raw.decode()


def test_a_read_only_token_reads_but_changes_nothing(server: SimpleNamespace, realdata: Path) -> None:
    assert call(f"{server.base}/v1/worklist", token=TOKEN_R)[0] == 200
    status, raw, _ = call(f"{server.base}/v1/triage", token=TOKEN_R, body=(realdata / SIIM).read_bytes())
    assert status == 403 and json.loads(raw)["error"]["code"] == "read_only"


def test_the_worklist_asks_a_person_to_sign_in(server: SimpleNamespace) -> None:
    request = urllib.request.Request(f"{server.base}/worklist/", headers={"Accept": "text/html"})

    class Stay(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    try:
        urllib.request.build_opener(Stay).open(request, timeout=30)
        raise AssertionError("the worklist answered without a session")
    except urllib.error.HTTPError as exc:
        assert exc.code == 303 and exc.headers["location"] == "/worklist/login?next=%2Fworklist%2F"
    status, page, _ = call(f"{server.base}/worklist/login")
    assert status == 200 and b'name="token"' in page and b'type="password"' in page
    status, raw, _ = call(f"{server.base}/worklist/events")
    assert status == 401 and json.loads(raw)["error"]["code"] == "unauthorized"


def test_answers_are_de_identified_with_keyed_pseudonyms(server: SimpleNamespace, realdata: Path) -> None:
    """Also proves the edge still reaches the model worker (which gets no token) with auth on."""
    film = (realdata / SIIM).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(film), stop_before_pixels=True)
    pseudonyms = Pseudonymiser(KEY)
    status, raw, _ = call(f"{server.base}/v1/triage?mask=none", token=TOKEN_A, body=film)
    assert status == 200, raw
    answer = json.loads(raw)
    assert 0 <= answer["score"] <= 1
    for name, real in (("study_uid", ds.StudyInstanceUID), ("series_uid", ds.SeriesInstanceUID),
                       ("sop_uid", ds.SOPInstanceUID)):
        assert answer[name] == pseudonyms.uid(str(real)) and answer[name] != real
        assert str(real) not in raw.decode()
    status, raw, _ = call(f"{server.base}/v1/inspect", token=TOKEN_B, body=film)
    assert status == 200 and json.loads(raw)["sop_uid"] == answer["sop_uid"]
    assert str(ds.StudyInstanceUID) not in raw.decode()


def test_the_tokens_never_reach_the_log(server: SimpleNamespace) -> None:
    call(f"{server.base}/v1/worklist", token=TOKEN_A[:-1] + "x")
    call(f"{server.base}/v1/worklist", token=TOKEN_B)
    text = server.log.read_text(errors="replace")
    assert "bearer authentication on" in text  # the log is the server's (and says auth is on) ...
    for secret in (TOKEN_A, TOKEN_B, TOKEN_A[:-1] + "x", KEY, TOKEN_A[6:22]):
        assert secret not in text  # ... and never holds a token, a presented token or the key


def test_token_file_permissions_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file = tmp_path / "tokens"
    file.write_text(TOKEN_A + "\n")
    file.chmod(0o644)
    with caplog.at_level("WARNING", logger="ptx.auth"):
        assert auth.read_token_file(file) == [TOKEN_A]
    assert "chmod 600" in caplog.text and TOKEN_A not in caplog.text
    caplog.clear()
    os.chmod(file, 0o600)
    with caplog.at_level("WARNING", logger="ptx.auth"):
        auth.read_token_file(file)
    assert caplog.text == ""
