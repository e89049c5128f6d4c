"""Optional API keys: a file of hashed keys, the helper that makes them, and the ASGI middleware that checks them.

Off unless CONVNET_API_KEYS_FILE names a key file. Then every request needs `Authorization: Bearer <key>`, except
the probes (/livez, /readyz, /healthz), the API docs (/, /docs, /docs.json and their static files), the demo page
(/demo...) and /metrics (unless CONVNET_METRICS_AUTH=key). The check is by path, outside the routes, so whatever
endpoint is added later (the /v2 inference protocol, say) is protected without being named here.

The key file holds one key per line, `sha256:<hex digest> <name>`, and never a key itself:

    python -m serving.keys new ci-pipeline     # prints a fresh key once; stores only its hash and the name
    python -m serving.keys revoke ci-pipeline  # deletes the line
    python -m serving.keys list

Why SHA-256 and not a slow password hash (bcrypt, scrypt, argon2): a key is 32 random bytes from `secrets`, so
there is nothing to guess. A slow KDF protects low-entropy passwords against dictionary attacks on a stolen hash; a
256-bit random key has no dictionary, and brute-forcing SHA-256 preimages over 2^256 is out of reach at any speed.
A fast hash also keeps the check at a microsecond per request. Digests are compared with `hmac.compare_digest`
against every stored key, without stopping at a match, so the time taken says nothing about which key (if any)
matched or how much of a digest did.

Reload: each worker re-reads the file when it changes (checked at most once a second, by inode, size, mtime and
ctime), and on restart; no signal is needed. A file that becomes unreadable or malformed fails closed: no key is
accepted until it is fixed, and the error is logged. Keys are never logged; names are (and label /metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.errors import ClientError, Unauthorized, error_body

log = logging.getLogger("convnet_serving")

KEY_PREFIX = "cnv_"  # makes a leaked key recognisable to secret scanners and people
HASH_SCHEME = "sha256"
KEYS_FILE_ENV = "CONVNET_API_KEYS_FILE"  # the server's key file (ServiceConfig.api_keys_file)
CLIENT_KEY_ENV = "CONVNET_API_KEY"  # the key the batch CLI and the load tests send
RECHECK_S = 1.0
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a Prometheus label value that needs no escaping
LINE_RE = re.compile(rf"{HASH_SCHEME}:([0-9a-f]{{64}})(?:\s+(\S+))?")

# Paths that never need a key: probes, API docs, the demo page. /metrics is added when metrics_auth is "open".
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/v2/health/live", "/v2/health/ready", "/", "/docs",
                        "/docs.json", "/demo"})
OPEN_PREFIXES = ("/demo/", "/demo.", "/static_content/")  # the demo page's files (/demo/app.js, /demo.html)
METRICS_PATH = "/metrics"


class KeyFileError(ValueError):
    """The key file is missing, unreadable or malformed: an operator's problem (the server refuses to start)."""


@dataclass(frozen=True)
class StoredKey:
    name: str
    digest: bytes  # SHA-256 of the key


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_line(name: str, key: str) -> str:
    return f"{HASH_SCHEME}:{digest(key).hex()} {name}"


def parse_key_file(text: str, source: str = "the key file") -> list[StoredKey]:
    """Lines `sha256:<64 hex> [name]`; blank lines and `#` comments skipped. A name defaults to the digest's
    first 12 hex digits (not secret: a hash of a random key)."""
    keys: list[StoredKey] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = LINE_RE.fullmatch(line)
        if not m:
            # Never echo the line: someone may have pasted a key itself in here.
            raise KeyFileError(f"{source} line {lineno}: expected '{HASH_SCHEME}:<64 hex digits> [name]'")
        name = m.group(2) or m.group(1)[:12]
        if not NAME_RE.fullmatch(name):
            raise KeyFileError(f"{source} line {lineno}: key name {name!r} must match {NAME_RE.pattern}")
        if any(k.name == name for k in keys):
            raise KeyFileError(f"{source} line {lineno}: key name {name!r} is used twice")
        keys.append(StoredKey(name, bytes.fromhex(m.group(1))))
    return keys


