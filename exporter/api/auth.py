"""HTTP Basic (htpasswd) and Digest (htdigest) authentication, as pure ASGI middleware.

cAdvisor's ``http_auth_file`` + ``http_auth_realm`` turn on Basic auth and ``http_digest_file`` +
``http_digest_realm`` Digest auth (RFC 7616, MD5 with qop=auth: an htdigest file holds MD5 HA1 values,
so no other algorithm can be offered). Both may be on at once; the client picks either.

The middleware is plain ASGI rather than Starlette's ``BaseHTTPMiddleware`` so that it wraps
streaming responses without buffering them, and it runs before any handler: a request without valid
credentials never reaches the app.

Digest nonces carry their issue time and an HMAC under a per-process secret, so verifying one needs
no state; only the highest nonce count seen per nonce is kept (bounded) to refuse replays.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import struct
import time
import urllib.parse
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import bcrypt

if TYPE_CHECKING:
    from exporter.config import Config

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_BODY_401 = b"401 Unauthorized\n"
SUPPORTED_HASHES = "supported: bcrypt (htpasswd -B), SHA1 (htpasswd -s), apr1-MD5 (htpasswd -m)"
MAX_AUTHORIZATION_BYTES = 8192


class AuthFileError(Exception):
    """An htpasswd or htdigest file that cannot be used; the message names the file and the line."""


# --- password hashes -------------------------------------------------------------------------

_CRYPT64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BCRYPT_RE = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_APR1_RE = re.compile(r"\$apr1\$([^$]{0,8})\$[./A-Za-z0-9]{22}")
_DES_RE = re.compile(r"[./A-Za-z0-9]{13}")
# bcrypt uses the first 72 bytes of a password; Apache's crypt_blowfish ignores the rest and
# bcrypt>=5 raises ValueError for longer input, so the truncation is ours.
BCRYPT_MAX_PASSWORD_BYTES = 72


def apr1_md5(password: bytes, salt: bytes) -> str:
    """Apache's apr1-MD5 hash: Poul-Henning Kamp's FreeBSD md5-crypt with the magic ``$apr1$``
    (apr_md5_encode in APR's crypto/apr_md5.c)."""
    magic = b"$apr1$"
    salt = salt[:8]
    ctx = hashlib.md5(password + magic + salt)
    alternate = hashlib.md5(password + salt + password).digest()
    for i in range(len(password), 0, -16):
        ctx.update(alternate[: min(16, i)])
    i = len(password)
    while i:
        ctx.update(b"\0" if i & 1 else password[:1])
        i >>= 1
    final = ctx.digest()
    for i in range(1000):  # "to make it slower": a fixed 1000 rounds in the algorithm
        round_ = hashlib.md5()
        round_.update(password if i & 1 else final)
        if i % 3:
            round_.update(salt)
        if i % 7:
            round_.update(password)
        round_.update(final if i & 1 else password)
        final = round_.digest()
    out = []
    for a, b, c in ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)):
        value = (final[a] << 16) | (final[b] << 8) | final[c]
        for _ in range(4):
            out.append(_CRYPT64[value & 0x3F])
            value >>= 6
    value = final[11]
    for _ in range(2):
        out.append(_CRYPT64[value & 0x3F])
        value >>= 6
    return f"$apr1${salt.decode('ascii')}${''.join(out)}"


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """One htpasswd entry's hash. ``slow`` hashes (bcrypt) should be verified off the event loop."""

    scheme: str  # "bcrypt", "sha1" or "apr1"
    stored: str = field(repr=False)

    @property
    def slow(self) -> bool:
        return self.scheme == "bcrypt"

    def verify(self, password: bytes) -> bool:
        if self.scheme == "bcrypt":
            return bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD_BYTES], self.stored.encode("ascii"))
        if self.scheme == "sha1":
            expected = base64.b64decode(self.stored[len("{SHA}") :])
            return hmac.compare_digest(hashlib.sha1(password).digest(), expected)
        salt = self.stored[len("$apr1$") :].split("$", 1)[0]
        return hmac.compare_digest(apr1_md5(password, salt.encode("ascii")).encode("ascii"), self.stored.encode("ascii"))


