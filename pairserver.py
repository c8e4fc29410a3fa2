"""pairserver: a live pair-programming server in one module.

Two or twenty people open the same room, type in the same file at the same
time and see each other's edits, cursors and runs. The server is the single
authority over each room's text: every update is rebased over the updates it
did not see, so no keystroke is lost and every screen ends with the same text.
Code runs in sandboxed, pre-started interpreters; autocomplete reads the code's
scopes with `ast`; rooms can be kept in SQLite or PostgreSQL. The contract it
serves (REST routes, WebSocket messages, offsets in UTF-16 code units, error
shapes) is docs/protocol.md; the demo page is static/index.html.

Run it::

    python pairserver.py --port 8765          # prints its URL and admin token
    python pairserver.py --host 0.0.0.0 --db rooms.db   # a class on the LAN, kept across restarts

Embed it::

    app = pairserver.create_app(max_clients=20)
    room = app[pairserver.ROOMS].create(code="print('hello')\\n")
    web.run_app(app)                          # or parent.add_subapp("/pair", app)
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import builtins
import codecs
import collections
import contextlib
import errno
import hmac
import ipaddress
import io
import itertools
import json
import keyword
import logging
import math
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import struct
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp_cors
from aiohttp import WSCloseCode, WSMsgType, web

log = logging.getLogger("pairserver")


# ---------------------------------------------------------------------------
# Configuration: every limit is a create_app() option and a command-line flag
# ---------------------------------------------------------------------------

def _option(default: Any, help: str) -> Any:
    """A Config field whose help text is also its --flag's help."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Everything create_app() accepts; main() turns each field into a flag."""

    admin_token: str = _option("", "bearer token for /admin (default: $PAIRSERVER_ADMIN_TOKEN, "
                                   "else one made up and printed at start)")
    host: str = _option("127.0.0.1", "address to listen on; 0.0.0.0 for every network")
    cors_origin: tuple[str, ...] = _option((), "another origin whose pages may call the API "
                                               "(*: any); repeat for several (default: none)")
    allow_host: tuple[str, ...] = _option((), "a Host name to answer on loopback besides localhost "
                                              "(a proxy's); repeat for several")
    max_connections_per_address: int = _option(500, "open connections one client address may have")
    header_timeout: float = _option(10.0, "seconds to send a request's headers, or to idle between")
    max_code: int = _option(1_000_000, "largest room text, in UTF-16 code units")
    max_message: int = _option(4 << 20, "largest WebSocket message or request body, in bytes")
    max_rooms: int = _option(1000, "most rooms at once")
    max_clients: int = _option(50, "most connected clients in one room")
    history: int = _option(500, "updates kept per room for rebasing stale updates")
    send_queue: int = _option(4 << 20, "bytes queued for one slow socket before it is dropped")
    heartbeat: float = _option(30.0, "seconds between pings that find dead peers")
    db: str = _option("", "SQLite file or postgresql:// URL to keep rooms in across restarts "
                          "(default: $PAIRSERVER_DB, else memory only)")
    room_ttl: float = _option(7 * 86400.0, "seconds before a room nobody is in or changes goes")
    unused_room_ttl: float = _option(3600.0, "seconds before a room made by POST /rooms and never "
                                             "joined goes; 0: never")
    rooms_per_minute: float = _option(30.0, "rooms an address may make a minute (bursts of 10)")
    sandbox: str = _option("auto", "isolate runs with bwrap: auto (if it works), bwrap, none")
    python: str = _option("", "Python interpreter for runs (default: the one running the server)")
    max_runs: int = _option(os.cpu_count() or 2, "runs at once; more wait in a short queue")
    max_queue: int = _option(64, "runs waiting, in all, before 429 Too Many Requests")
    max_queue_per_source: int = _option(2, "runs a room or a client address may have waiting")
    pool: int = _option(2, "interpreters per language started ahead, waiting for code")
    timeout: float = _option(5.0, "seconds a run may take when it asks for no timeout")
    max_timeout: float = _option(30.0, "largest timeout a run may ask for, in seconds")
    max_output: int = _option(64 << 10, "bytes of stdout and stderr together, then a run stops")
    max_memory: int = _option(256 << 20, "bytes of memory a run may use")
    max_procs: int = _option(64, "processes a run may have at once (where a cgroup is writable)")
    max_file: int = _option(16 << 20, "bytes a run may write to one file, and to its folder")
    max_source: int = _option(1 << 20, "bytes of code or stdin POST /execute accepts")
    static_dir: str = _option(str(Path(__file__).with_name("static")),
                              "folder of the demo page, index.html (default: static/ here)")


#: Most changes in one update.
MAX_CHANGES = 10_000
#: Past these, a stale update gets resync rather than stalling its room: units
#: of text times updates missed, to rebuild an old text for a whole-text
#: update; components of the history and the update times updates missed, to rebase.
REBUILD_COST, REBASE_COST = 50_000_000, 200_000
#: A room's history holds at most this many texts' worth of units: huge pastes cannot pile up.
HISTORY_TEXTS = 4

#: The SPEC's close codes.
CLOSE_REPLACED, CLOSE_BAD_CLIENT, CLOSE_FORBIDDEN, CLOSE_NO_ROOM, CLOSE_FULL = \
    4000, 4400, 4403, 4404, 4429

#: Where an app keeps its state, so that two apps in one process share nothing.
CONFIG, STARTED = web.AppKey("config", Config), web.AppKey("started", float)
ROOMS: web.AppKey[Rooms] = web.AppKey("rooms")  # the classes are defined below
RUNNER: web.AppKey[Runner] = web.AppKey("runner")
MODULES: web.AppKey[ModuleNames] = web.AppKey("modules")
ROOM_LIMIT: web.AppKey[RateLimit] = web.AppKey("room_limit")

_CLIENT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_LANGUAGE = re.compile(r"[a-z0-9+#_-]{1,32}\Z")
_REQUIRED = object()  #: _field()'s default: no default


def _now() -> str:
    """The current time as an ISO 8601 UTC string."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(obj: Any) -> str:
    """Compact JSON; ensure_ascii writes our surrogate pairs as JSON's \\ud83d\\ude00 escapes."""
    return json.dumps(obj, separators=(",", ":"))


class PairError(Exception):
    """A refusal with a machine-readable code: HTTP answers `status`, a socket an `error`."""

    def __init__(self, code: str, message: str, status: int = 400, retry_after: int = 60) -> None:
        super().__init__(message)
        self.code, self.message, self.status, self.retry_after = code, message, status, retry_after


def _field(obj: dict, key: str, kind: type | tuple, default: Any = _REQUIRED,
         code: str = "bad_request") -> Any:
    """obj[key], checked to be a `kind` (bool is not an int here)."""
    value, kinds = obj.get(key, default), kind if isinstance(kind, tuple) else (kind,)
    if value is _REQUIRED:
        raise PairError(code, f"'{key}' is required")
    wrong = not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds
    if value is not default and wrong:
        raise PairError(code, f"'{key}' must be of type {'/'.join(k.__name__ for k in kinds)}")
    return value