def read_key_file(path: Path) -> list[StoredKey]:
    return parse_key_file(_read_text(path), str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the API key file {path}: {e}") from None


class KeyFile:
    """The server's view of the key file: read at start (errors stop the server), re-read when it changes."""

    def __init__(self, path: Path | str, recheck_s: float = RECHECK_S) -> None:
        self.path, self.recheck_s = Path(path), recheck_s
        # Stat before reading, as keys() does: a change between the two is then seen at the next check. The other
        # way round, a file replaced in between would be stamped new but held old, and its change never seen.
        self._stamp = self._stat()
        self._keys = read_key_file(self.path)
        self._next_check = time.monotonic() + recheck_s
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int, int, int] | None:
        """What says the file changed. The ctime too: an in-place rewrite of the same size with the old mtime put
        back (touch -r, cp -p, rsync -t, an archive's fixed dates) keeps inode, size and mtime, and a revoked key
        would stay valid until a restart; no program can set the ctime, every write and chmod moves it."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def keys(self) -> list[StoredKey]:
        now = time.monotonic()
        if now >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._next_check = now + self.recheck_s
                stamp = self._stat()
                if stamp != self._stamp:
                    self._stamp = stamp
                    self._reload()
            finally:
                self._lock.release()
        return self._keys

    def _reload(self) -> None:
        try:
            self._keys = read_key_file(self.path)
        except KeyFileError as e:
            self._keys = []  # fail closed: a broken file must not leave a revoked key working
            log.error("API keys: %s; refusing every key until the file is fixed", e)
            return
        log.info("API keys: re-read %s: %d key(s): %s", self.path, len(self._keys),
                 ", ".join(k.name for k in self._keys) or "none")

    def verify(self, key: str) -> str | None:
        """The name of the stored key equal to `key`, or None. Every stored digest is compared, match or not."""
        presented = digest(key)
        match = None
        for stored in self.keys():
            if hmac.compare_digest(stored.digest, presented):
                match = stored.name
        return match


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of the `Authorization: Bearer <token>` header (scheme case-insensitive), or None. Several
    Authorization headers raise ClientError (400): which one counts is ambiguous (this took the first; a proxy or
    gateway in front may check the last, or add its own), so the request is refused rather than guessed at."""
    values = [value for name, value in headers if name.lower() == b"authorization"]
    if len(values) > 1:
        raise ClientError(f"the request has {len(values)} Authorization headers: send exactly one, "
                          "'Authorization: Bearer <key>'")
    if not values:
        return None
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@functools.cache
def _counters() -> tuple[Any, Any]:
    """Created on first use, inside a worker, after BentoML has set PROMETHEUS_MULTIPROC_DIR (as api.Metrics is)."""
    import prometheus_client as prom

    accepted = prom.Counter("convnet_api_key_requests", "Requests with a valid API key, by key name", ["key"])
    refused = prom.Counter("convnet_api_key_refusals", "Requests refused with 401, by reason (missing or invalid "
                           "key)", ["reason"])
    return accepted, refused


class RequireAPIKey:
    """ASGI middleware: 401 `{"error": "unauthorized", ...}` with `WWW-Authenticate: Bearer` for a protected path
    without a valid key (400 for several Authorization headers); otherwise passes the request on, with the key's
    name in `scope["state"]["api_key"]`."""

    def __init__(self, app: Any, key_file: KeyFile, metrics_open: bool = True) -> None:
        self.app, self.key_file = app, key_file
        self.open_paths = OPEN_PATHS | {METRICS_PATH} if metrics_open else OPEN_PATHS

    def is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(OPEN_PREFIXES)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # CORS preflights carry no credentials by design; the CORS middleware (when configured) answers them.
        if (scope["type"] not in ("http", "websocket") or self.is_open(scope["path"])
                or scope.get("method") == "OPTIONS"):
            await self.app(scope, receive, send)
            return
        accepted, refused = _counters()
        try:
            token = bearer_token(scope["headers"])
        except ClientError as exc:
            refused.labels("invalid").inc()
            # RFC 6750 3.1: a malformed request (a repeated credential) is a 400 with error="invalid_request".
            await self._refuse(scope, send, exc, 'Bearer realm="convnet-serving", error="invalid_request"')
            return
        name = None if token is None else self.key_file.verify(token)
        if name is None:
            refused.labels("missing" if token is None else "invalid").inc()
            if token is None:
                exc = Unauthorized("this endpoint needs an API key: send the header 'Authorization: Bearer <key>'")
                await self._refuse(scope, send, exc, 'Bearer realm="convnet-serving"')
            else:
                exc = Unauthorized("the API key is not valid (unknown or revoked)")
                await self._refuse(scope, send, exc, 'Bearer realm="convnet-serving", error="invalid_token"')
            return
        accepted.labels(name).inc()
        scope.setdefault("state", {})["api_key"] = name
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: dict, send: Any, exc: ClientError, challenge: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.responses import JSONResponse

        status, body = error_body(exc)
        await JSONResponse(body, status, headers={"WWW-Authenticate": challenge})(scope, None, send)


