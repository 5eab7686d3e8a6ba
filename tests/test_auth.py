"""HTTP Basic and Digest auth (exporter.api.auth).

The password files are made by Apache's own htpasswd and htdigest (apache2-utils), the requests go
through real clients (requests, httpx) to a real uvicorn server on a free port.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from requests.auth import HTTPBasicAuth, HTTPDigestAuth

from exporter.api.auth import (
    AuthFileError,
    AuthMiddleware,
    AuthStats,
    HtdigestFile,
    HtpasswdFile,
    apr1_md5,
    load_htdigest,
    load_htpasswd,
    options_from_config,
    parse_auth_params,
)
from exporter.clock import FakeClock
from exporter.config import Config

REALM = "container-exporter"
BASIC_REALM = "exporter basic"
USERS = {"bcrypt": ("bea", "bcrypt-secret", "-B"), "sha1": ("sam", "sha1 secret", "-s"), "apr1": ("amy", "äpr1-sécret", "-m")}
LONG_PASSWORD = "L" * 72 + "ignored-by-bcrypt"


# --- real password files ---------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install apache2-utils (scripts/setup-system.sh)", pytrace=False)
    return path


def htpasswd(path: Path, flag: str, user: str, password: str) -> None:
    create = [] if path.exists() else ["-c"]
    subprocess.run(
        [_tool("htpasswd"), "-b", *create, flag, str(path), user, password], check=True, capture_output=True, timeout=30
    )


def htpasswd_line(flag: str, user: str, password: str) -> str:
    out = subprocess.run([_tool("htpasswd"), "-nb", flag, user, password], check=True, capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def htdigest(path: Path, realm: str, user: str, password: str) -> None:
    """htdigest has no batch mode: it reads the password twice from /dev/tty, or from stdin when the
    process has no controlling terminal, which a new session guarantees."""
    create = [] if path.exists() else ["-c"]
    subprocess.run(
        [_tool("htdigest"), *create, str(path), realm, user],
        input=f"{password}\n{password}\n",
        text=True,
        start_new_session=True,
        check=True,
        capture_output=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def htpasswd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "htpasswd"
    for user, password, flag in USERS.values():
        htpasswd(path, flag, user, password)
    htpasswd(path, "-B", "long", LONG_PASSWORD)
    return path


@pytest.fixture(scope="module")
def htdigest_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "htdigest"
    htdigest(path, REALM, "dora", "digest-secret")
    htdigest(path, REALM, "dänu", "ümlaut pass")
    htdigest(path, "elsewhere", "olaf", "other-realm-pass")  # right password, wrong realm
    return path


# --- a real server ---------------------------------------------------------------------------


@contextmanager
def serve(app: Any) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


class StreamProbe:
    started = False


def make_app(probe: StreamProbe | None = None) -> FastAPI:
    api = FastAPI()

    @api.get("/healthz")
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @api.get("/private")
    def private(request: Request) -> dict[str, Any]:
        return {"user": request.scope.get("auth_user"), "query": str(request.query_params)}

    @api.get("/other")
    def other() -> dict[str, str]:
        return {"other": "yes"}

    @api.post("/echo")
    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(await request.body())

    @api.get("/stream")
    def stream() -> StreamingResponse:
        def chunks() -> Iterator[bytes]:
            if probe is not None:
                probe.started = True
            for i in range(5):
                yield f"chunk {i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    return api


def wrapped(basic: HtpasswdFile | None = None, digest: HtdigestFile | None = None, **kwargs: Any) -> AuthMiddleware:
    return AuthMiddleware(
        kwargs.pop("app", None) or make_app(),
        basic=basic,
        basic_realm=BASIC_REALM,
        digest=digest,
        digest_realm=REALM,
        **kwargs,
    )


@pytest.fixture(scope="module")
def basic_server(htpasswd_file: Path) -> Iterator[str]:
    with serve(wrapped(basic=load_htpasswd(htpasswd_file))) as url:
        yield url


@pytest.fixture(scope="module")
def digest_stats() -> AuthStats:
    return AuthStats()


@pytest.fixture(scope="module")
def digest_server(htdigest_file: Path, digest_stats: AuthStats) -> Iterator[str]:
    with serve(wrapped(digest=load_htdigest(htdigest_file), stats=digest_stats)) as url:
        yield url


@pytest.fixture(scope="module")
def both_stats() -> AuthStats:
    return AuthStats()


@pytest.fixture(scope="module")
def both_server(htpasswd_file: Path, htdigest_file: Path, both_stats: AuthStats) -> Iterator[str]:
    """Wired the way the exporter's app does it: FastAPI's add_middleware with options_from_config."""
    config = Config(
        http_auth_file=htpasswd_file, http_auth_realm=BASIC_REALM, http_digest_file=htdigest_file, http_digest_realm=REALM
    )
    options = options_from_config(config)
    assert options is not None
    api = make_app()
    api.add_middleware(AuthMiddleware, **options, stats=both_stats)
    with serve(api) as url:
        yield url


def challenges(response: requests.Response | httpx.Response) -> dict[str, dict[str, str]]:
    """WWW-Authenticate headers of a response → {scheme: params}."""
    values = response.headers.get_list("www-authenticate") if isinstance(response, httpx.Response) else None
    if values is None:
        values = response.raw.headers.getlist("www-authenticate")
    out = {}
    for value in values:
        scheme, _, rest = value.partition(" ")
        params = parse_auth_params(rest)
        assert params is not None, value
        out[scheme.lower()] = params
    return out


def digest_header(
    challenge: dict[str, str], user: str, password: str, method: str, uri: str, realm: str | None = None, **override: str
) -> str:
    """An RFC 7616 MD5/qop=auth Authorization header made by hand, with fields optionally overridden."""
    realm = challenge["realm"] if realm is None else realm
    fields = {
        "username": user,
        "realm": realm,
        "nonce": challenge["nonce"],
        "uri": uri,
        "qop": "auth",
        "nc": "00000001",
        "cnonce": "0a4f113b",
        "opaque": challenge["opaque"],
        "algorithm": "MD5",
    }
    fields.update(override)
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{fields['uri']}".encode()).hexdigest()
    fields.setdefault(
        "response",
        hashlib.md5(f"{ha1}:{fields['nonce']}:{fields['nc']}:{fields['cnonce']}:{fields['qop']}:{ha2}".encode()).hexdigest(),
    )
    unquoted = ("qop", "nc", "algorithm", "userhash")
    return "Digest " + ", ".join(f"{k}={v}" if k in unquoted else f'{k}="{v}"' for k, v in fields.items())


def fresh_challenge(url: str) -> dict[str, str]:
    response = requests.get(f"{url}/private", timeout=10)
    assert response.status_code == 401
    return challenges(response)["digest"]


# --- parsing the files -----------------------------------------------------------------------


def test_htpasswd_entries_made_by_htpasswd_are_recognised(htpasswd_file: Path) -> None:
    passwords = load_htpasswd(htpasswd_file)
    assert sorted(passwords.users) == sorted([u for u, _, _ in USERS.values()] + ["long"])
    for scheme, (user, password, _) in USERS.items():
        entry = passwords.get(user)
        assert entry is not None and entry.scheme == scheme
        assert entry.verify(password.encode())
        assert not entry.verify(password.encode() + b"x")
        assert not entry.verify(b"")
    assert passwords.get("nobody") is None
    assert "secret" not in repr(passwords.get("sam"))  # the hash stays out of reprs and logs


@pytest.mark.parametrize(
    "password", ["", "a", "1234567", "12345678", "x" * 15, "y" * 16, "z" * 17, "q" * 33, "pässwörd ✓", "a:b:c"]
)
def test_apr1_matches_htpasswd(password: str) -> None:
    line = htpasswd_line("-m", "u", password)
    stored = line.split(":", 1)[1]
    salt = stored.split("$")[2]
    assert apr1_md5(password.encode(), salt.encode()) == stored


def test_bcrypt_ignores_bytes_after_72_like_apache(htpasswd_file: Path) -> None:
    entry = load_htpasswd(htpasswd_file).get("long")
    assert entry is not None and entry.scheme == "bcrypt"
    assert entry.verify(LONG_PASSWORD.encode())
    assert entry.verify(LONG_PASSWORD[:72].encode())  # what Apache's crypt_blowfish does too
    assert not entry.verify(LONG_PASSWORD[:71].encode())


def test_bcrypt_2a_and_2b_prefixes(tmp_path: Path) -> None:
    stored = htpasswd_line("-B", "u", "pw").split(":", 1)[1]
    assert stored.startswith("$2y$")
    path = tmp_path / "htpasswd"
    path.write_text(f"a:{stored.replace('$2y$', '$2a$', 1)}\nb:{stored.replace('$2y$', '$2b$', 1)}\n")
    passwords = load_htpasswd(path)
    for user in ("a", "b"):
        entry = passwords.get(user)
        assert entry is not None and entry.verify(b"pw") and not entry.verify(b"pW")


def test_comments_blank_lines_crlf_and_extra_fields(tmp_path: Path) -> None:
    sha = htpasswd_line("-s", "sam", "pw")
    path = tmp_path / "htpasswd"
    path.write_bytes(
        f"# users\r\n\r\n   {sha}\r\n  # indented comment\n{htpasswd_line('-m', 'amy', 'pw')}:extra field\n".encode()
    )
    passwords = load_htpasswd(path)
    assert sorted(passwords.users) == ["amy", "sam"]
    assert passwords.get("amy").verify(b"pw")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("-d", "crypt(3) DES hashes are not supported"),
        ("-p", "plain-text passwords are not supported"),
        ("-2", "crypt(3) $5$"),
        ("-5", "crypt(3) $6$"),
    ],
)
def test_htpasswd_refuses_weak_or_unknown_hashes(tmp_path: Path, flag: str, message: str) -> None:
    path = tmp_path / "htpasswd"
    htpasswd(path, "-B", "good", "pw")
    htpasswd(path, flag, "weak", "pw-weak")
    with pytest.raises(AuthFileError) as info:
        load_htpasswd(path)
    text = str(info.value)
    assert text.startswith(f"{path}:2: user 'weak': ")
    assert message in text
    assert "pw-weak" not in text
    assert "htpasswd -B" in text  # says what to use instead


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"alice\n", ":1: expected user:password-hash"),
        (b":{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", ":1: expected user:password-hash"),
        (b"# only a comment\nalice:\n", ":2: user 'alice' has an empty password hash"),
        (
            b"alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\nalice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n",
            ":2: user 'alice' is already defined on line 1",
        ),
        (b"alice:$2y$05$tooShort\n", ":1: user 'alice': malformed bcrypt hash"),
        (b"alice:{SHA}not base64!\n", ":1: user 'alice': malformed {SHA} hash"),
        (b"alice:{SHA}c2hvcnQ=\n", ":1: user 'alice': malformed {SHA} hash"),
        (b"alice:$apr1$salt$short\n", ":1: user 'alice': malformed $apr1$ hash"),
        (b"ok:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n\xff\xfe:x\n", ":2: not valid UTF-8"),
        (b"# nobody\n\n", ": no users"),
    ],
)
def test_htpasswd_errors_name_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "htpasswd"
    path.write_bytes(content)
    with pytest.raises(AuthFileError, match=re.escape(f"{path}{message}")):
        load_htpasswd(path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match=f"^{re.escape(str(tmp_path / 'missing'))}: no such file$"):
        load_htpasswd(tmp_path / "missing")
    with pytest.raises(AuthFileError, match=f"^{re.escape(str(tmp_path))}: is a directory$"):
        load_htdigest(tmp_path)


def test_htdigest_made_by_htdigest(htdigest_file: Path) -> None:
    users = load_htdigest(htdigest_file)
    assert users.realms == {REALM, "elsewhere"}
    assert users.ha1("dora", REALM) == hashlib.md5(f"dora:{REALM}:digest-secret".encode()).hexdigest()
    assert users.ha1("dänu", REALM) == hashlib.md5(f"dänu:{REALM}:ümlaut pass".encode()).hexdigest()
    assert users.ha1("olaf", REALM) is None
    assert users.ha1("olaf", "elsewhere") is not None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"dora:realm\n", ":1: expected user:realm:md5-hex"),
        (b"dora:realm:xyz\n", ":1: user 'dora': the hash is not 32 hexadecimal digits"),
        (b"a:r:" + b"0" * 32 + b"\n# c\na:r:" + b"1" * 32 + b"\n", ":3: user 'a' in realm 'r' is already defined on line 1"),
        (b"\n", ": no users"),
    ],
)
def test_htdigest_errors_name_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "htdigest"
    path.write_bytes(content)
    with pytest.raises(AuthFileError, match=re.escape(f"{path}{message}")):
        load_htdigest(path)


def test_options_from_config(htpasswd_file: Path, htdigest_file: Path) -> None:
    assert options_from_config(Config()) is None
    options = options_from_config(Config(http_auth_file=htpasswd_file))
    assert options is not None and isinstance(options["basic"], HtpasswdFile) and options["digest"] is None
    assert options["basic_realm"] == "localhost"
    with pytest.raises(
        AuthFileError,
        match=r"no user in realm 'localhost' \(http_digest_realm\); realms in the file: 'container-exporter', 'elsewhere'",
    ):
        options_from_config(Config(http_digest_file=htdigest_file))
    with pytest.raises(AuthFileError, match="no such file"):
        options_from_config(Config(http_auth_file=htdigest_file.parent / "nope"))


def test_realm_that_cannot_be_sent_is_refused() -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        AuthMiddleware(make_app(), basic=None, basic_realm="a\r\nSet-Cookie: x", digest=None, digest_realm="ok")


# --- Basic over HTTP -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(USERS))
def test_basic_right_password(basic_server: str, scheme: str) -> None:
    user, password, _ = USERS[scheme]
    response = requests.get(f"{basic_server}/private", auth=HTTPBasicAuth(user, password), timeout=10)
    assert response.status_code == 200
    assert response.json()["user"] == user


@pytest.mark.parametrize("scheme", sorted(USERS))
def test_basic_wrong_password(basic_server: str, scheme: str) -> None:
    user, password, _ = USERS[scheme]
    response = requests.get(f"{basic_server}/private", auth=HTTPBasicAuth(user, password + "!"), timeout=10)
    assert response.status_code == 401
    assert challenges(response) == {"basic": {"realm": BASIC_REALM, "charset": "UTF-8"}}


def test_basic_unknown_user_and_other_users_password(basic_server: str) -> None:
    assert requests.get(f"{basic_server}/private", auth=("mallory", "bcrypt-secret"), timeout=10).status_code == 401
    assert requests.get(f"{basic_server}/private", auth=("sam", USERS["bcrypt"][1]), timeout=10).status_code == 401


def test_basic_missing_header_gets_challenge(basic_server: str) -> None:
    response = httpx.get(f"{basic_server}/private")
    assert response.status_code == 401
    assert response.text == "401 Unauthorized\n"
    assert response.headers.get_list("www-authenticate") == [f'Basic realm="{BASIC_REALM}", charset="UTF-8"']
    assert "digest" not in challenges(response)
    head = httpx.head(f"{basic_server}/private")
    assert head.status_code == 401 and head.content == b"" and "basic" in challenges(head)


def test_basic_utf8_and_latin1_clients_and_lowercase_scheme(basic_server: str) -> None:
    user, password, _ = USERS["apr1"]  # not ASCII
    # httpx sends UTF-8 (as RFC 7617 and browsers do), requests latin-1; both mean the same password.
    assert httpx.get(f"{basic_server}/private", auth=(user, password)).json()["user"] == user
    assert requests.get(f"{basic_server}/private", auth=(user, password), timeout=10).json()["user"] == user
    assert httpx.get(f"{basic_server}/private", auth=(user, password.replace("é", "e"))).status_code == 401
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert httpx.get(f"{basic_server}/private", headers={"Authorization": f"basic   {token}"}).status_code == 200


def test_healthz_is_exempt(basic_server: str, digest_server: str) -> None:
    for url in (basic_server, digest_server):
        response = requests.get(f"{url}/healthz", timeout=10)
        assert response.status_code == 200 and response.text == "ok"
        assert "www-authenticate" not in response.headers
        # Only the exact path: a look-alike is still protected.
        assert requests.get(f"{url}/healthz/", timeout=10).status_code == 401
        assert requests.get(f"{url}/healthzx", timeout=10).status_code == 401


def test_long_bcrypt_password_over_http(basic_server: str) -> None:
    assert requests.get(f"{basic_server}/private", auth=("long", LONG_PASSWORD), timeout=10).status_code == 200


def test_digest_is_not_accepted_when_only_basic_is_configured(basic_server: str, digest_server: str) -> None:
    assert requests.get(f"{basic_server}/private", auth=HTTPDigestAuth("dora", "digest-secret"), timeout=10).status_code == 401
    user, password, _ = USERS["sha1"]
    assert requests.get(f"{digest_server}/private", auth=HTTPBasicAuth(user, password), timeout=10).status_code == 401


def test_basic_successes_are_cached_for_a_while(htpasswd_file: Path) -> None:
    clock = FakeClock()
    stats = AuthStats()
    app = wrapped(basic=load_htpasswd(htpasswd_file), clock=clock.monotonic, cache_ttl_s=30, stats=stats)
    user, password, _ = USERS["bcrypt"]
    with serve(app) as url, requests.Session() as session:
        session.auth = (user, password)
        for _ in range(5):
            assert session.get(f"{url}/private", timeout=10).status_code == 200
        assert (stats.password_checks, stats.cache_hits) == (1, 4)
        clock.advance(31)
        assert session.get(f"{url}/private", timeout=10).status_code == 200
        assert (stats.password_checks, stats.cache_hits) == (2, 4)
        # Failures are not cached, and a cached success says nothing about another password.
        for _ in range(2):
            assert session.get(f"{url}/private", auth=(user, password + "x"), timeout=10).status_code == 401
        assert stats.password_checks == 4
        assert stats.denied["bad_password"] == 2
        assert stats.allowed == 6


def test_basic_cache_is_bounded(htpasswd_file: Path) -> None:
    stats = AuthStats()
    app = wrapped(basic=load_htpasswd(htpasswd_file), cache_max_entries=1, stats=stats)
    with serve(app) as url:
        for user, password in (USERS["bcrypt"][:2], ("long", LONG_PASSWORD), USERS["bcrypt"][:2]):
            assert requests.get(f"{url}/private", auth=(user, password), timeout=10).status_code == 200
        assert (stats.password_checks, stats.cache_hits) == (3, 0)  # bea was pushed out by long


# --- Digest over HTTP ------------------------------------------------------------------------


def test_digest_challenge(digest_server: str) -> None:
    response = requests.get(f"{digest_server}/private", timeout=10)
    assert response.status_code == 401
    params = challenges(response)
    assert set(params) == {"digest"}
    digest = params["digest"]
    assert digest["realm"] == REALM and digest["qop"] == "auth" and digest["algorithm"] == "MD5"
    assert len(digest["nonce"]) == 43 and digest["opaque"] and "stale" not in digest
    assert fresh_challenge(digest_server)["nonce"] != digest["nonce"]


@pytest.mark.parametrize(("user", "password"), [("dora", "digest-secret"), ("dänu", "ümlaut pass")])
def test_digest_right_password(digest_server: str, user: str, password: str) -> None:
    with requests.Session() as session:
        session.auth = HTTPDigestAuth(user, password)
        for query in ("", "?a=1&b=%20x", "?x=/y"):
            response = session.get(f"{digest_server}/private{query}", timeout=10)
            assert response.status_code == 200, response.headers
            assert response.json()["user"] == user
        # The client reuses the nonce with nc 2, 3, ...: the last request carried a count above 1.
        assert "nc=00000003" in response.request.headers["Authorization"]
        assert session.post(f"{digest_server}/echo", data=b"payload", timeout=10).text == "payload"


def test_digest_wrong_password_and_unknown_user(digest_server: str) -> None:
    for user, password in (("dora", "wrong"), ("mallory", "digest-secret")):
        response = requests.get(f"{digest_server}/private", auth=HTTPDigestAuth(user, password), timeout=10)
        assert response.status_code == 401
        assert "stale" not in challenges(response)["digest"]


def test_digest_wrong_realm(digest_server: str, digest_stats: AuthStats) -> None:
    # olaf's password is right, but for realm "elsewhere", not the server's.
    response = requests.get(f"{digest_server}/private", auth=HTTPDigestAuth("olaf", "other-realm-pass"), timeout=10)
    assert response.status_code == 401
    # Answering the challenge for the realm the file has him in does not help either.
    before = digest_stats.denied["realm_mismatch"]
    challenge = fresh_challenge(digest_server)
    header = digest_header(challenge, "olaf", "other-realm-pass", "GET", "/private", realm="elsewhere")
    assert requests.get(f"{digest_server}/private", headers={"Authorization": header}, timeout=10).status_code == 401
    assert digest_stats.denied["realm_mismatch"] == before + 1
    # The hand-made header is right when nothing is tampered with.
    header = digest_header(fresh_challenge(digest_server), "dora", "digest-secret", "GET", "/private")
    assert requests.get(f"{digest_server}/private", headers={"Authorization": header}, timeout=10).status_code == 200


def test_digest_tampered_uri(digest_server: str, digest_stats: AuthStats) -> None:
    # A header a real client made for /private?a=1, sent for other targets.
    response = requests.get(f"{digest_server}/private?a=1", auth=HTTPDigestAuth("dora", "digest-secret"), timeout=10)
    assert response.status_code == 200
    assert 'uri="/private?a=1"' in response.request.headers["Authorization"]
    before = digest_stats.denied["uri_mismatch"]
    for target in ("/other", "/private?a=2", "/private", "/private?a=1&b=2"):
        assert requests.get(f"{digest_server}{target}", headers=response.request.headers, timeout=10).status_code == 401
    assert digest_stats.denied["uri_mismatch"] == before + 4
    # Made by hand with an unused count: the uri rewritten to match the target breaks the response.
    header = digest_header(fresh_challenge(digest_server), "dora", "digest-secret", "GET", "/private?a=1", nc="00000005")
    rewritten = header.replace('uri="/private?a=1"', 'uri="/other"')
    before = digest_stats.denied["bad_password"]
    assert requests.get(f"{digest_server}/other", headers={"Authorization": rewritten}, timeout=10).status_code == 401
    # A header made for GET is no good for POST, and it is refused before routing (no 405).
    assert requests.post(f"{digest_server}/private?a=1", headers={"Authorization": header}, timeout=10).status_code == 401
    assert digest_stats.denied["bad_password"] == before + 2
    # The control: untampered, for its own target, the same header is accepted.
    accepted = requests.get(f"{digest_server}/private?a=1", headers={"Authorization": header}, timeout=10)
    assert accepted.status_code == 200 and accepted.json() == {"user": "dora", "query": "a=1"}


def test_digest_replayed_nonce_count(digest_server: str) -> None:
    with requests.Session() as session:
        session.auth = HTTPDigestAuth("dora", "digest-secret")
        first = session.get(f"{digest_server}/private", timeout=10)
        second = session.get(f"{digest_server}/private", timeout=10)
        assert first.status_code == second.status_code == 200
        header_1 = first.request.headers["Authorization"]
        header_2 = second.request.headers["Authorization"]
        assert "nc=00000001" in header_1 and "nc=00000002" in header_2
        for replay in (header_2, header_1):  # the same count again, and a lower one
            response = requests.get(f"{digest_server}/private", headers={"Authorization": replay}, timeout=10)
            assert response.status_code == 401
            assert challenges(response)["digest"]["stale"] == "true"
        # The rightful client carries on with the next count.
        third = session.get(f"{digest_server}/private", timeout=10)
        assert third.status_code == 200 and "nc=00000003" in third.request.headers["Authorization"]


def test_digest_stale_nonce_is_renewed_by_the_client(htdigest_file: Path) -> None:
    clock = FakeClock()
    stats = AuthStats()
    app = wrapped(digest=load_htdigest(htdigest_file), clock=clock.monotonic, nonce_lifetime_s=300, stats=stats)
    with serve(app) as url, requests.Session() as session:
        session.auth = HTTPDigestAuth("dora", "digest-secret")
        first = session.get(f"{url}/private", timeout=10)
        assert first.status_code == 200
        clock.advance(299)
        assert session.get(f"{url}/private", timeout=10).status_code == 200
        assert stats.denied["stale_nonce"] == 0
        challenge = fresh_challenge(url)  # issued at 299 s
        clock.advance(2)
        # The first nonce has expired: with the right password, 401 stale=true ...
        first_challenge = challenges(first.history[0])["digest"]
        header = digest_header(first_challenge, "dora", "digest-secret", "GET", "/private", nc="00000007")
        assert first_challenge["nonce"] != challenge["nonce"]
        stale = requests.get(f"{url}/private", headers={"Authorization": header}, timeout=10)
        assert stale.status_code == 401
        assert challenges(stale)["digest"]["stale"] == "true"
        # ... and with a wrong password no stale flag: nothing says the client knows the password.
        wrong = digest_header(first_challenge, "dora", "wrong", "GET", "/private", nc="00000008")
        response = requests.get(f"{url}/private", headers={"Authorization": wrong}, timeout=10)
        assert response.status_code == 401 and "stale" not in challenges(response)["digest"]
        # A nonce younger than the lifetime is still good.
        header = digest_header(challenge, "dora", "digest-secret", "GET", "/private")
        assert requests.get(f"{url}/private", headers={"Authorization": header}, timeout=10).status_code == 200
        # The real client sends the old nonce, is told it is stale, retries with the new one.
        renewed = session.get(f"{url}/private", timeout=10)
        assert renewed.status_code == 200
        assert [r.status_code for r in renewed.history] == [401]
        assert challenges(renewed.history[0])["digest"]["stale"] == "true"
        assert "nc=00000001" in renewed.request.headers["Authorization"]
        assert stats.denied["stale_nonce"] == 2


def test_digest_forgotten_nonce_cannot_be_replayed(htdigest_file: Path) -> None:
    """With room for two nonces, a third pushes the first out; its count is unknown then, so it is
    refused (stale) rather than accepted with any count."""
    clock = FakeClock()
    stats = AuthStats()
    app = wrapped(digest=load_htdigest(htdigest_file), clock=clock.monotonic, max_tracked_nonces=2, stats=stats)
    with serve(app) as url:
        issued = []
        for _ in range(3):
            issued.append(fresh_challenge(url))
            clock.advance(1)
        for challenge in issued:
            header = digest_header(challenge, "dora", "digest-secret", "GET", "/private", nc="00000001")
            assert requests.get(f"{url}/private", headers={"Authorization": header}, timeout=10).status_code == 200
        header = digest_header(issued[0], "dora", "digest-secret", "GET", "/private", nc="00000002")
        forgotten = requests.get(f"{url}/private", headers={"Authorization": header}, timeout=10)
        assert forgotten.status_code == 401 and challenges(forgotten)["digest"]["stale"] == "true"
        assert stats.denied["forgotten_nonce"] == 1
        for challenge in issued[1:]:  # the two remembered ones go on with a higher count
            header = digest_header(challenge, "dora", "digest-secret", "GET", "/private", nc="00000002")
            assert requests.get(f"{url}/private", headers={"Authorization": header}, timeout=10).status_code == 200
        # A real client that held the forgotten nonce gets a new one without asking its user.
        assert requests.get(f"{url}/private", auth=HTTPDigestAuth("dora", "digest-secret"), timeout=10).status_code == 200


def test_digest_nonce_of_another_run_is_renewed(htdigest_file: Path, digest_server: str, digest_stats: AuthStats) -> None:
    """Another instance (as after a restart) has another secret: its nonces are refused, and since
    the digest is right, with stale=true, so the client gets a new nonce without asking its user."""
    with requests.Session() as session:
        session.auth = HTTPDigestAuth("dora", "digest-secret")
        with serve(wrapped(digest=load_htdigest(htdigest_file))) as earlier:
            challenge = fresh_challenge(earlier)
            assert session.get(f"{earlier}/private", timeout=10).status_code == 200
        before = digest_stats.denied["bad_nonce"]
        header = digest_header(
            challenge, "dora", "digest-secret", "GET", "/private", opaque=fresh_challenge(digest_server)["opaque"]
        )
        response = requests.get(f"{digest_server}/private", headers={"Authorization": header}, timeout=10)
        assert response.status_code == 401 and challenges(response)["digest"]["stale"] == "true"
        wrong = digest_header(challenge, "dora", "wrong", "GET", "/private")
        response = requests.get(f"{digest_server}/private", headers={"Authorization": wrong}, timeout=10)
        assert response.status_code == 401 and "stale" not in challenges(response)["digest"]
        renewed = session.get(f"{digest_server}/private", timeout=10)  # sends the earlier run's nonce first
        assert renewed.status_code == 200 and [r.status_code for r in renewed.history] == [401]
        assert digest_stats.denied["bad_nonce"] == before + 1  # the client's came with the earlier opaque
        assert digest_stats.denied["bad_opaque"] >= 1


@pytest.mark.parametrize(
    ("override", "status"),
    [
        ({}, 200),  # the control: untouched, it is accepted
        ({"algorithm": "md5"}, 200),  # the same, spelt differently
        ({"algorithm": "SHA-256"}, 401),
        ({"algorithm": "MD5-sess"}, 401),
        ({"qop": "auth-int"}, 401),
        ({"opaque": "forged"}, 401),
        ({"nc": "0000001"}, 401),
        ({"nc": "00000000"}, 401),
        ({"nc": "zzzzzzzz"}, 401),
        ({"response": "0" * 32}, 401),
        ({"userhash": "true"}, 401),
        ({"cnonce": "changed"}, 200),  # the client's to choose: it is part of the response
    ],
)
def test_digest_altered_fields(digest_server: str, override: dict[str, str], status: int) -> None:
    challenge = fresh_challenge(digest_server)
    header = digest_header(challenge, "dora", "digest-secret", "GET", "/private", **override)
    response = requests.get(f"{digest_server}/private", headers={"Authorization": header}, timeout=10)
    assert response.status_code == status


def test_digest_without_qop_is_refused(digest_server: str) -> None:
    """RFC 2069 digests (no qop, no nc) cannot be protected against replay."""
    challenge = fresh_challenge(digest_server)
    ha1 = hashlib.md5(f"dora:{REALM}:digest-secret".encode()).hexdigest()
    ha2 = hashlib.md5(b"GET:/private").hexdigest()
    response = hashlib.md5(f"{ha1}:{challenge['nonce']}:{ha2}".encode()).hexdigest()
    header = f'Digest username="dora", realm="{REALM}", nonce="{challenge["nonce"]}", uri="/private", response="{response}"'
    assert requests.get(f"{digest_server}/private", headers={"Authorization": header}, timeout=10).status_code == 401


# --- both, streaming, malformed input --------------------------------------------------------


def test_both_configured_either_method_works(both_server: str, both_stats: AuthStats) -> None:
    response = requests.get(f"{both_server}/private", timeout=10)
    assert response.status_code == 401
    params = challenges(response)
    assert params["digest"]["realm"] == REALM and params["basic"]["realm"] == BASIC_REALM
    assert response.raw.headers.getlist("www-authenticate")[0].startswith("Digest ")  # the stronger first
    user, password, _ = USERS["sha1"]
    assert requests.get(f"{both_server}/private", auth=HTTPBasicAuth(user, password), timeout=10).json()["user"] == user
    assert (
        requests.get(f"{both_server}/private", auth=HTTPDigestAuth("dora", "digest-secret"), timeout=10).json()["user"] == "dora"
    )
    assert requests.get(f"{both_server}/private", auth=HTTPBasicAuth("dora", "digest-secret"), timeout=10).status_code == 401
    assert requests.get(f"{both_server}/private", auth=HTTPDigestAuth(user, password), timeout=10).status_code == 401
    assert requests.get(f"{both_server}/healthz", timeout=10).status_code == 200
    assert both_stats.allowed >= 2 and both_stats.denied["missing"] >= 1


def test_streaming_response_passes_through_and_unauthenticated_never_starts(htpasswd_file: Path) -> None:
    probe = StreamProbe()
    app = wrapped(basic=load_htpasswd(htpasswd_file), app=make_app(probe))
    user, password, _ = USERS["sha1"]
    with serve(app) as url:
        denied = httpx.get(f"{url}/stream")
        assert denied.status_code == 401 and not probe.started
        with httpx.stream("GET", f"{url}/stream", auth=(user, password)) as response:
            assert response.status_code == 200
            assert response.headers.get("transfer-encoding") == "chunked"
            lines = list(response.iter_lines())
        assert lines == [f"chunk {i}" for i in range(5)] and probe.started


MALFORMED: list[bytes] = [
    b"Basic",
    b"Basic ",
    b"Basic !!!!",
    b"Basic " + base64.b64encode(b"no-colon"),
    b"Basic " + base64.b64encode(b"\xff\xfe:pw"),
    b"Basic " + base64.b64encode(b"bea:" + b"x" * 5000),
    b"Basic " + base64.b64encode(b"bea:bcrypt-secret")[:-2],
    b"Basic \xff\xfe\xfd",
    b"Digest",
    b"Digest ",
    b"Digest garbage",
    b'Digest username="dora',
    b'Digest username="dora", username="dora"',
    b'Digest username="dora", realm="container-exporter", nonce="x", uri="/private", response="y", qop=auth, nc=00000001, cnonce="c"',
    b'Digest username="\xff\xfe", realm="container-exporter", nonce="\xe9\xe9", uri="/private", response="\xe9", qop=auth, nc=00000001, cnonce="c", opaque="\xe9"',
    b"Digest " + b"a=b, " * 1700,
    b"Digest ,,,,",
    b'Digest username=dora realm="x"',
    b"Bearer abc.def.ghi",
    b"NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw==",
    b"\xe9\xe9 \xe9",
    b" ",
]


def raw_get(url: str, path: str, authorization: bytes) -> tuple[int, bytes]:
    """A GET with the Authorization header exactly as given (clients refuse some of these)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"GET "
            + path.encode()
            + b" HTTP/1.1\r\nHost: test\r\nAuthorization: "
            + authorization
            + b"\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, _ = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