async def _json_body(request: web.Request, optional: bool = False) -> dict:
    """The request's JSON object body; {} for an absent optional one."""
    raw = await request.read()  # over client_max_size: 413 through the middleware
    if optional and not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise PairError("bad_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise PairError("bad_json", "the body must be a JSON object")
    return body


# ---------------------------------------------------------------------------
# Text and operations: UTF-16 units; compose, transform, apply, invert; change lists
# ---------------------------------------------------------------------------
# Clients count offsets in UTF-16 code units. Rather than convert every offset,
# a room keeps its text *as* UTF-16 code units: a Python str in which each
# character above U+FFFF is stored as its two surrogates. Then every index,
# slice and len() is already in the clients' units.

_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_UNFIT = re.compile("\0|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")


def _surrogates(match: re.Match) -> str:
    c = ord(match.group()) - 0x10000
    return chr(0xD800 + (c >> 10)) + chr(0xDC00 + (c & 0x3FF))


def to_units(s: str) -> str:
    """Write s with surrogate pairs for astral characters, so len() counts UTF-16 units."""
    return s if s.isascii() else _ASTRAL.sub(_surrogates, s)


def from_units(s: str) -> str:
    """The ordinary str for text held in UTF-16 units."""
    return s if s.isascii() else s.encode("utf-16-le", "surrogatepass").decode("utf-16-le")


def checked_units(code: str, max_code: int) -> str:
    """code in UTF-16 units; PairError if longer than max_code or holding NUL or half a pair."""
    units = to_units(code)
    if len(units) > max_code:
        raise PairError("too_large", f"code exceeds {max_code} UTF-16 code units", 413)
    if _UNFIT.search(units):  # PostgreSQL keeps no NUL: one would stop every room's writes
        raise PairError("bad_request", "code holds a NUL or half of a surrogate pair")
    return units


def splits_pair(text: str, i: int) -> bool:
    """True if position i falls between the two halves of a surrogate pair."""
    return 0 < i < len(text) and _PAIR.fullmatch(text, i - 1, i + 1) is not None


# An operation walks a whole text from start to end, as in ot.js: an int n > 0
# keeps n units, an int n < 0 deletes -n units, a str inserts itself.
# Transforming one operation over another keeps every insert of both: a delete
# consumes only characters of the text both were based on, so text inserted
# concurrently inside a deleted range survives. Of two inserts at one place,
# the one applied first stays first.

Op = list  # of int | str components, as above


def _push(op: Op, c: int | str) -> None:
    """Append c, merged with a last component of its kind; an insert goes before a delete."""
    if not c:
        return
    last = op[-1] if op else None
    after_delete = isinstance(last, int) and last < 0
    same_kind = type(last) is type(c) and (isinstance(c, str) or (last > 0) == (c > 0))
    if isinstance(c, str) and after_delete:
        op.pop()
        _push(op, c)
        op.append(last)
    elif same_kind:
        op[-1] += c  # two inserts, two keeps or two deletes
    else:
        op.append(c)


def _shrink(c: int | str, n: int) -> int | str:
    """What is left of component c after its first n units."""
    return c[n:] if isinstance(c, str) else (c - n if c > 0 else c + n)


def compose(a: Op, b: Op) -> Op:
    """One operation doing a, then b (b is based on a's result)."""
    out: Op = []
    ia, ib = iter(a), iter(b)
    x, y = next(ia, None), next(ib, None)
    while x is not None or y is not None:
        if isinstance(x, int) and x < 0:           # a's deletes stay
            _push(out, x)
            x = next(ia, None)
        elif isinstance(y, str):                    # b's inserts stay
            _push(out, y)
            y = next(ib, None)
        else:
            assert x is not None and y is not None, "operation lengths differ"
            n = min(len(x) if isinstance(x, str) else x, abs(y))  # a keeps or inserts here
            if y > 0:                               # b keeps what a kept or inserted
                _push(out, x[:n] if isinstance(x, str) else n)
            elif isinstance(x, int):                # b deletes what a kept
                _push(out, -n)
            x, y = _shrink(x, n) or next(ia, None), _shrink(y, n) or next(ib, None)
    return out


def transform(a: Op, b: Op) -> Op:
    """Rebase a over b, both based on the same text: the a' to apply after b."""
    out: Op = []
    ia, ib = iter(a), iter(b)
    x, y = next(ia, None), next(ib, None)
    while x is not None or y is not None:
        if isinstance(y, str):                      # b's insert goes first, a keeps it
            _push(out, len(y))
            y = next(ib, None)
        elif isinstance(x, str):
            _push(out, x)
            x = next(ia, None)
        else:
            assert x is not None and y is not None, "operation lengths differ"
            n = min(abs(x), abs(y))
            if y > 0:                               # a's keep or delete of text b kept
                _push(out, n if x > 0 else -n)
            x, y = _shrink(x, n) or next(ia, None), _shrink(y, n) or next(ib, None)
    return out


def apply(text: str, op: Op) -> tuple[str, list[str]]:
    """The text after op, and the pieces op deleted (to invert it later)."""
    parts, deleted, i = [], [], 0
    for c in op:
        if isinstance(c, str):
            parts.append(c)
        elif c > 0:
            parts.append(text[i:i + c])
            i += c
        else:
            deleted.append(text[i:i - c])
            i -= c
    parts.append(text[i:])
    return "".join(parts), deleted


def invert(op: Op, deleted: list[str]) -> Op:
    """The operation that undoes op, given the pieces op deleted."""
    out: Op = []
    pieces = iter(deleted)
    for c in op:
        _push(out, -len(c) if isinstance(c, str) else c if c > 0 else next(pieces))
    return out


def changes_to_op(changes: list, length: int) -> Op:
    """One operation for a SPEC change list (each on the text the last left); PairError if bad."""
    steps: list[Op] = [[length] if length else []]
    for change in changes:
        if not isinstance(change, dict):
            raise PairError("bad_change", "each change must be an object")
        start, end = (_field(change, key, int, code="bad_change") for key in ("from", "to"))
        insert = to_units(_field(change, "insert", str, "", code="bad_change"))
        if not 0 <= start <= end <= length:
            raise PairError("bad_change", f"change {start}..{end} is outside the text ({length})")
        steps.append([])
        for c in (start, insert, start - end, length - end):
            _push(steps[-1], c)
        length += len(insert) - (end - start)
    while len(steps) > 1:  # pairwise, so that a thousand changes cost k log k, not k squared
        steps = [compose(*steps[i:i + 2]) if i + 1 < len(steps) else steps[i]
                 for i in range(0, len(steps), 2)]
    return steps[0]


def diff_to_op(old: str, new: str) -> Op:
    """The one change from old to new: keep the common prefix and suffix, replace the middle
    (a finer diff could match unrelated text, then duplicate or drop concurrent edits)."""
    prefix = _common_prefix(old, new)
    prefix -= splits_pair(old, prefix)              # never cut a surrogate pair
    suffix = _common_prefix(old[prefix:][::-1], new[prefix:][::-1])
    suffix -= splits_pair(old, len(old) - suffix)
    op: Op = []
    for c in (prefix, new[prefix:len(new) - suffix], prefix + suffix - len(old), suffix):
        _push(op, c)
    return op


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix, by bisection so the comparing runs in C."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def op_to_changes(op: Op) -> list[dict]:
    """The SPEC change list for op: each change against the text the previous left."""
    changes: list[dict] = []
    pos = 0  # where the next component applies, in the text changed so far
    for c in op:
        if isinstance(c, str):
            changes.append({"from": pos, "to": pos, "insert": c})
            pos += len(c)
        elif c > 0:
            pos += c
        elif changes and (last := changes[-1])["from"] == last["to"] == pos - len(last["insert"]):
            last["to"] -= c  # a delete right after an insert: one change
        else:
            changes.append({"from": pos, "to": pos - c, "insert": ""})
    return changes


def map_position(op: Op, pos: int) -> int:
    """Where position pos of the old text ends up after op."""
    old = new = 0
    for c in op:
        if isinstance(c, str):
            new += len(c)
        elif old + abs(c) > pos:
            return new + (pos - old if c > 0 else 0)
        else:
            old, new = old + abs(c), new + max(c, 0)
    return new + pos - old


def _check_boundaries(text: str, op: Op) -> None:
    """Refuse an op that would cut a surrogate pair or insert half of one, or a NUL."""
    i = 0
    for c in op:
        if isinstance(c, str):
            if _UNFIT.search(c):
                raise PairError("bad_change", "inserted text holds a NUL or half a surrogate pair")
        else:
            i += abs(c)
        if splits_pair(text, i):
            raise PairError("bad_change", f"position {i} is inside a surrogate pair")


# ---------------------------------------------------------------------------
# Rooms: Room holds one text and its history, Rooms is the registry
# ---------------------------------------------------------------------------

class Stale(Exception):
    """An update based on a version older than the history kept."""


@dataclass
class Client:
    """One connected socket of a room.

    Messages go straight into the connection's transport as ready-made WebSocket
    frames: one bytes object per broadcast serves every socket, with no task or
    queue per socket. The transport's buffer is the bounded outgoing queue: a
    socket too far behind is dropped (it may reconnect) so that it stalls nobody.
    aiohttp's own frames (pings, pongs, the close) are whole, unmasked and
    uncompressed like ours, and written from the same thread: never interleaved."""

    id: str
    name: str
    ws: web.WebSocketResponse | None = None
    transport: asyncio.Transport | None = None
    wants_code: bool = False           #: wants the whole text in every code_update
    send_queue: int = 4 << 20
    color: int = 0                     #: the smallest not taken in the room when it joined
    cursor: dict | None = None

    def send(self, frame: bytes) -> None:
        """Queue one frame made by _frame()."""
        if self.ws.closed or self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() > self.send_queue:
            log.warning("client %s reads too slowly; dropping it", self.id)
            self.transport.abort()  # a close frame would wait behind the backlog
            return
        self.transport.write(frame)

    def describe(self) -> dict:
        return {"clientId": self.id, "name": self.name, "color": self.color}


def _frame(text: str) -> bytes:
    """A server's text frame (RFC 6455 5.2: final, unmasked, uncompressed), one for all sockets."""
    n = len(data := text.encode())
    head = bytes([0x81, n]) if n < 126 else struct.pack("!BBH", 0x81, 126, n) if n < 65536 \
        else struct.pack("!BBQ", 0x81, 127, n)
    return head + data


def _message(type: str, **fields: Any) -> bytes:
    return _frame(_dumps({"type": type, **fields}))


def _broadcast(room: Room, frame: bytes, skip: Client | None = None) -> None:
    """Send one frame to the room's sockets: encoded once, not per socket."""
    for client in list(room.clients.values()):
        if client is not skip:
            client.send(frame)


def _growth(op: Op) -> int:
    """How many units op adds to a text's length (negative if it shrinks it)."""
    return sum(len(c) if isinstance(c, str) else min(c, 0) for c in op)


def _weight(op: Op, deleted: list[str]) -> int:
    return sum(len(c) for c in op if isinstance(c, str)) + sum(map(len, deleted))


@dataclass(eq=False)
class Room:
    """One shared text, its version, recent history, and who is connected.

    Pure state: apply_update() and friends do no I/O, so they are tested
    directly; the WebSocket layer sends what they return."""

    id: str
    language: str = "python"
    text: str = ""                     #: in UTF-16 code units, see to_units()
    version: int = 0
    max_code: int = 1_000_000
    history_size: int = 500
    #: (op, deleted pieces) of the last updates, version - len(history) + 1 .. version
    history: collections.deque = field(default_factory=collections.deque)
    history_units: int = 0
    clients: dict[str, Client] = field(default_factory=dict)
    seqs: Any = field(default_factory=lambda: _Memo(64 << 10))  #: each client's last applied seq
    execution: dict = field(default_factory=lambda: {"running": False, "clientId": None})
    cancel: asyncio.Event | None = None  #: set to stop the room's run
    unused: bool = False               #: made by POST /rooms and never joined yet
    changed: bool = True               #: since a store last wrote it (see _flush)
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)

    @property
    def code(self) -> str:
        """The text as an ordinary Python str."""
        return from_units(self.text)

    def __repr__(self) -> str:
        return f"<Room {self.id} {self.language} v{self.version} clients={len(self.clients)}>"

    def _since(self, version: int) -> list[tuple[Op, list[str]]]:
        """The history entries of the updates after version; Stale if older than the history."""
        behind = self.version - version
        if behind > len(self.history):
            raise Stale(version)
        return list(self.history)[len(self.history) - behind:]

    def text_at(self, version: int) -> str:
        """The text as it was at a version still in the history."""
        text = self.text
        for op, deleted in reversed(self._since(version)):
            text = apply(text, invert(op, deleted))[0]
        return text

    def apply_update(self, version: int | None, changes: list | None = None,
                     code: str | None = None) -> list[dict]:
        """Apply a change list or a whole text based on `version` (None: the current one); the
        changes as applied. PairError for a malformed update, Stale for one too old to rebase."""
        version = self.version if version is None else version
        if not 0 <= version <= self.version:
            raise PairError("bad_version", f"version {version} is not one of this room's "
                            f"(now {self.version})")
        missed = [op for op, _ in self._since(version)]
        op = self._rebase(self._operation(version, missed, changes, code), missed)
        self._apply(op)
        return op_to_changes(op)

    def _operation(self, version: int, missed: list[Op], changes: list | None,
                   code: str | None) -> Op:
        """The update as one operation on the text at `version`, which `missed` changed
        since: its change list, or its whole text's diff (Stale if rebuilding costs too much)."""
        if code is None:
            if len(changes) > MAX_CHANGES:
                raise PairError("too_large", f"an update may hold at most {MAX_CHANGES} changes")
            return changes_to_op(changes, len(self.text) - sum(map(_growth, missed)))
        if missed and len(self.text) * len(missed) > REBUILD_COST:
            raise Stale(version)
        return diff_to_op(self.text_at(version), to_units(code))

    @staticmethod
    def _rebase(op: Op, missed: list[Op]) -> Op:
        """op transformed over the operations it missed; Stale if that costs too much."""
        if missed and sum(map(len, missed)) + len(op) * len(missed) > REBASE_COST:
            raise Stale()
        for past in missed:
            op = transform(op, past)
        return op

    def _apply(self, op: Op) -> None:
        """Apply a rebased op (pairs whole, within max_code), keep it in history, move cursors."""
        _check_boundaries(self.text, op)
        if len(self.text) + _growth(op) > self.max_code:
            raise PairError("too_large", f"the text would exceed {self.max_code} UTF-16 code units")
        self.text, deleted = apply(self.text, op)
        self.version, self.updated_at, self.changed = self.version + 1, _now(), True
        self.history.append((op, deleted))
        self.history_units += _weight(op, deleted)
        while len(self.history) > (1 if self.history_units > HISTORY_TEXTS * self.max_code
                                   else self.history_size):  # too heavy: down to the last
            self.history_units -= _weight(*self.history.popleft())
        for client in self.clients.values():
            if client.cursor:
                client.cursor = {k: map_position(op, v) if isinstance(v, int) else v
                                 for k, v in client.cursor.items()}

    def set_language(self, language: str) -> None:
        """Set the room's language, a short lowercase name such as 'python'."""
        if not _LANGUAGE.match(language):
            raise PairError("bad_request", "'language' must be a short lowercase name, as 'python'")
        self.language, self.changed = language, True

    def set_cursor(self, client: Client, position: int, selection_end: int | None) -> dict:
        """Store a client's cursor, clamped into the text."""
        clamp = lambda p: min(max(p, 0), len(self.text))  # noqa: E731
        client.cursor = {"position": clamp(position),
                         "selectionEnd": None if selection_end is None else clamp(selection_end)}
        return client.cursor

    def as_stored(self) -> tuple:
        """The room as a store keeps it."""
        return self.id, self.language, self.code, self.version, self.created_at, self.updated_at

    def describe(self) -> dict:
        """The room as GET /rooms/{roomId} shows it."""
        return {"roomId": self.id, "language": self.language, "code": self.text,
                "version": self.version, "clients": [c.describe() for c in self.clients.values()],
                "createdAt": self.created_at, "updatedAt": self.updated_at,
                "execution": dict(self.execution)}


class Rooms:
    """The registry of rooms: a dict by id, plus the limits every room gets.

    Also the Python API for scripts that embed the server: ``rooms.create(code=...)``,
    ``rooms.get(id)``, ``list(rooms)``, ``await rooms.delete(id)``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._rooms: dict[str, Room] = {}
        self._tasks: set[asyncio.Task] = set()  # held here so that they are not collected
        #: ids of rooms removed since the store last wrote; None: no store to tell
        self.gone: set[str] | None = set() if config.db else None

    def __repr__(self) -> str:
        return f"<Rooms {len(self._rooms)} rooms, {self.connections} connections>"

    def __iter__(self):
        return iter(list(self._rooms.values()))

    def __len__(self) -> int:
        return len(self._rooms)

    @property
    def connections(self) -> int:
        return sum(len(room.clients) for room in self._rooms.values())

    def spawn(self, coro) -> None:
        """Run coro in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def create(self, language: str = "python", code: str = "") -> Room:
        """Make a room with an unguessable id (128 random bits)."""
        if len(self._rooms) >= self.config.max_rooms:
            raise PairError("too_many_rooms", f"at most {self.config.max_rooms} rooms here", 429)
        text = checked_units(code, self.config.max_code)
        room = Room(secrets.token_urlsafe(16), text=text, max_code=self.config.max_code,
                    history_size=self.config.history)
        room.set_language(language)
        self._rooms[room.id] = room
        log.info("room %s created (%s, %d units)", room.id, language, len(text))
        return room

    def restore(self, rows: list[tuple]) -> None:
        """Take back the rooms a store kept: their text, language and version."""
        for room_id, language, code, version, created_at, updated_at in rows:
            self._rooms[room_id] = Room(room_id, language, to_units(code), version,
                                        self.config.max_code, self.config.history,
                                        created_at=created_at, updated_at=updated_at, changed=False)
        log.info("%d rooms restored", len(rows))

    def forget(self, room_id: str) -> Room | None:
        """Remove a room from memory, and from the store at its next write."""
        if self.gone is not None:
            self.gone.add(room_id)
        return self._rooms.pop(room_id, None)

    def get(self, room_id: str) -> Room | None:
        """The room with this id, or None."""
        return self._rooms.get(room_id)

    async def delete(self, room_id: str) -> bool:
        """Remove a room and close its sockets with 4404; False if unknown."""
        room = self.forget(room_id)
        if room is None:
            return False
        await asyncio.gather(*(c.ws.close(code=CLOSE_NO_ROOM, message=b"room deleted")
                               for c in list(room.clients.values())))
        log.info("room %s deleted", room_id)
        return True


# ---------------------------------------------------------------------------
# How long rooms live: let go when idle; kept across restarts in SQLite or PostgreSQL
# ---------------------------------------------------------------------------
# The registry stays the source of truth. Each second one task lets go of idle
# rooms and writes those changed, many changes in one write; everything is
# written at shutdown. A store that fails while running costs nothing but the
# write: it is retried each second, and the rooms go on in memory meanwhile.

def expire(rooms: Rooms, ttl: float, unused_ttl: float) -> None:
    """Let go of rooms empty and unchanged for ttl s, unjoined ones after unused_ttl (0: never)."""
    now = datetime.now(timezone.utc)
    for room in rooms:
        idle = (now - datetime.fromisoformat(room.updated_at)).total_seconds()
        too_long = 0 < ttl < idle or room.unused and 0 < unused_ttl < idle
        if too_long and not room.clients:
            rooms.forget(room.id)
            log.info("room %s expired", room.id)


_SCHEMA = """CREATE TABLE IF NOT EXISTS pairserver_rooms (id TEXT PRIMARY KEY,
    language TEXT NOT NULL, code TEXT NOT NULL, version BIGINT NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL)"""
_SAVE = """INSERT INTO pairserver_rooms VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET
    language = excluded.language, code = excluded.code, version = excluded.version,
    updated_at = excluded.updated_at"""