def install(service: Any, api_keys_file: str, metrics_auth: str = "open") -> Callable[[Any], Any]:
    """Protect a BentoML service when a key file is configured. The file is read here, at import, so a missing or
    malformed one stops the server before it serves anything unprotected. Returns the same protection (the same key
    file) for an app served outside the service's middleware stack: serving/service.py's front door."""
    if not api_keys_file:
        return lambda app: app
    key_file, metrics_open = KeyFile(api_keys_file), metrics_auth == "open"
    service.add_asgi_middleware(RequireAPIKey, key_file=key_file, metrics_open=metrics_open)
    return lambda app: RequireAPIKey(app, key_file, metrics_open)


def client_headers(key: str | None) -> dict[str, str]:
    """What a client adds to each request: the batch CLI, the load tests."""
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---------------------------------------------------------------------------------------------------------------
# python -m serving.keys new|revoke|list


def _write_atomically(path: Path, lines: list[str]) -> None:
    """Replace the file in one rename, so a server re-reading it never sees half a file. Mode 0600 for a new file,
    the old mode and owner otherwise."""
    old = path.stat() if path.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
        if old is not None:
            # The new file belongs to whoever runs the helper (root, say): a server running as the old owner could
            # no longer read it and would refuse every key. Refuse instead when the owner cannot be kept.
            try:
                os.chown(tmp, old.st_uid, old.st_gid)
            except PermissionError:
                raise KeyFileError(f"cannot keep {path}'s owner ({old.st_uid}:{old.st_gid}): run the helper as "
                                   "that user or as root") from None
        os.chmod(tmp, old.st_mode & 0o777 if old is not None else 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the key file's directory while reading and rewriting the file. Two helpers run at
    once (a `revoke` and a `new`, two `new`s) would otherwise each rewrite the file from what they read before the
    other's rename: a key printed as stored would be missing, or a revoked key written back. The lock is on the
    directory, not the file, because the file is replaced by a rename (a lock on the old inode guards nothing), and
    a directory lock leaves no lock file behind."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        yield
    finally:
        os.close(fd)


def _file_lines(path: Path) -> list[str]:
    if not path.exists():
        return ["# API keys for convnet-serving: sha256:<digest of the key> <name>. Made by python -m serving.keys."]
    lines = _read_text(path).splitlines()
    parse_key_file("\n".join(lines), str(path))  # refuse to edit a file the server would refuse
    return lines


def cmd_new(path: Path, name: str) -> int:
    if not NAME_RE.fullmatch(name):
        print(f"key name {name!r} must match {NAME_RE.pattern}", file=sys.stderr)
        return 2
    key = new_key()
    with _editing(path):
        lines = _file_lines(path)
        if any(k.name == name for k in parse_key_file("\n".join(lines))):
            print(f"{path} already has a key named {name!r}: revoke it first, or pick another name", file=sys.stderr)
            return 2
        _write_atomically(path, [*lines, key_line(name, key)])
    print(key)
    print(f"stored the hash of key {name!r} in {path}; the key itself is shown only this once", file=sys.stderr)
    return 0


def cmd_revoke(path: Path, name: str) -> int:
    with _editing(path):
        lines = _file_lines(path) if path.exists() else []
        kept = [line for line in lines if not ((m := LINE_RE.fullmatch(line.strip())) and
                                               (m.group(2) or m.group(1)[:12]) == name)]
        if len(kept) == len(lines):
            print(f"no key named {name!r} in {path}", file=sys.stderr)
            return 1
        _write_atomically(path, kept)
    print(f"revoked {name!r}: running servers stop accepting it within {RECHECK_S:.0f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.keys", description="Manage the service's API key file.")
    p.add_argument("--file", type=Path, default=os.environ.get(KEYS_FILE_ENV) or None,
                   help=f"the key file (default: ${KEYS_FILE_ENV})")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("new", help="make a key: print it once, store its hash").add_argument("name")
    sub.add_parser("revoke", help="delete a key by name").add_argument("name")
    sub.add_parser("list", help="the names of the stored keys")
    args = p.parse_args(argv)
    if args.file is None:
        p.error(f"name the key file with --file or {KEYS_FILE_ENV}")
    try:
        if args.command == "new":
            return cmd_new(args.file, args.name)
        if args.command == "revoke":
            return cmd_revoke(args.file, args.name)
        for stored in read_key_file(args.file):
            print(stored.name)
        return 0
    except KeyFileError as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:  # no such directory, not writable, ...: a message, not a traceback
        print(f"cannot edit the API key file {args.file}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