def test_malformed_headers_get_401_not_500(both_server: str, both_stats: AuthStats) -> None:
    for value in MALFORMED:
        status, head = raw_get(both_server, "/private", value)
        assert status == 401, value
        assert b'www-authenticate: Digest realm="container-exporter"' in head and b"www-authenticate: Basic" in head
        assert raw_get(both_server, "/healthz", value)[0] == 200
    assert both_stats.denied["malformed"] >= 10


def test_malformed_nonce_lookalikes(digest_server: str) -> None:
    challenge = fresh_challenge(digest_server)
    nonce = challenge["nonce"]
    flipped = nonce[:-1] + ("A" if nonce[-1] != "A" else "B")
    for bad in (flipped, nonce + "=", nonce[:-1], "é" * 43, "=" * 43):
        header = digest_header(challenge, "dora", "digest-secret", "GET", "/private", nonce=bad)
        response = requests.get(f"{digest_server}/private", headers={"Authorization": header.encode("utf-8")}, timeout=10)
        assert response.status_code == 401


def test_parse_auth_params() -> None:
    assert parse_auth_params('a=b, C="d, \\"e\\"",f=""') == {"a": "b", "c": 'd, "e"', "f": ""}
    assert parse_auth_params("") == {}
    for bad in ('a="b', "a=b c=d", "a=b,,", "=b", "a", 'a=b, a="c"'):
        assert parse_auth_params(bad) is None, bad