_LOAD = "SELECT id, language, code, version, created_at, updated_at FROM pairserver_rooms"
_DROP = "DELETE FROM pairserver_rooms WHERE id = ?"


class Store:
    """Rooms in an SQLite file (WAL mode, written from a thread so that the event loop never
    waits on the disk) or PostgreSQL (asyncpg, imported only for this): `where`, path or URL."""

    def __init__(self, where: str) -> None:
        self.where, self.db = where, None  #: an sqlite3 connection, or an asyncpg pool
        self.postgres = where.startswith(("postgres://", "postgresql://"))
        self.shown = re.sub(r"://[^@/]*@", "://...@", where)  #: where, without a password

    async def load(self) -> list[tuple]:
        """Open the store, make its table if need be, and read every room."""
        if not self.postgres:
            return await asyncio.to_thread(self._load_sqlite)
        import asyncpg
        try:
            self.db = await asyncpg.create_pool(self.where, min_size=1, max_size=2, timeout=10)
            async with self.db.acquire() as db:
                await db.execute(_SCHEMA)
                return [tuple(row) for row in await db.fetch(_LOAD)]
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, ValueError) as e:
            raise RuntimeError(f"--db {self.shown}: {e}") from None

    def _load_sqlite(self) -> list[tuple]:
        try:
            self.db = sqlite3.connect(self.where, timeout=0.5, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses nothing written
            with self.db:
                self.db.execute(_SCHEMA)
            return self.db.execute(_LOAD).fetchall()
        except sqlite3.Error as e:
            raise RuntimeError(f"--db {self.shown}: {e}") from None

    async def save(self, rows: list[tuple], gone: list[str]) -> None:
        """Write the changed rooms and drop the removed ones, in one transaction."""
        gone_rows = [(room_id,) for room_id in gone]
        if not self.postgres:
            return await asyncio.to_thread(self._save_sqlite, rows, gone_rows)
        async with self.db.acquire(timeout=5) as db, db.transaction():
            await db.executemany(_numbered(_SAVE), rows)
            await db.executemany(_numbered(_DROP), gone_rows)

    def _save_sqlite(self, rows: list[tuple], gone_rows: list[tuple]) -> None:
        with self.db:
            self.db.executemany(_SAVE, rows)
            self.db.executemany(_DROP, gone_rows)

    async def close(self) -> None:
        if self.db:
            await (self.db.close() if self.postgres else asyncio.to_thread(self.db.close))


def _numbered(query: str) -> str:
    """SQLite's ? placeholders as PostgreSQL's $1, $2, ..."""
    return re.sub(r"\?", lambda _, numbers=itertools.count(1): f"${next(numbers)}", query)


async def _keep(rooms: Rooms, store: Store | None, stop: asyncio.Event, config: Config) -> None:
    """Each second until stop is set, let go of idle rooms and write those changed (stopped
    between writes, never cancelled inside one, whose thread would go on)."""
    failing = False
    while not stop.is_set():
        expire(rooms, config.room_ttl, config.unused_room_ttl)
        failing = bool(store) and await _flush(rooms, store, failing)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1)


async def _flush(rooms: Rooms, store: Store, failing: bool = False) -> bool:
    """Write what changed; on failure keep it for next time, say so once an episode, return True."""
    changed, gone, rooms.gone = [room for room in rooms if room.changed], rooms.gone, set()
    if not changed and not gone:
        return failing
    for room in changed:  # a change made while writing marks it again
        room.changed = False
    rows = [room.as_stored() for room in changed]
    try:
        await store.save(rows, list(gone))
    except Exception as e:  # noqa: BLE001 - any store error: the rooms carry on in memory
        for room in changed:
            room.changed = True
        rooms.gone |= gone
        if not failing:
            log.error("cannot write rooms to %s (%s); serving from memory, retrying each second",
                      store.shown, e)
        return True
    if failing:
        log.warning("%s works again: %d changed rooms written", store.shown, len(rows))
    return False


async def _keeping_lifetime(app: web.Application):
    """Load the kept rooms, keep them (above) while the app runs, write everything at the end."""
    config, rooms = app[CONFIG], app[ROOMS]
    store = Store(config.db) if config.db else None
    if store:  # rooms an embedding script made stay changed: written
        rooms.restore(await store.load())
    stop = asyncio.Event()
    keeper = asyncio.get_running_loop().create_task(_keep(rooms, store, stop, config))
    yield
    stop.set()
    await keeper
    if not store:
        return
    for _ in range(3):  # the sockets are closed by now: this is the last word
        if not await _flush(rooms, store):
            break
        await asyncio.sleep(1)
    else:
        log.error("could not write the rooms to %s at shutdown: the last changes are lost",
                  store.shown)
    await store.close()


# ---------------------------------------------------------------------------
# Autocomplete: suggest, ranking, and what follows a dot
# ---------------------------------------------------------------------------
# While someone types, the text rarely parses. suggest() parses it one
# top-level block at a time (cached: between keystrokes only one changes),
# mending a line that breaks a block; in the cursor's block, the cursor's line
# is cut there and its brackets closed, so that the word being typed is a name
# in the innermost scope. It walks the tree down to that name collecting each
# scope's names, and ranks them: how they match the typed prefix, then how near
# the cursor they are used, then how near their scope is. The text's words
# follow, for whatever a mended line defined.

#: Autocomplete reads at most these characters and lines before and after the
#: cursor, so that a request costs a bounded time however long the text.
SUGGEST_BEFORE, SUGGEST_AFTER = (64_000, 2_000), (16_000, 500)
#: CPU seconds it may spend parsing for one request, the cursor's block first;
#: blocks not reached are parsed by later requests, into the cache.
SUGGEST_PARSE_SECONDS = 0.025
#: Memory for parsed blocks and for learned modules' names, in bytes. A parsed
#: block is weighed at AST_BYTES_PER_CHAR of its text: what `x\n` * n takes.
PARSE_CACHE_BYTES, MODULE_CACHE_BYTES, AST_BYTES_PER_CHAR = 48 << 20, 16 << 20, 400
#: Seconds the sandbox may take to import a module and list its names.
LEARN_TIMEOUT = 5.0

Suggestion = tuple  # (label, kind, detail, scope): scope 0 is the innermost
#: Comments and strings: a triple-quoted one whole, others within their line, `\'` in them.
_NOT_CODE = r"#.*|'''[\s\S]*?'''|" r'"""[\s\S]*?"""|' r"'[^'\\\n]*(?:\\.[^'\\\n]*)*'|" \
    r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"'
_CODE_WORD = re.compile(r"(?:%s)|(\.?)([A-Za-z_]\w*)" % _NOT_CODE)  #: words: (".", w) or ("", w)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
           ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_PAIRS = {"(": ")", "[": "]", "{": "}"}
_CURSOR = "__cursor__"  #: the name put at the cursor, to find where it is in the tree
_DEFINES = re.compile(r"(async\s+)?(def|class)\s+\w+\s*[(:\[]|@")  #: not prose: `class will`
_DEFINITION = re.compile(r"^[ \t]*(?:%s)" % _DEFINES.pattern, re.MULTILINE)
_TOP_DEFINITION = re.compile(r"^(?:%s)" % _DEFINES.pattern, re.MULTILINE)  #: at a line's start
#: Builtins common enough to rank with a program's own names, the commonest first.
_COMMON = {b: 6 + i / 20 for i, b in enumerate("""None str False True isinstance len int list dict
bool ValueError property range super tuple type set TypeError getattr hasattr float bytes
classmethod object print NotImplementedError Exception enumerate max staticmethod KeyError zip abs
min sorted AttributeError any all map next OSError id repr sum iter RuntimeError open dir setattr
IndexError vars callable reversed filter format StopIteration round""".split())}
_BUILTINS = [b for b in dir(builtins) if b[0] != "_"]
_DUNDERS = ("__name__", "__file__", "__doc__", "__all__")  #: a module's globals
#: What an object of unknown type most likely has: what the commonest types have.
_TYPE_METHODS = sorted({n for t in (str, bytes, list, dict, set, re.Match, re.Pattern,
                                    io.TextIOWrapper, Path) for n in dir(t) if n[0] != "_"})


@dataclass
class _Parse:
    """The text parsed around the cursor: the cursor's block, its row and col there, bindings."""

    tree: ast.Module
    row: int
    col: int
    known: dict  #: _bindings() by id(scope); the tree's, of every block's top level

    def path(self) -> list[ast.AST]:
        """The nodes that hold the cursor, outermost first, from the module; looked into, not kept:
        those with no place (a withitem) and keywords. Siblings that claim it kept (3.11's f"")."""
        chain, todo, at = [self.tree], [self.tree], (self.row, self.col)
        for node in todo:
            placed = hasattr(node, "lineno")
            if not placed or (node.lineno - 1, node.col_offset) <= at \
                    <= (node.end_lineno - 1, node.end_col_offset):
                todo += ast.iter_child_nodes(node)
                chain += [node] * (placed and type(node) is not ast.keyword)
        return chain

    def scopes(self) -> list[ast.AST]:
        """The scopes that hold the cursor, outermost first, the module included."""
        return [n for n in self.path() if n is self.tree or isinstance(n, _SCOPES)]

    def bound(self, scope: ast.AST) -> dict[str, tuple[str, str | None, list]]:
        """_bindings(scope), once a request; the top level's from the blocks' cache."""
        if id(scope) not in self.known:
            self.known[id(scope)] = _bindings(scope)
        return self.known[id(scope)]


def suggest(code: str, cursor: int, language: str = "python",
            modules: Callable[[str], dict] = lambda name: {}) -> dict:
    """The SPEC's autocomplete answer at a cursor (str indexes), reading only the lines within
    SUGGEST_BEFORE and SUGGEST_AFTER of it; `modules(name)` gives a module's names (ModuleNames)."""
    lo = max(0, cursor - SUGGEST_BEFORE[0])
    lo = cursor - len("\n".join(code[lo:cursor].split("\n")[-SUGGEST_BEFORE[1]:]))
    top = lo and _TOP_DEFINITION.search(code, lo, cursor)  # not in a string or a class's middle
    lo = top.start() if top else (code.find("\n", lo, cursor) + 1 or lo) if lo else 0
    after = code[cursor:cursor + SUGGEST_AFTER[0]].split("\n")[:SUGGEST_AFTER[1]]
    hi = cursor + len("\n".join(after))  # if the text goes on: before its last definition read
    ends = [m.start() for m in _DEFINITION.finditer(code, cursor, hi)] if hi < len(code) else [hi]
    hi = max((ends or [code.rfind("\n", 0, hi)])[-1], cursor)  # (not mid-statement), or a line end
    answer = _suggest(code[lo:hi], cursor - lo, language, modules, code.count("\n", 0, lo))
    return {"suggestions": answer[0], "from": answer[1] + lo, "to": cursor}


def _suggest(code: str, cursor: int, language: str, modules: Callable[[str], dict],
             line0: int) -> tuple[list[dict], int]:
    """suggest() within its window, whose first line is line `line0` of the text."""
    start = cursor - len(re.search(r"\w*\Z", code[max(0, cursor - 100):cursor]).group())
    prefix, line_start = code[start:cursor], code.rfind("\n", 0, start) + 1
    before = code[max(line_start, start - 300):start]
    whole = line_start >= start - 300  # `before` holds the line's start, so ^ means it
    parse = _parse_near(code, start, line0) if language == "python" else None
    *_, statement, name = [None, *parse.path()] if parse else [None, None]
    inside = isinstance(name, ast.Name) and not isinstance(statement, ast.Expr)  # an expression
    words, near = _nearby(code, start, cursor)
    if language != "python":
        found = [(w, "word", None, 0) for w in words]
    elif isinstance(name, ast.alias) and getattr(statement, "module", None) and not statement.level:
        found = [(n, k, d, 0) for n, (k, d) in modules(statement.module).items()]  # from m import |
    elif whole and (m := re.fullmatch(r"\s*(?:import|from)\s+([\w.]+)\.", before)):
        found = [(n, k, d, 0) for n, (k, d) in modules(m.group(1)).items() if k == "import"]
    elif whole and re.fullmatch(r"\s*(import|from)\s+([\w.]+\s*,\s*)*", before):
        found = [(n, "import", "module", 0) for n in sys.stdlib_module_names if n[0] != "_"]
    elif (dot := re.search(r"([\w.]*|[)\]}'\"])\s*\.\s*\Z", before)) and \
            (owner := dot.group(1).lstrip("0123456789.")):  # after `owner.` (a number's is none)
        members = _attributes(parse, name, owner, modules)
        after = dict.fromkeys(re.findall(r"\.[ \t]*([A-Za-z_]\w*)", code[:start] + code[cursor:]))
        found = members + [(w, "attribute", None, 1000 if members else 6) for w in after] \
            + [(n, "method", None, 7) for n in _TYPE_METHODS if not members]
    else:  # the text's words last (what no parse bound), those only seen after a dot after all
        found = _parameters(parse, statement, name, modules) + _names(parse) \
            + [(b, "builtin", None, _COMMON.get(b, 8)) for b in _BUILTINS] \
            + [(d, "global", "a module's", 7) for d in _DUNDERS] \
            + _keywords(before, whole and not inside, code, start) \
            + [(w, "word", None, 12 if plain else 40) for w, plain in words.items()]
        own = getattr(statement, "name", 0) or getattr(getattr(statement, "target", 0), "id", 0)
        found = [f for f in found if f[0] != own]  # not `class X(X`, `for x in x`, `except x as x`
    named = re.fullmatch(r"\s*(?:self\.)?(\w+)\s*=\s*[\w.]*", before) if whole else None
    return _rank(found, prefix, near, named and named[1].strip("_").lower()), start


