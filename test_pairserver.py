"""Tests for pairserver: stories of use through the public interface.

Pure logic (operations, rebasing) is tested directly; everything else through
real HTTP and WebSocket clients against create_app(), and a real server
process where a test needs signals."""

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import random
import re
import signal
import socket
import sqlite3
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings, strategies as st

import pairserver
from pairserver import (ROOMS, Config, PairError, Room, Stale, apply, changes_to_op, compose, create_app,
                        diff_to_op, from_units, invert, op_to_changes, suggest, to_units, transform)

TOKEN = "test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
HERE = Path(__file__).parent


# ---------------------------------------------------------------------------
# Helpers: a room, a client in it, the next message of a kind
# ---------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def server(aiohttp_client):
    """A test client for a fresh app; `server.app` reaches its rooms."""
    return await aiohttp_client(create_app(admin_token=TOKEN, heartbeat=0, rooms_per_minute=0))


async def make_room(server, code="", language="python") -> str:
    resp = await server.post("/rooms", json={"code": code, "language": language})
    assert resp.status == 201
    return (await resp.json())["roomId"]


async def join(server, room_id, client_id, **params):
    """Connect and return (socket, init message)."""
    ws = await server.ws_connect(f"/ws/{room_id}/{client_id}", params=params)
    init = await ws.receive_json(timeout=5)
    assert init["type"] == "init"
    return ws, init


async def two_in_room(server, code=""):
    """A new room with alice and bob connected: (room id, alice's socket, bob's)."""
    room = await make_room(server, code)
    alice, _ = await join(server, room, "alice")
    bob, _ = await join(server, room, "bob")
    return room, alice, bob


async def next_of(ws, kind: str) -> dict:
    """The next message of type `kind`, passing over presence and cursor news."""
    while True:
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data["type"] == kind:
            return data
        assert data["type"] in ("user_joined", "user_left", "cursor"), data


async def edit(ws, version, *changes, seq=None) -> None:
    msg = {"type": "code_update", "version": version,
           "changes": [{"from": f, "to": t, "insert": s} for f, t, s in changes]}
    if seq is not None:
        msg["seq"] = seq
    await ws.send_json(msg)


async def room_text(server, room_id) -> str:
    return (await (await server.get(f"/rooms/{room_id}")).json())["code"]


def replay(text: str, changes: list[dict]) -> str:
    """Apply a SPEC change list as a browser would, on a str of UTF-16 units."""
    for c in changes:
        text = text[:c["from"]] + to_units(c["insert"]) + text[c["to"]:]
    return text


async def expect_error(ws, code: str, seq=None) -> dict:
    err = await next_of(ws, "error")
    assert err["code"] == code, err
    if seq is not None:
        assert err["seq"] == seq
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A pairserver process, its URL and the lines it logs."""

    def __init__(self, proc, port):
        self.proc, self.port, self.url = proc, port, f"http://127.0.0.1:{port}"
        self.log: list[str] = []

    @classmethod
    async def start(cls, *args, port=None, preexec_fn=None):
        port = port or free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "pairserver.py"), "--port", str(port), "--pool", "0", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=preexec_fn)
        server = cls(proc, port)
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"pairserver on" in line, (line, await proc.stderr.read())
        return server

    async def wait_log(self, text: str, seconds: float = 10) -> str:
        """The next logged line holding text."""
        while True:
            line = (await asyncio.wait_for(self.proc.stderr.readline(), seconds)).decode()
            assert line, "the server ended"
            self.log.append(line)
            if text in line:
                return line

    async def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 15)
        self.log += (await self.proc.stderr.read()).decode().splitlines()
        return code


# ---------------------------------------------------------------------------
# Operations: the rebasing rules of the SPEC, checked without I/O
# ---------------------------------------------------------------------------

def op(text, *changes):
    return changes_to_op([{"from": f, "to": t, "insert": s} for f, t, s in changes], len(text))


def test_two_inserts_at_one_place_both_survive_first_applied_first():
    room = Room("r", text="ab")
    room.apply_update(0, [{"from": 1, "to": 1, "insert": "X"}])
    room.apply_update(0, [{"from": 1, "to": 1, "insert": "Y"}])
    assert room.text == "aXYb"


def test_stale_deletion_keeps_text_inserted_inside_and_at_its_edges():
    room = Room("r", text="0123456789")
    room.apply_update(0, [{"from": 5, "to": 5, "insert": "in"}])
    room.apply_update(1, [{"from": 2, "to": 2, "insert": "<"}, {"from": 11, "to": 11, "insert": ">"}])
    assert room.text == "01<234in567>89"
    changes = room.apply_update(0, [{"from": 2, "to": 8, "insert": ""}])  # based on the old text
    assert room.text == "01<in>89"
    assert replay("01<234in567>89", changes) == room.text


def test_overlapping_deletions_and_replacements():
    room = Room("r", text="abcdefgh")
    room.apply_update(0, [{"from": 2, "to": 6, "insert": "XY"}])   # ab XY gh
    room.apply_update(0, [{"from": 4, "to": 8, "insert": "Z"}])    # based on abcdefgh
    assert room.text == "abXYZ"


def test_sequential_changes_compose_each_against_the_previous_result():
    room = Room("r", text="hello")
    room.apply_update(0, [{"from": 5, "to": 5, "insert": " world"}, {"from": 0, "to": 1, "insert": "H"},
                          {"from": 11, "to": 11, "insert": "!"}])
    assert room.text == "Hello world!"


def test_invert_undoes_and_compose_equals_sequence():
    text = "the quick brown fox"
    a = op(text, (4, 9, "slow"), (0, 0, ">"))
    after_a, deleted = apply(text, a)
    b = changes_to_op([{"from": 1, "to": 4, "insert": ""}], len(after_a))
    assert apply(text, compose(a, b))[0] == apply(after_a, b)[0]
    assert apply(after_a, invert(a, deleted))[0] == text


def test_whole_text_update_is_one_change_against_its_base():
    assert diff_to_op("abcdef", "abXYef") == [2, "XY", -2, 2]
    assert diff_to_op("aaaa", "aaaaa") == [4, "a"]
    # both emoji start with the same high surrogate: the change must not cut the pair
    assert diff_to_op(to_units("😀"), to_units("😁")) == [to_units("😁"), -2]
    assert diff_to_op(to_units("x😀"), to_units("x😀😀")) == [3, to_units("😀")]


def test_changes_out_of_range_or_inverted_are_refused():
    room = Room("r", text="abc")
    for bad in ([{"from": 2, "to": 1}], [{"from": 0, "to": 4}], [{"from": -1, "to": 0}],
                [{"from": "0", "to": 1}], [{"from": True, "to": 1}], ["x"], [{"to": 1}],
                [{"from": 0, "to": 0, "insert": 5}]):
        with pytest.raises(PairError) as e:
            room.apply_update(0, bad)
        assert e.value.code == "bad_change"
    assert (room.text, room.version) == ("abc", 0)


def test_old_base_beyond_history_is_stale_and_future_is_refused():
    room = Room("r", text="", history_size=3)
    for i in range(5):
        room.apply_update(i, [{"from": i, "to": i, "insert": "x"}])
    with pytest.raises(Stale):
        room.apply_update(1, [])
    room.apply_update(2, [])  # exactly the oldest base still kept
    with pytest.raises(PairError) as e:
        room.apply_update(99, [])
    assert e.value.code == "bad_version"


def test_history_is_bounded_in_units_as_well_as_count():
    room = Room("r", max_code=100)
    for i in range(50):
        room.apply_update(i, [{"from": 0, "to": len(room.text), "insert": "y" * 90}])
    assert room.history_units <= 4 * 100 and len(room.history) < 50


def test_size_limit_refuses_and_changes_nothing():
    room = Room("r", text="abc", max_code=5)
    with pytest.raises(PairError) as e:
        room.apply_update(0, [{"from": 0, "to": 0, "insert": "123"}])
    assert e.value.code == "too_large" and room.text == "abc" and room.version == 0


def test_emoji_offsets_count_utf16_units():
    room = Room("r", text=to_units("a😀b"))
    assert len(room.text) == 4
    room.apply_update(0, [{"from": 3, "to": 3, "insert": "🎉"}])
    assert room.code == "a😀🎉b"
    for position in (2, 4):  # inside 😀, inside 🎉
        with pytest.raises(PairError) as e:
            room.apply_update(1, [{"from": position, "to": position, "insert": "x"}])
        assert e.value.code == "bad_change"
    with pytest.raises(PairError):  # half a pair inserted
        room.apply_update(1, [{"from": 0, "to": 0, "insert": "\ud83d"}])
    with pytest.raises(PairError):  # a second change that splits the first one's emoji
        room.apply_update(1, [{"from": 0, "to": 0, "insert": "🙂"}, {"from": 1, "to": 1, "insert": "x"}])
    assert room.code == "a😀🎉b"


# Random concurrent editors: every one sends updates based on whatever
# version it last caught up to. Every character is unique, so "no insert is
# lost" is exact: the final text holds every character that was ever inserted,
# except those that some editor saw and deleted.

ALPHABET = [chr(c) for c in range(0x4E00, 0x4E00 + 400)] + [chr(c) for c in range(0x1F300, 0x1F300 + 400)]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_concurrent_updates_converge_and_lose_no_insert(data):
    fresh = iter(ALPHABET)
    initial = "".join(next(fresh) for _ in range(5))
    room = Room("r", text=to_units(initial), history_size=20)
    stream: list[list[dict]] = []                          # changes of versions 1, 2, ...
    views = [[0, room.text] for _ in range(3)]             # each editor's version and text
    inserted, seen_deleted = set(initial), set()
    for _ in range(data.draw(st.integers(1, 25))):
        view = views[data.draw(st.integers(0, 2))]
        if data.draw(st.booleans()):                       # catch up on the stream
            for changes in stream[view[0]:]:
                view[1] = replay(view[1], changes)
            view[0] = len(stream)
            continue
        text, changes, made, unmade = view[1], [], set(), set()
        for _ in range(data.draw(st.integers(1, 2))):
            chars = from_units(text)
            i = data.draw(st.integers(0, len(chars)))
            j = data.draw(st.integers(i, min(len(chars), i + 3)))
            new = "".join(next(fresh) for _ in range(data.draw(st.integers(0, 2))))
            made.update(new)
            unmade.update(chars[i:j])
            start, end = len(to_units(chars[:i])), len(to_units(chars[:j]))
            changes.append({"from": start, "to": end, "insert": new})
            text = text[:start] + to_units(new) + text[end:]
        try:
            stream.append(room.apply_update(view[0], changes))
            inserted |= made
            seen_deleted |= unmade
        except Stale:  # dropped, and its author told so: resync (its edits are the author's to redo)
            view[:] = [room.version, room.text]
    for view in views:
        for changes in stream[view[0]:]:
            view[1] = replay(view[1], changes)
        assert view[1] == room.text                         # everyone converges
    assert set(room.code) == inserted - seen_deleted        # no insert lost, nothing unseen deleted
    assert len(room.code) == len(set(room.code))


def test_huge_updates_are_refused_or_resynced_rather_than_stalling_the_room():
    room = Room("r", text="a" * 20_000)
    with pytest.raises(PairError) as e:
        room.apply_update(0, [{"from": 0, "to": 0, "insert": "x"}] * 10_001)
    assert e.value.code == "too_large" and room.version == 0
    room.apply_update(0, [{"from": i, "to": i, "insert": "x"} for i in range(0, 20_000, 2)])  # 10,000 is fine
    for v in range(1, 25):
        room.apply_update(v, [{"from": i, "to": i, "insert": "y"} for i in range(0, 10_000, 2)])
    with pytest.raises(Stale):  # 10,000 changes rebased over 24 updates of 5,000: answered with resync
        room.apply_update(1, [{"from": i, "to": i, "insert": "z"} for i in range(0, 20_000, 2)])


# ---------------------------------------------------------------------------
# Rooms that survive restarts: real server processes on SQLite and PostgreSQL
# ---------------------------------------------------------------------------

async def type_lines(http, url, room, client_id, lines, version=None):
    """Connect, type each line at the end, wait until each is acknowledged;
    returns the version after the last."""
    ws = await http.ws_connect(f"{url.replace('http', 'ws')}/ws/{room}/{client_id}")
    init = await ws.receive_json(timeout=5)
    version, length = init["version"], len(to_units(init["code"]))
    for i, line in enumerate(lines):
        await edit(ws, version, (length, length, line), seq=i)
        ack = await next_of(ws, "code_update")
        assert ack["clientId"] == client_id and ack["seq"] == i
        version, length = ack["version"], length + len(to_units(line))
    await ws.close()
    return version


def stored_version(db, room) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:  # `with conn` alone leaves it open
        row = conn.execute("SELECT version FROM pairserver_rooms WHERE id = ?", (room,)).fetchone()
    return row[0] if row else -1


def find_postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    candidates = [Path(found).parent] if found else sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    return next((c for c in candidates if (c / "pg_ctl").exists()), None)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of our own in a temporary folder: (URL, pg_ctl command)."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    data, port = Path(tempfile.mkdtemp(prefix="pairserver-pg-")), free_port()  # in /tmp: reachable
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    if as_user:
        shutil.chown(data, "postgres")
    subprocess.run([*as_user, bin_dir / "initdb", "-D", data / "db", "-A", "trust", "-U", "pairserver"],
                   check=True, capture_output=True)
    pg_ctl = [*as_user, bin_dir / "pg_ctl", "-D", data / "db", "-l", data / "db" / "log", "-w",
              "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1"]
    subprocess.run([*pg_ctl, "start"], check=True, capture_output=True)
    yield f"postgresql://pairserver@127.0.0.1:{port}/postgres", pg_ctl
    subprocess.run([*pg_ctl, "stop", "-m", "immediate"], capture_output=True)
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """Where a test's server keeps its rooms: a fresh SQLite file, or a fresh
    table in our PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "rooms.db")
    url, _ = request.getfixturevalue("postgres")
    import asyncpg

    async def clear():
        conn = await asyncpg.connect(url)
        await conn.execute("DROP TABLE IF EXISTS pairserver_rooms")
        await conn.close()
    asyncio.run(clear())
    return url


async def test_rooms_survive_a_graceful_restart_and_versions_continue(db):
    server = await Server.start("--db", db)
    async with aiohttp.ClientSession() as http:
        room = (await (await http.post(f"{server.url}/rooms", json={"code": "# notes\n"})).json())["roomId"]
        version = await type_lines(http, server.url, room, "alice", [f"line {i} 😀\n" for i in range(30)])
        ws = await http.ws_connect(f"{server.url.replace('http', 'ws')}/ws/{room}/carol")
        assert (await ws.receive_json(timeout=5))["type"] == "init"
        await ws.send_json({"type": "language", "language": "python3"})  # kept like an edit
        assert (await next_of(ws, "language"))["language"] == "python3"
        await ws.close()
        assert await server.stop() == 0
        server = await Server.start("--db", db, port=server.port)
        state = await (await http.get(f"{server.url}/rooms/{room}")).json()
        assert state["code"] == "# notes\n" + "".join(f"line {i} 😀\n" for i in range(30))
        assert state["version"] == version == 30 and state["language"] == "python3"
        # both come back and type at once: versions go on, and they converge
        alice = await http.ws_connect(f"{server.url.replace('http', 'ws')}/ws/{room}/alice")
        bob = await http.ws_connect(f"{server.url.replace('http', 'ws')}/ws/{room}/bob")
        for ws in (alice, bob):
            assert (await ws.receive_json(timeout=5))["version"] == 30
        end = len(to_units(state["code"]))
        await asyncio.gather(edit(alice, 30, (end, end, "A")), edit(bob, 30, (0, 0, "B")))
        texts = []
        for ws in (alice, bob):
            text = state["code"]
            for version in (31, 32):
                update = await next_of(ws, "code_update")
                assert update["version"] == version
                text = replay(to_units(text), update["changes"])
            texts.append(from_units(text))
            await ws.close()
        final = (await (await http.get(f"{server.url}/rooms/{room}")).json())["code"]
        assert texts == [final, final] and final.startswith("B# notes") and final.endswith("A")
    assert await server.stop() == 0
    assert "1 rooms restored" in "".join(server.log)