def parse_password_hash(text: str) -> PasswordHash:
    """``text`` → :class:`PasswordHash`; ValueError saying why an entry is refused."""
    if text.startswith(("$2y$", "$2b$", "$2a$")):
        if not _BCRYPT_RE.fullmatch(text):
            raise ValueError("malformed bcrypt hash")
        return PasswordHash("bcrypt", text)
    if text.startswith("{SHA}"):
        try:
            digest = base64.b64decode(text[len("{SHA}") :], validate=True)
        except (binascii.Error, ValueError):
            digest = b""
        if len(digest) != 20:
            raise ValueError("malformed {SHA} hash (expected the base64 of a 20-byte SHA1 digest)")
        return PasswordHash("sha1", text)
    if text.startswith("$apr1$"):
        if not _APR1_RE.fullmatch(text):
            raise ValueError("malformed $apr1$ hash")
        return PasswordHash("apr1", text)
    if text.startswith(("$1$", "$5$", "$6$")):
        raise ValueError(f"crypt(3) {text[:3]} hashes are not supported ({SUPPORTED_HASHES})")
    if _DES_RE.fullmatch(text):
        # A 13-character crypt(3) DES hash (htpasswd -d) uses only the first 8 characters of a
        # password; it could also be a 13-character plain-text password, which is no better.
        raise ValueError(f"crypt(3) DES hashes are not supported, they use only 8 characters of a password ({SUPPORTED_HASHES})")
    raise ValueError(f"unrecognised password hash; plain-text passwords are not supported ({SUPPORTED_HASHES})")


# --- files -----------------------------------------------------------------------------------


def _file_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for each line that is neither blank nor a ``#`` comment, stripped as
    Apache's ap_cfg_getline strips them."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuthFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise AuthFileError(f"{path}: is a directory") from None
    except PermissionError:
        raise AuthFileError(f"{path}: permission denied") from None
    except OSError as exc:
        raise AuthFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise AuthFileError(f"{path}:{line}: not valid UTF-8") from None
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