#: Keywords after a complete expression, starting a statement (most used first), values.
_INFIX = ("in", "is", "and", "or", "not", "if", "else", "for", "as", "from", "import")
_STARTS = ("if", "return", "def", "for", "raise", "elif", "else", "import", "from", "try", "with",
           "except", "while", "class", "pass", "continue", "break", "yield", "assert", "del",
           "finally", "global", "nonlocal", "async", "await", "lambda", "case")
_VALUES = ("None", "True", "False", "not", "lambda", "await", "yield")
#: Statement keywords only some places allow; those that may follow a block, by its first word.
_GATED = set("elif else except finally return yield await break continue case".split())
_AFTER = {"if": "elif else", "elif": "elif else", "try": "except finally", "for": "else",
          "except": "except else finally", "while": "else", "else": "finally"}
_HEADER = re.compile(r"\s*((el)?if|else|for|while|try|except|finally|with|def|class|async|case)"
                     r"\b.*:\s*\Z")  #: a compound statement's header: its body may follow


def _keywords(before: str, whole: bool, code: str, start: int) -> list[Suggestion]:
    """Keywords the grammar allows: after an expression (first), at a statement's start, else."""
    prior = code[max(code.rfind("\n", 0, max(0, start - len(before) - 1)) + 1, start - 300):start]
    bare = re.sub(_NOT_CODE, lambda m: "''" * (m[0][0] != "#"), prior)  # 'a' -> ''
    depth = sum(map(bare.count, "([{")) - sum(map(bare.count, ")]}"))
    opened, body = not before.strip() and depth > 0, depth <= 0 and _HEADER.match(before)
    end = re.search(r"([\w.]+|[)\]}'\"])\s+(not\s+)?\Z", bare if opened else before)
    if end and (end[1].istitle() or not keyword.iskeyword(end[1])):  # `x i`, `x not i`, `None a`
        first = "import" if re.fullmatch(r"\s*from\s+[\w.]+\s+", before) else "as"
        order = (first, *_INFIX) if re.match(r"\s*(import|from|except|with)\b", before) else \
            ("is", "and", *_INFIX) if re.match(r"\s*(if|assert)\b", before) else _INFIX
        return [(k, "keyword", None, 100 * i - 10_000) for i, k in enumerate(dict.fromkeys(order))]
    if not whole or before.strip() and not body:  # inside an expression, not `if x: |`
        yield_from = [("from", "keyword", None, -10_000)] * bool(re.search(r"\byield\s+\Z", before))
        return yield_from + [(k, "keyword", None, 5) for k in _VALUES]  # stdlib `yield f`: 85% from
    heads, previous = _blocks_around(code, start, len(before) - len(before.lstrip()) + bool(body))
    inner = next((h for h in heads if h in ("def", "class", "async")), "")
    loop = {"for", "while"} & set(heads[:heads.index(inner)] if inner else heads)
    must = ("except", "finally") if previous == "try" else ("case",) * (heads[:1] == ["match"])
    may = {*must, *_AFTER.get(previous, "").split(), "await" * (inner == "async"),
           *("return", "yield") * (inner in ("def", "async")), *("break", "continue") * bool(loop)}
    return [(k, "keyword", None, 2 * i - 60 - 10_000 * (k in must))  # the commonest before names
            for i, k in enumerate(_STARTS) if k in may or k not in _GATED]


def _blocks_around(code: str, end: int, indent: int) -> tuple[list[str], str]:
    """First words of the blocks around a line at `indent` (innermost first), of the one before:
    the lines up to `end` (this line's start, or a header's `:` for a body on its line)."""
    heads, previous = [], None
    while end >= 0:
        begin = code.rfind("\n", 0, end) + 1
        line, end = code[begin:end].split("#")[0].rstrip(), begin - 1
        depth, word = len(line) - len(line.lstrip()), line.lstrip().split(" ")[0].rstrip(":")
        if line and depth < indent:
            indent, _ = depth, heads.append(word)
        elif line and depth == indent and previous is None and not heads:
            previous = word
        if line[:1].strip():
            break  # the top level
    return heads, previous or ""


def _rank(found: list[Suggestion], prefix: str, near: dict, like: str | None) -> list[dict]:
    """By match to the prefix, use near the cursor (`x = |` counts names holding x as used:
    `info = get_info()`), scope, then the shorter (the more used, as a rule); 50, each once."""
    lower, ranked = prefix.lower(), []
    for label, kind, detail, scope in found:
        name = label.rstrip("=")
        if prefix and name[:1].lower() != lower[:1]:  # each way of matching needs the first letter
            continue
        match = 0 if name.startswith(prefix) else 1 if name.lower().startswith(lower) \
            else 2 if _subsequence(lower, name.lower()) else None  # case, then any case, fuzzy
        if match is not None:
            used = max(near.get(name, 0), near.get(name.lstrip("_"), 0))  # `_x` is near if `x` is
            used /= 3 if kind in ("word", "keyword") else 1
            used += 20 * bool(like and like in name.lower() and like != name.lower().strip("_"))
            ranked.append(((match, name == label, scope - used, len(name)), label, kind, detail))
    best: dict[str, dict] = {}  # each label once, where it ranks best
    for _, label, kind, detail in sorted(ranked, key=lambda r: r[:2]):  # a detail may be None
        shown = {"detail": detail[:100]} if detail else {}
        best.setdefault(label, {"label": label, "kind": kind, **shown})
    return list(best.values())[:50]


def _subsequence(needle: str, hay: str) -> bool:
    it = iter(hay)
    return all(c in it for c in needle)


def _nearby(code: str, start: int, cursor: int) -> tuple[dict[str, bool], dict[str, float]]:
    """The words of code near the cursor but keywords and the one typed, each with whether it is
    ever used without a dot before it, and a score for every word growing the nearer its nearest
    use (above counts more) and the more its uses. Read from 8,000 characters above (from a
    top-level definition if any: begun in a docstring, prose would read as code) to 4,000 below."""
    top, score = _TOP_DEFINITION.search(code, max(0, start - 8000), start), {}
    lo = top.start() if top else max(0, start - 8000)
    above, below = [_CODE_WORD.findall(code, i, j)
                    for i, j in ((lo, start), (cursor, cursor + 4000))]
    plain = {w for dot, w in above + below if not dot}
    above, below = [[w for _, w in part if w] for part in (above, below)]
    for i, word in enumerate(reversed(above)):
        score.setdefault(word, 100 / (1 + i / 12))
    for i, word in enumerate(below):
        score[word] = max(score.get(word, 0), 80 / (1 + i / 12))
    for word, n in collections.Counter(above + below).items():
        score[word] += 10 * math.log2(n)  # and the more it is used
    return {w: w in plain for w in score if not keyword.iskeyword(w)}, score


# ---------------------------------------------------------------------------
# Autocomplete: the text parsed block by block, its scopes; modules' names; the route
# ---------------------------------------------------------------------------

def _parse_near(code: str, start: int, line0: int = 0) -> _Parse:
    """The text parsed block by block (see above), all but the cursor's from a cache (a keystroke
    changes one); blocks not reached in SUGGEST_PARSE_SECONDS left out."""
    lines, deadline = code.split("\n"), time.thread_time() + SUGGEST_PARSE_SECONDS
    row, names = code.count("\n", 0, start), {}
    blocks = list(zip(tops := _blocks(lines), tops[1:] + [len(lines)]))
    at = max(first for first, _ in blocks if first <= row)
    cursor_block, col = _parse_cursor_block(lines, at, row, dict(blocks)[at],
                                            start - (code.rfind("\n", 0, start) + 1), deadline)
    tree = ast.Module(body=cursor_block, type_ignores=[])
    for first, end in blocks:  # the names each block binds, in order: the last binding wins
        names.update(_bindings(tree, line0 + at) if first == at else
                     _parse_block(line0 + first, "\n".join(lines[first:end]), deadline))
    return _Parse(tree, row - at, col, {id(tree): names})


_CONTINUES = ("#", ")", "]", "}", "else", "elif", "except", "finally")  #: no block starts so


def _blocks(lines: list[str]) -> list[int]:
    """Where the top-level blocks start: each definition one (not in a triple-quoted string: a
    docstring's text at column 0), the lines between at most 200."""
    starts, quoted = [0], False
    for i, line in enumerate(lines):
        top = i and line[:1].strip() and not line.startswith(_CONTINUES) \
            and not lines[i - 1].startswith("@")  # at column 0, and not a decorated definition
        if top and (not quoted and (_DEFINES.match(line) or _DEFINES.match(lines[starts[-1]]))
                    or i - starts[-1] > 200):  # a definition begins or ends, or the lines grow many
            starts.append(i)
        quoted ^= ("''" in line or '""' in line) and (line.count('"""') + line.count("'''")) & 1
    return starts