async def test_sqlite_after_sigkill_only_the_last_second_is_lost(tmp_path):
    db = str(tmp_path / "rooms.db")
    server = await Server.start("--db", db)
    async with aiohttp.ClientSession() as http:
        room = (await (await http.post(f"{server.url}/rooms")).json())["roomId"]
        await type_lines(http, server.url, room, "alice", [f"kept {i}\n" for i in range(10)])
        assert await until(lambda: stored_version(db, room) == 10)  # written behind, within a second
        await type_lines(http, server.url, room, "alice", ["maybe lost\n"])
        assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
        server = await Server.start("--db", db, port=server.port)
        state = await (await http.get(f"{server.url}/rooms/{room}")).json()
        assert state["code"].startswith("".join(f"kept {i}\n" for i in range(10)))
        assert state["version"] in (10, 11)
    assert await server.stop() == 0


async def test_a_corrupt_sqlite_file_is_a_clear_startup_error(tmp_path):
    db = tmp_path / "rooms.db"
    db.write_bytes(b"this is not a database, " * 100)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "pairserver.py"), "--port", str(free_port()), "--db", str(db),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode not in (0, None)
    assert f"--db {db}: file is not a database" in err.decode()


async def test_an_unreachable_postgresql_is_a_clear_startup_error():
    pytest.importorskip("asyncpg")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "pairserver.py"), "--port", str(free_port()),
        "--db", f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode not in (0, None) and "--db postgresql://...@127.0.0.1" in err.decode()


async def test_a_nul_is_refused_so_that_it_cannot_stop_the_store_keeping_rooms(aiohttp_client, db):
    server = await aiohttp_client(create_app(db=db))
    refused = await server.post("/rooms", json={"code": "a\0b"})  # PostgreSQL keeps no NUL
    assert refused.status == 400 and (await refused.json())["error"]["code"] == "bad_request"
    room = (await (await server.post("/rooms", json={"code": "kept\n"})).json())["roomId"]
    ws = await server.ws_connect(f"/ws/{room}/alice")
    assert (await ws.receive_json())["type"] == "init"
    for update in ({"changes": [{"from": 0, "to": 0, "insert": "\0"}]}, {"code": "kept\0\n"}):
        await ws.send_json({"type": "code_update", "version": 0, **update})
        assert (await ws.receive_json())["code"] == "bad_change"
    await ws.send_json({"type": "code_update", "version": 0,
                        "changes": [{"from": 5, "to": 5, "insert": "too\n"}]})
    assert (await ws.receive_json())["version"] == 1
    await ws.close()
    await server.close()  # written at the end
    server = await aiohttp_client(create_app(db=db))
    assert (await (await server.get(f"/rooms/{room}")).json())["code"] == "kept\ntoo\n"


async def test_sqlite_failing_mid_session_loses_nothing(tmp_path):
    db = str(tmp_path / "rooms.db")
    server = await Server.start("--db", db)
    async with aiohttp.ClientSession() as http:
        room = (await (await http.post(f"{server.url}/rooms")).json())["roomId"]
        await type_lines(http, server.url, room, "alice", ["before\n"])
        assert await until(lambda: stored_version(db, room) == 1)
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database: every write fails
        await type_lines(http, server.url, room, "alice", [f"during {i}\n" for i in range(5)])
        await server.wait_log("cannot write rooms")
        assert (await http.get(f"{server.url}/health")).status == 200  # still serving from memory
        blocker.execute("ROLLBACK")
        blocker.close()
        await server.wait_log("works again")
        assert stored_version(db, room) == 6
        assert await server.stop() == 0
        assert sum("cannot write rooms" in line for line in server.log) == 1  # once per episode
        server = await Server.start("--db", db, port=server.port)
        state = await (await http.get(f"{server.url}/rooms/{room}")).json()
        assert state["code"] == "before\n" + "".join(f"during {i}\n" for i in range(5))
    assert await server.stop() == 0


async def test_postgresql_restarted_mid_session_loses_nothing(postgres):
    url, pg_ctl = postgres
    server = await Server.start("--db", url)
    async with aiohttp.ClientSession() as http:
        room = (await (await http.post(f"{server.url}/rooms")).json())["roomId"]
        await type_lines(http, server.url, room, "alice", ["before\n"])
        subprocess.run([*pg_ctl, "stop", "-m", "fast"], check=True, capture_output=True)
        await type_lines(http, server.url, room, "alice", [f"during {i}\n" for i in range(5)])
        await server.wait_log("cannot write rooms")
        subprocess.run([*pg_ctl, "start"], check=True, capture_output=True)
        await server.wait_log("works again", seconds=20)
        assert await server.stop() == 0
        server = await Server.start("--db", url, port=server.port)
        state = await (await http.get(f"{server.url}/rooms/{room}")).json()
        assert state["code"] == "before\n" + "".join(f"during {i}\n" for i in range(5))
        assert state["version"] == 6
    assert await server.stop() == 0


@pytest.mark.parametrize("kept", [False, True])
async def test_idle_rooms_expire_from_memory_and_store(aiohttp_client, tmp_path, kept):
    db = str(tmp_path / "rooms.db")
    server = await aiohttp_client(create_app(db=db if kept else "", room_ttl=0.5, pool=0))
    rooms = server.app[ROOMS]
    idle = rooms.create(code="idle")
    busy = rooms.create(code="busy")
    ws, _ = await join(server, busy.id, "alice")  # somebody is in it
    assert await until(lambda: rooms.get(idle.id) is None)
    assert rooms.get(busy.id) is busy
    if kept:
        assert await until(lambda: stored_version(db, busy.id) == 0 and stored_version(db, idle.id) == -1)
    await ws.close()


async def test_rooms_made_over_http_and_never_joined_expire_sooner(aiohttp_client):
    server = await aiohttp_client(create_app(unused_room_ttl=0.5, pool=0, rooms_per_minute=0))
    unused, joined = await make_room(server), await make_room(server)
    ws, _ = await join(server, joined, "alice")
    await ws.close()
    made_by_script = server.app[ROOMS].create(code="for the class")
    assert await until(lambda: server.app[ROOMS].get(unused) is None)
    assert server.app[ROOMS].get(joined) and server.app[ROOMS].get(made_by_script.id)


async def test_one_address_may_make_only_so_many_rooms(aiohttp_client):
    server = await aiohttp_client(create_app(rooms_per_minute=30, pool=0))
    statuses = [(await server.post("/rooms")).status for _ in range(12)]
    assert statuses == [201] * 10 + [429] * 2  # a burst of 10, then one each 2 s
    resp = await server.post("/rooms")
    assert resp.status == 429 and 1 <= int(resp.headers["Retry-After"]) <= 2
    assert (await resp.json())["error"]["code"] == "too_many_requests"
    assert len(server.app[ROOMS]) == 10


async def test_rooms_an_embedding_script_makes_before_start_are_kept(tmp_path):
    db = str(tmp_path / "rooms.db")
    app = create_app(db=db, pool=0)
    room = app[ROOMS].create(code="# team red\n")
    runner = web.AppRunner(app)
    await runner.setup()
    await runner.cleanup()
    assert stored_version(db, room.id) == 0


# ---------------------------------------------------------------------------
# Autocomplete: suggest() directly, and POST /autocomplete
# ---------------------------------------------------------------------------

def complete(code: str, language: str = "python") -> list[tuple[str, str]]:
    """(label, kind) suggested where the | is."""
    cursor = code.index("|")
    answer = suggest(code.replace("|", "", 1), cursor, language)
    return [(s["label"], s["kind"]) for s in answer["suggestions"]]


def labels(code: str, language: str = "python") -> list[str]:
    return [label for label, _ in complete(code, language)]


def test_names_of_every_scope_with_their_kinds():
    code = """import os.path as osp
from collections import OrderedDict as OD
LIMIT = 10
class Shape:
    sides = 0
def outer(alpha, *args, beta=1, **kw):
    gamma = 2
    def inner(delta):
        epsilon = [zeta for zeta in range(delta)]
        return (lambda eta: |)
    return inner
"""
    found = dict(complete(code))
    assert {name: found[name] for name in ("eta", "epsilon", "delta", "gamma", "alpha", "args", "beta",
                                           "kw", "inner", "outer", "Shape", "LIMIT", "osp", "OD")} == {
        "eta": "param", "epsilon": "local", "delta": "param", "gamma": "local", "alpha": "param",
        "args": "param", "beta": "param", "kw": "param", "inner": "function", "outer": "function",
        "Shape": "class", "LIMIT": "global", "osp": "import", "OD": "import"}
    assert found["zeta"] == found["sides"] == "word"  # not names here: a comprehension's, a class body's
    order = labels(code)
    assert order.index("eta") < order.index("delta") < order.index("alpha") < order.index("LIMIT")
    assert complete("x = 1\nle|")[0] == ("len", "builtin")
    assert complete("def f():\n    ret|")[0] == ("return", "keyword")


def test_comprehension_and_class_body_scopes_are_their_own():
    assert labels("values = [it| for item in range(3)]")[0] == "item"
    code = "class Config:\n    debug = False\n    verbose = de|\n    def m(self):\n        return 1\n"
    assert complete(code)[0] == ("debug", "attribute")
    code = "class Config:\n    debug = False\n    def m(self):\n        return de|\n"
    assert ("debug", "attribute") not in complete(code)  # not visible from a method
    code = "class Server:\n    ma|\n" + "    x = 0\n" * 80 + "    def start(self):\n        self.max_size = 5\n"
    assert labels(code)[0] == "max_size"  # in the class body, what its methods set on self


def test_details_tell_signatures_and_sources():
    code = "import json\ndef area(w, h=2):\n    pass\nar"
    details = {s["label"]: s.get("detail") for s in suggest(code, len(code))["suggestions"]}
    assert details["area"] == "def area(w, h=2)"
    code = "import json\nj"
    details = {s["label"]: s.get("detail") for s in suggest(code, len(code))["suggestions"]}
    assert details["json"] == "import json"


def test_self_members_include_inherited_ones_from_the_same_code():
    code = """class Base:
    kind = "base"
    def __init__(self):
        self.size = 1
    def grow(self, by):
        self.size += by
class Box(Base):
    def __init__(self):
        super().__init__()
        self.items = []
    def add(self, item):
        self.|
"""
    found = dict(complete(code))
    assert {k: found[k] for k in ("items", "add", "size", "grow", "kind")} == {
        "items": "attribute", "add": "method", "size": "attribute", "grow": "method", "kind": "attribute"}
    assert labels(code).index("items") < labels(code).index("size")  # its own class before its base


GARAGE = """class Engine:
    power = 1
    def start(self, gear=1):
        pass
class Car:
    wheels: int = 4
    def __init__(self, spare: Engine):
        self.engine, self.spare = Engine(), spare
    def drive(self) -> Engine:
        return self.engine
"""


def test_members_of_what_the_code_builds():
    car = {"wheels", "engine", "spare", "drive"}
    assert car <= set(labels(GARAGE + "car = Car(Engine())\ncar.|")[:5])  # x = Foo() -> x.
    assert labels(GARAGE + "def service(car: Car):\n    car.en|")[0] == "engine"  # annotated
    assert labels(GARAGE + "car = Car(None)\ncar.engine.|")[:2] == ["start", "power"]  # self.x = Foo()
    assert labels(GARAGE + "Car(None).drive().st|")[0] == "start"  # what a method returns
    assert labels(GARAGE + "with Car(None) as car:\n    car.sp|")[0] == "spare"
    later = "def park(car: Car):\n    car.|\n" + GARAGE  # a class defined after the cursor
    assert car <= set(labels(later)[:5])
    assert labels(GARAGE + "car = Car(None)\ncar.engine.start(ge|")[0] == "gear="  # a method's
    assert "append" not in labels(GARAGE + "car = Car(None)\ncar.|")  # known: no guessing
    unknown = labels("def load(found, fp):\n    found.gr|") + labels("def load(fp):\n    fp.readl|")
    assert unknown[:1] == ["group"] and "readlines" in unknown  # unknown: what common types have


async def test_members_of_literals_builtins_and_standard_library_classes(server):
    assert (await suggested(server, 'name = "ada"\nname.up|'))[0] == "upper"
    assert (await suggested(server, "rows = [1]\nrows.app|"))[0] == "append"
    assert "keys" not in await suggested(server, "rows = []\nrows.|")  # a list's, not a dict's
    assert (await suggested(server, "text = str(3)\ntext.zf|"))[0] == "zfill"
    assert (await suggested(server, "with open('f') as fh:\n    fh.readl|"))[:2] == ["readline",
                                                                                    "readlines"]
    code = "import threading\nclass Worker(threading.Thread):\n    def run(self):\n        self.sta|"
    assert (await suggested(server, code))[0] == "start"  # a standard-library base
    assert "close" in await suggested(server, "import io\nio.RawIOBase.cl|")  # a module's class
    code = "import io, socket\nclass Conn(io.FileIO, socket.socket):\n    def f(self):\n        self.fil|"
    assert "fileno" in await suggested(server, code)  # both bases have it, one's with no signature


async def test_keyword_parameters_of_standard_library_functions_and_classes(server):
    assert (await suggested(server, "with open('f', en|"))[0] == "encoding="
    assert (await suggested(server, "print('x', e|"))[0] == "end="
    assert (await suggested(server, "import threading\nthreading.Thread(ta|"))[0] == "target="
    assert (await suggested(server, "import zlib\nzlib.|"))[:1] != []  # posix, zlib: learned too


async def suggested(server, code: str) -> list[str]:
    """The labels POST /autocomplete suggests where the | is."""
    resp = await server.post("/autocomplete", json={"code": code.replace("|", "", 1),
                                                    "cursorPosition": code.index("|")})
    assert resp.status == 200, await resp.text()
    return [s["label"] for s in (await resp.json())["suggestions"]]


async def test_standard_library_module_names_are_learned_in_the_sandbox(server):
    assert (await suggested(server, "import os\nos.getc|"))[0] == "getcwd"
    assert "join" in await suggested(server, "import os.path as osp\nosp.j|")
    assert "loads" in await suggested(server, "import json\njson.lo|")
    assert "md5" in await suggested(server, "import hashlib\nhashlib.m|")  # made as hashlib is imported
    assert {"OrderedDict", "defaultdict", "Counter"} <= set(await suggested(server, "from collections import |"))
    assert "deque" in await suggested(server, "from collections import (\n    Counter,\n    de|")
    assert "sqrt" in await suggested(server, "import math\nmath.sq|")  # a C module
    assert "etree" in await suggested(server, "import xml.|")
    assert "json" in await suggested(server, "import js|")