class HtpasswdFile:
    """Users and password hashes of an htpasswd file."""

    def __init__(self, path: Path, entries: dict[str, PasswordHash]) -> None:
        self.path = path
        self._entries = entries

    def get(self, user: str) -> PasswordHash | None:
        return self._entries.get(user)

    @property
    def users(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"HtpasswdFile({str(self.path)!r}, {len(self)} users)"


class HtdigestFile:
    """(user, realm) → HA1 = MD5(user:realm:password), from an htdigest file."""

    def __init__(self, path: Path, entries: dict[tuple[str, str], str]) -> None:
        self.path = path
        self._entries = entries

    def ha1(self, user: str, realm: str) -> str | None:
        return self._entries.get((user, realm))

    @property
    def realms(self) -> frozenset[str]:
        return frozenset(realm for _, realm in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"HtdigestFile({str(self.path)!r}, {len(self)} entries)"


def load_htpasswd(path: str | Path) -> HtpasswdFile:
    """Read an htpasswd file: ``user:hash`` lines (fields after a second ``:`` are ignored, as by
    Apache). Raises :class:`AuthFileError` naming the file and line."""
    path = Path(path)
    entries: dict[str, PasswordHash] = {}
    lines: dict[str, int] = {}
    for number, line in _file_lines(path):
        user, sep, rest = line.partition(":")
        where = f"{path}:{number}"
        if not sep or not user:
            raise AuthFileError(f"{where}: expected user:password-hash")
        text = rest.split(":", 1)[0]
        if not text:
            raise AuthFileError(f"{where}: user {user!r} has an empty password hash")
        if user in entries:
            raise AuthFileError(f"{where}: user {user!r} is already defined on line {lines[user]}")
        try:
            entries[user] = parse_password_hash(text)
        except ValueError as exc:
            raise AuthFileError(f"{where}: user {user!r}: {exc}") from None
        lines[user] = number
    if not entries:
        raise AuthFileError(f"{path}: no users")
    return HtpasswdFile(path, entries)


_HA1_RE = re.compile(r"[0-9a-fA-F]{32}")


def load_htdigest(path: str | Path) -> HtdigestFile:
    """Read an htdigest file: ``user:realm:HA1`` lines. Raises :class:`AuthFileError` naming the
    file and line."""
    path = Path(path)
    entries: dict[tuple[str, str], str] = {}
    lines: dict[tuple[str, str], int] = {}
    for number, line in _file_lines(path):
        parts = line.split(":")
        where = f"{path}:{number}"
        if len(parts) < 3 or not parts[0]:
            raise AuthFileError(f"{where}: expected user:realm:md5-hex")
        user, realm, ha1 = parts[0], parts[1], parts[2]
        if not _HA1_RE.fullmatch(ha1):
            raise AuthFileError(f"{where}: user {user!r}: the hash is not 32 hexadecimal digits (MD5 of user:realm:password)")
        if (user, realm) in entries:
            raise AuthFileError(f"{where}: user {user!r} in realm {realm!r} is already defined on line {lines[user, realm]}")
        entries[user, realm] = ha1.lower()
        lines[user, realm] = number
    if not entries:
        raise AuthFileError(f"{path}: no users")
    return HtdigestFile(path, entries)


def options_from_config(config: Config) -> dict[str, Any] | None:
    """:class:`AuthMiddleware`'s keyword arguments for ``config``; None when neither
    ``http_auth_file`` nor ``http_digest_file`` is set. Raises :class:`AuthFileError` for a file
    that cannot be used, or an htdigest file with nobody in ``http_digest_realm``."""
    if config.http_auth_file is None and config.http_digest_file is None:
        return None
    basic = load_htpasswd(config.http_auth_file) if config.http_auth_file is not None else None
    digest = load_htdigest(config.http_digest_file) if config.http_digest_file is not None else None
    if digest is not None and config.http_digest_realm not in digest.realms:
        raise AuthFileError(
            f"{digest.path}: no user in realm {config.http_digest_realm!r} (http_digest_realm); "
            f"realms in the file: {', '.join(repr(r) for r in sorted(digest.realms))}"
        )
    return {"basic": basic, "basic_realm": config.http_auth_realm, "digest": digest, "digest_realm": config.http_digest_realm}


# --- header parsing --------------------------------------------------------------------------

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_AUTH_PARAM_RE = re.compile(rf'[ \t]*({_TOKEN})[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))[ \t]*(?:,|\Z)')
_UNESCAPE_RE = re.compile(r"\\(.)")
_NC_RE = re.compile(r"[0-9a-fA-F]{8}")


def parse_auth_params(text: str) -> dict[str, str] | None:
    """``a=b, c="d"`` → {"a": "b", "c": "d"} (names lower-cased); None if malformed or a name repeats."""
    params: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _AUTH_PARAM_RE.match(text, pos)
        if match is None or match.end() == pos:
            return None
        name = match.group(1).lower()
        if name in params:
            return None
        quoted = match.group(2)
        params[name] = _UNESCAPE_RE.sub(r"\1", quoted) if quoted is not None else match.group(3)
        pos = match.end()
    return params


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _md5_hex(text: str) -> str:
    return hashlib.md5(text.encode("latin-1")).hexdigest()


def _as_text(value: str) -> str:
    """A header value decoded as latin-1 (byte for byte) → its UTF-8 reading when it has one."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return value


def _utf8_or_latin1(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _verify_any(entry: PasswordHash, candidates: list[bytes]) -> bool:
    return any([entry.verify(candidate) for candidate in candidates])  # all of them: no early exit


def request_target(scope: Scope) -> str:
    """The request-target as sent (path and query, still percent-encoded), as a Digest ``uri``."""
    raw_path = scope.get("raw_path") or urllib.parse.quote(scope["path"]).encode("ascii")
    query = scope.get("query_string", b"")
    return (raw_path + b"?" + query if query else raw_path).decode("latin-1")


# --- the middleware --------------------------------------------------------------------------


@dataclass
class AuthStats:
    """Counters for the exporter's own metrics. ``denied`` is keyed by reason: missing, malformed,
    scheme_not_offered, unsupported (a Digest algorithm, qop or userhash not offered), unknown_user,
    bad_password, realm_mismatch, uri_mismatch, bad_opaque, bad_nonce (not made by this process: an earlier run's),
    stale_nonce (expired), replayed_nc, forgotten_nonce (dropped from the bounded count table)."""

    allowed: int = 0
    denied: Counter[str] = field(default_factory=Counter)
    password_checks: int = 0  # Basic passwords hashed and compared
    cache_hits: int = 0  # Basic credentials accepted from the cache of recent successes


@dataclass(frozen=True, slots=True)
class _Outcome:
    user: str | None
    reason: str = ""
    stale: bool = False


def _deny(reason: str, stale: bool = False) -> _Outcome:
    return _Outcome(None, reason, stale)


class AuthMiddleware:
    """Require HTTP Basic and/or Digest credentials for every HTTP and WebSocket request whose path
    is not in ``exempt_paths``. With neither ``basic`` nor ``digest`` it passes everything through.

    ``clock`` is monotonic seconds (nonce ages, cache expiry). Successful Basic checks are cached
    for ``cache_ttl_s`` under an HMAC of the credentials (never the password itself), at most
    ``cache_max_entries`` of them. The highest nonce count of at most ``max_tracked_nonces`` nonces
    is kept; a nonce evicted from that table is answered as stale, so it cannot be replayed.
    The authenticated user name is put in ``scope["auth_user"]``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        basic: HtpasswdFile | None,
        basic_realm: str,
        digest: HtdigestFile | None,
        digest_realm: str,
        exempt_paths: frozenset[str] = frozenset({"/healthz"}),
        clock: Callable[[], float] = time.monotonic,
        nonce_lifetime_s: float = 300,
        cache_ttl_s: float = 60,
        cache_max_entries: int = 1024,
        max_tracked_nonces: int = 4096,
        stats: AuthStats | None = None,
    ) -> None:
        for name, realm in (("basic_realm", basic_realm), ("digest_realm", digest_realm)):
            if not all(" " <= ch <= "~" for ch in realm):
                raise ValueError(f"{name} {realm!r}: only printable ASCII characters can be sent in a challenge")
        if nonce_lifetime_s <= 0 or cache_ttl_s < 0 or cache_max_entries < 0 or max_tracked_nonces < 1:
            raise ValueError("nonce_lifetime_s must be > 0, cache_ttl_s and cache_max_entries >= 0, max_tracked_nonces >= 1")
        self._app = app
        self._basic = basic
        self._digest = digest
        self._digest_realm = digest_realm
        self._exempt = exempt_paths
        self._clock = clock
        self._nonce_lifetime_ns = int(nonce_lifetime_s * 1e9)
        self._cache_ttl_s = cache_ttl_s
        self._cache_max = cache_max_entries
        self._max_nonces = max_tracked_nonces
        self.stats = stats if stats is not None else AuthStats()
        self._secret = secrets.token_bytes(32)
        self._opaque = hmac.new(self._secret, b"opaque", hashlib.sha256).hexdigest()[:32]
        self._dummy_ha1 = hmac.new(self._secret, b"dummy", hashlib.md5).hexdigest()
        self._verified: OrderedDict[bytes, float] = OrderedDict()  # HMAC(user:password) → expiry
        self._nonce_counts: OrderedDict[str, tuple[int, int]] = OrderedDict()  # nonce → (issued_ns, highest nc)
        self._evicted_up_to_ns: int | None = None  # newest issue time of a nonce dropped from _nonce_counts
        self._basic_challenge = f'Basic realm={_quote(basic_realm)}, charset="UTF-8"'.encode("ascii")
        self._digest_challenge = f'Digest realm={_quote(digest_realm)}, qop="auth", algorithm=MD5'.encode("ascii")

    @property
    def enabled(self) -> bool:
        return self._basic is not None or self._digest is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.enabled or scope["path"] in self._exempt:
            await self._app(scope, receive, send)
            return
        outcome = await self._authenticate(scope)
        if outcome.user is not None:
            self.stats.allowed += 1
            scope["auth_user"] = outcome.user
            await self._app(scope, receive, send)
            return
        self.stats.denied[outcome.reason] += 1
        if outcome.reason != "missing":
            client = scope.get("client")
            log.debug(
                "%s %s denied: %s (client %s)",
                scope.get("method", "WEBSOCKET"),
                scope["path"],
                outcome.reason,
                client[0] if client else "?",
            )
        if scope["type"] == "websocket":
            # Closing before accepting makes the server refuse the handshake (403).
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(_BODY_401)).encode("ascii"))]
        headers.extend((b"www-authenticate", value) for value in self._challenges(outcome.stale))
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": _BODY_401})

    def _challenges(self, stale: bool) -> list[bytes]:
        out = []
        if self._digest is not None:
            extra = f', nonce="{self._new_nonce()}", opaque="{self._opaque}"' + (", stale=true" if stale else "")
            out.append(self._digest_challenge + extra.encode("ascii"))
        if self._basic is not None:
            out.append(self._basic_challenge)
        return out

    async def _authenticate(self, scope: Scope) -> _Outcome:
        header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        if header is None:
            return _deny("missing")
        if len(header) > MAX_AUTHORIZATION_BYTES:
            return _deny("malformed")
        scheme, _, credentials = header.decode("latin-1").strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and self._basic is not None:
            return await self._check_basic(self._basic, credentials.strip())
        if scheme == "digest" and self._digest is not None:
            return self._check_digest(self._digest, credentials, scope.get("method", "GET"), request_target(scope))
        return _deny("scheme_not_offered")

    # --- Basic ---

    async def _check_basic(self, passwords: HtpasswdFile, credentials: str) -> _Outcome:
        try:
            raw = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return _deny("malformed")
        user_bytes, sep, password = raw.partition(b":")
        if not sep:
            return _deny("malformed")
        # RFC 7617 asks for UTF-8 (browsers send it); requests and older clients send latin-1.
        # Bytes that are not UTF-8 are read as latin-1, so the password is also tried re-encoded.
        user = _utf8_or_latin1(user_bytes)
        candidates = [password]
        try:
            password.decode("utf-8")
        except UnicodeDecodeError:
            candidates.append(password.decode("latin-1").encode("utf-8"))
        entry = passwords.get(user)
        if entry is None:
            return _deny("unknown_user")
        key = hmac.new(self._secret, raw + b"\0" + entry.stored.encode("ascii"), hashlib.sha256).digest()
        expiry = self._verified.get(key)
        if expiry is not None:
            if self._clock() < expiry:
                self.stats.cache_hits += 1
                return _Outcome(user)
            del self._verified[key]
        self.stats.password_checks += 1
        if entry.slow:
            ok = await anyio.to_thread.run_sync(_verify_any, entry, candidates)
        else:
            ok = _verify_any(entry, candidates)
        if not ok:
            return _deny("bad_password")
        if self._cache_max and self._cache_ttl_s:
            self._verified[key] = self._clock() + self._cache_ttl_s
            self._verified.move_to_end(key)
            while len(self._verified) > self._cache_max:
                self._verified.popitem(last=False)
        return _Outcome(user)

    # --- Digest ---

    def _nonce_mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, b"nonce:" + body, hashlib.sha256).digest()[:16]

    def _new_nonce(self) -> str:
        body = struct.pack(">q", int(self._clock() * 1e9)) + secrets.token_bytes(8)
        return base64.urlsafe_b64encode(body + self._nonce_mac(body)).decode("ascii").rstrip("=")

    def _nonce_issued_ns(self, nonce: str) -> int | None:
        """Issue time of a nonce this process made; None for any other string."""
        if len(nonce) != 43 or not nonce.isascii():
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=")
        except (binascii.Error, ValueError):
            return None
        if len(raw) != 32 or base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != nonce:
            return None
        if not hmac.compare_digest(raw[16:], self._nonce_mac(raw[:16])):
            return None
        return int(struct.unpack(">q", raw[:8])[0])

    def _check_digest(self, users: HtdigestFile, credentials: str, method: str, target: str) -> _Outcome:
        p = parse_auth_params(credentials)
        if p is None:
            return _deny("malformed")
        if any(k not in p for k in ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")):
            return _deny("malformed")
        if p.get("algorithm", "MD5").upper() != "MD5" or p["qop"] != "auth" or p.get("userhash", "false").lower() != "false":
            return _deny("unsupported")
        if not _NC_RE.fullmatch(p["nc"]) or int(p["nc"], 16) == 0:
            return _deny("malformed")
        if p["realm"] != self._digest_realm:
            return _deny("realm_mismatch")
        if p["uri"] != target:
            return _deny("uri_mismatch")
        user = _as_text(p["username"])
        ha1 = users.ha1(user, self._digest_realm)
        ha2 = _md5_hex(f"{method}:{p['uri']}")
        expected = _md5_hex(f"{ha1 or self._dummy_ha1}:{p['nonce']}:{p['nc']}:{p['cnonce']}:{p['qop']}:{ha2}")
        if not hmac.compare_digest(expected.encode("ascii"), p["response"].lower().encode("latin-1")) or ha1 is None:
            return _deny("unknown_user" if ha1 is None else "bad_password")
        # The client knows the password from here on: a refused nonce is answered with stale=true,
        # which lets it retry with a fresh nonce without asking its user again (RFC 7616 3.3). That
        # includes a nonce (and opaque) of an earlier run of the exporter, whose secret is gone.
        if "opaque" in p and not hmac.compare_digest(p["opaque"].encode("latin-1"), self._opaque.encode("ascii")):
            return _deny("bad_opaque", stale=True)
        issued_ns = self._nonce_issued_ns(p["nonce"])
        if issued_ns is None:
            return _deny("bad_nonce", stale=True)
        now_ns = int(self._clock() * 1e9)
        if now_ns - issued_ns > self._nonce_lifetime_ns:
            return _deny("stale_nonce", stale=True)
        return self._count_nonce(p["nonce"], issued_ns, int(p["nc"], 16), now_ns, user)

    def _count_nonce(self, nonce: str, issued_ns: int, nc: int, now_ns: int, user: str) -> _Outcome:
        seen = self._nonce_counts.get(nonce)
        if seen is not None:
            if nc <= seen[1]:
                return _deny("replayed_nc", stale=True)
            self._nonce_counts[nonce] = (issued_ns, nc)
            return _Outcome(user)
        if self._evicted_up_to_ns is not None and issued_ns <= self._evicted_up_to_ns:
            # Maybe used before and forgotten: its counts are unknown, so it cannot be trusted.
            return _deny("forgotten_nonce", stale=True)
        self._nonce_counts[nonce] = (issued_ns, nc)
        if len(self._nonce_counts) > self._max_nonces:
            for old in [n for n, (t, _) in self._nonce_counts.items() if now_ns - t > self._nonce_lifetime_ns]:
                del self._nonce_counts[old]  # expired: refused as stale whatever their count
            while len(self._nonce_counts) > self._max_nonces:
                _, (old_ns, _) = self._nonce_counts.popitem(last=False)
                self._evicted_up_to_ns = max(old_ns, self._evicted_up_to_ns or old_ns)
        return _Outcome(user)