class _Memo:
    """A dict that forgets its least recently used entries past `limit` bytes, as put() weighs."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size, self.items = limit, 0, collections.OrderedDict()

    def get(self, key: Any) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key, (None,))[0]

    def put(self, key: Any, value: Any, weight: int) -> None:
        self.size -= self.items.pop(key, (None, 0))[1]
        self.items[key], self.size = (value, weight), self.size + weight
        while self.size > self.limit:
            self.size -= self.items.popitem(last=False)[1][1]


_PARSED = _Memo(PARSE_CACHE_BYTES)  # a pure memo, so shared by the apps of a process


def _parse_block(first: int, text: str, deadline: float) -> dict:
    """The names one top-level block (from line `first`) binds, mended line by line (none if
    that fails); {} uncached once past the deadline."""
    if (known := _PARSED.get((first, text))) is not None:
        return known
    body, bad = _mend(text, -1, deadline)
    if bad == -2:
        return {}
    bound = _bindings(ast.Module(body=body or [], type_ignores=[]), first)
    _PARSED.put((first, text), bound, AST_BYTES_PER_CHAR * len(text) + 1000)
    return bound


def _parse_cursor_block(lines: list[str], first: int, row: int, end: int, col: int,
                        deadline: float) -> tuple[list, int]:
    """The cursor's block, its line cut at the cursor: first with the rest of the line (in brackets
    at a line's end, a comma), then open brackets closed (then with `**` before the name in a call
    or dict: after a keyword argument a name alone does not parse), the name alone, `pass`."""
    head, tail = lines[row][:col], re.sub(r"^\w*", "", lines[row][col:])
    closers = []  # a stack: the last opened (on this line or one above) is closed first
    for c in re.findall(r"(?:%s)|([][(){}])" % _NOT_CODE, "\n".join(lines[first:row] + [head])):
        if c in _PAIRS:  # a bracket outside strings and comments (findall gives "" for those)
            closers.append(_PAIRS[c])
        elif closers and c == closers[-1]:
            closers.pop()
    indent, close = re.match(r"\s*", lines[row]).group(), "".join(reversed(closers))
    below = lines[row + 1] if row + 1 < end else ""  # deeper than the cursor's line: goes on?
    deeper = below[:len(indent) + 1].isspace() and below.strip()
    tail = tail if tail.strip() else "," * bool(close and deeper)  # in brackets, at the line's end
    mark = "**" * (close[:1] in (")", "}"))  # each variant once: with no `**` the same as the first
    variants = [(head + _CURSOR + close, col), (head + mark + _CURSOR + close, col + len(mark)),
                (indent + _CURSOR, len(indent)), (indent + "pass", len(indent))]
    for line, at in dict.fromkeys([(head + _CURSOR + tail, col)] * bool(tail) + variants):
        for stop in (end, row + 1):  # then without the block's lines after the cursor
            text = "\n".join(lines[first:row] + [line] + lines[row + 1:stop])
            body, bad = _mend(text, row - first, deadline)
            if body is not None or bad == -2:  # parsed, or out of time: other variants would be too
                return body or [], at
            if bad <= row - first:  # the cursor's line itself: the lines after it are not to blame
                break
    return [], 0


def _mend(text: str, keep: int, deadline: float) -> tuple[list[ast.stmt] | None, int]:
    """Parse a block's text, mending each line that breaks it (a missing colon added, ` pass` after
    a header with no body, else the line made `pass`, then blank; line `keep` only by the first
    two). The statements (lines from the block's first), or None and the line it gave up on."""
    lines, patched, bad = text.split("\n"), set(), -1
    for _ in range(8):
        if time.thread_time() > deadline:
            return None, -2  # past the deadline
        try:
            with warnings.catch_warnings(action="ignore"):  # 3.12 prints `"\d"` at each parse
                return ast.parse("\n".join(lines)).body, -1
        except SyntaxError as e:
            header = re.match(r"expected an indented block after .* line (\d+)", e.msg)
            bad, colon = (int(header[1]) if header else e.lineno or 1) - 1, "expected ':'" in e.msg
            if bad >= len(lines) or bad == keep and not (header or colon and bad not in patched):
                return None, bad
            lines[bad] = lines[bad] + " pass" if header else lines[bad] + ":" if colon \
                else "" if bad in patched else re.match(r"\s*", lines[bad]).group() + "pass"
            patched.add(bad)
        except (ValueError, RecursionError, MemoryError):
            return None, -1
    return None, bad


def _names(parse: _Parse) -> list[Suggestion]:
    """Every name visible at the cursor, innermost scope first, the module's ranked as 5; a class
    body's only in itself, with what its methods set as self.name."""
    chain = parse.scopes()
    return [(name.removeprefix("self."), kind, detail, depth if depth < len(chain) - 1 else 5)
            for depth, scope in enumerate(reversed(chain))
            if depth == 0 or not isinstance(scope, ast.ClassDef)
            for name, (kind, detail, _) in parse.bound(scope).items() if name != _CURSOR]


def _bindings(scope: ast.AST, first: int = 0) -> dict[str, tuple[str, str | None, list]]:
    """Names bound in one scope, not in those nested in it (a class's self.x too), `first` its
    block's first line: {name: (kind, detail, what the code gives it: values, annotations, def)}.
    Expressions are looked into only where they can bind: targets and `:=`."""
    found: dict[str, tuple[str, str | None, list]] = {}
    bind = lambda name, kind, detail, *given: \
        found.setdefault(name, (kind, detail, []))[2].extend(given)  # noqa: E731
    local = {ast.Module: "global", ast.ClassDef: "attribute"}.get(type(scope), "local")
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        where, args = getattr(scope, "name", "lambda"), scope.args
        for a in [*args.posonlyargs, *args.args, args.vararg, *args.kwonlyargs, args.kwarg]:
            if a:
                bind(a.arg, "param", f"param of {where}", a.annotation)
    for node in ast.walk(scope) if local == "attribute" else ():  # self.x = ... in its methods
        for target, given in _targets(node) if isinstance(node, _ASSIGNS) else ():
            if isinstance(target, ast.Attribute) and getattr(target.value, "id", 0) == "self":
                bind(f"self.{target.attr}", "attribute", f"self.{target.attr}", *given)
    todo = [g.target for g in getattr(scope, "generators", ())] or list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            signature = f"def {node.name}({ast.unparse(node.args)})"
            bind(node.name, "method" if local == "attribute" else "function", signature, node)
        elif isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            bind(node.name, "class", f"class {node.name}({bases})".replace("()", ""), node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                source = f"import {alias.name}" if isinstance(node, ast.Import) \
                    else f"from {node.module or '.'} import {alias.name}"
                module = name if isinstance(node, ast.Import) and not alias.asname else \
                    alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
                bind(name, "import", source, *[module] * (not getattr(node, "level", 0)))
        elif isinstance(node, _ASSIGNS):  # x = ..., with ... as x
            for target, given in _targets(node):
                if isinstance(target, ast.Name):
                    bind(target.id, local, f"line {target.lineno + first}", *given)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) or \
                isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bind(getattr(node, "id", None) or node.name, local, f"line {node.lineno + first}")
        a_value = isinstance(node, ast.expr) and not isinstance(node, ast.NamedExpr) \
            and not isinstance(getattr(node, "ctx", None), ast.Store)
        if not (isinstance(node, _SCOPES) or a_value):  # in a value nothing binds (but a rare :=)
            todo.extend(ast.iter_child_nodes(node))
    return found


def _parameters(parse: _Parse, call: ast.AST, name: ast.AST, modules: Callable) -> list:
    """In f(|), f a function, class or method the code defines or the standard library's: its
    keyword parameters, `name=`. In `def f(|`, the one being named: names its body uses unbound."""
    if getattr(name, "arg", None) == _CURSOR:  # and `call` is the def
        known = {*parse.bound(call), *parse.bound(parse.tree), *dir(builtins)}
        return [(n.id, "param", None, -1000) for n in ast.walk(call)
                if isinstance(n, ast.Name) and n.id not in known]
    given = isinstance(call, ast.Call) and call.args + [k.value for k in call.keywords if not k.arg]
    node = _made_of(parse, call.func, set()) if given and name in given else None  # f(a=1, **|)
    if isinstance(node, str):  # the standard library's: the parameters its signature names
        owner, _, attr = node.rpartition(".")
        named = re.findall(r"[(,] ?(\w+)=", modules(owner).get(attr, (0, ""))[1] or "")
        return [(f"{n}=", "param", f"param of {attr}", 0) for n in named]
    if isinstance(node, ast.ClassDef):  # its __init__'s
        node = parse.bound(node).get("__init__", (0, 0, [None]))[2][0]
    if not isinstance(node, _DEFS[:2]):
        return []
    return [(f"{a.arg}=", "param", f"param of {node.name}", 0)  # not the positional-only
            for a in [*node.args.args, *node.args.kwonlyargs] if a.arg not in ("self", "cls")]


def _attributes(parse: _Parse, dot: ast.AST, owner: str, modules: Callable) -> list[Suggestion]:
    """What follows `owner.` (`dot` if parsed): the members of what it is made of (_made_of)."""
    value = dot.value if isinstance(dot, ast.Attribute) and dot.attr == _CURSOR else None
    for part in owner.split(".") if not value and _MODULE.match(owner) else ():  # unparsed: text
        value = ast.Attribute(value, part) if value else ast.Name(part)
    return _members(_made_of(parse, value, set()), parse, modules)


def _members(made: Any, parse: _Parse, modules: Callable[[str], dict], seen: int = 0) -> list:
    """A class's methods, attributes and self.x, then its bases'; a module's or stdlib class's."""
    if isinstance(made, str):
        return [(n, k, d, seen) for n, (k, d) in modules(made).items()]
    if not isinstance(made, ast.ClassDef) or seen > 5:
        return []
    found = [(n.removeprefix("self."), k, d, seen) for n, (k, d, _) in parse.bound(made).items()]
    for base in made.bases:
        found += _members(_made_of(parse, base, set()), parse, modules, seen + 1)
    return found


_LITERALS = dict(Constant="", JoinedStr="str", List="list", ListComp="list", Dict="dict",
                 DictComp="dict", Set="set", SetComp="set", Tuple="tuple")  #: "", 1, [], {}...
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_ASSIGNS = (ast.Assign, ast.AnnAssign, ast.withitem)


def _made_of(parse: _Parse, node: Any, seen: set) -> Any:
    """What the code makes an expression (or the first of a list) from: a class or function it
    defines, or the path of a standard-library module or class (builtins.str for "x"), or None."""
    if isinstance(node, (str, *_DEFS)):
        return node
    if isinstance(node, list):  # the first of these it can tell
        return next((m for v in node if (m := _made_of(parse, v, seen)) is not None), None)
    if node is None or node in seen or len(seen) > 50:  # each node looked at once, 50 at most
        return None
    seen.add(node)
    if (literal := _LITERALS.get(type(node).__name__)) is not None:
        return f"builtins.{literal or type(node.value).__name__}"
    if isinstance(node, ast.Call):  # an instance of a class, or what a function returns
        made = _made_of(parse, node.func, seen)
        return "io.TextIOWrapper" if made == "builtins.open" else \
            _made_of(parse, made.returns, seen) if isinstance(made, _DEFS[:2]) else made
    if isinstance(node, ast.Attribute):  # of a module or class; x = or self.x = in a class
        made = _made_of(parse, node.value, seen)
        if isinstance(made, ast.ClassDef):
            bound, none = parse.bound(made), (0, 0, [])
            return _made_of(parse, bound.get(f"self.{node.attr}", none)[2]
                          + bound.get(node.attr, none)[2], seen)
        return f"{made}.{node.attr}" if isinstance(made, str) else None
    if isinstance(node, ast.Subscript):  # Optional[T] is a T, list[T] a list
        optional = ast.unparse(node.value).endswith("Optional")
        return _made_of(parse, node.slice if optional else node.value, seen)
    if isinstance(node, ast.BinOp):  # T | None
        return _made_of(parse, [node.left, node.right], seen)
    for scope in reversed(parse.scopes()) if isinstance(node, ast.Name) else ():
        if isinstance(scope, ast.ClassDef):  # self and cls; its body's names are not seen
            if node.id in ("self", "cls"):
                return scope
        elif (made := _made_of(parse, parse.bound(scope).get(node.id, (0, 0, []))[2], seen)):
            return made
    return f"builtins.{node.id}" if getattr(node, "id", None) in _BUILTINS else None


def _targets(node: ast.AST) -> list[tuple[Any, list]]:
    """What an assignment or `with ... as` gives each target: [(target, [annotation, value])]."""
    value = getattr(node, "value", getattr(node, "context_expr", None))
    found, one = [], getattr(node, "target", getattr(node, "optional_vars", None))
    for target in getattr(node, "targets", [one]):
        values = getattr(value, "elts", []) if isinstance(target, ast.Tuple) else [value]
        for one, given in itertools.zip_longest(getattr(target, "elts", [target]), values):
            found.append((one, [getattr(node, "annotation", None), given]))
    return found


class Unlearned(Exception):
    """Raised by ModuleNames for a module whose names are not known yet."""


_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")


def sandbox_program(name: str) -> str:
    """The text of a program in sandbox/, beside this module, to be run only in the sandbox."""
    return Path(__file__).with_name("sandbox").joinpath(name).read_text()


class ModuleNames:
    """The public names of standard-library modules and their classes (`threading.Thread`),
    learned by importing each in the sandbox, once, never in the server: importing runs a
    module's code (`lib2to3.__main__` exits, `antigravity` opens a browser), and C modules and
    names made at import (`hashlib.md5`) are known no other way."""

    def __init__(self, run: Callable[[str, str], Any]) -> None:
        self._run = run  #: run(code, stdin) -> a run's result, as Runner.run gives
        self._program = sandbox_program("learn.py")  #: what imports a module there
        self._known = _Memo(MODULE_CACHE_BYTES)
        self._learning: dict[str, asyncio.Future] = {}

    def __call__(self, name: str) -> dict[str, tuple[str, str | None]]:
        """{name: (kind, detail)} of module `name`; {} for anything outside the standard library."""
        parts = name.split(".")
        standard = _MODULE.match(name) and parts[0] in sys.stdlib_module_names
        if not standard or name in ("antigravity", "this"):  # imported for what importing does
            return {}
        for i in range(1, len(parts) + 1):  # only modules their package lists: a bounded set
            if (known := self._known.get(".".join(parts[:i]))) is None:
                raise Unlearned(".".join(parts[:i]))
            if i < len(parts) and known.get(parts[i], ("",))[0] not in ("import", "class"):
                return {}
        return known

    async def learn(self, name: str) -> None:
        """Learn a module's names; those asking for the same module at once share one run."""
        if name not in self._learning:
            self._learning[name] = asyncio.ensure_future(self._learn(name))
        await asyncio.shield(self._learning[name])

    async def _learn(self, name: str) -> None:
        try:
            result = await self._run(self._program, name)
            out = result["stdout"].rstrip().rpartition("\n")[2] if result["exitCode"] == 0 else "{}"
            found = {n: tuple(v) for n, v in json.loads(out).items()}  # learn.py says it last
            self._known.put(name, found, 4 * len(result["stdout"]) + 100)
        except (PairError, ValueError):  # too busy, or no answer: asked again next time
            pass
        finally:
            del self._learning[name]


async def complete(app: web.Application, code: str, cursor: int, language: str) -> dict:
    """suggest(), learning in the sandbox the modules it asks about first."""
    modules = app[MODULES]
    for _ in range(6):  # a module and the packages above it, a class in it
        try:
            return suggest(code, cursor, language, modules)
        except Unlearned as e:
            await modules.learn(str(e))
    return suggest(code, cursor, language)  # the sandbox could not tell: without module names


async def autocomplete(request: web.Request) -> web.Response:
    """POST /autocomplete {code, cursorPosition, language?} -> {suggestions, from, to}"""
    config, body = request.app[CONFIG], await _json_body(request)
    code, language = _field(body, "code", str), _field(body, "language", str, "python")
    cursor, units = _field(body, "cursorPosition", int), checked_units(code, config.max_code)
    if not 0 <= cursor <= len(units) or splits_pair(units, cursor):
        raise PairError("bad_request", f"cursorPosition {cursor} is outside the text or splits a "
                        "character")
    answer = await complete(request.app, code, len(from_units(units[:cursor])), language)
    span = len(to_units(code[:answer["from"]]))  # back to UTF-16 units
    return web.json_response({**answer, "from": span, "to": cursor})


# ---------------------------------------------------------------------------
# Execution: Runner (pools of interpreters, fair turns, limits)
# ---------------------------------------------------------------------------
# Each run gets a pre-started interpreter from a small pool: the sandbox and
# the interpreter are already up, waiting on stdin for a header line with the
# code's length, then the code, then the program's own stdin. So a short
# program answers in the time it takes to run, not to start. That waiting
# program is sandbox/run.py (run.js for node), which runs only in the sandbox.

class _Process(asyncio.SubprocessProtocol):
    """A started interpreter: output chunks to `cap` bytes (then `capped`), its end (`exited`)."""

    def __init__(self, cap: int) -> None:
        loop = asyncio.get_running_loop()
        self.exited, self.closed, self.capped = (loop.create_future() for _ in range(3))
        self.transport: asyncio.SubprocessTransport | None = None
        self.ready: asyncio.Future | None = None  # done once the process is started
        self.cgroups: list[Path] = []
        self.workdir: str | None = None
        self.cap, self.size, self.truncated = cap, 0, False
        self.chunks: list[tuple[str, str]] = []  #: (stream, text)
        self.decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in (1, 2)}
        self.on_output: Callable[[str, str], None] = lambda stream, text: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def process_exited(self) -> None:
        self.exited.done() or self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.done() or self.closed.set_result(None)

    def pipe_data_received(self, fd: int, data: bytes, final: bool = False) -> None:
        if self.truncated or fd not in self.decoders:
            return
        if self.size + len(data) >= self.cap:
            data, self.truncated = data[:self.cap - self.size], True
            self.capped.done() or self.capped.set_result(None)
        self.size += len(data)
        text = self.decoders[fd].decode(data, final=final or self.truncated)
        if text:
            stream = "stdout" if fd == 1 else "stderr"
            self.chunks.append((stream, text))
            self.on_output(stream, text)

    def text(self, stream: str | None = None) -> str:
        return "".join(t for s, t in self.chunks if stream in (None, s))