async def test_nothing_outside_the_standard_library_is_looked_at(server, tmp_path, monkeypatch):
    (tmp_path / "evil_module_xyz.py").write_text("raise SystemExit('imported!')\nSECRET = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "SECRET" not in await suggested(server, "import evil_module_xyz\nevil_module_xyz.S|")
    assert "SECRET" not in await suggested(server, "from evil_module_xyz import |")
    assert "evil_module_xyz" not in sys.modules


async def test_completing_imports_never_runs_a_module_in_the_server():
    server = await Server.start()
    hostile = ["from unittest.__main__.x import ", "from this.x import ", "import this\nthis.",
               "import antigravity\nantigravity.", "from lib2to3.__main__.x import ",
               "import " + ".".join(["os"] * 3000) + " as deep\ndeep."]  # no recursion per dot
    try:
        async with aiohttp.ClientSession(server.url) as http:
            for code in hostile:
                resp = await http.post("/autocomplete", json={"code": code, "cursorPosition": len(code)})
                assert resp.status == 200, code
            assert (await http.get("/health")).status == 200
    finally:
        assert await server.stop() == 0
    printed = (await server.proc.stdout.read()).decode() + "".join(server.log)
    assert "Beautiful is better" not in printed  # this.py's poem, printed where it is imported


def rss_mib(pid: int) -> float:
    """A process's resident memory, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


async def test_hostile_texts_to_complete_neither_stall_nor_bloat_the_server():
    server = await Server.start()
    hostile = ["a" * 52_000, "x = " + "a" * 999_000 + " .", "(" * 999_000, "x\n" * 499_000, "a." * 499_000,
               "from os import (" + "a,\n" * 330_000, '"""' + "\n" * 999_000, "f(" * 400_000 + "\n" * 10]
    big = ["".join(f"def f{i}_{n}(a, b):\n    return a + b * {n}\n" for n in range(16_000)) for i in range(6)]
    try:
        async with aiohttp.ClientSession(server.url) as http:
            before = rss_mib(server.proc.pid)
            for code in hostile + big:
                for cursor in (len(code), len(code) // 2):
                    started = time.monotonic()
                    body = io.BytesIO(json.dumps({"code": code, "cursorPosition": cursor}).encode())
                    resp = await http.post("/autocomplete", data=body, headers=JSON)
                    assert resp.status == 200 and time.monotonic() - started < 2, code[:20]
            grown = rss_mib(server.proc.pid) - before
            assert grown < 200, f"the server grew by {grown:.0f} MiB"  # caches are bounded by bytes
            assert (await http.get("/health")).status == 200
    finally:
        assert await server.stop() == 0


def test_a_word_on_the_line_after_a_from_import_gets_names():
    assert complete("from os import path\npa|")[0] == ("path", "import")  # not os's names: a new line


def test_keywords_where_the_grammar_allows_them():
    typed = lambda code: labels(code + "|")  # noqa: E731 - the cursor at the end
    # after a complete expression only the keywords that may follow one, and first
    assert typed("for item in items:\n    if item i")[:2] == ["is", "in"]  # in ifs, is is commoner
    assert typed("for item i")[0] == "in"
    assert typed("import typing a")[0] == "as"
    assert typed("try:\n    pass\nexcept (KeyError, ValueError) a")[0] == "as"
    assert typed("names = []\nprint(3 not i")[0] == "in"
    assert typed("raise KeyError fr")[0] == "from" and typed("from types i")[0] == "import"
    assert typed("if x is not None a")[0] == "and" and typed("while done is True o")[0] == "or"
    assert typed("ok = (a in (b, c)\n      o")[0] == "or" and typed("x = [a for a in b\n     i")[0] == "in"
    assert typed("print('(')\ni")[0] == "if" and typed("f(a,\n  i")[0] != "in"  # strings, commas
    # at a statement's start: the statement keywords there, return and yield only in a function
    assert typed("def f(rows):\n    r")[:3] == ["rows", "return", "raise"]
    assert "return" not in typed("r") and typed("i")[0] in ("if", "import")
    assert typed("class A:\n    d")[0] == "def"
    sums = "".join(f"    total_{i} = sum(r[{i}] for r in rows)\n" for i in range(6))
    assert typed("def report(rows):\n    invoice = rows[0]\n" + sums + "    i")[0] == "if"  # common
    # a block's continuations after it (except or finally must follow try), break in loops...
    assert typed("try:\n    x = 1\ne")[0] == "except" and "elif" not in typed("x = 1\ne")
    assert typed("if x:\n    y = 1\n# why\n\nel")[:2] == ["elif", "else"]
    assert "else" in typed("for a in b:\n    pass\nel") and "else" not in typed("x = 1\nel")
    assert "continue" in typed("while a:\n    if b:\n        co")
    assert "continue" not in typed("for a in b:\n    def f():\n        co")
    assert "await" in typed("async def f():\n    aw") and "await" not in typed("def f():\n    aw")
    assert typed("match command:\n    c")[0] == "case" and "case" not in typed("c")
    assert typed("def f(x):\n    if not x: r")[0] == "return" and typed("class E(Exception): pa")[0] == "pass"
    assert "return" not in typed("x: r") + typed("if {1: r") + typed("class A: r")  # not a body
    # inside an expression: values, no statement keywords
    assert "return" not in typed("x = r") and typed("x = No")[0] == "None"
    assert "def" not in typed("print(d") and typed("if n")[0] == "not"
    assert typed("def walk(frames):\n    yield fr")[0] == "from" and "from" not in typed("x = fr")
    assert "break" not in typed("total = (a,\n         b")  # a bracket left open on a line above
    assert typed("total = (a,  # the first\n         i")[0] != "in"  # a comment's word ends nothing


def test_keyword_parameters_inside_a_call():
    code = "def connect(host, port=80, *, timeout=None):\n    pass\nconnect('x', |"
    assert labels(code)[:3] == ["timeout=", "port=", "host="]
    code = "class Server:\n    def __init__(self, host, debug=False):\n        pass\nServer(de|"
    assert labels(code)[0] == "debug="
    code = "def connect(host, /, port=80, *, timeout=None):\n    pass\ndef main(tries):\n    "
    assert labels(code + "connect('x', |")[:2] == ["timeout=", "port="]  # host is positional-only
    # after a keyword argument a name alone would not parse: the call is read all the same
    assert labels(code + "connect('x', port=1, t|")[:2] == ["timeout=", "tries"]
    assert labels(code + "options = {'a': 1, tr|")[0] == "tries"  # in a dict's keys, likewise
    assert labels(code + "with connect('x', t|")[0] == "timeout="  # a header with no body yet
    assert labels(code + "hosts = [h for h in connect('x', t|)]")[0] == "timeout="  # comprehension


def test_a_parameter_being_named_is_a_name_the_body_uses_that_nothing_binds():
    body = "):\n    width = default_width\n    return [i for i in items if len(i) < displaywidth]\n"
    assert labels("default_width = 80\ndef columnize(items, d|" + body)[0] == "displaywidth"
    assert labels("default_width = 80\ndef columnize(items, n=d|" + body)[0] == "default_width"
    more = "\n             sep=' '" + body  # a signature going on over the next line: read whole
    assert labels("default_width = 80\ndef columnize(items, d|" + more)[0] == "displaywidth"


@pytest.mark.parametrize("code, want", [
    ("def f(count):\n    total = (count +\n    to|", "total"),                # an unclosed bracket
    ("value = 3\nif val|", "value"),                                          # a line half typed
    ("value = 3\nif value > 2\n    result = 1\nres|", "result"),             # if without its colon
    ("text = '''never closed\nname = 1\ndef g(param):\n    return pa|", "param"),  # unterminated string
    ("def broken(:\n    pass\nanswer = 42\nans|", "answer"),                # a bad line elsewhere
    ("def go(*, timeout=None):\n    delims = ' \\'(['\n    go(t|", "timeout="),  # \' in a string
])
def test_broken_code_still_gets_the_names_at_the_cursor(code, want):
    assert labels(code)[0] == want


def test_prose_in_a_docstring_is_not_taken_for_a_definition():
    prose = "".join(f"and so on, page {i}\n" for i in range(12))  # more lines than _mend mends
    code = f'"""Servers.\n\nclass will be deaf while a request waits\n{prose}"""\nLIMIT = 3\n'
    assert complete(code + "\n\ndef f():\n    return LIM|")[0] == ("LIMIT", "global")
    code = 'def main(argv):\n    """Usage:\ntool [options]\n"""\n    return ar|'  # text at column 0
    assert complete(code)[0] == ("argv", "param")


def test_code_the_parser_warns_about_is_read_and_warns_nobody():
    code = 'import re\n\ndef f():\n    digits = re.compile("\\d+")\n    odd = 1if digits else 2\n    return '
    found = complete(code + "di|") + complete(code + "od|")  # warnings are errors here (pytest.ini)
    assert ("digits", "local") in found and ("odd", "local") in found
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        complete(code + "od|")
    assert not warned  # Python 3.12 printed "\d" on the server's stderr at every keystroke


def test_ranking_prefix_case_then_fuzzy_then_nearness():
    order = labels("Total = 1\ntotal_sum = 2\nto_do = 3\nt_o = 4\nto|")
    assert order.index("to_do") < order.index("Total") < order.index("t_o")  # prefix, any case, fuzzy
    code = "alpha_far = 1\n" + "x = 0\n" * 80 + "alpha_near = 2\nprint(alpha_near)\nal|"
    assert labels(code)[:2] == ["alpha_near", "alpha_far"]
    assert "unique_word_typed" not in labels("x = 1\nunique_word_typed|")  # found nowhere else
    assert len(labels("|")) == 50
    assert labels("Sy|")[:4] == ["SystemExit", "SyntaxError", "SystemError", "SyntaxWarning"]  # shorter
    code = ("class Pool:\n    def __init__(self, size):\n        self._|\n"
            "    def grow(self):\n        self._ready = self._total = 0\n        self._size = 1\n")
    assert labels(code)[0] == "_size"  # `_size` is used where `size` is: self._size = size
    assert labels("class Thread:\n    pass\nclass ThreadPool(Thr|")[0] == "Thread"  # not itself
    assert labels("def f(lines):\n    for line in l|")[0] == "lines"  # not the loop's own name
    code = "def go(get_info, gin, ginger):\n    "  # `x = |` ranks first a name holding x, else nearness
    assert labels(code + "info = g|")[0] == "get_info" and labels(code + "x = g|")[0] == "ginger"
    code = "def load(stream):\n    text = stream.getvalue()\n    return g|"  # getvalue: only after a dot
    assert labels(code)[:3] == ["getattr", "globals", "getvalue"]


def test_words_above_the_cursor_are_read_as_code_below_a_long_docstring():
    # Words are read from 8,000 characters above the cursor, which here falls inside the docstring.
    prose = '"""Notes.\n' + "rarely read rubric\n" * 600 + '"""\n'
    code = prose + 'def setup():\n    """Ready."""\n    return ready_record\n\n\ndef f():\n    """Go."""\n    r|'
    found = labels(code)
    assert "ready_record" in found and not {"rarely", "rubric"} & set(found)


def test_other_languages_get_the_words_of_the_text():
    found = complete("fn main() { let counter = 1; let count = 2; cou| }", "rust")
    assert found[:2] == [("count", "word"), ("counter", "word")]


async def test_autocomplete_over_http_counts_utf16_units(server):
    code = "emoji = '😀'\nem"
    resp = await server.post("/autocomplete", json={"code": code, "cursorPosition": len(to_units(code)),
                                                    "language": "python"})
    body = await resp.json()
    assert resp.status == 200 and body["suggestions"][0] == {"label": "emoji", "kind": "global",
                                                              "detail": "line 1"}
    assert (body["from"], body["to"]) == (len(to_units(code)) - 2, len(to_units(code)))


@pytest.mark.parametrize("body", [
    {"code": "abc", "cursorPosition": 4},
    {"code": "abc", "cursorPosition": -1},
    {"code": "😀", "cursorPosition": 1},          # inside the emoji's surrogate pair
    {"code": "abc", "cursorPosition": "1"},
    {"code": 5, "cursorPosition": 0},
    {"cursorPosition": 0},
    {"code": "", "cursorPosition": 0, "language": 3},
])
async def test_autocomplete_refuses_bad_input(server, body):
    resp = await server.post("/autocomplete", json=body)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"


async def test_autocomplete_refuses_huge_code(aiohttp_client):
    server = await aiohttp_client(create_app(max_code=100))
    resp = await server.post("/autocomplete", json={"code": "x" * 101, "cursorPosition": 0})
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"


def test_a_modules_own_dunders():
    assert labels("if __na|")[0] == "__name__" and labels("__al|")[0] == "__all__"


def test_a_class_longer_than_what_is_read_after_the_cursor_is_read_up_to_a_method():
    method = "    def m{}(self):\n        try:\n            pass\n        except OSError:\n            raise\n"
    code = "class Big:\n    def first(self):\n        total = 1\n        return tot|\n" \
        + "        totals = 2\n" * 5  # the text read ends after an `except ...:`, mid-statement
    found = complete(code + "".join(method.format(i) for i in range(400)))
    assert ("totals", "local") in found  # read up to the last method it holds: the class parses


def test_a_window_begun_inside_a_long_docstring_starts_at_the_next_definition():
    code = 'def first():\n    """' + "text line\n" * 7000 + '    """\n\n\ndef second(value):\n'
    assert complete(code + '    """Doc."""\n    return val|')[0] == ("value", "param")


async def test_a_huge_text_to_complete_does_not_stall_the_server(aiohttp_client):
    server = await aiohttp_client(create_app(pool=0))
    code = "value = 1\n" * 90_000 + "val"
    asking = asyncio.ensure_future(server.post("/autocomplete", json={"code": code, "cursorPosition": len(code)}))
    for _ in range(3):
        started = time.monotonic()
        assert (await server.get("/health")).status == 200
        assert time.monotonic() - started < 0.5
    resp = await asking
    assert resp.status == 200 and (await resp.json())["suggestions"][0]["label"] == "value"


# ---------------------------------------------------------------------------
# Running code: POST /execute, GET /languages, and runs in a room
# ---------------------------------------------------------------------------

BWRAP = shutil.which("bwrap")
needs_bwrap = pytest.mark.skipif(not BWRAP, reason="bwrap is not installed (apt-get install bubblewrap)")
NODE = shutil.which("node")


async def run(server, code, **fields) -> dict:
    resp = await server.post("/execute", json={"code": code, **fields})
    assert resp.status == 200, await resp.text()
    return await resp.json()


def host_processes(marker: str) -> list[int]:
    """Pids on this machine whose command line holds marker."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


async def until(condition, seconds=5.0) -> bool:
    """Poll a condition that no event announces (the kernel tearing down a
    namespace) until it holds or the time is up."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_languages_says_what_runs_here_and_how(server):
    body = await (await server.get("/languages")).json()
    names = {lang["name"]: lang for lang in body["languages"]}
    assert names["python"]["version"] == platform.python_version()
    assert ("javascript" in names) == bool(NODE)
    assert body["sandbox"] == ("bwrap" if BWRAP else "rlimits")


async def test_output_exit_codes_stdin_and_tracebacks(server):
    # Each print waits until the server has read it (FIONREAD: bytes still in the pipe),
    # so the order is the program's and not a race between two pipes.
    result = await run(server, """import fcntl, struct, sys, termios
def say(text, stream):
    print(text, file=stream)
    while struct.unpack('i', fcntl.ioctl(stream, termios.FIONREAD, b'0000'))[0]:
        pass
say('out', sys.stdout); say('err', sys.stderr); say('out2', sys.stdout)""")
    assert result["output"] == "out\nerr\nout2\n"  # the program's order
    assert (result["stdout"], result["stderr"]) == ("out\nout2\n", "err\n")
    assert result["exitCode"] == 0 and not result["timedOut"] and not result["truncated"]
    assert 0 < result["durationMs"] < 5000
    assert (await run(server, "raise SystemExit(3)"))["exitCode"] == 3
    result = await run(server, "def f():\n    1/0\nf()")
    assert result["exitCode"] == 1
    assert result["stderr"].startswith('Traceback (most recent call last):\n  File "main.py", line 3')
    assert "ZeroDivisionError" in result["stderr"] and "<string>" not in result["stderr"]
    assert (await run(server, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))["exitCode"] == -9
    assert (await run(server, "print(input()[::-1], input())", stdin="olleh\nwörld 😀\n"))["output"] \
        == "hello wörld 😀\n"
    result = await run(server, "input()")  # no stdin: EOF at once, never a hang
    assert result["exitCode"] == 1 and "EOFError" in result["stderr"]
    result = await run(server, "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe end')")
    assert result["output"] == "ok \ufffd\ufffd end"


@pytest.mark.skipif(not NODE, reason="node is not on PATH")
async def test_javascript_runs_when_node_is_installed(server):
    result = await run(server, "const x = [1, 2, 3];\nconsole.log(x.map(n => n * 2).join(' '));"
                               "\nconsole.error('oops'); process.exit(4)", language="javascript")
    assert result["stdout"] == "2 4 6\n" and result["stderr"] == "oops\n" and result["exitCode"] == 4


async def test_an_infinite_loop_times_out_and_the_server_stays_responsive(server):
    running = asyncio.ensure_future(run(server, "while True: pass", timeout=2))
    for _ in range(5):  # health answers while the loop spins
        started = time.monotonic()
        assert (await server.get("/health")).status == 200
        assert time.monotonic() - started < 0.5
    result = await running
    assert result["timedOut"] and result["exitCode"] == -9
    assert 2000 <= result["durationMs"] < 3500


async def test_a_print_flood_is_truncated_and_server_memory_stays_bounded(server):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = await run(server, "while True: print('x' * 999)")
    assert result["truncated"] and not result["timedOut"] and result["exitCode"] == -9
    assert 60_000 < len(result["output"].encode()) <= 64 * 1024
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20_000  # KiB


async def test_a_memory_bomb_is_stopped_by_the_memory_limit(server):
    result = await run(server, "blocks = []\nwhile True: blocks.append(bytearray(50 << 20))", timeout=20)
    assert not result["timedOut"] and result["durationMs"] < 10_000
    assert result["exitCode"] != 0 and ("MemoryError" in result["stderr"] or result["exitCode"] == -9)


@needs_bwrap
async def test_a_fork_bomb_and_a_new_session_child_leave_nothing_behind(aiohttp_client):
    server = await aiohttp_client(create_app(pool=0))
    marker = f"pairserver-test-{os.getpid()}-{random.getrandbits(32)}"
    escapee = ("import subprocess, sys\n"
               f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'],"
               " start_new_session=True)\nprint('left a child behind')")
    assert (await run(server, escapee))["output"] == "left a child behind\n"
    bomb = ("import os, sys\nwhile True:\n    try:\n        if os.fork() == 0:\n"
            f"            os.execv(sys.executable, [sys.executable, '-c', 'while True: pass', '{marker}'])\n"
            "    except OSError:\n        pass")
    result = await run(server, bomb, timeout=2)
    assert result["exitCode"] == -9  # the timeout, or the memory limit of all the processes together
    assert await until(lambda: not host_processes(marker)), host_processes(marker)
    assert (await server.get("/health")).status == 200


def children() -> set[int]:
    """Pids of this process's children: interpreters a Runner started and did not reap."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.add(int(stat.parent.name))
    return found


async def test_stopping_kills_the_run_refuses_the_waiting_and_starts_nothing_after():
    before = children()
    runner = pairserver.Runner(Config(max_runs=1, pool=1))
    await runner.start()
    going = asyncio.Event()
    running = asyncio.ensure_future(runner.run("python", "print('go', flush=True)\nwhile 1: pass",
                                               timeout=30, on_output=lambda *_: going.set(), source="a"))
    waiting = asyncio.ensure_future(runner.run("python", "print('late')", source="b"))
    await going.wait()
    await runner.stop()
    assert (await running)["exitCode"] == -9
    with pytest.raises(PairError) as refused:  # not started once the server stops
        await waiting
    assert refused.value.status == 503 and refused.value.code == "cannot_run"
    # The runs' ends would refill the pools: an interpreter spawned then would be forked by now
    # (its task was scheduled before this one woke), and would outlive the stopped runner.
    assert children() <= before


@needs_bwrap
async def test_the_sandbox_hides_the_host_the_server_and_the_network(server, tmp_path, monkeypatch):
    home = os.path.expanduser("~")
    secret = tmp_path / "secret.txt"
    secret.write_text("the database password")
    monkeypatch.setenv("PAIRSERVER_TEST_SECRET", "hunter2")
    code = f"""import os, socket
for path in [{str(secret)!r}, {str(HERE / 'pairserver.py')!r}, '/etc/passwd']:
    print(path, os.path.exists(path))
print(os.path.exists({home!r}) and os.listdir({home!r}))
print(sorted(os.environ))
print(os.getcwd(), os.listdir('.'), os.getuid())
try:
    socket.create_connection(('127.0.0.1', {server.port}), timeout=2)
    print('connected')
except OSError as e:
    print('no network')
"""
    lines = (await run(server, code))["output"].splitlines()
    assert lines[:3] == [f"{secret} False", f"{HERE / 'pairserver.py'} False", "/etc/passwd False"]
    # the home folder is absent, or holds only the way to the interpreter bound read-only
    interpreter = os.path.realpath(sys.executable)
    inside = Path(interpreter).relative_to(home).parts[:1] if interpreter.startswith(home) else None
    assert lines[3] == (str(list(inside)) if inside else "False")
    assert "PAIRSERVER_TEST_SECRET" not in lines[4] and "hunter2" not in lines[4]
    assert lines[5] == "/work ['main.py'] 65534" and lines[6] == "no network"
    # the run's files vanish with it
    await run(server, "open('keep.txt', 'w').write('x')")
    assert (await run(server, "import os; print(sorted(os.listdir('.')))"))["output"] == "['main.py']\n"


@needs_bwrap
@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="no seccomp filter here")
async def test_the_sandbox_makes_only_unix_and_inet_sockets(server):
    code = """import ctypes, errno, os, socket
for name, kind in [("AF_VSOCK", socket.SOCK_STREAM), ("AF_NETLINK", socket.SOCK_RAW),
                   ("AF_PACKET", socket.SOCK_RAW), ("AF_UNIX", socket.SOCK_STREAM),
                   ("AF_INET", socket.SOCK_STREAM), ("AF_INET6", socket.SOCK_DGRAM)]:
    try:
        socket.socket(getattr(socket, name), kind).close()
        print(name, "made")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
print("socketpair", len(socket.socketpair()))
libc = ctypes.CDLL(None, use_errno=True)
print("io_uring_setup", libc.syscall(425, 1, None), errno.errorcode[ctypes.get_errno()])
"""
    assert (await run(server, code))["output"].splitlines() == [
        "AF_VSOCK EAFNOSUPPORT", "AF_NETLINK EAFNOSUPPORT", "AF_PACKET EAFNOSUPPORT",
        "AF_UNIX made", "AF_INET made", "AF_INET6 made", "socketpair 2", "io_uring_setup -1 ENOSYS"]


async def test_without_bwrap_runs_keep_limits_and_a_cleared_environment(aiohttp_client, monkeypatch):
    monkeypatch.setenv("PAIRSERVER_TEST_SECRET", "hunter2")
    server = await aiohttp_client(create_app(sandbox="none", pool=1))
    assert (await (await server.get("/languages")).json())["sandbox"] == "rlimits"
    result = await run(server, "import os; print(sorted(os.environ), os.getcwd())")
    names, cwd = result["output"].rsplit(" ", 1)
    assert "PAIRSERVER_TEST_SECRET" not in names and "pairserver-run-" in cwd
    assert await until(lambda: not os.path.exists(cwd.strip()))  # its folder is removed
    assert (await run(server, "while True: pass", timeout=1))["timedOut"]


async def test_sandbox_bwrap_without_bwrap_is_a_startup_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValueError, match="bwrap is not installed"):
        create_app(sandbox="bwrap")


@pytest.mark.parametrize("body, status, code", [
    ({"code": "1", "language": "cobol"}, 400, "unsupported_language"),
    ({"code": 1}, 400, "bad_request"),
    ({}, 400, "bad_request"),
    ({"code": "1", "timeout": 0}, 400, "bad_request"),
    ({"code": "1", "timeout": -1}, 400, "bad_request"),
    ({"code": "1", "timeout": "5"}, 400, "bad_request"),
    ({"code": "1", "timeout": True}, 400, "bad_request"),
    ({"code": "1", "stdin": 5}, 400, "bad_request"),
])
async def test_execute_refuses_bad_requests(server, body, status, code):
    resp = await server.post("/execute", json=body)
    assert resp.status == status and (await resp.json())["error"]["code"] == code


async def test_execute_refuses_code_or_stdin_over_the_size_limit(aiohttp_client):
    server = await aiohttp_client(create_app(max_source=100))
    for body in ({"code": "x" * 101}, {"code": "é" * 51}, {"code": "1", "stdin": "x" * 101}):
        resp = await server.post("/execute", json=body)
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"
    assert (await run(server, "print(1)" + " " * 92))["output"] == "1\n"


async def test_execute_refuses_a_non_finite_timeout(server):
    resp = await server.post("/execute", data=b'{"code": "1", "timeout": 1e999}', headers=JSON)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"


async def test_a_timeout_above_the_maximum_is_clamped(aiohttp_client):
    server = await aiohttp_client(create_app(max_timeout=1))
    result = await run(server, "while True: pass", timeout=60)
    assert result["timedOut"] and result["durationMs"] < 2500


async def test_thirty_concurrent_runs_are_each_answered(aiohttp_client):
    server = await aiohttp_client(create_app(max_runs=2, max_queue=4))
    responses = await asyncio.gather(*(server.post("/execute", json={"code": f"print({i})"})
                                       for i in range(30)))
    statuses = sorted(r.status for r in responses)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
    for i, resp in enumerate(responses):
        body = await resp.json()
        if resp.status == 200:
            assert body["output"] == f"{i}\n"
        else:
            assert body["error"]["code"] == "too_busy" and resp.headers["Retry-After"]


async def test_one_client_flooding_runs_cannot_lock_a_room_out(aiohttp_client):
    server = await aiohttp_client(create_app(max_runs=1, max_queue_per_source=2))
    flood = [asyncio.ensure_future(server.post("/execute", json={"code": "import time; time.sleep(1)"}))
             for _ in range(6)]
    assert await until(lambda: sum(f.done() for f in flood) == 3)  # 1 running, 2 waiting, 3 refused
    refused = [await f.result().json() for f in flood if f.done()]
    assert all(r["error"]["code"] == "too_busy" for r in refused)
    room = await make_room(server, "print('our turn')")
    alice, _ = await join(server, room, "alice")
    await alice.send_json({"type": "execute"})
    assert (await next_run_messages(alice))[-2]["output"] == "our turn\n"
    waiting = [f for f in flood if not f.done()]
    assert len(waiting) == 2  # the room ran right after the flood's first run
    assert all(r.status == 200 for r in await asyncio.gather(*waiting))
    await alice.close()


async def next_run_messages(ws) -> list[dict]:
    """Messages of one run, from the lock to the unlock."""
    messages = []
    while not messages or messages[-1] != {"type": "execution_lock", "locked": False,
                                           "clientId": messages[0]["clientId"]}:
        msg = await ws.receive_json(timeout=10)
        if msg["type"].startswith("execution_"):
            messages.append(msg)
    return messages


async def test_a_run_in_a_room_streams_to_everyone(server):
    room = await make_room(server, "import time\nprint('start', flush=True)\ntime.sleep(0.3)\n"
                                   "print(input())\n")
    alice, _ = await join(server, room, "alice")
    bob, _ = await join(server, room, "bob")
    await next_of(alice, "user_joined")
    await alice.send_json({"type": "execute", "stdin": "from stdin\n"})
    for ws in (alice, bob):
        messages = await next_run_messages(ws)
        assert messages[0] == {"type": "execution_lock", "locked": True, "clientId": "alice"}
        outputs = [m for m in messages if m["type"] == "execution_output"]
        assert outputs[0] == {"type": "execution_output", "stream": "stdout", "data": "start\n"}
        assert "".join(m["data"] for m in outputs) == "start\nfrom stdin\n"
        result = messages[-2]
        assert result["type"] == "execution_result" and result["clientId"] == "alice"
        assert result["output"] == "start\nfrom stdin\n" and result["exitCode"] == 0
        assert result["cancelled"] is False
    state = await (await server.get(f"/rooms/{room}")).json()
    assert state["execution"] == {"running": False, "clientId": None}
    for ws in (alice, bob):
        await ws.close()


async def test_a_second_run_is_refused_while_one_runs_and_cancel_stops_it(server):
    room, alice, bob = await two_in_room(server, "print('looping', flush=True)\nwhile True: pass\n")
    await alice.send_json({"type": "execute"})
    assert (await next_of(bob, "execution_lock"))["locked"] is True
    state = await (await server.get(f"/rooms/{room}")).json()
    assert state["execution"] == {"running": True, "clientId": "alice"}
    await bob.send_json({"type": "execute"})
    assert (await expect_error(bob, "execution_locked"))["message"].startswith("alice")
    assert (await next_of(bob, "execution_output"))["data"] == "looping\n"
    await bob.send_json({"type": "execute_cancel"})  # anyone in the room may stop it
    result = await next_of(bob, "execution_result")
    assert result["cancelled"] is True and result["exitCode"] == -9 and not result["timedOut"]
    assert await next_of(bob, "execution_lock") == {"type": "execution_lock", "locked": False,
                                                    "clientId": "alice"}
    await bob.send_json({"type": "execute_cancel"})
    await expect_error(bob, "not_running")
    for ws in (alice, bob):
        await ws.close()


async def test_the_lock_is_released_when_the_starter_disconnects(server):
    room, alice, bob = await two_in_room(server, "import time\ntime.sleep(0.5)\nprint('done')\n")
    await alice.send_json({"type": "execute"})
    assert (await next_of(bob, "execution_lock"))["locked"] is True
    await alice.close()
    assert (await next_of(bob, "execution_output"))["data"] == "done\n"
    assert (await next_of(bob, "execution_result"))["output"] == "done\n"
    assert (await next_of(bob, "execution_lock"))["locked"] is False
    await bob.send_json({"type": "execute"})  # the room is free again
    messages = await next_run_messages(bob)
    assert messages[0]["clientId"] == "bob" and messages[-2]["output"] == "done\n"
    await bob.close()


async def test_a_run_in_an_unsupported_language_is_refused_and_unlocked(server):
    room = await make_room(server, "main = putStrLn 1", language="haskell")
    alice, _ = await join(server, room, "alice")
    await alice.send_json({"type": "execute"})
    assert (await next_of(alice, "execution_lock"))["locked"] is True
    await expect_error(alice, "unsupported_language")
    assert (await next_of(alice, "execution_lock"))["locked"] is False
    await alice.close()


# ---------------------------------------------------------------------------
# REST
# ---------------------------------------------------------------------------

async def test_create_and_get_a_room(server):
    resp = await server.post("/rooms", json={"language": "python", "code": "x = '😀'\n"})
    assert resp.status == 201
    made = await resp.json()
    assert made["code"] == "x = '😀'\n" and made["version"] == 0 and made["language"] == "python"
    assert len(made["roomId"]) >= 11  # 128 random bits, URL-safe
    room = await (await server.get(f"/rooms/{made['roomId']}")).json()
    assert room["clients"] == [] and room["execution"] == {"running": False, "clientId": None}
    assert room["createdAt"].endswith("Z") and room["code"] == made["code"]


async def test_the_page_and_its_editor_are_served_compressed_and_revalidated(server):
    page = await server.get("/")
    assert page.status == 200 and "<script type=\"module\">" in await page.text()
    resp = await server.get("/editor.js", headers={"Accept-Encoding": "gzip"})
    assert resp.status == 200 and resp.headers["Content-Encoding"] == "gzip"
    assert "javascript" in resp.headers["Content-Type"] and resp.headers["Cache-Control"] == "no-cache"
    assert await resp.read() == (HERE / "static" / "editor.js").read_bytes()
    again = await server.get("/editor.js", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304


def test_the_editor_bundle_is_what_its_lock_file_builds(tmp_path):
    """static/editor.js is committed so that nobody builds it; this rebuilds it
    with the command beside it from what `npm ci` installed, and compares."""
    static = HERE / "static"
    if not (static / "node_modules" / ".bin" / "esbuild").exists():
        pytest.skip("run `npm ci` in static/ first (.ci/run does)")
    work = tmp_path / "static"
    work.mkdir()
    for name in ("editor-entry.js", "package.json"):
        shutil.copy(static / name, work)
    (work / "node_modules").symlink_to(static / "node_modules")
    subprocess.run(["npm", "run", "--silent", "build"], cwd=work, check=True, capture_output=True)
    for name in ("editor.js", "editor.js.gz"):
        assert (work / name).read_bytes() == (static / name).read_bytes(), f"{name} differs: npm run build"


async def test_create_room_without_body_and_ids_are_unguessable(server):
    ids = set()
    for _ in range(20):
        resp = await server.post("/rooms")
        body = await resp.json()
        assert resp.status == 201 and body["language"] == "python" and body["code"] == ""
        ids.add(body["roomId"])
    assert len(ids) == 20


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "bad_json"),
    (b"[1, 2]", 400, "bad_json"),
    (b'{"code": 5}', 400, "bad_request"),
    (b'{"language": "Python 3!"}', 400, "bad_request"),
    (b'{"language": null}', 400, "bad_request"),
    (b'{"code": "\\ud83d"}', 400, "bad_request"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "bad_json"),
    (b"\xff\xfe", 400, "bad_json"),
])
async def test_create_room_refuses_bad_bodies(server, body, status, code):
    resp = await server.post("/rooms", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code


async def test_limits_on_code_size_body_size_and_room_count(aiohttp_client):
    server = await aiohttp_client(create_app(max_code=10, max_message=1000, max_rooms=2))
    resp = await server.post("/rooms", json={"code": "x" * 11})
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"
    resp = await server.post("/rooms", json={"code": "x" * 2000})
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"
    await make_room(server)
    await make_room(server)
    resp = await server.post("/rooms")
    assert resp.status == 429 and resp.headers["Retry-After"]
    assert (await resp.json())["error"]["code"] == "too_many_rooms"


async def test_unknown_room_path_and_method_are_json_errors(server):
    for resp, status, code in [(await server.get("/rooms/nope"), 404, "room_not_found"),
                               (await server.get("/no/such/path"), 404, "not_found"),
                               (await server.put("/rooms"), 405, "method_not_allowed")]:
        assert resp.status == status and resp.content_type == "application/json"
        assert (await resp.json())["error"]["code"] == code


async def test_health_counts_rooms_and_connections(server):
    room = await make_room(server)
    ws, _ = await join(server, room, "alice")
    health = await (await server.get("/health")).json()
    assert health["status"] == "ok" and health["rooms"] == 1 and health["connections"] == 1
    assert health["uptimeSeconds"] >= 0
    await ws.close()


async def test_admin_needs_the_token(server):
    room = await make_room(server, "secret code")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for resp in (await server.get("/admin/rooms", headers=headers),
                     await server.delete(f"/admin/rooms/{room}", headers=headers)):
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    listed = (await (await server.get("/admin/rooms", headers=ADMIN)).json())["rooms"]
    assert listed == [{"roomId": room, "language": "python", "version": 0, "clients": 0,
                       "codeLength": 11, "createdAt": listed[0]["createdAt"],
                       "updatedAt": listed[0]["updatedAt"]}]


async def test_admin_delete_closes_the_rooms_sockets_with_4404(server):
    room = await make_room(server)
    ws, _ = await join(server, room, "alice")
    resp = await server.delete(f"/admin/rooms/{room}", headers=ADMIN)
    assert resp.status == 204
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4404
    assert (await server.get(f"/rooms/{room}")).status == 404
    assert (await server.delete(f"/admin/rooms/{room}", headers=ADMIN)).status == 404


async def test_cors_lets_a_browser_page_call_the_api(aiohttp_client):
    server = await aiohttp_client(create_app(cors_origin=("https://class.example",)))
    resp = await server.options("/rooms", headers={"Origin": "https://class.example",
                                                   "Access-Control-Request-Method": "POST"})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://class.example"
    resp = await server.get("/health", headers={"Origin": "https://class.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://class.example"
    resp = await server.get("/health", headers={"Origin": "https://elsewhere.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_a_foreign_page_can_neither_call_the_api_nor_join_a_room(aiohttp_client):
    server = await aiohttp_client(create_app(pool=0, rooms_per_minute=0))
    own, evil = {"Origin": f"http://127.0.0.1:{server.port}"}, {"Origin": "https://evil.example"}
    resp = await server.post("/rooms", json={"code": "x = 1"}, headers=own)  # the demo page
    assert resp.status == 201
    room = (await resp.json())["roomId"]
    for resp in [await server.post("/rooms", json={}, headers=evil),
                 await server.post("/execute", json={"code": "print(1)"}, headers=evil),
                 await server.get(f"/rooms/{room}", headers=evil),
                 await server.options("/execute", headers={**evil, "Access-Control-Request-Method": "POST"})]:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden_origin"
    ws = await server.ws_connect(f"/ws/{room}/mallory", headers=evil)
    assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.CLOSE and ws.close_code == 4403
    assert not server.app[ROOMS].get(room).clients
    ws, init = await join(server, room, "alice")  # a script: no Origin
    assert init["code"] == "x = 1"
    await ws.close()


@pytest.mark.parametrize("path, body, content_type", [
    ("/execute", b'{"code": "print(1)"}', "text/plain"),  # what a page may send with no preflight
    ("/rooms", b"code=1", "application/x-www-form-urlencoded"),
    ("/autocomplete", b'{"code": "", "cursorPosition": 0}', "multipart/form-data; boundary=x"),
])
async def test_post_bodies_must_be_json(server, path, body, content_type):
    resp = await server.post(path, data=body, headers={"Content-Type": content_type})
    assert resp.status == 415 and (await resp.json())["error"]["code"] == "unsupported_media_type"


async def test_on_loopback_only_loopback_host_names_are_answered(aiohttp_client):
    server = await aiohttp_client(create_app(pool=0, allow_host=("pair.example",)))
    for host in ("localhost:8765", "127.0.0.1", "[::1]:80", "LocalHost", "pair.example"):
        assert (await server.get("/health", headers={"Host": host})).status == 200, host
    for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example", "192.168.1.5"):
        resp = await server.get("/health", headers={"Host": host})  # a DNS-rebound page's name
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden_host"


async def test_unisolated_runs_are_refused_beyond_loopback_unless_asked_for(aiohttp_client, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap
    server = await aiohttp_client(create_app(host="0.0.0.0", pool=0, rooms_per_minute=0))
    assert (await (await server.get("/languages")).json())["sandbox"] == "rlimits"
    resp = await server.post("/execute", json={"code": "print(1)"})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "runs_not_isolated"
    room, alice, bob = await two_in_room(server, "print(1)")
    await alice.send_json({"type": "execute"})
    assert "bubblewrap" in (await expect_error(alice, "runs_not_isolated"))["message"]
    for ws in (alice, bob):
        await ws.close()
    server = await aiohttp_client(create_app(host="0.0.0.0", pool=0, sandbox="none"))
    assert (await run(server, "print(1)"))["output"] == "1\n"  # asked for: runs, unisolated


async def test_python_api_for_embedding_scripts(aiohttp_client):
    app = create_app()
    rooms = app[ROOMS]
    room = rooms.create(language="python", code="print('starter')\n")
    assert rooms.get(room.id) is room and list(rooms) == [room]
    parent = aiohttp.web.Application()
    parent.add_subapp("/pair/", app)
    server = await aiohttp_client(parent)
    assert (await (await server.get(f"/pair/rooms/{room.id}")).json())["code"] == "print('starter')\n"
    ws = await server.ws_connect(f"/pair/ws/{room.id}/alice")
    assert (await ws.receive_json(timeout=5))["code"] == "print('starter')\n"
    assert await rooms.delete(room.id)
    assert (await ws.receive(timeout=5)).data == 4404
    assert rooms.get(room.id) is None and not await rooms.delete(room.id)


# ---------------------------------------------------------------------------
# WebSocket: joining, presence, cursors, language
# ---------------------------------------------------------------------------

async def test_init_and_presence(server):
    room = await make_room(server, "x = 1\n")
    alice, init = await join(server, room, "alice", name="Alice")
    made = server.app[ROOMS].get(room)
    assert init == {"type": "init", "roomId": room, "clientId": "alice", "version": 0,
                    "code": "x = 1\n", "language": "python",
                    "execution": {"running": False, "clientId": None},
                    "createdAt": made.created_at, "updatedAt": made.updated_at,
                    "clients": [{"clientId": "alice", "name": "Alice", "color": 0, "cursor": None}],
                    "seq": None}  # none of alice's updates applied yet
    bob, init = await join(server, room, "bob")
    assert [c["clientId"] for c in init["clients"]] == ["alice", "bob"]
    assert init["clients"][1]["name"] == "bob"  # name defaults to the clientId
    bob_joined = {"clientId": "bob", "name": "bob", "color": 1}
    assert await alice.receive_json(timeout=5) == {"type": "user_joined", **bob_joined}
    await bob.close()
    assert await alice.receive_json(timeout=5) == {"type": "user_left", **bob_joined}
    room_state = await (await server.get(f"/rooms/{room}")).json()
    assert room_state["clients"] == [{"clientId": "alice", "name": "Alice", "color": 0}]
    await alice.close()


async def test_cursors_go_to_the_others_are_clamped_and_follow_edits(server):
    room, alice, bob = await two_in_room(server, "abcdef")
    await bob.send_json({"type": "cursor", "position": 4, "selectionEnd": 99})
    assert await next_of(alice, "cursor") == {"type": "cursor", "clientId": "bob",
                                               "position": 4, "selectionEnd": 6}
    await bob.send_json({"type": "cursor", "position": 3})
    assert await next_of(alice, "cursor") == {"type": "cursor", "clientId": "bob", "position": 3}
    await edit(alice, 0, (0, 0, "XY"))
    await next_of(alice, "code_update")
    _, init = await join(server, room, "carol")
    assert init["clients"][1]["cursor"] == {"position": 5, "selectionEnd": None}
    await next_of(bob, "code_update")
    await bob.send_json({"type": "cursor", "position": "3"})
    await expect_error(bob, "bad_request")
    for ws in (alice, bob):
        await ws.close()


async def test_everyone_in_a_room_gets_a_colour_of_their_own(server):
    room = await make_room(server)
    people = [await join(server, room, f"p{i}") for i in range(8)]
    assert [c["color"] for c in people[-1][1]["clients"]] == list(range(8))  # well apart on the page
    await people[3][0].close()
    await next_of(people[0][0], "user_left")
    _, init = await join(server, room, "newcomer")  # takes the colour set free
    assert {c["clientId"]: c["color"] for c in init["clients"]}["newcomer"] == 3
    again, init = await join(server, room, "p5")  # a reloaded tab keeps its own
    assert {c["clientId"]: c["color"] for c in init["clients"]}["p5"] == 5
    for ws, _ in people:
        await ws.close()
    await again.close()


async def test_a_rename_reaches_everyone(server):
    room, alice, bob = await two_in_room(server)
    await bob.send_json({"type": "rename", "name": "  Bob B.  "})
    for ws in (alice, bob):
        assert await next_of(ws, "rename") == {"type": "rename", "clientId": "bob", "name": "Bob B."}
    clients = (await (await server.get(f"/rooms/{room}")).json())["clients"]
    assert [c["name"] for c in clients] == ["alice", "Bob B."]
    for bad in ("", "   ", "x" * 65, 7):
        await bob.send_json({"type": "rename", "name": bad})
        await expect_error(bob, "bad_request")
    tab2, _ = await join(server, room, "bob", name="Robert")  # a tab that comes back renamed
    assert await next_of(alice, "rename") == {"type": "rename", "clientId": "bob", "name": "Robert"}
    for ws in (alice, tab2):
        await ws.close()


async def test_a_ping_is_answered_with_a_pong_to_the_sender_alone(server):
    room, alice, bob = await two_in_room(server)
    await alice.send_json({"type": "ping"})
    assert await next_of(alice, "pong") == {"type": "pong"}
    await alice.send_json({"type": "cursor", "position": 0})
    assert (await bob.receive_json(timeout=5))["type"] == "cursor"  # bob got no pong before it
    for ws in (alice, bob):
        await ws.close()


async def test_language_change_reaches_everyone(server):
    room, alice, bob = await two_in_room(server)
    await alice.send_json({"type": "language", "language": "javascript"})
    for ws in (alice, bob):
        assert await next_of(ws, "language") == {"type": "language", "language": "javascript",
                                                 "clientId": "alice"}
    assert (await (await server.get(f"/rooms/{room}")).json())["language"] == "javascript"
    await alice.send_json({"type": "language", "language": "<script>"})
    await expect_error(alice, "bad_request")
    for ws in (alice, bob):
        await ws.close()


@pytest.mark.parametrize("client_id", ["a" * 65, "bad%20id", "é"])
async def test_bad_client_id_is_closed_with_4400(server, client_id):
    room = await make_room(server)
    ws = await server.ws_connect(f"/ws/{room}/{client_id}")
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4400


async def test_unknown_room_is_closed_with_4404(server):
    ws = await server.ws_connect("/ws/nosuchroom/alice")
    assert (await ws.receive(timeout=5)).data == 4404


async def test_full_room_is_closed_with_4429_but_a_member_may_reconnect(aiohttp_client):
    server = await aiohttp_client(create_app(max_clients=2))
    room = await make_room(server)
    a, _ = await join(server, room, "a")
    b, _ = await join(server, room, "b")
    c = await server.ws_connect(f"/ws/{room}/c")
    assert (await c.receive(timeout=5)).data == 4429
    b2, init = await join(server, room, "b")  # takes b's place back
    assert len(init["clients"]) == 2
    for ws in (a, b2):
        await ws.close()


async def test_second_connection_replaces_the_first_without_leave_or_join(server):
    room = await make_room(server)
    alice, _ = await join(server, room, "alice")
    tab1, first = await join(server, room, "bob")
    await next_of(alice, "user_joined")
    await edit(tab1, 0, (0, 0, "sent before reload"), seq=7)
    await next_of(tab1, "code_update")
    tab2, init = await join(server, room, "bob")
    assert first["seq"] is None and init["seq"] == 7  # the last of bob's updates applied: not to resend
    assert init["code"] == "sent before reload"
    msg = await tab1.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4000
    await edit(tab2, 1, (0, 0, ">"))
    for version in (1, 2):  # and no user_left / user_joined between them
        update = await alice.receive_json(timeout=5)
        assert update["type"] == "code_update" and update["version"] == version
    clients = (await (await server.get(f"/rooms/{room}")).json())["clients"]
    assert [c["clientId"] for c in clients] == ["alice", "bob"]
    for ws in (alice, tab2):
        await ws.close()


# ---------------------------------------------------------------------------
# WebSocket: edits
# ---------------------------------------------------------------------------

async def test_an_edit_reaches_everyone_author_included(server):
    room, alice, bob = await two_in_room(server, "print()")
    watcher, _ = await join(server, room, "watcher", full="1")
    await edit(alice, 0, (6, 6, "'hi'"), seq=7)
    expected = {"type": "code_update", "version": 1, "clientId": "alice", "seq": 7,
                "changes": [{"from": 6, "to": 6, "insert": "'hi'"}]}
    assert await next_of(alice, "code_update") == expected
    assert await next_of(bob, "code_update") == expected
    assert await next_of(watcher, "code_update") == {**expected, "code": "print('hi')"}
    assert await room_text(server, room) == "print('hi')"
    for ws in (alice, bob, watcher):
        await ws.close()


async def test_two_clients_typing_at_one_place_at_once_keep_both_texts(server):
    room, alice, bob = await two_in_room(server, "x = \n")
    await asyncio.gather(edit(alice, 0, (4, 4, "'alice'")), edit(bob, 0, (4, 4, "'bob'")))
    texts = []
    for ws in (alice, bob):
        text = "x = \n"
        for _ in range(2):
            update = await next_of(ws, "code_update")
            text = replay(text, update["changes"])
        texts.append(text)
    final = await room_text(server, room)
    assert texts == [final, final]
    assert final in ("x = 'alice''bob'\n", "x = 'bob''alice'\n")
    for ws in (alice, bob):
        await ws.close()


async def test_stale_deletion_over_a_concurrent_insert_keeps_the_insert(server):
    room, alice, bob = await two_in_room(server, "def f():\n    return 1\n")
    await edit(alice, 0, (21, 21, "0"))                   # return 10
    assert (await next_of(bob, "code_update"))["version"] == 1
    await edit(bob, 0, (9, 22, ""), seq="b1")             # bob, still at v0, deletes the body
    assert (await next_of(alice, "code_update"))["version"] == 1
    update = await next_of(alice, "code_update")
    assert update["seq"] == "b1" and update["version"] == 2
    assert update["changes"] == [{"from": 9, "to": 21, "insert": ""}, {"from": 10, "to": 11, "insert": ""}]
    assert await room_text(server, room) == "def f():\n0"
    for ws in (alice, bob):
        await ws.close()


async def test_emoji_offsets_over_the_socket(server):
    room = await make_room(server, "s = '😀'")
    alice, init = await join(server, room, "alice")
    assert init["code"] == "s = '😀'"
    await edit(alice, 0, (7, 7, "🎉"))                     # after the emoji: 5 + 2 units
    update = await next_of(alice, "code_update")
    assert update["changes"] == [{"from": 7, "to": 7, "insert": "🎉"}]
    assert await room_text(server, room) == "s = '😀🎉'"
    await edit(alice, 1, (6, 6, "x"), seq=3)               # between the halves of 😀
    err = await expect_error(alice, "bad_change", seq=3)
    assert "surrogate" in err["message"]
    await alice.close()


async def test_whole_text_updates_with_and_without_a_base_version(server):
    room, alice, bob = await two_in_room(server, "a = 1\nb = 2\n")
    await edit(alice, 0, (0, 0, "# top\n"))
    await next_of(bob, "code_update")
    await next_of(alice, "code_update")
    await bob.send_json({"type": "code_update", "version": 0, "code": "a = 1\nb = 3\n"})
    update = await next_of(alice, "code_update")
    assert update["changes"] == [{"from": 16, "to": 17, "insert": "3"}]
    assert await room_text(server, room) == "# top\na = 1\nb = 3\n"
    await bob.send_json({"type": "code_update", "code": "replaced"})  # last writer wins
    await next_of(alice, "code_update")
    assert await room_text(server, room) == "replaced"
    for ws in (alice, bob):
        await ws.close()


async def test_an_update_that_changes_nothing_still_takes_a_version(server):
    room = await make_room(server, "abc")
    alice, _ = await join(server, room, "alice")
    await edit(alice, 0, (0, 3, ""))
    await edit(alice, 0, (1, 2, ""))                        # its range is gone already
    await next_of(alice, "code_update")
    assert await next_of(alice, "code_update") == {"type": "code_update", "version": 2,
                                                   "clientId": "alice", "changes": []}
    await alice.close()


async def test_an_update_too_old_for_the_history_gets_resync(aiohttp_client):
    server = await aiohttp_client(create_app(history=2))
    room = await make_room(server)
    alice, _ = await join(server, room, "alice")
    for v in range(3):
        await edit(alice, v, (v, v, "x"))
        await next_of(alice, "code_update")
    await edit(alice, 0, (0, 0, "lost"))
    assert await next_of(alice, "resync") == {"type": "resync", "version": 3, "code": "xxx"}
    assert await room_text(server, room) == "xxx"
    await alice.close()


@pytest.mark.parametrize("message, code", [
    ("not json", "bad_message"),
    ("[1]", "bad_message"),
    ('{"type": "dance"}', "bad_message"),
    ('{"seq": 1}', "bad_message"),
    ('{"type": "code_update", "version": 0, "changes": "abc", "seq": 1}', "bad_change"),
    ('{"type": "code_update", "version": 0, "changes": [{"from": 2, "to": 1}], "seq": 1}', "bad_change"),
    ('{"type": "code_update", "version": 0, "changes": [{"from": 0, "to": 9}], "seq": 1}', "bad_change"),
    ('{"type": "code_update", "version": 5, "changes": [], "seq": 1}', "bad_version"),
    ('{"type": "code_update", "version": "0", "changes": [], "seq": 1}', "bad_version"),
    ('{"type": "code_update", "changes": [], "seq": 1}', "bad_version"),
    ('{"type": "code_update", "version": 0, "code": 7, "seq": 1}', "bad_change"),
    ('{"type": "code_update", "version": 0, "changes": [], "seq": [1]}', "bad_message"),
    ("[" * 100_000 + "]" * 100_000, "bad_message"),
    ('{"type": "code_update", "version": 0, "changes": [{"from": 0, "to": 0, "insert": "12345678"}],'
     ' "seq": 1}', "too_large"),
])
async def test_malformed_messages_are_refused_and_change_nothing(aiohttp_client, message, code):
    server = await aiohttp_client(create_app(max_code=10))
    room = await make_room(server, "abc")
    alice, _ = await join(server, room, "alice")
    await alice.send_str(message)
    err = await expect_error(alice, code)
    if '"seq": 1' in message:
        assert err["seq"] == 1
    await edit(alice, 0, (3, 3, "d"))                       # the socket stays open and usable
    assert (await next_of(alice, "code_update"))["version"] == 1
    assert await room_text(server, room) == "abcd"
    await alice.close()


async def test_binary_frames_are_refused(server):
    room = await make_room(server)
    alice, _ = await join(server, room, "alice")
    await alice.send_bytes(b"\x00\x01")
    await expect_error(alice, "bad_message")
    await alice.close()


async def test_a_message_over_the_size_limit_closes_the_socket(aiohttp_client):
    server = await aiohttp_client(create_app(max_message=1000))
    room = await make_room(server)
    alice, _ = await join(server, room, "alice")
    await alice.send_json({"type": "code_update", "code": "x" * 2000})
    msg = await alice.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert await room_text(server, room) == ""


async def test_many_clients_typing_concurrently_converge_over_real_sockets(server):
    rng = random.Random(7)
    room = await make_room(server, "filler " * 20)
    sockets = [(await join(server, room, f"c{i}"))[0] for i in range(4)]
    views = [[0, "filler " * 20] for _ in sockets]
    words = []
    for round_ in range(10):
        sends = []
        for i, ws in enumerate(sockets):
            word = f"<{i}.{round_}>"
            words.append(word)
            text = views[i][1]
            pos = rng.choice([p for p in range(len(text) + 1)  # never inside a word
                              if text.count("<", 0, p) == text.count(">", 0, p)])
            end = min(len(views[i][1]), pos + rng.choice([0, 0, 2]))
            if "<" in views[i][1][pos:end] or ">" in views[i][1][pos:end]:
                end = pos  # delete only filler that this client sees, never a word
            sends.append(edit(ws, views[i][0], (pos, end, word)))
        await asyncio.gather(*sends)
        for i, ws in enumerate(sockets):  # each catches up before typing again, as a browser would
            while views[i][0] < (round_ + 1) * len(sockets):
                update = await next_of(ws, "code_update")
                assert update["version"] == views[i][0] + 1
                views[i] = [update["version"], replay(views[i][1], update["changes"])]
    final = await room_text(server, room)
    assert all(view[1] == final for view in views)
    assert all(word in final for word in words)  # no concurrent deletion took a word
    for ws in sockets:
        await ws.close()


async def test_a_slow_reader_is_dropped_and_does_not_delay_the_others(aiohttp_client):
    server = await aiohttp_client(create_app(send_queue=64 * 1024, heartbeat=0))
    room = await make_room(server)
    writer, _ = await join(server, room, "writer")
    reader, _ = await join(server, room, "reader")
    # The slow peer: a raw socket that completes the handshake and never reads again.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (server.host, server.port))
    await loop.sock_sendall(sock, (
        f"GET /ws/{room}/slow?full=1 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    assert b"101" in await loop.sock_recv(sock, 12)
    await next_of(reader, "user_joined")
    chunk = "y" * 1000
    for v in range(200):
        await edit(writer, v, (0, 0, chunk))
    for v in range(1, 201):
        msg = await reader.receive_json(timeout=5)
        if msg["type"] == "user_left":
            assert msg["clientId"] == "slow"
            msg = await reader.receive_json(timeout=5)
        assert msg["type"] == "code_update" and msg["version"] == v
    clients = (await (await server.get(f"/rooms/{room}")).json())["clients"]
    assert "slow" not in [c["clientId"] for c in clients]
    sock.close()
    for ws in (writer, reader):
        await ws.close()


# ---------------------------------------------------------------------------
# A real server process: the command line, the banner, graceful shutdown
# ---------------------------------------------------------------------------

def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(HERE / "pairserver.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    flags = ["--port", "--log-level"] + ["--" + f.name.replace("_", "-") for f in dataclasses.fields(Config)]
    assert len(flags) > 30 and all(flag in out for flag in flags)
    readme = (HERE / "README.md").read_text()
    assert [flag for flag in flags if f"`{flag}`" not in readme] == []  # and the README's table


def test_the_protocol_document_names_every_route_message_error_and_close_code():
    doc, source = (HERE / "docs" / "protocol.md").read_text(), (HERE / "pairserver.py").read_text()
    for route in create_app().router.routes():
        path = route.resource.canonical
        if route.method not in ("HEAD", "OPTIONS"):
            assert (f"`{route.method} {path}`" if route.method != "GET" or "/ws/" not in path
                    else path) in doc, (route.method, path)
    sent = set(re.findall(r'_message\("(\w+)"', source)) | {"code_update"}
    errors = set(re.findall(r'PairError\("(\w+)"', source))
    assert sent and errors and pairserver._HANDLERS
    for name in sent | set(pairserver._HANDLERS) | errors:
        assert f"`{name}`" in doc, name
    for code in (1001, 1009, pairserver.CLOSE_REPLACED, pairserver.CLOSE_BAD_CLIENT, pairserver.CLOSE_FORBIDDEN,
                 pairserver.CLOSE_NO_ROOM, pairserver.CLOSE_FULL):
        assert f"| {code} |" in doc, code


def test_the_module_keeps_a_shape_one_can_read():
    """The ceilings of the README: 2,400 lines in all, sections of at most 420,
    the core path a newcomer reads first at most 1,000, no line over 100."""
    lines = (HERE / "pairserver.py").read_text().split("\n")[:-1]
    banners = [i for i, line in enumerate(lines) if line.startswith("# ---")
               and i + 2 < len(lines) and lines[i + 2].startswith("# ---")]
    sections = {lines[a + 1][2:]: b - a for a, b in zip(banners, banners[1:] + [len(lines)])}
    core = ("Configuration", "Text and operations", "Rooms", "HTTP", "WebSocket", "Lifecycle")
    read_first = banners[0] + sum(n for title, n in sections.items() if title.startswith(core))
    assert len(sections) > 10 and sum(title.startswith(core) for title in sections) == len(core)
    assert len(lines) <= 2400 and read_first <= 1000, (len(lines), read_first)
    assert {title: n for title, n in sections.items() if n > 420} == {}
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 100] == []


async def test_sigterm_closes_sockets_with_1001_and_exits_cleanly(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PAIRSERVER_ADMIN_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "pairserver.py"), "--port", str(port), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        banner = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert f"http://localhost:{port}/" in banner
        assert "runs are" in (await asyncio.wait_for(proc.stdout.readline(), 5)).decode()
        token = (await asyncio.wait_for(proc.stdout.readline(), 5)).decode().split(": ")[1].strip()
        assert len(token) >= 16
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            resp = await http.get("/admin/rooms", headers={"Authorization": f"Bearer {token}"})
            assert resp.status == 200
            room = (await (await http.post("/rooms", json={"code": "kept"})).json())["roomId"]
            ws = await http.ws_connect(f"/ws/{room}/alice")
            await ws.receive_json(timeout=5)
            proc.send_signal(signal.SIGTERM)
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        log = (await proc.stderr.read()).decode()
        assert "alice joined room" in log and "kept" not in log  # never the code itself
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_banner_says_where_to_open_it_and_whether_runs_are_isolated():
    env = {**os.environ, "PATH": "/nonexistent"}  # no bwrap
    for flags, runs in [(["--host", "0.0.0.0"], "NOT isolated (no working bwrap"),
                        (["--host", "0.0.0.0", "--sandbox", "none"], "WARNING: runs are NOT isolated")]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "pairserver.py"), "--port", str(free_port()), "--pool", "0",
            "--admin-token", "given-by-the-instructor", *flags, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        first = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert "http://localhost" not in first  # the address other machines can open
        assert runs in (await asyncio.wait_for(proc.stdout.readline(), 5)).decode()
        proc.send_signal(signal.SIGTERM)
        assert "given-by-the-instructor" not in (await proc.stdout.read()).decode()
        assert await proc.wait() == 0


async def test_half_open_connections_cannot_starve_the_server():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))  # ours: 1,100 sockets
    server = await Server.start("--header-timeout", "2", "--max-connections-per-address", "300",
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))
    loop, half_open = asyncio.get_running_loop(), []
    try:
        for _ in range(1100):  # headers that never finish, from 127.0.0.1
            sock = socket.socket()
            sock.setblocking(False)
            half_open.append(sock)
            with contextlib.suppress(ConnectionError):
                await loop.sock_connect(sock, ("127.0.0.1", server.port))
                await loop.sock_sendall(sock, b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))  # another address
        async with aiohttp.ClientSession(server.url, connector=other) as http:
            assert (await http.get("/health", timeout=aiohttp.ClientTimeout(total=5))).status == 200
            resp = await http.post("/execute", json={"code": "print('still here')"})
            assert (await resp.json()).get("output") == "still here\n", await resp.text()

        async def closed_by_the_server(sock) -> bool:
            with contextlib.suppress(ConnectionError):
                return await asyncio.wait_for(loop.sock_recv(sock, 1), 10) == b""
            return True
        assert all(await asyncio.gather(*map(closed_by_the_server, half_open)))
    finally:
        for sock in half_open:
            sock.close()
        assert await server.stop() == 0
    assert len(server.log) < 50 and not any("Traceback" in line for line in server.log)


# ---------------------------------------------------------------------------
# The demo page in a real browser (Chromium, driven by Playwright)
# ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = HERE / "screenshots"


@pytest.fixture
async def chromium():
    if not CHROMIUM:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.async_api")
    async with playwright.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync", "--host-resolver-rules=MAP pair.test 127.0.0.1"])
        yield browser
        await browser.close()


class Person:
    """One person in a browser context of their own: what their console said,
    and the messages their page sent."""

    def __init__(self, context, page):
        self.context, self.page, self.errors, self.sent = context, page, [], []

    @classmethod
    async def open(cls, browser, server, room, name, url=None, ws_route=None, **context_options):
        context = await browser.new_context(**{"viewport": {"width": 1280, "height": 800}, **context_options})
        page = await context.new_page()
        if ws_route:  # stands between the page's sockets and the server
            await page.route_web_socket("**/ws/**", ws_route)
        person = cls(context, page)
        page.on("console", lambda m: m.type == "error" and person.errors.append(m.text))
        page.on("pageerror", lambda e: person.errors.append(str(e)))
        page.on("websocket", lambda ws: ws.on("framesent", lambda data: person.sent.append(json.loads(data))))
        await page.add_init_script(f"localStorage.getItem('pairserver.name') || "
                                   f"localStorage.setItem('pairserver.name', {name!r})")
        await page.goto((url or str(server.make_url("/"))) + f"#room={room}")
        await page.locator("#status.online").wait_for(timeout=10000)
        return person

    async def text(self) -> str:
        return await self.page.evaluate("pairserver.view.state.doc.toString()")

    async def caret_at(self, position: int, end: int | None = None) -> None:
        """Put the caret (or select position..end) as a click or a drag would."""
        await self.page.evaluate(f"pairserver.view.focus(); pairserver.view.dispatch("
                                 f"{{selection: {{anchor: {position if end is None else end}, head: {position}}}, "
                                 f"userEvent: 'select'}})")

    async def peer(self, client_id: str) -> dict | None:
        """Where this person's page shows another's caret: {head, anchor, name, color, active}."""
        return (await self.page.evaluate("pairserver.peers()")).get(client_id)


async def eventually(check, seconds=10.0):
    """Await an async check until it is true or the time is up (a browser and
    a server converge with no event the test can wait on)."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.05)


async def test_page_two_people_type_into_one_line_at_once(server, chromium):
    # Two places on one line: at the very same place, the SPEC's rule (the update
    # the server applied first comes first) may interleave two typists' letters.
    room = await make_room(server, "names = [, ]\nprint(names)\n")
    alice, bob = [await Person.open(chromium, server, room, name) for name in ("Alice", "Bob")]
    await alice.caret_at(len("names = ["))
    await bob.caret_at(len("names = [, "))
    await asyncio.gather(alice.page.keyboard.type("'alice'", delay=25), bob.page.keyboard.type("'bob'", delay=25))

    async def same():
        texts = {await alice.text(), await bob.text(), await room_text(server, room)}
        return len(texts) == 1
    await eventually(same)
    assert await alice.text() == "names = ['alice', 'bob']\nprint(names)\n"
    await alice.page.locator("#people li", has_text="Bob").wait_for()
    SHOTS.mkdir(exist_ok=True)
    for person, name in ((alice, "alice"), (bob, "bob")):
        await person.page.screenshot(path=SHOTS / f"two-people-{name}.png")
        assert person.errors == []


async def test_page_a_run_streams_to_the_other_person_under_the_lock(server, chromium):
    room = await make_room(server, "import time\nprint('first', flush=True)\ntime.sleep(0.8)\nprint('second')\n")
    alice, bob = [await Person.open(chromium, server, room, name) for name in ("Alice", "Bob")]
    await alice.page.click("#run")
    await bob.page.locator("#runner", has_text="Alice is running").wait_for()
    assert await bob.page.locator("#run").is_disabled()
    await bob.page.locator("#output", has_text="first").wait_for()
    assert "second" not in await bob.page.inner_text("#output")  # streamed while it runs
    await bob.page.locator("#output", has_text="exit code 0").wait_for()
    assert "second" in await bob.page.inner_text("#output") and not await bob.page.locator("#run").is_disabled()
    SHOTS.mkdir(exist_ok=True)
    await bob.page.screenshot(path=SHOTS / "run-bob.png")
    assert alice.errors == bob.errors == []


async def test_page_typing_offline_is_sent_on_return(server, chromium):
    room = await make_room(server, "notes = []\n")
    alice, bob = [await Person.open(chromium, server, room, name) for name in ("Alice", "Bob")]
    bob_id = await bob.page.evaluate("pairserver.S.clientId")
    await bob.context.set_offline(True)
    if (gone := server.app[ROOMS].get(room).clients.get(bob_id)) is not None:
        gone.transport.abort()  # the network goes (if the page has not closed on the offline event)
    await bob.page.locator("#status.offline").wait_for()
    await bob.caret_at(len("notes = []\n"))
    await bob.page.keyboard.type("notes.append('typed offline')\n")
    await bob.page.locator("#status", has_text="edits waiting").wait_for()
    assert await bob.page.locator("#run").is_disabled()
    assert "Offline" in await bob.page.get_attribute("#run", "title")
    await alice.caret_at(0)
    await alice.page.keyboard.type("# online\n")
    await bob.context.set_offline(False)
    await bob.page.locator("#status.online").wait_for(timeout=3000)  # at the online event, not a retry timer

    async def merged():
        texts = {await alice.text(), await bob.text(), await room_text(server, room)}
        return len(texts) == 1 and "typed offline" in texts.pop()
    await eventually(merged, 20)
    assert (await alice.text()).startswith("# online\nnotes = []\n")
    assert (await alice.text()).count("typed offline") == 1  # sent once: not flushed, then rebased too
    asked = []  # closing a tab with edits still waiting asks first; with none, it does not
    for person in (alice, bob):
        person.page.on("dialog", lambda d: asked.append(d.type) or asyncio.ensure_future(d.dismiss()))
    await bob.context.set_offline(True)
    await bob.page.locator("#status.offline").wait_for()
    await bob.page.keyboard.type("# not sent yet\n")
    for person in (alice, bob):
        await person.page.close(run_before_unload=True)

    async def closed_or_asked():
        return alice.page.is_closed() and asked == ["beforeunload"]
    await eventually(closed_or_asked)
    assert not bob.page.is_closed() and "# not sent yet" in await bob.text()  # kept, as asked
    assert alice.errors == bob.errors == []


async def test_page_an_edit_the_server_refuses_leaves_the_page_in_step(aiohttp_client, chromium):
    server = await aiohttp_client(create_app(max_code=40, heartbeat=0))
    room = await make_room(server, "x = 1\n")
    alice, bob = [await Person.open(chromium, server, room, name) for name in ("Alice", "Bob")]
    await alice.caret_at(len("x = 1\n"))
    await alice.page.keyboard.insert_text("# a paste longer than the room may hold\n")
    await alice.page.locator("#notice", has_text="too_large").wait_for()
    await eventually(lambda: alice.page.evaluate("pairserver.view.state.doc.toString() === 'x = 1\\n'"))
    await alice.page.keyboard.type("y = 2\n")  # taken, not queued behind the refused paste

    async def in_step():
        texts = {await alice.text(), await bob.text(), await room_text(server, room)}
        return texts == {"x = 1\ny = 2\n"}
    await eventually(in_step)
    assert alice.errors == bob.errors == []


async def bob_offline(aiohttp_client, chromium, code):
    """A room that keeps only 3 updates (then resync), with Alice in it and Bob's page cut off."""
    server = await aiohttp_client(create_app(history=3, heartbeat=0))
    room = await make_room(server, code)
    alice, bob = [await Person.open(chromium, server, room, name) for name in ("Alice", "Bob")]
    bob_id = await bob.page.evaluate("pairserver.S.clientId")
    await bob.context.set_offline(True)
    if (gone := server.app[ROOMS].get(room).clients.get(bob_id)) is not None:
        gone.transport.abort()
    await bob.page.locator("#status.offline").wait_for()
    return server, room, alice, bob


async def bob_back_and_merged(server, room, alice, bob, want):
    """Bob's page back online merges what he typed itself: everyone ends with `want`."""
    assert server.app[ROOMS].get(room).version > 3  # more updates than the room keeps
    await bob.context.set_offline(False)
    await bob.page.locator("#notice", has_text="merged").wait_for(timeout=5000)

    async def merged():
        return {await alice.text(), await bob.text(), await room_text(server, room)} == {want}
    await eventually(merged, 20)
    assert alice.errors == bob.errors == []


async def test_page_typing_offline_survives_a_room_too_busy_to_rebase_it(aiohttp_client, chromium):
    server, room, alice, bob = await bob_offline(aiohttp_client, chromium, "first\nlast\n")
    await bob.caret_at(len("first\nlast"))
    await bob.page.keyboard.type(" (bob, offline)")
    await alice.caret_at(len("first\n"))
    await alice.page.keyboard.type("alice 1\nalice 2\n", delay=20)  # more updates than the room keeps
    await eventually(lambda: room_text_is(server, room, "first\nalice 1\nalice 2\nlast\n"))
    await bob_back_and_merged(server, room, alice, bob, "first\nalice 1\nalice 2\nlast (bob, offline)\n")


async def test_page_typing_offline_stays_on_its_line_when_others_changed_the_lines_around(
        aiohttp_client, chromium):
    server, room, alice, bob = await bob_offline(aiohttp_client, chromium, "first\nmiddle\nlast\n")
    await bob.caret_at(len("first\nmiddle"))
    await bob.page.keyboard.type(" (bob)")
    for end, typed in ((len("first"), " 1"), (len("first 1\nmiddle\nlast"), " 3")):  # above and below
        await alice.caret_at(end)
        await alice.page.keyboard.type(typed, delay=20)
    await eventually(lambda: room_text_is(server, room, "first 1\nmiddle\nlast 3\n"))
    # bob's words on bob's line, not at the edge of all that changed (as a one-change diff put them)
    await bob_back_and_merged(server, room, alice, bob, "first 1\nmiddle (bob)\nlast 3\n")


async def test_page_an_update_whose_echo_was_lost_is_not_sent_twice(server, chromium):
    room = await make_room(server, "x = 1\n")
    cut = asyncio.Event()

    def line(ws):  # the network: once, the server has bob's update but the line goes before its echo
        bob_id, upstream, gone = ws.url.split("?")[0].rsplit("/", 1)[1], ws.connect_to_server(), []

        def to_page(message):
            echo = json.loads(message)["type"] == "code_update" and bob_id in message
            if echo and not cut.is_set():
                cut.set()
                gone.append(asyncio.ensure_future(asyncio.gather(ws.close(), upstream.close())))
            elif not gone:
                ws.send(message)
        upstream.on_message(to_page)
        ws.on_message(lambda message: gone or upstream.send(message))  # the page's frames die too
    bob = await Person.open(chromium, server, room, "Bob", ws_route=line)
    await bob.caret_at(len("x = 1\n"))
    await bob.page.keyboard.type("abc")
    await cut.wait()

    async def once():
        texts = {await bob.text(), await room_text(server, room)}
        return texts == {"x = 1\nabc"}
    await eventually(once)  # the room applied it, init says so: it is not sent again
    assert bob.errors == []


async def test_page_edits_sent_for_rebasing_on_a_line_that_dies_again_are_kept(server, chromium):
    room = await make_room(server, "x = 1\n")
    lines, cuts = [], []

    def line(ws):  # the network: cut once; then the update sent for rebasing never arrives
        upstream, gone = ws.connect_to_server(), []

        def to_server(message):
            if len(cuts) == 1 and json.loads(message)["type"] == "code_update":
                gone.append(cut(ws, upstream))
            elif not gone:
                upstream.send(message)
        ws.on_message(to_server)
        lines.append((ws, upstream, gone))

    def cut(ws, upstream):
        cuts.append(asyncio.ensure_future(asyncio.gather(ws.close(), upstream.close())))
        return cuts[-1]
    bob = await Person.open(chromium, server, room, "Bob", ws_route=line)
    first, upstream, gone = lines[0]
    gone.append(cut(first, upstream))
    await bob.page.locator("#status.offline").wait_for()
    await bob.caret_at(len("x = 1\n"))
    await bob.page.keyboard.type("typed offline")

    async def kept():
        return len(cuts) == 2 and {await bob.text(), await room_text(server, room)} == {"x = 1\ntyped offline"}
    await eventually(kept)  # the second init said the rebase was not applied: it was sent again, merged
    assert bob.errors == []


async def test_page_autocomplete_inserts_the_chosen_name(server, chromium):
    room = await make_room(server, "import os\ntemperature_celsius = 21\n")
    alice = await Person.open(chromium, server, room, "Alice")
    await alice.caret_at(len("import os\ntemperature_celsius = 21\n"))
    await alice.page.keyboard.type("print(tem")  # the editor closes the bracket: print(tem|)
    await alice.page.keyboard.press("Control+Space")
    option = alice.page.locator(".cm-tooltip-autocomplete li[aria-selected]", has_text="temperature_celsius")
    await option.wait_for()
    assert "global" in await option.inner_text()  # the kind is shown
    await option.click()
    want = "import os\ntemperature_celsius = 21\nprint(temperature_celsius)"
    assert await alice.text() == want
    await eventually(lambda: room_text_is(server, room, want))
    await alice.page.keyboard.press("End")
    await alice.page.keyboard.type("\nos.")  # a dot opens it unasked
    await alice.page.locator(".cm-tooltip-autocomplete li").first.wait_for()
    await alice.page.keyboard.type("pa")
    await alice.page.locator(".cm-tooltip-autocomplete li", has_text="pathsep").wait_for()  # asked again
    assert alice.errors == []


async def room_text_is(server, room, text) -> bool:
    return await room_text(server, room) == text


async def test_page_makes_a_room_and_says_when_a_room_is_unknown(server, chromium):
    context = await chromium.new_context()
    page = await context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.add_init_script("localStorage.setItem('pairserver.name', 'Ana')")
    await page.goto(str(server.make_url("/")) + "#room=no-such-room")
    await page.locator("#notice", has_text="does not exist").wait_for()
    await page.goto(str(server.make_url("/")))
    await page.fill("#starter", "print('starter')\n")
    await page.click("#create")
    await page.locator("#status.online").wait_for()
    room = page.url.split("#room=")[1]
    text = await page.evaluate("pairserver.view.state.doc.toString()")
    assert text == "print('starter')\n" == await room_text(server, room)
    assert errors == []
    await context.close()


async def client_id(person) -> str:
    return await person.page.evaluate("pairserver.S.clientId")


async def in_view(locator) -> bool:
    """Whether an element is drawn inside the editor's visible area."""
    if not await locator.count():
        return False
    return await locator.first.evaluate("e => { const r = e.getBoundingClientRect(), s = document.querySelector("
                                        "'.cm-scroller').getBoundingClientRect(); "
                                        "return r.top >= s.top && r.bottom <= s.bottom; }")


async def test_page_each_person_sees_the_others_carets_and_selections(server, chromium):
    room = await make_room(server, "first line\nsecond line\nthird line\n")
    alice, bob = [await Person.open(chromium, server, room, name) for name in ("Alice", "Bob")]
    bob_id = await client_id(bob)
    await bob.caret_at(11, 17)  # selects "second" from its end, the caret before it
    await alice.page.locator(".cm-peer", has_text="Bob").wait_for(state="attached")
    assert {k: v for k, v in (await alice.peer(bob_id)).items() if k != "active"} == \
        {"id": bob_id, "head": 11, "anchor": 17, "name": "Bob", "color": 1}
    band = alice.page.locator(".cm-content span[style*='background-color']", has_text="second")
    await band.wait_for()
    hues = await alice.page.evaluate("[...Array(8).keys()].map(i => +pairserver.color(i).match(/hsl\\((\\d+)/)[1])")
    gaps = [min(abs(a - b), 360 - abs(a - b)) for i, a in enumerate(hues) for b in hues[i + 1:]]
    assert min(gaps) >= 40  # eight people, eight colours well apart
    await alice.caret_at(0)
    await alice.page.keyboard.type("# ")  # text before Bob's selection moves it along, on both screens

    async def moved():
        peer = await alice.peer(bob_id)
        mine = await bob.page.evaluate("(s => [s.head, s.anchor])(pairserver.view.state.selection.main)")
        return (peer["head"], peer["anchor"]) == (13, 19) and mine == [13, 19]
    await eventually(moved)
    await bob.caret_at(5)  # the name shows while Bob moves, then only on hover
    await alice.page.locator(".cm-peer.active .cm-peer-name", has_text="Bob").wait_for()
    await alice.page.locator(".cm-peer:not(.active)", has_text="Bob").wait_for(state="attached")
    SHOTS.mkdir(exist_ok=True)
    await alice.page.screenshot(path=SHOTS / "carets-alice.png")
    assert alice.errors == bob.errors == []


async def test_page_undo_takes_back_only_your_own_edits(server, chromium):
    room = await make_room(server, "a = 1\nb = 2\n")
    alice, bob = [await Person.open(chromium, server, room, name) for name in ("Alice", "Bob")]
    await alice.caret_at(len("a = 1"))
    await alice.page.keyboard.type(" + 10")

    async def everyone_has(text):
        return {await alice.text(), await bob.text(), await room_text(server, room)} == {text}
    await eventually(lambda: everyone_has("a = 1 + 10\nb = 2\n"))  # Bob's page too, before his caret
    await bob.caret_at(len("a = 1 + 10\nb = 2"))
    await bob.page.keyboard.type(" * 3")
    await eventually(lambda: everyone_has("a = 1 + 10\nb = 2 * 3\n"))
    await alice.page.keyboard.press("Control+z")  # Alice's edit goes, Bob's stays
    await eventually(lambda: everyone_has("a = 1\nb = 2 * 3\n"))
    await alice.page.keyboard.press("Control+Shift+z")
    await eventually(lambda: everyone_has("a = 1 + 10\nb = 2 * 3\n"))
    await bob.page.keyboard.press("Control+z")
    await eventually(lambda: everyone_has("a = 1 + 10\nb = 2\n"))
    assert alice.errors == bob.errors == []


async def test_page_an_idle_person_sends_no_cursor_messages(server, chromium):
    room = await make_room(server, "x = 1\n")
    alice, bob = [await Person.open(chromium, server, room, name) for name in ("Alice", "Bob")]
    await alice.caret_at(len("x = 1\n"))
    alice.sent.clear()
    bob.sent.clear()
    started = time.monotonic()
    await alice.page.keyboard.type("twenty keys, typed!!")  # 20 keys
    typed = time.monotonic() - started
    await eventually(lambda: room_text_is(server, room, "x = 1\ntwenty keys, typed!!"))
    await eventually(lambda: text_is(bob, "x = 1\ntwenty keys, typed!!"))
    cursors = lambda: [m for m in alice.sent if m["type"] == "cursor"]  # noqa: E731

    async def caret_sent() -> bool:  # the last move goes out up to 50 ms after the last key
        return bool(cursors()) and cursors()[-1]["position"] == len("x = 1\ntwenty keys, typed!!")
    await eventually(caret_sent)
    assert [m for m in bob.sent if m["type"] == "cursor"] == []  # others' edits move no one
    assert 1 <= len(cursors()) <= typed / 0.05 + 2  # at most one each 50 ms
    assert alice.errors == bob.errors == []


async def text_is(person, text) -> bool:
    return await person.text() == text


async def test_page_go_to_a_person_and_follow_them(server, chromium):
    room = await make_room(server, "".join(f"line_{i} = {i}\n" for i in range(300)))
    alice, bob = [await Person.open(chromium, server, room, name) for name in ("Alice", "Bob")]
    line = lambda n: sum(len(f"line_{i} = {i}\n") for i in range(n))  # noqa: E731
    await bob.caret_at(line(250))
    bobs_caret = alice.page.locator(".cm-peer", has_text="Bob")
    await alice.page.locator("#people li", has_text="line 251").wait_for()
    assert not await in_view(bobs_caret)
    await alice.page.locator("#people .who", has_text="Bob").click()  # go to Bob
    await eventually(lambda: in_view(bobs_caret))
    await alice.page.locator("#people .follow").click()  # and follow him
    await bob.caret_at(line(20))
    await eventually(lambda: in_view(bobs_caret))
    await bob.caret_at(line(290))
    await eventually(lambda: in_view(bobs_caret))
    assert await alice.page.get_attribute("#people .follow", "aria-pressed") == "true"
    assert alice.errors == bob.errors == []


async def test_page_copy_link_on_plain_http_at_a_name_other_than_localhost(aiohttp_client, chromium):
    server = await aiohttp_client(create_app(allow_host=("pair.test",), heartbeat=0))
    room = await make_room(server)
    url = f"http://pair.test:{server.port}/"  # as in a workshop on a LAN: not a secure context
    alice = await Person.open(chromium, server, room, "Alice", url=url)
    assert not await alice.page.evaluate("isSecureContext")
    await alice.page.click("#copy")
    await alice.page.locator("#notice", has_text=re.compile(r"Link copied|Ctrl\+C")).wait_for()
    assert await alice.page.input_value("#link") == f"{url}#room={room}"
    await alice.page.locator("#notice").wait_for(state="hidden")  # notices fade
    assert alice.errors == []


async def test_page_finds_a_silent_network_and_reconnects(server, chromium):
    room = await make_room(server, "x = 1\n")
    alice = await Person.open(chromium, server, room, "Alice")
    old = server.app[ROOMS].get(room).clients[await client_id(alice)]
    old.transport.pause_reading()  # the server hears nothing more and so says nothing: a silent network

    async def reconnected():
        now = server.app[ROOMS].get(room).clients.get(await client_id(alice))
        return now is not None and now is not old
    await eventually(reconnected, seconds=6)  # found silent within 5 s, and a new socket at once
    await alice.page.locator("#status.online").wait_for()
    await alice.caret_at(0)
    await alice.page.keyboard.type("# back\n")
    await eventually(lambda: room_text_is(server, room, "# back\nx = 1\n"))
    assert alice.errors == []


async def test_page_a_name_is_changed_in_place_and_remembered(server, chromium):
    room = await make_room(server)
    alice, bob = [await Person.open(chromium, server, room, name) for name in ("Alice", "Bob")]
    await bob.page.fill("#name", "Robert")
    await bob.page.press("#name", "Enter")
    await alice.page.locator("#people li", has_text="Robert").wait_for()
    clients = (await (await server.get(f"/rooms/{room}")).json())["clients"]
    assert sorted(c["name"] for c in clients) == ["Alice", "Robert"]
    await bob.page.reload()
    await bob.page.locator("#status.online").wait_for()
    assert await bob.page.input_value("#name") == "Robert"
    assert alice.errors == bob.errors == []


async def test_page_at_400_pixels_and_in_dark_mode(server, chromium):
    room = await make_room(server, "print('hello from a phone')\n")
    narrow = await Person.open(chromium, server, room, "Alice", viewport={"width": 400, "height": 800})
    dark = await Person.open(chromium, server, room, "Bob", color_scheme="dark")
    assert await narrow.page.evaluate("document.activeElement.classList.contains('cm-content')")  # focused
    assert await narrow.page.evaluate("document.documentElement.scrollWidth") <= 400
    for selector in ("#editor", "#run", "#output"):
        await narrow.page.locator(selector).scroll_into_view_if_needed()
        box = await narrow.page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 400, selector
    await narrow.page.click("#run")
    await narrow.page.locator("#output", has_text="hello from a phone").wait_for()
    await dark.page.click("#copy")
    await dark.page.locator("#notice").wait_for()

    def lightness(css):  # rgb(r, g, b) -> 0..1
        return sum(map(int, re.findall(r"\d+", css)[:3])) / 765
    for selector in (".cm-editor", "#notice", "body"):
        background = await dark.page.eval_on_selector(selector, "e => getComputedStyle(e).backgroundColor")
        assert lightness(background) < 0.3, (selector, background)
    SHOTS.mkdir(exist_ok=True)
    await narrow.page.screenshot(path=SHOTS / "narrow-400px.png", full_page=True)
    await dark.page.screenshot(path=SHOTS / "dark.png")
    assert narrow.errors == dark.errors == []


async def test_page_editor_changes_and_operations_convert_both_ways(server, chromium):
    """The page turns CodeMirror's change sets into operations and back: on
    random texts (emoji included) and random changes, both give CodeMirror's text."""
    room = await make_room(server)
    alice = await Person.open(chromium, server, room, "Alice")
    failures = await alice.page.evaluate("""() => {
        const { view, fromChanges, toChanges, applyOp } = pairserver, ChangeSet = view.state.changes().constructor;
        let seed = 7; const rand = n => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % n;
        const pieces = ["a", "b", "\\n", "😀", "xyz", ""], failures = [];
        for (let round = 0; round < 500; round++) {
            let doc = ""; for (let i = rand(12); i > 0; i--) doc += pieces[rand(pieces.length)];
            const specs = [], at = [...Array(rand(4)).keys()].map(() => rand(doc.length + 1)).sort((x, y) => x - y);
            let last = 0;
            for (const from of at) {
                if (from < last) continue;
                const to = Math.min(doc.length, from + rand(3));
                specs.push({ from, to, insert: pieces[rand(pieces.length)] }); last = to;
            }
            const changes = ChangeSet.of(specs, doc.length), want = changes.apply(view.state.doc.constructor
                .of(doc.split("\\n"))).toString();
            const op = fromChanges(changes), back = ChangeSet.of(toChanges(op), doc.length);
            const viaBack = back.apply(view.state.doc.constructor.of(doc.split("\\n"))).toString();
            if (applyOp(doc, op) !== want || viaBack !== want) failures.push({ doc, specs });
        }
        return failures.slice(0, 3);
    }""")
    assert failures == []
    assert alice.errors == []


async def test_page_three_people_typing_at_random_places_lose_nothing(server, chromium):
    """Each person makes 40 edits at random places as fast as their page goes,
    all at once: every token typed survives exactly once, deletes included
    elsewhere, and the three screens and the server end equal."""
    room = await make_room(server, "start\n")
    people = [await Person.open(chromium, server, room, name) for name in ("Ann", "Ben", "Cy")]
    typing = """async ([mark, seed]) => {
        const view = pairserver.view; let s = seed;
        const rand = n => (s = (Math.imul(s, 1103515245) + 12345) >>> 0) % n;
        for (let i = 0; i < 40; i++) {
            const doc = view.state.doc.toString(), spots = [0], letters = [];
            for (let k = 0; k < doc.length; k++) {
                if (/[a-z]/.test(doc[k])) letters.push(k);  // the letters of 'start'
                if (/[a-z>\\n]/.test(doc[k])) spots.push(k + 1);  // never inside a token
            }
            if (i % 4 === 3 && letters.length) {
                const at = letters[rand(letters.length)];
                view.dispatch({ changes: { from: at, to: at + 1 }, userEvent: "delete" });
            } else view.dispatch({ changes: { from: spots[rand(spots.length)], insert: `<${mark}${i}>` },
                                   userEvent: "input" });
            await new Promise(r => setTimeout(r, rand(15)));
        }
    }"""
    await asyncio.gather(*(p.page.evaluate(typing, [mark, seed])
                           for p, mark, seed in zip(people, "ABC", (1, 2, 3))))

    async def converged():
        texts = {await p.text() for p in people} | {await room_text(server, room)}
        return len(texts) == 1
    await eventually(converged, 20)
    text = await room_text(server, room)
    for mark in "ABC":
        typed = [i for i in range(40) if i % 4 != 3 or f"<{mark}{i}>" in text]  # no letter left: a token
        assert [text.count(f"<{mark}{i}>") for i in typed] == [1] * len(typed), (mark, text)
        assert len(typed) >= 30
    assert all(p.errors == [] for p in people)


NODE_CHECK = """
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
console.log(JSON.stringify(cases.map(([text, a, b]) => ({
  aFirst: transform(a, b, true), bAfter: transform(b, a, false), composed: compose(a, transform(b, a, false)),
  changes: opToChanges(a), back: changesToOp(opToChanges(a), text.length), applied: applyOp(text, a),
}))));
"""


@pytest.mark.skipif(not NODE, reason="node is not on PATH")
def test_the_page_and_the_server_transform_alike():
    """The page's operations (its script's first section) against the server's,
    on random concurrent edits: the same rebasing, and both orders converge."""
    page = (HERE / "static" / "index.html").read_text()
    ops_js = page[page.index("const isStr"):page.index("// The page")]
    rng = random.Random(3)

    def random_op(text):
        changes, length = [], len(text)
        for _ in range(rng.randint(1, 3)):
            start = rng.randint(0, length)
            end = min(length, start + rng.choice([0, 0, 1, 3]))
            insert = rng.choice(["", "x", "yz", "😀"])
            changes.append({"from": start, "to": end, "insert": insert})
            length += len(to_units(insert)) - (end - start)
        return changes_to_op(changes, len(text))

    cases = []
    for _ in range(300):
        text = to_units("".join(rng.choice("ab\n😀") for _ in range(rng.randint(0, 12))))
        cases.append([text, random_op(text), random_op(text)])
    out = subprocess.run([NODE, "-e", ops_js + NODE_CHECK], input=json.dumps(cases),
                         capture_output=True, text=True, check=True).stdout
    def units(value):  # JSON from node holds emoji whole; the server's ops hold surrogate pairs
        return to_units(value) if isinstance(value, str) else [units(v) for v in value] \
            if isinstance(value, list) else {k: units(v) for k, v in value.items()} \
            if isinstance(value, dict) else value

    for (text, a, b), js in zip(cases, units(json.loads(out))):
        assert js["aFirst"] == transform(a, b)                       # the server's rebasing
        assert apply(apply(text, b)[0], js["aFirst"])[0] == apply(apply(text, a)[0], js["bAfter"])[0]
        assert js["applied"] == apply(text, a)[0] and js["changes"] == op_to_changes(a)
        assert js["back"] == a
        assert js["composed"] == compose(a, js["bAfter"])              # and the same composing


DIFF_CHECK = """
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
console.log(JSON.stringify(cases.map(([old, now, mine]) => {
  const op = diffOp(old, now);
  return { applied: applyOp(old, op), mine: applyOp(now, transform(mine, op, true)) };
})));
"""


@pytest.mark.skipif(not NODE, reason="node is not on PATH")
def test_the_page_merges_edits_into_a_text_changed_meanwhile_line_by_line():
    """What the page does with edits the room could not rebase (after a long time offline): the
    text's changes since are found line by line, so a line the others left alone keeps the edit."""
    page = (HERE / "static" / "index.html").read_text()
    ops_js = page[page.index("const isStr"):page.index("// The page")]
    rng = random.Random(5)
    cases = [["a = 1\nb = 2\nc = 3\n", "a = 100\nb = 2\nc = 300\n", [11, "  # mine", 1]],
             ["x\ny\n", "start\nx\nmiddle\ny\nend\n", [1, "!", 3]],  # lines added around
             ["\n".join(f"a{i}" for i in range(600)), "\n".join(f"b{i}" for i in range(600)), [0]]]  # too many
    for _ in range(300):  # random texts, lines of a few letters, the second made from the first
        lines = ["".join(rng.choice("ab😀") for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(0, 9))]
        others = [line for line in lines if rng.random() < 0.7] + [rng.choice(["a", "new", ""])]
        if rng.random() < 0.2:
            rng.shuffle(others)
        old, now = to_units("\n".join(lines)), to_units("\n".join(others))
        cases.append([old, now, [len(old)]])
    out = subprocess.run([NODE, "-e", ops_js + DIFF_CHECK], input=json.dumps(cases),
                         capture_output=True, text=True, check=True).stdout
    found = [{k: to_units(v) for k, v in case.items()} for case in json.loads(out)]
    assert found[0]["mine"] == "a = 100\nb = 2  # mine\nc = 300\n"  # not on the line after
    assert found[1]["mine"] == "start\nx!\nmiddle\ny\nend\n"
    assert [f["applied"] for f in found] == [now for _, now, _ in cases]  # every diff is right