# --- ASGI scopes a browser does not send -----------------------------------------------------


class Recorder:
    """An inner ASGI app that notes who reached it."""

    def __init__(self) -> None:
        self.reached: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.reached.append(scope.get("auth_user", "-"))


def drive(app: AuthMiddleware, scope: dict[str, Any]) -> list[dict[str, Any]]:
    import anyio

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    anyio.run(app, scope, receive, send)
    return sent


def _websocket_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b"", "headers": headers}


def test_websocket_handshake_needs_credentials(htpasswd_file: Path) -> None:
    inner = Recorder()
    app = wrapped(basic=load_htpasswd(htpasswd_file), app=inner)
    assert drive(app, _websocket_scope([])) == [{"type": "websocket.close", "code": 1008}]
    assert inner.reached == []
    user, password, _ = USERS["sha1"]
    token = b"Basic " + base64.b64encode(f"{user}:{password}".encode())
    assert drive(app, _websocket_scope([(b"authorization", token)])) == []
    assert inner.reached == [user]


def test_lifespan_and_unconfigured_pass_through(htpasswd_file: Path) -> None:
    inner = Recorder()
    assert drive(wrapped(basic=load_htpasswd(htpasswd_file), app=inner), {"type": "lifespan"}) == []
    open_app = wrapped(app=inner)
    assert not open_app.enabled
    assert drive(open_app, {"type": "http", "method": "GET", "path": "/private", "headers": []}) == []
    assert inner.reached == ["-", "-"]


def test_no_password_in_logs(basic_server: str, digest_server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="exporter.api.auth")
    requests.get(f"{basic_server}/private", auth=("bea", "Sup3r-Secret-Attempt"), timeout=10)
    requests.get(f"{digest_server}/private", auth=HTTPDigestAuth("dora", "Sup3r-Secret-Attempt"), timeout=10)
    assert "bad_password" in caplog.text
    assert "Sup3r-Secret-Attempt" not in caplog.text
    assert base64.b64encode(b"bea:Sup3r-Secret-Attempt").decode() not in caplog.text