class Turns:
    """Fair turns for runs, `size` at once: a freed slot goes to the waiting source (a room, a
    REST client's address) with the fewest runs going, then the one served longest ago; a source
    with `per_source` runs waiting, or any once `total` wait, gets 429: none locks others out."""

    def __init__(self, size: int, per_source: int, total: int) -> None:
        self.free, self.per_source, self.total = size, per_source, total
        self.running: collections.Counter = collections.Counter()
        self.waiting: list[tuple[str, asyncio.Future]] = []  #: (source, its turn), oldest first
        self.served: dict[str, int] = {}  #: when each source running or waiting last got a slot
        self._clock = itertools.count()

    async def take(self, source: str) -> None:
        """Wait for a slot for source; raises PairError (429) when it may not wait."""
        if self.free and not self.waiting:
            self.free -= 1
            return self._start(source)
        mine = sum(s == source for s, _ in self.waiting)
        if mine >= self.per_source or len(self.waiting) >= self.total:
            raise PairError("too_busy", "too many runs waiting; try again shortly", 429)
        turn = (source, asyncio.get_running_loop().create_future())
        self.waiting.append(turn)
        try:
            await turn[1]
        except asyncio.CancelledError:
            if turn[1].cancelled():  # still waiting: leave the queue
                self.waiting.remove(turn)
            else:  # given a slot just now: pass it on
                self.give_back(source)
            raise

    def give_back(self, source: str) -> None:
        """Free source's slot for the fairest waiter."""
        self.running[source] -= 1
        if not self.running[source] and source not in (s for s, _ in self.waiting):
            del self.running[source], self.served[source]
        if not self.waiting:
            self.free += 1
            return
        turn = min(self.waiting, key=lambda t: (self.running[t[0]], self.served.get(t[0], -1)))
        self.waiting.remove(turn)
        self._start(turn[0])
        turn[1].set_result(None)

    def _start(self, source: str) -> None:
        self.running[source] += 1
        self.served[source] = next(self._clock)


class Runner:
    """Runs code in sandboxed interpreters: max_runs at once, taking turns fairly (Turns), then
    429. Pure asyncio, so the event loop never waits on a run."""

    def __init__(self, config: Config) -> None:
        self.config = config
        bwrap = shutil.which("bwrap")
        if config.sandbox == "bwrap" and not bwrap:
            raise ValueError("--sandbox bwrap: bwrap is not installed (apt-get install bubblewrap)")
        self.bwrap = bwrap if config.sandbox != "none" else None
        self.seccomp = _seccomp_filter()  #: the program bwrap loads, if any
        python = os.path.realpath(config.python or sys.executable)
        #: each language this machine can run: how to start its interpreter waiting
        self.languages = {"python": [python, "-I", "-u", "-c", sandbox_program("run.py")]}
        if node := shutil.which("node"):
            self.languages["javascript"] = [os.path.realpath(node), "-e", sandbox_program("run.js")]
        self._versions: dict[str, str] = {}
        self.turns = Turns(config.max_runs, config.max_queue_per_source, config.max_queue)
        self._pool = {name: collections.deque() for name in self.languages}
        self._live: set[_Process] = set()
        self._cgroup_base: list[Path] = []
        self.stopped = False  #: by stop(): no run and no interpreter starts from then on

    @property
    def sandbox(self) -> str:
        return "bwrap" if self.bwrap else "rlimits"

    async def start(self) -> None:
        """Find a writable cgroup, check that bwrap works here, fill the pools."""
        self._cgroup_base = _make_cgroup_base()
        works = self.bwrap and (await self._works() or self.seccomp and await self._works(False))
        if self.bwrap and not works and self.config.sandbox == "bwrap":
            raise RuntimeError("--sandbox bwrap: bwrap cannot create a sandbox on this machine")
        self.bwrap = self.bwrap if works else None
        if self.bwrap and not self.seccomp:
            log.warning("runs are isolated, but their socket families are not filtered (no seccomp "
                        "filter for %s, or it did not load): AF_VSOCK may reach the host", _MACHINE)
        if not self.bwrap:
            log.warning("runs are NOT isolated from this machine (no working bwrap): only resource "
                        "limits and the process-tree kill hold. apt-get install bubblewrap.")
        cgroups = "on" if self._cgroup_base else "off"
        log.info("runs: %s sandbox, cgroup limits %s", self.sandbox, cgroups)
        for name in [*self.languages] * self.config.pool:
            self._refill(name)

    async def _works(self, seccomp: bool = True) -> bool:
        """Whether the sandbox starts here (with the seccomp filter, or without it from now on)."""
        self.seccomp = self.seccomp if seccomp else None
        probe = _Process(0)
        await self._spawn(probe, [self.languages["python"][0], "-c", "pass"])
        await probe.exited
        self._discard(probe)
        return probe.transport.get_returncode() == 0

    async def stop(self) -> None:
        """Kill every run and pooled interpreter, refuse the runs waiting; remove their cgroups."""
        procs, self.stopped = list(self._live), True
        for proc in procs:
            self._discard(proc)
        started = [proc.exited for proc in procs if proc.transport]
        if started:  # a cgroup can be removed only once its processes are gone
            await asyncio.wait(started, timeout=2)
        for _ in range(20):
            if all([_rmdir_all(base) for base in self._cgroup_base]):
                break
            await asyncio.sleep(0.25)

    async def describe(self) -> dict:
        """What GET /languages says: the languages with versions, and the sandbox."""
        for name, (executable, *_) in self.languages.items():
            if name not in self._versions:
                proc = await asyncio.create_subprocess_exec(executable, "--version",
                                                            stdout=asyncio.subprocess.PIPE)
                said = (await proc.communicate())[0].decode()  # "Python 3.11.2", "v20.1.0"
                self._versions[name] = said.split()[-1].lstrip("v")
        return {"languages": [{"name": name, "version": self._versions[name], "executable": argv[0]}
                              for name, argv in self.languages.items()], "sandbox": self.sandbox}

    async def run(self, language: str, code: str, stdin: str = "", timeout: float = 5.0,
                  on_output: Callable[[str, str], None] | None = None,
                  cancel: asyncio.Event | None = None, source: str = "") -> dict:
        """Run code, return the SPEC's result; on_output sees each chunk, `source` takes turns."""
        if language not in self.languages:
            raise PairError("unsupported_language", f"cannot run {language!r} here; "
                            f"can run: {', '.join(self.languages)}")
        await self.turns.take(source)
        try:
            return await self._run(self._take(language), code, stdin, timeout, on_output, cancel)
        except OSError as e:  # out of descriptors or processes: not the code's fault
            raise PairError("cannot_run", f"the server cannot start a run now ({e.strerror}); "
                            "try again shortly", 503) from None
        finally:
            self.turns.give_back(source)
            # Refill only now: a new process joining its cgroup (v1) stalls every
            # fork and exit on the machine for an RCU grace period, this run's too.
            self._refill(language)

    async def _run(self, proc, code, stdin, timeout, on_output, cancel) -> dict:
        await proc.ready
        proc.on_output = on_output or proc.on_output
        src, feed = code.encode("utf-8", "replace"), proc.transport.get_pipe_transport(0)
        started = time.monotonic()
        feed.write(b"%d\n%s%s" % (len(src), src, stdin.encode("utf-8", "replace")))
        feed.close()
        cancelled = asyncio.ensure_future((cancel or asyncio.Event()).wait())
        done, _ = await asyncio.wait([proc.exited, proc.capped, cancelled], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        cancelled.cancel()
        killed = not proc.exited.done()
        if killed:
            self._kill(proc)
        duration = time.monotonic() - started
        await asyncio.wait([proc.exited, proc.closed], timeout=2)  # the last output, if any
        status = proc.transport.get_returncode()
        if killed or status is None:
            status = -signal.SIGKILL
        elif self.bwrap and status > 128:
            status = 128 - status  # bwrap reports death by signal N as 128 + N
        for fd in (1, 2):  # the decoders' last bytes
            proc.pipe_data_received(fd, b"", final=True)
        self._discard(proc)
        return {"output": proc.text(), "stdout": proc.text("stdout"),
                "stderr": proc.text("stderr"), "exitCode": status,
                "timedOut": killed and not done, "truncated": proc.truncated,
                "cancelled": cancelled in done and killed, "durationMs": round(duration * 1000, 1)}

    def _take(self, language: str) -> _Process:
        """A waiting interpreter from the pool, or a cold one; none once stopped."""
        if self.stopped:
            raise PairError("cannot_run", "the server is stopping; try again shortly", 503)
        pool = self._pool[language]
        while pool:
            proc = pool.popleft()
            if not proc.exited.done():
                return proc
            self._discard(proc)
        return self._start(language)

    def _refill(self, language: str) -> None:
        if not self.stopped and len(self._pool[language]) < self.config.pool:
            self._pool[language].append(self._start(language))

    def _start(self, language: str) -> _Process:
        proc = _Process(self.config.max_output)
        proc.ready = asyncio.ensure_future(self._spawn(proc, self.languages[language]))
        self._live.add(proc)  # now, so that stop() finds it even before it is spawned
        return proc

    async def _spawn(self, proc: _Process, argv: list[str]) -> None:
        """Start argv in the sandbox, with its limits, its cgroup, its own folder."""
        proc.cgroups = _make_cgroup(self._cgroup_base, f"run-{secrets.token_hex(8)}", self.config)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/work"}
        fds: tuple[int, ...] = ()
        if self.bwrap and self.seccomp:  # bwrap reads the filter from a pipe
            read, write = os.pipe()
            os.write(write, self.seccomp)
            os.close(write)
            fds = (read,)
        if self.bwrap:
            argv = self.sandboxed(argv, *fds)
        else:
            proc.workdir = tempfile.mkdtemp(prefix="pairserver-run-")
            env["HOME"] = proc.workdir
        loop = asyncio.get_running_loop()
        try:
            await loop.subprocess_exec(
                lambda: proc, *argv, cwd=proc.workdir, env=env, start_new_session=True,
                pass_fds=fds, preexec_fn=lambda: _limit_child(self.config, proc.cgroups))
        finally:
            for fd in fds:
                os.close(fd)

    def sandboxed(self, argv: list[str], seccomp_fd: int | None = None) -> list[str]:
        """argv inside bwrap: no network, no host files but the interpreter's, private /work and
        /tmp, its own pids, an unprivileged user, the seccomp filter read from seccomp_fd."""
        executable = argv[0]
        args = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
                "--die-with-parent", "--new-session", "--uid", "65534", "--gid", "65534",
                "--ro-bind", "/usr", "/usr", "--proc", "/proc",
                "--dev", "/dev", "--size", str(self.config.max_file), "--tmpfs", "/tmp",
                "--size", str(self.config.max_file), "--tmpfs", "/work", "--chdir", "/work"]
        for top in ("/bin", "/lib", "/lib64", "/sbin"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        prefix = os.path.dirname(os.path.dirname(executable))
        if not prefix.startswith("/usr"):
            args += ["--ro-bind", prefix, prefix]
        return args + ["--seccomp", str(seccomp_fd)] * (seccomp_fd is not None) + argv

    def _kill(self, proc: _Process) -> None:
        """Kill the run's tree: its pid namespace goes with bwrap, its cgroup catches strays."""
        for group in proc.cgroups:
            _kill_cgroup(group)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.transport.get_pid(), signal.SIGKILL)

    def _discard(self, proc: _Process) -> None:
        """Kill proc if it still runs, close its pipes, remove its folder and cgroup."""
        if proc.transport:
            self._kill(proc)  # close the transport once exited, or asyncio may reap the pid twice
            proc.exited.add_done_callback(lambda _: proc.transport.close())
        elif proc.ready:
            proc.ready.cancel()
        self._live.discard(proc)
        if proc.workdir:
            shutil.rmtree(proc.workdir, ignore_errors=True)
        for group in proc.cgroups:
            _rmdir_all(group, retries=20)


async def _runner_lifetime(app: web.Application):
    """Start the interpreter pools with the app; kill every run when it stops."""
    await app[RUNNER].start()
    yield
    await app[RUNNER].stop()


# ---------------------------------------------------------------------------
# The sandbox around each run: rlimits, a seccomp filter, cgroups
# ---------------------------------------------------------------------------

def _limit_child(config: Config, cgroups: list[Path]) -> None:
    """In the child, before exec: the cgroup, resource limits, a lower priority.
    (The cgroup first: the child holds the server's descriptors until exec,
    so under the run's RLIMIT_NOFILE it could open no file.)"""
    for group in cgroups:
        (group / "cgroup.procs").write_text(str(os.getpid()))
    for limit, value in ((resource.RLIMIT_CPU, int(config.max_timeout) + 1),
                         (resource.RLIMIT_DATA, config.max_memory), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_FSIZE, config.max_file), (resource.RLIMIT_NOFILE, 256)):
        resource.setrlimit(limit, (value, value))
    if not cgroups and os.getuid() != 0:  # per-uid and shared, so only as a last resort
        resource.setrlimit(resource.RLIMIT_NPROC, (config.max_procs * 8,) * 2)
    os.nice(5)


_MACHINE = os.uname().machine
#: Per machine: its audit arch, and the numbers of socket, socketpair and io_uring_setup.
_SYSCALLS = {"x86_64": (0xC000003E, 41, 53, 425), "aarch64": (0xC00000B7, 198, 199, 425)}


def _seccomp_filter() -> bytes | None:
    """A seccomp program (classic BPF, for bwrap --seccomp) that lets a run
    make sockets only of AF_UNIX, AF_INET and AF_INET6 (harmless in an empty
    network namespace) and refuses other families with EAFNOSUPPORT: AF_VSOCK
    reaches the hypervisor, which no namespace covers. It refuses io_uring
    (which can make sockets past this filter), x32 system calls, and kills a
    process calling in through another ABI. None on an unknown machine."""
    if _MACHINE not in _SYSCALLS:
        return None
    arch, socket_nr, socketpair_nr, uring = _SYSCALLS[_MACHINE]
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, |JGE|K, BPF_RET|K
    allow, kill, refuse = 0x7FFF0000, 0x80000000, 0x00050000  # refuse: SECCOMP_RET_ERRNO | errno
    program = [                                    # (code, jump if true, jump if false, k)
        (load, 0, 0, 4),                           # 0  the calling ABI
        (jeq, 0, 14, arch),                        # 1  not ours: kill (16)
        (load, 0, 0, 0),                           # 2  the system call's number
        (jge, 11, 0, 0x40000000),                  # 3  x32: ENOSYS (15)
        (jeq, 10, 0, uring),                       # 4  io_uring_setup, _enter, _register: ENOSYS
        (jeq, 9, 0, uring + 1),                    # 5
        (jeq, 8, 0, uring + 2),                    # 6
        (jeq, 1, 0, socket_nr),                    # 7  socket: 9
        (jeq, 0, 4, socketpair_nr),                # 8  socketpair: 9; any other call: allow (13)
        (load, 0, 0, 16),                          # 9  the first argument, the family (low half)
        (jeq, 2, 0, socket.AF_UNIX),               # 10 allowed families: 13
        (jeq, 1, 0, socket.AF_INET),               # 11
        (jeq, 0, 1, socket.AF_INET6),              # 12 others: EAFNOSUPPORT (14)
        (ret, 0, 0, allow),                        # 13
        (ret, 0, 0, refuse | errno.EAFNOSUPPORT),  # 14
        (ret, 0, 0, refuse | errno.ENOSYS),        # 15
        (ret, 0, 0, kill),                         # 16
    ]
    return b"".join(struct.pack("HBBI", *instruction) for instruction in program)


def _make_cgroup_base() -> list[Path]:
    """Our runs' cgroup folders: v2's tree, or v1's pids and memory trees; [] if none writable."""
    base = f"pairserver-{os.getpid()}-{secrets.token_hex(4)}"  # one per Runner, not per process
    root, v2 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cgroup.controllers")
    v2 = v2.exists() and "pids" in v2.read_text()
    trees = [root / base] if v2 else [root / "pids" / base, root / "memory" / base]
    try:
        for tree in trees:
            for stale in tree.parent.glob("pairserver-*-*"):  # left by a server that was killed
                if not Path("/proc", stale.name.split("-")[1]).exists():
                    _rmdir_all(stale)
            tree.mkdir(exist_ok=True)
            if (tree / "cgroup.subtree_control").exists():
                (tree / "cgroup.subtree_control").write_text("+pids +memory")
        return trees
    except OSError:
        for tree in trees:
            _rmdir_all(tree)
        return []


def _make_cgroup(bases: list[Path], name: str, config: Config) -> list[Path]:
    """A cgroup per run, capping its processes and memory (swap included)."""
    for group in (groups := [base / name for base in bases]):
        group.mkdir()
        for knob, value in (("pids.max", config.max_procs), ("memory.max", config.max_memory),
                            ("memory.swap.max", 0), ("memory.limit_in_bytes", config.max_memory)):
            if (group / knob).exists():
                with contextlib.suppress(OSError):
                    (group / knob).write_text(str(value))
    return groups


def _kill_cgroup(group: Path) -> None:
    if (group / "cgroup.kill").exists():
        (group / "cgroup.kill").write_text("1")
        return
    for _ in range(3):  # v1: a fork may race the first pass
        for pid in (group / "cgroup.procs").read_text().split() if group.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _rmdir_all(path: Path, retries: int = 0) -> bool:
    """Remove a cgroup folder and its children, True once gone; a busy one retried every 0.25 s."""
    try:
        for child in path.glob("*/"):
            child.rmdir()
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        if retries:
            asyncio.get_running_loop().call_later(0.25, _rmdir_all, path, retries - 1)
        return False
    return True


# ---------------------------------------------------------------------------
# Guards: who may call (hosts, origins, isolation), how often, how many connections
# ---------------------------------------------------------------------------
# Nothing a web page or a client address sends may drive or starve the server:
# these checks run before any handler, or around the listening socket.

def _is_loopback(address: str) -> bool:
    """Whether an address or host name is this machine's loopback (localhost, 127.x, ::1)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%")[0])
    except ValueError:
        return address.lower() == "localhost"
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


@web.middleware
async def guard_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Who may call (SPEC): a request that came to a loopback address must name a loopback host
    (a DNS-rebound page names its own); a browser page must be the server's own or of a
    --cors-origin; a POST body must be JSON, which no foreign page sends without a preflight."""
    to = request.transport and request.transport.get_extra_info("sockname")
    to_loopback = isinstance(to, tuple) and _is_loopback(to[0])
    host = urlsplit("//" + request.headers.get("Host", "")).hostname or ""  # none: no name
    named = _is_loopback(host) or host in request.app[CONFIG].allow_host
    if to_loopback and not named:
        raise PairError("forbidden_host", f"this server answers to localhost, not to {host!r}; "
                        "start it with --allow-host NAME to answer to that name", 403)
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"  # closed with 4403 instead
    if not upgrade and not _origin_allowed(request):
        raise PairError("forbidden_origin", "pages from this origin may not call this server "
                        "(see --cors-origin)", 403)
    json_body = not request.body_exists or request.content_type == "application/json"
    if request.method == "POST" and not json_body:
        raise PairError("unsupported_media_type", "send the body as application/json", 415)
    return await handler(request)


def _origin_allowed(request: web.Request) -> bool:
    """No Origin (a script), the server's own pages, or a --cors-origin's."""
    origin, allowed = request.headers.get("Origin"), request.app[CONFIG].cors_origin
    return origin is None or "*" in allowed or origin in allowed \
        or urlsplit(origin).netloc.lower() == request.headers.get("Host", "").lower()  # our own


def _require_isolation(app: web.Application) -> None:
    """Runs are served beyond loopback only when isolated, or when --sandbox none says so."""
    config = app[CONFIG]
    isolated_or_told = app[RUNNER].bwrap or config.sandbox == "none"
    if not isolated_or_told and not _is_loopback(config.host):
        raise PairError("runs_not_isolated", "this server cannot isolate runs (no working bwrap), "
                        "so it runs code only when it listens on localhost; install bubblewrap, or "
                        "start it with --sandbox none to run code unisolated for everyone", 403)


#: Rooms one client address may make at once before --rooms-per-minute paces it.
ROOM_BURST = 10


class RateLimit:
    """A token bucket per client address: `per_minute` tokens a minute, `burst` at most."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate, self.burst = per_minute / 60, burst
        self.buckets: dict[str, tuple[float, float]] = {}  #: address: (tokens, when), oldest first

    def take(self, address: str) -> None:
        """Spend a token of address's, or raise PairError (429) saying when one comes."""
        now = time.monotonic()
        tokens, then = self.buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        self.buckets[address] = (tokens - (tokens >= 1), now)
        if len(self.buckets) > 10_000:  # forget the address heard from longest ago: nearly full
            del self.buckets[next(iter(self.buckets))]
        if self.rate and tokens < 1:
            raise PairError("too_many_requests", "too many rooms made from this address; wait a "
                            "little", 429, retry_after=math.ceil((1 - tokens) / self.rate))


def _cap_connections(server: web.Server, cap: int) -> None:
    """Close a new connection at once when its address has `cap` open already."""
    made, lost = server.connection_made, server.connection_lost
    peers: dict[Any, str] = {}
    count: collections.Counter = collections.Counter()

    def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        peers[handler] = peer = (transport.get_extra_info("peername") or ("",))[0]
        count[peer] += 1
        made(handler, transport)
        if count[peer] > cap:  # read nothing; abort once the handler has started (else it fails)
            transport.pause_reading()
            asyncio.get_running_loop().call_later(0, transport.abort)

    def connection_lost(handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        peer = peers.pop(handler, None)
        count[peer] -= 1
        if count[peer] <= 0:
            del count[peer]
        lost(handler, exc)

    server.connection_made, server.connection_lost = connection_made, connection_lost


def _once_per_episode(previous: Callable | None) -> Callable:
    """An event-loop exception handler that logs running out of descriptors (a failed accept,
    each with a traceback) once per episode: until a minute passes without it."""
    last = [-math.inf]

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        e = context.get("exception")
        if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
            if time.monotonic() - last[0] > 60:
                log.error("out of file descriptors or buffers (%s): new connections wait until "
                          "some close; said once until a minute passes without it", e)
            last[0] = time.monotonic()
            return
        (previous or type(loop).default_exception_handler)(loop, context)  # else as before

    return handler


# ---------------------------------------------------------------------------
# Runs: POST /execute, GET /languages, and a room's execute and execute_cancel
# ---------------------------------------------------------------------------
# A room's run belongs to the room: one at a time (its lock), everyone sees its
# output as it comes, and anyone in the room can stop it.

#: A run's output is sent to its room at most once per stream in this time.
OUTPUT_BATCH_SECONDS = 0.05

async def execute(request: web.Request) -> web.Response:
    """POST /execute {code, language?, stdin?, timeout?} -> the run's result."""
    _require_isolation(request.app)
    config, body = request.app[CONFIG], await _json_body(request)
    code, stdin = _field(body, "code", str), _field(body, "stdin", str, "")
    if max(len(text.encode("utf-8", "replace")) for text in (code, stdin)) > config.max_source:
        raise PairError("too_large", f"code and stdin may each have {config.max_source} bytes", 413)
    timeout = _field(body, "timeout", (int, float), config.timeout)
    if not (math.isfinite(timeout) and timeout > 0):
        raise PairError("bad_request", "'timeout' must be a positive number of seconds")
    return web.json_response(await request.app[RUNNER].run(
        _field(body, "language", str, "python"), code, stdin, min(timeout, config.max_timeout),
        source=request.remote or ""))


async def languages(request: web.Request) -> web.Response:
    """GET /languages -> what this machine can run, and how runs are isolated."""
    return web.json_response(await request.app[RUNNER].describe())


def _on_execute(room: Room, client: Client, msg: dict, app: web.Application) -> None:
    stdin = _field(msg, "stdin", str, "")
    _require_isolation(app)
    if room.execution["running"]:
        raise PairError("execution_locked", f"{room.execution['clientId']} is running the code")
    room.execution, room.cancel = {"running": True, "clientId": client.id}, asyncio.Event()
    _broadcast(room, _message("execution_lock", locked=True, clientId=client.id))
    app[ROOMS].spawn(_run_in_room(app, room, client, stdin))


def _on_execute_cancel(room: Room, client: Client, msg: dict, app: web.Application) -> None:
    if not room.execution["running"]:
        raise PairError("not_running", "nothing is running in this room")
    room.cancel.set()


async def _run_in_room(app: web.Application, room: Room, client: Client, stdin: str) -> None:
    """Run the room's code, its output to all in batches (OUTPUT_BATCH_SECONDS); always unlock."""
    pending: list[tuple[str, str]] = []

    def flush() -> None:
        for stream, chunks in itertools.groupby(pending, key=lambda chunk: chunk[0]):
            data = "".join(text for _, text in chunks)
            _broadcast(room, _message("execution_output", stream=stream, data=data))
        pending.clear()

    def on_output(stream: str, text: str) -> None:
        if not pending:
            asyncio.get_running_loop().call_later(OUTPUT_BATCH_SECONDS, flush)
        pending.append((stream, text))

    try:
        result = await app[RUNNER].run(room.language, room.code, stdin, app[CONFIG].timeout,
                                       on_output, room.cancel, source=f"room {room.id}")
        flush()
        _broadcast(room, _message("execution_result", clientId=client.id, **result))
    except PairError as e:
        client.send(_message("error", code=e.code, message=e.message))
    finally:
        room.execution = {"running": False, "clientId": None}
        _broadcast(room, _message("execution_lock", locked=False, clientId=client.id))


# ---------------------------------------------------------------------------
# HTTP handlers and the one JSON error path
# ---------------------------------------------------------------------------

def error_response(status: int, code: str, message: str, **headers: str) -> web.Response:
    """The SPEC's error shape: {"error": {"code", "message"}}."""
    return web.json_response({"error": {"code": code, "message": message}},
                             status=status, headers=headers)


_HTTP_CODES = {413: "too_large", 429: "too_busy"}  #: the others are their reason: not_found


@web.middleware
async def error_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Answer every failure as JSON with its status; log the unexpected."""
    try:
        return await handler(request)
    except PairError as e:
        headers = {"Retry-After": str(e.retry_after)} if e.status == 429 else {}
        return error_response(e.status, e.code, e.message, **headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status) or e.reason.lower().replace(" ", "_")
        return error_response(e.status, code, e.reason, **{
            k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")})
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(500, "internal", "the server failed; the error is logged")


def _require_admin(request: web.Request) -> None:
    token, given = request.app[CONFIG].admin_token, request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise PairError("unauthorized", "send 'Authorization: Bearer <admin token>'", 401)


async def create_room(request: web.Request) -> web.Response:
    """POST /rooms {language?, code?} -> 201 {roomId, language, code, version}"""
    body = await _json_body(request, optional=True)
    request.app[ROOM_LIMIT].take(request.remote or "")
    language, code = _field(body, "language", str, "python"), _field(body, "code", str, "")
    room = request.app[ROOMS].create(language, code)
    room.unused = True
    return web.json_response({"roomId": room.id, "language": room.language, "code": room.text,
                              "version": room.version}, status=201, dumps=_dumps)


async def get_room(request: web.Request) -> web.Response:
    """GET /rooms/{roomId} -> the room, its clients and its execution state."""
    room = request.app[ROOMS].get(request.match_info["roomId"])
    if room is None:
        raise PairError("room_not_found", "no room has this id", 404)
    return web.json_response(room.describe(), dumps=_dumps)


async def health(request: web.Request) -> web.Response:
    """GET /health -> {status, rooms, connections, uptimeSeconds}"""
    rooms = request.app[ROOMS]
    return web.json_response({"status": "ok", "rooms": len(rooms), "connections": rooms.connections,
                              "uptimeSeconds": round(time.monotonic() - request.app[STARTED], 3)})


async def admin_rooms(request: web.Request) -> web.Response:
    """GET /admin/rooms -> every room, without its text."""
    _require_admin(request)
    return web.json_response({"rooms": [
        {"roomId": r.id, "language": r.language, "version": r.version, "clients": len(r.clients),
         "codeLength": len(r.text), "createdAt": r.created_at, "updatedAt": r.updated_at}
        for r in request.app[ROOMS]]})


async def admin_delete_room(request: web.Request) -> web.Response:
    """DELETE /admin/rooms/{roomId} -> 204; the room's sockets close with 4404."""
    _require_admin(request)
    if not await request.app[ROOMS].delete(request.match_info["roomId"]):
        raise PairError("room_not_found", "no room has this id", 404)
    return web.Response(status=204)


async def page(request: web.Request) -> web.StreamResponse:
    """GET / and GET /editor.js: the page and its editor, gzipped where a .gz lies beside, ETags."""
    name = "editor.js" if request.path.endswith("/editor.js") else "index.html"
    path = Path(request.app[CONFIG].static_dir, name)
    if not path.is_file():
        raise PairError("not_found", "the demo page is not shipped with this server", 404)
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------
# WebSocket: /ws/{roomId}/{clientId}
# ---------------------------------------------------------------------------

async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Join a room: init, then one JSON message per frame until the socket closes."""
    config, rooms = request.app[CONFIG], request.app[ROOMS]
    room_id, client_id = request.match_info["roomId"], request.match_info["clientId"]
    ws = web.WebSocketResponse(heartbeat=config.heartbeat or None, max_msg_size=config.max_message,
                               compress=False)  # per-socket compression would undo encode-once
    await ws.prepare(request)  # accept first, then close with a code a browser can see
    room = rooms.get(room_id)
    old = room.clients.get(client_id) if room else None  # this tab's previous socket, if any
    full = room is not None and old is None and len(room.clients) >= config.max_clients
    for refused, code, reason in (
            (not _origin_allowed(request), CLOSE_FORBIDDEN, b"pages from this origin may not join"),
            (not _CLIENT_ID.match(client_id), CLOSE_BAD_CLIENT, b"clientId: 1-64 of A-Za-z0-9_.-"),
            (room is None, CLOSE_NO_ROOM, b"room not found"),
            (full, CLOSE_FULL, b"room is full")):
        if refused:
            await ws.close(code=code, message=reason)
            return ws

    name, room.unused = request.query.get("name", "")[:64] or client_id, False
    wants_code = request.query.get("full") in ("1", "true")  # the whole text in every code_update
    taken = {c.color for c in room.clients.values()}
    color = old.color if old else next(i for i in itertools.count() if i not in taken)
    client = Client(client_id, name, ws, request.transport, wants_code, config.send_queue, color)
    room.clients[client_id] = client
    if old is not None:  # a reconnecting tab takes its place back; the others see no leave/join
        client.cursor = old.cursor
        rooms.spawn(old.ws.close(code=CLOSE_REPLACED, message=b"replaced"))
        if old.name != name:
            _broadcast(room, _message("rename", clientId=client_id, name=name), skip=client)
    client.send(_message("init", **{**room.describe(), "clientId": client_id, "clients": [
        {**c.describe(), "cursor": c.cursor} for c in room.clients.values()],
        "seq": room.seqs.get(client_id)}))  # the last of this client's updates applied, if any
    if old is None:
        _broadcast(room, _message("user_joined", **client.describe()), skip=client)
    log.info("%s %s room %s", client_id, "rejoined" if old else "joined", room.id)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and room.clients.get(client_id) is client:  # not replaced
                _receive(request.app, room, client, msg.data)
            elif msg.type is WSMsgType.BINARY:
                client.send(_message("error", code="bad_message", message="send text frames"))
    finally:
        if room.clients.get(client_id) is client:
            del room.clients[client_id]
            _broadcast(room, _message("user_left", **client.describe()))
            log.info("%s left room %s", client_id, room.id)
    return ws


def _receive(app: web.Application, room: Room, client: Client, data: str) -> None:
    """Handle one message from a client; a refusal goes back to it alone. Every _on_* handler
    never awaits, so updates apply in the order they arrive; a run is spawned."""
    seq = msg = None
    try:
        with contextlib.suppress(ValueError, RecursionError):  # RecursionError: nested too deep
            msg = json.loads(data)
        if not isinstance(msg, dict):
            raise PairError("bad_message", "a message must be one JSON object")
        seq, kind = msg.get("seq"), msg.get("type")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            raise PairError("bad_message", f"unknown message type {kind!r}")
        handler(room, client, msg, app)
    except PairError as e:
        log.info("refused %s from %s in room %s: %s", e.code, client.id, room.id, e.message)
        fields = {"seq": seq} if seq is not None else {}
        client.send(_message("error", code=e.code, message=e.message, **fields))


def _on_code_update(room: Room, client: Client, msg: dict, app: web.Application) -> None:
    seq = _field(msg, "seq", (int, str), None, code="bad_message")
    listed = "changes" in msg  # else a whole text, whose version may be left out
    version = _field(msg, "version", int, _REQUIRED if listed else None, code="bad_version")
    args = (version, _field(msg, "changes", list, code="bad_change")) if listed \
        else (version, None, _field(msg, "code", str, code="bad_change"))
    try:
        changes = room.apply_update(*args)
    except Stale:
        client.send(_message("resync", version=room.version, code=room.text))
        return
    room.seqs.put(client.id, seq, 100 + len(str(seq)))  # init tells it: was mine applied?
    update = {"type": "code_update", "version": room.version, "clientId": client.id,
              "changes": changes, **({} if seq is None else {"seq": seq})}
    plain, with_code = _frame(_dumps(update)), None
    for other in list(room.clients.values()):
        if other.wants_code:
            with_code = with_code or _frame(_dumps({**update, "code": room.text}))
        other.send(with_code if other.wants_code else plain)


def _on_cursor(room: Room, client: Client, msg: dict, app: web.Application) -> None:
    position, end = _field(msg, "position", int), _field(msg, "selectionEnd", int, None)
    cursor = room.set_cursor(client, position, end)
    shown = {k: v for k, v in cursor.items() if v is not None}
    _broadcast(room, _message("cursor", clientId=client.id, **shown), skip=client)


def _on_rename(room: Room, client: Client, msg: dict, app: web.Application) -> None:
    name = _field(msg, "name", str).strip()
    if not 0 < len(name) <= 64:
        raise PairError("bad_request", "'name' must be 1 to 64 characters")
    client.name = name
    _broadcast(room, _message("rename", clientId=client.id, name=name))


def _on_language(room: Room, client: Client, msg: dict, app: web.Application) -> None:
    room.set_language(_field(msg, "language", str))
    _broadcast(room, _message("language", language=room.language, clientId=client.id))


_HANDLERS: dict[str, Callable[[Room, Client, dict, web.Application], None]] = {
    "code_update": _on_code_update,     # edits, rebased and echoed to everyone
    "cursor": _on_cursor,               # presence, to the others
    "rename": _on_rename,               # a person's new name, to everyone
    "ping": lambda room, client, msg, app: client.send(_message("pong")),  # a page's heartbeat
    "language": _on_language,           # the room's language, to everyone
    "execute": _on_execute,             # run the room's code, output to everyone
    "execute_cancel": _on_execute_cancel,
}


# ---------------------------------------------------------------------------
# Lifecycle and create_app
# ---------------------------------------------------------------------------

async def _close_sockets(app: web.Application) -> None:
    """On shutdown, close every socket with 1001 so clients know to come back."""
    await asyncio.gather(*(c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                           for room in app[ROOMS] for c in list(room.clients.values())))


def create_app(**options: Any) -> web.Application:
    """Build the server as an aiohttp Application; `options` are Config's fields. Nothing
    runs until the app is started, so it can be a sub-app of another."""
    config = Config(**options)
    config.admin_token = config.admin_token or os.environ.get("PAIRSERVER_ADMIN_TOKEN") \
        or secrets.token_urlsafe(24)
    config.db = config.db or os.environ.get("PAIRSERVER_DB", "")
    app = web.Application(middlewares=[error_middleware, guard_middleware],
                          client_max_size=config.max_message)
    app[CONFIG], app[ROOMS], app[STARTED] = config, Rooms(config), time.monotonic()
    app[ROOM_LIMIT] = RateLimit(config.rooms_per_minute, ROOM_BURST)
    app[RUNNER] = runner = Runner(config)
    app[MODULES] = ModuleNames(lambda code, stdin: runner.run("python", code, stdin, LEARN_TIMEOUT,
                                                              source="autocomplete"))
    app.on_shutdown.append(_close_sockets)
    app.cleanup_ctx.extend([_keeping_lifetime, _runner_lifetime])
    app.add_routes([
        web.post("/rooms", create_room),
        web.get("/rooms/{roomId}", get_room),
        web.post("/autocomplete", autocomplete),
        web.post("/execute", execute),
        web.get("/languages", languages),
        web.get("/health", health),
        web.get("/admin/rooms", admin_rooms),
        web.delete("/admin/rooms/{roomId}", admin_delete_room),
        web.get("/ws/{roomId}/{clientId}", websocket),
        web.get("/", page),
        web.get("/editor.js", page),
    ])
    cors = aiohttp_cors.setup(app, defaults={origin: aiohttp_cors.ResourceOptions(
        allow_headers="*", expose_headers="*", allow_methods="*") for origin in config.cors_origin})
    for route in list(app.router.routes()):
        cors.add(route)
    return app


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    """Flags for --port, --log-level and every Config field."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (default: 8765)")
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    parser.add_argument("--log-level", default="INFO", choices=levels,
                        help="what to log (default: INFO: rooms, joins, refusals; never code)")
    for f in fields(Config):
        default = ", ".join(f.default) if isinstance(f.default, tuple) else f.default
        help = f.metadata["help"]
        help += "" if "default" in help else f" (default: {default})"
        kind = {"action": "append"} if isinstance(f.default, tuple) else {"type": type(f.default)}
        parser.add_argument("--" + f.name.replace("_", "-"), help=help, **kind)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the server from the command line until SIGINT or SIGTERM."""
    parser = _parser()
    args = vars(parser.parse_args(argv))
    port = args.pop("port")
    logging.basicConfig(level=args.pop("log_level"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token_made_up = not (args["admin_token"] or os.environ.get("PAIRSERVER_ADMIN_TOKEN"))
    try:
        app = create_app(**{k: v for k, v in args.items() if v is not None})
    except ValueError as e:
        parser.error(str(e))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # a socket each: take all the system allows
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
    try:
        asyncio.run(_serve(app, port, token_made_up))
    except (RuntimeError, OSError) as e:  # bwrap unusable, port taken
        sys.exit(f"pairserver: {e}")


async def _serve(app: web.Application, port: int, show_token: bool) -> None:
    """Serve app until SIGINT or SIGTERM, with a deadline for request headers and a cap on each
    address's connections, so that half-open connections cannot use up the descriptors."""
    config, loop = app[CONFIG], asyncio.get_running_loop()
    loop.set_exception_handler(_once_per_episode(loop.get_exception_handler()))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5,
                           keepalive_timeout=config.header_timeout)  # and unfinished headers
    try:
        await runner.setup()
        _cap_connections(runner.server, config.max_connections_per_address)
        await web.TCPSite(runner, config.host, port).start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(_banner(app, port, show_token), flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def _banner(app: web.Application, port: int, show_token: bool) -> str:
    """What the server says at start: its URL, where rooms are kept, isolation, a made-up token."""
    config = app[CONFIG]
    host = _lan_address() if config.host in ("0.0.0.0", "::", "") else \
        "localhost" if _is_loopback(config.host) else config.host
    kept = f"rooms kept in {config.db}" if config.db else "rooms in memory: they end with it"
    if app[RUNNER].bwrap:
        runs = "runs are isolated (bwrap sandbox)"
    elif config.sandbox == "none":
        runs = "WARNING: runs are NOT isolated: they can read this machine's files and network"
    else:
        runs = "runs are NOT isolated (no working bwrap: apt-get install bubblewrap)" + (
            "" if _is_loopback(config.host) else ", so other machines may not run code")
    token = [f"admin token: {config.admin_token}"] if show_token else []
    return "\n".join([f"pairserver on http://{host}:{port}/  ({kept})", runs, *token])


def _lan_address() -> str:
    """This machine's address on its network (a UDP connect picks a route, sending nothing)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        return s.getsockname()[0]
    return "localhost"


if __name__ == "__main__":
    main()
