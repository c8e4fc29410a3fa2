"""Benchmarks for pairserver, each beside a baseline measured in the same run.

    python bench.py collab [--rooms 50 --clients 6 --rate 5 --seconds 10] [--db sqlite --db postgres]
    python bench.py execute [--runs 50 --seconds 10]
    python bench.py autocomplete [--files 25 --per-file 8 --seed 7 [--seed 11 ...]]
    python bench.py hostile
    python bench.py page

collab: R rooms x C clients, each client typing one character at a steady
rate over a real WebSocket. It reports edit->peer latency (from a client
sending an update to each other client of the room receiving it), updates/s
and server memory per idle connection, for pairserver and for a bare aiohttp
relay (receive a frame, send it to the room's sockets, nothing else). Both
servers run as their own processes; the load comes from this one.

execute: print('hi') through POST /execute, p50/p95 of the round trip, beside
the same interpreter started cold the way the server would start one (same
sandbox, same limits) and beside the server with no pool; then runs/second
with 8 clients posting at once.

autocomplete: completion cases cut from the standard library's own source
(files sampled with a fixed seed, at most 2,000 lines): an identifier being
read keeps its first one or two letters and the rest of its line is dropped,
as a person typing would leave it; keywords likewise (a quarter as many
cases as names, one letter kept of a two-letter one). Top-1, top-5 and mean reciprocal rank per
kind of name, and latency, for pairserver's suggest() and for Jedi (installed
for the benchmark only) on the same cases; then the same cases posted to a real
server over loopback.

page: two people in real browsers (Chromium, headless, driven by Playwright)
in one room. The time from a key going down on one page to the character in
the other page's editor, median of 20 keys, on a 20-line and a 2,000-line
file, beside the floor under it: a message from one page to the other through
the server, with no editor; and beside the textarea page this one replaced
(taken from git, served by the same server). And the time a keystroke takes in its own page
(key down to the edit handled and sent) on a 10,000-line file, beside the same
on a 20-line file.

hostile: the CPU time of suggest() on 1 MB texts made to be slow (lines of
brackets, dots, quotes, names, thousands of short lines, broken lines, a class
of 600 methods whole and broken: what autocomplete parses whole), at the
end and in the middle, the first time and again, beside the same on the
standard library's typing.py; the target is 50 ms for any text.
"""

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
from aiohttp import web

HERE = Path(__file__).parent


# ---------------------------------------------------------------------------
# The baseline: a relay that knows nothing about edits
# ---------------------------------------------------------------------------

def relay_app() -> web.Application:
    """Receive a frame, send it to every socket of the room, nothing else."""
    rooms: dict[str, set] = defaultdict(set)

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        room = rooms[request.match_info["roomId"]]
        room.add(ws)
        try:
            async for msg in ws:
                for other in list(room):
                    await other.send_str(msg.data)
        finally:
            room.discard(ws)
        return ws

    async def create_room(request: web.Request) -> web.Response:
        return web.json_response({"roomId": f"r{len(rooms)}-{random.getrandbits(32)}"}, status=201)

    app = web.Application()
    app.add_routes([web.get("/ws/{roomId}/{clientId}", websocket), web.post("/rooms", create_room)])
    return app


# ---------------------------------------------------------------------------
# Servers as processes, and their memory
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, port: int, *args: str) -> subprocess.Popen:
    """Start pairserver or the relay on port and wait until it answers."""
    cmd = ([sys.executable, str(HERE / "pairserver.py"), "--log-level", "WARNING", *args]
           if kind == "pairserver" else [sys.executable, __file__, "relay"])
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ---------------------------------------------------------------------------
# collab: typists in rooms
# ---------------------------------------------------------------------------

async def typist(http, base, room, cid, rate, stop_at, measure_from, sent, latencies, counts):
    """One client: type a character every 1/rate s at a random place, record
    when each peer's update arrives."""
    ws = await http.ws_connect(f"{base}/ws/{room}/{cid}")
    state = {"version": 0, "length": 0}

    async def read():
        async for msg in ws:
            data = json.loads(msg.data)
            kind = data.get("type")
            if kind in ("init", "resync"):
                state["version"], state["length"] = data["version"], len(data["code"])
            elif kind == "error":
                counts[1] += 1
            elif kind == "code_update":
                state["version"] = max(state["version"], data["version"])
                state["length"] += sum(len(c["insert"]) - (c["to"] - c["from"]) for c in data["changes"])
                t0 = sent.get((data.get("clientId"), data.get("seq")))
                if data.get("clientId") != cid and t0 is not None and t0 >= measure_from:
                    latencies.append(time.perf_counter() - t0)

    reader = asyncio.create_task(read())
    seq = 0
    await asyncio.sleep(random.random() / rate)
    next_at = time.perf_counter()
    while time.perf_counter() < stop_at:
        seq += 1
        pos = random.randint(0, state["length"])
        sent[(cid, seq)] = time.perf_counter()
        await ws.send_str(json.dumps({"type": "code_update", "clientId": cid, "seq": seq,
                                      "version": state["version"],
                                      "changes": [{"from": pos, "to": pos, "insert": "x"}]}))
        if sent[(cid, seq)] >= measure_from:
            counts[0] += 1
        next_at += 1 / rate
        await asyncio.sleep(max(0, next_at - time.perf_counter()))
    await asyncio.sleep(1)  # let the last updates arrive
    await ws.close()
    await reader


async def collab_load(port: int, rooms: int, clients: int, rate: float, seconds: float) -> dict:
    base = f"http://127.0.0.1:{port}"
    sent, latencies, counts = {}, [], [0, 0]  # updates sent while measuring, errors
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        ids = [(await (await http.post(f"{base}/rooms")).json())["roomId"] for _ in range(rooms)]
        now = time.perf_counter()
        warmup = 2.0
        await asyncio.gather(*(typist(http, base, room, f"c{i}", rate, now + warmup + seconds,
                                      now + warmup, sent, latencies, counts)
                               for room in ids for i in range(clients)))
    latencies.sort()
    return {"p50": statistics.median(latencies) * 1000,
            "p99": latencies[int(len(latencies) * 0.99)] * 1000,
            "updates": counts[0] / seconds, "errors": counts[1]}


async def idle_memory(proc: subprocess.Popen, port: int, connections: int, greets: bool) -> float:
    """Server memory per idle connection, in KiB: RSS with them minus RSS without."""
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        rooms = [(await (await http.post(f"{base}/rooms")).json())["roomId"]
                 for _ in range(connections // 20)]
        await asyncio.sleep(0.5)
        before = rss_kib(proc.pid)
        sockets = [await http.ws_connect(f"{base}/ws/{room}/idle{i}") for room in rooms for i in range(20)]
        for ws in sockets if greets else ():
            await ws.receive(timeout=10)  # init
        await asyncio.sleep(0.5)
        after = rss_kib(proc.pid)
        for ws in sockets:
            await ws.close()
    return (after - before) / len(sockets)


def collab(args: argparse.Namespace) -> None:
    """Measure the servers under the same load; print the figures and ratios.
    With --db, pairserver keeping its rooms there is measured too."""
    print(f"collab: {args.rooms} rooms x {args.clients} clients x {args.rate} edits/s, "
          f"{args.seconds:g} s measured after 2 s warm-up")
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        servers = {"relay": [], "pairserver": [  # one address makes every room and connection
            "--max-rooms", "5000", "--pool", "0", "--rooms-per-minute", "0",
            "--max-connections-per-address", "5000"]}
        for db in args.db or []:
            where = str(Path(scratch, "rooms.db")) if db == "sqlite" else \
                stack.enter_context(postgres_server()) if db == "postgres" else db
            servers[f"pairserver+{db}"] = [*servers["pairserver"], "--db", where]
        runs: dict[str, list[dict]] = {kind: [] for kind in servers}
        for _ in range(args.repeat):  # the servers in turn, so that drifts of the machine hit all alike
            for kind, flags in servers.items():
                port = free_port()
                proc = start(kind.split("+")[0], port, *flags)
                try:
                    figures = asyncio.run(collab_load(port, args.rooms, args.clients, args.rate, args.seconds))
                    figures["kib"] = asyncio.run(idle_memory(proc, port, args.idle, kind != "relay"))
                finally:
                    proc.terminate()
                    proc.wait(10)
                runs[kind].append(figures)
                if figures["errors"]:
                    print(f"warning: {kind} refused {figures['errors']} updates")
    results = {kind: {k: statistics.median(f[k] for f in fs) for k in fs[0]} for kind, fs in runs.items()}
    if args.repeat > 1:
        print(f"medians of {args.repeat} runs each")
    print(f"{'':20} {'p50 ms':>8} {'p99 ms':>8} {'updates/s':>10} {'KiB/idle conn':>14}")
    for kind, f in results.items():
        print(f"{kind:20} {f['p50']:8.2f} {f['p99']:8.2f} {f['updates']:10.0f} {f['kib']:14.1f}")
    r, p = results["relay"], results["pairserver"]
    print(f"pairserver / relay: p50 {p['p50'] / r['p50']:.2f}x, p99 {p['p99'] / r['p99']:.2f}x "
          f"(target <= 2x), memory {p['kib'] / r['kib']:.2f}x ({p['kib']:.1f} KiB, target <= 25)")
    for kind in results.keys() - {"relay", "pairserver"}:
        print(f"{kind} / pairserver in memory: p99 {results[kind]['p99'] / p['p99']:.2f}x (target <= 1.10x)")


@contextlib.contextmanager
def postgres_server():
    """A PostgreSQL server of the benchmark's own, in a temporary folder: its URL."""
    bin_dir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
    if bin_dir is None:
        sys.exit("--db postgres needs PostgreSQL installed (apt-get install postgresql)")
    data, port = Path(tempfile.mkdtemp(prefix="pairserver-bench-pg-")), free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    if as_user:
        shutil.chown(data, "postgres")
    subprocess.run([*as_user, bin_dir / "initdb", "-D", data / "db", "-A", "trust", "-U", "bench"],
                   check=True, capture_output=True)
    pg_ctl = [*as_user, bin_dir / "pg_ctl", "-D", data / "db", "-l", data / "log", "-w",
              "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1"]
    subprocess.run([*pg_ctl, "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://bench@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "stop", "-m", "fast"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


# ---------------------------------------------------------------------------
# execute: round trips against cold starts
# ---------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] * 1000


async def round_trips(port: int, runs: int) -> list[float]:
    times = []
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        for _ in range(runs + 3):  # the first three warm up
            started = time.perf_counter()
            result = await (await http.post("/execute", json={"code": "print('hi')"})).json()
            assert result["output"] == "hi\n", result
            times.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)  # a person's pace: the pool refills between runs
    return times[3:]


async def throughput(port: int, clients: int, seconds: float) -> tuple[float, int]:
    done, busy = 0, 0
    stop_at = time.perf_counter() + seconds
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        async def client():
            nonlocal done, busy
            while time.perf_counter() < stop_at:
                resp = await http.post("/execute", json={"code": "print('hi')"})
                await resp.read()
                done, busy = done + (resp.status == 200), busy + (resp.status == 429)
        await asyncio.gather(*(client() for _ in range(clients)))
    return done / seconds, busy


def cold_starts(runs: int) -> list[float]:
    """The interpreter started as the server would start one cold: same
    sandbox, same limits, without the pool and without HTTP."""
    import functools
    import pairserver
    config = pairserver.Config()
    runner = pairserver.Runner(config)
    python = runner.languages["python"][0]
    argv = [python, "-I", "-u", "-c", "print('hi')"]
    argv = runner.sandboxed(argv) if runner.bwrap else argv
    times = []
    for _ in range(runs + 3):
        started = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
                             preexec_fn=functools.partial(pairserver._limit_child, config, []))
        assert out.stdout == b"hi\n", out
        times.append(time.perf_counter() - started)
    return times[3:]


def execute(args: argparse.Namespace) -> None:
    cold = cold_starts(args.runs)
    figures = {}
    for name, flags in (("pooled", []), ("no pool", ["--pool", "0"])):
        port = free_port()  # the clients share one address: let each of them have a run waiting
        proc = start("pairserver", port, *flags, "--max-queue-per-source", "8")
        try:
            figures[name] = asyncio.run(round_trips(port, args.runs))
            if name == "pooled":
                rate, busy = asyncio.run(throughput(port, 8, args.seconds))
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"execute: print('hi'), {args.runs} runs each")
    print(f"{'':34} {'p50 ms':>8} {'p95 ms':>8}")
    print(f"{'cold interpreter, same sandbox':34} {percentile(cold, .5):8.1f} {percentile(cold, .95):8.1f}")
    for name, times in figures.items():
        print(f"{'POST /execute, ' + name:34} {percentile(times, .5):8.1f} {percentile(times, .95):8.1f}")
    ratio = percentile(figures["pooled"], .5) / percentile(cold, .5)
    print(f"pooled round trip / cold start, p50: {ratio:.2f}x (target <= 0.5x)")
    print(f"throughput, 8 clients at once: {rate:.1f} runs/s ({busy} answered 429)")


# ---------------------------------------------------------------------------
# autocomplete: stdlib cases against Jedi
# ---------------------------------------------------------------------------

def completion_cases(files: int, per_file: int, seed: int) -> list[dict]:
    """Cut cases from standard-library files; each knows its kind of name."""
    import ast
    import builtins
    import io
    import keyword
    import sysconfig
    import tokenize
    rng = random.Random(seed)
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng.shuffle(paths)
    cases = []
    for path in paths:
        src = path.read_text(encoding="utf-8", errors="replace")
        lines = src.split("\n")
        if len(lines) > 2000 or len(lines) < 100 or len([c for c in cases if c["path"] == path]):
            continue
        try:
            tree = ast.parse(src)
            tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
        except (SyntaxError, tokenize.TokenError):
            continue
        kinds = name_kinds(tree)
        names = [(t, tokens[i - 1]) for i, t in enumerate(tokens) if i and t.type == tokenize.NAME
                 and not keyword.iskeyword(t.string) and len(t.string) > 2
                 and tokens[i - 1].string not in ("def", "class", "import", "as")
                 and not lines[t.start[0] - 1].lstrip().startswith(("import ", "from "))]
        words = [(t, tokens[i - 1]) for i, t in enumerate(tokens)  # keywords, a quarter as many
                 if i and t.type == tokenize.NAME and keyword.iskeyword(t.string)]
        for tok, prev in rng.sample(names, min(per_file, len(names))) + \
                rng.sample(words, min(max(1, per_file // 4), len(words))):
            row, col = tok.start[0] - 1, tok.start[1]
            keep = min(rng.choice((1, 2)), len(tok.string) - 1)
            line = lines[row][:col + keep]
            code = "\n".join(lines[:row] + [line] + lines[row + 1:])
            cursor = len("\n".join(lines[:row])) + (row > 0) + len(line)
            if keyword.iskeyword(tok.string):
                kind = "keyword"
            elif prev.string == ".":
                owner = lines[row][:col - 1].rstrip()
                owner = owner[len(owner.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789")):]
                kind = "self." if owner == "self" else "module." if owner in kinds["modules"] else "other."
            else:
                kind = kinds["names"].get((tok.string, row + 1)) or kinds["names"].get(tok.string) or \
                    ("builtin" if tok.string in dir(builtins) else "other")
            cases.append({"path": path, "code": code, "cursor": cursor, "row": row + 1, "col": len(line),
                          "want": tok.string, "kind": kind})
        if len({c["path"] for c in cases}) >= files:
            break
    return cases


def name_kinds(tree) -> dict:
    """What each name of a file is, from its parsed source: param and local
    by the function around a line, else global, function, class, import."""
    import ast
    names, modules = {}, set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = "function"
        elif isinstance(node, ast.ClassDef):
            names[node.name] = "class"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = "import"
                if isinstance(node, ast.Import):
                    modules.add(alias.asname or alias.name.split(".")[0])
        else:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    names.setdefault(sub.id, "global")
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = {a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs,
                                      *filter(None, [fn.args.vararg, fn.args.kwarg])]}
            stores = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for line in range(fn.lineno, fn.end_lineno + 1):
                for name in params:
                    names[(name, line)] = "param"
                for name in stores - params:
                    names[(name, line)] = "local"
    return {"names": names, "modules": modules}


def rank_of(labels: list[str], want: str) -> int | None:
    for i, label in enumerate(labels[:50]):
        if label.rstrip("=") == want:
            return i + 1
    return None


def autocomplete(args: argparse.Namespace) -> None:
    import pairserver
    try:
        import jedi
    except ImportError:
        sys.exit("bench.py autocomplete compares with Jedi: pip install jedi")
    seeds = args.seed or [7]
    cases = [case for seed in seeds for case in completion_cases(args.files, args.per_file, seed)]
    def jedi_labels(case):
        try:
            return [c.name for c in jedi.Script(case["code"], path=str(case["path"])).complete(
                case["row"], case["col"])]
        except Exception:  # Jedi gives up on some broken code; count it as not found
            return []

    def measure(engine) -> list:
        rows = []
        for case in cases:
            started = time.perf_counter()
            labels = engine(case)
            rows.append((case["kind"], rank_of(labels, case["want"]), time.perf_counter() - started))
        return rows

    async def pairserver_rows() -> list:
        """suggest() with the names of the modules the cases use, learned in the
        sandbox beforehand (as a server has after its first requests); its
        parse cache emptied before measuring."""
        app = pairserver.create_app()
        await app[pairserver.RUNNER].start()
        for case in cases:
            await pairserver.complete(app, case["code"], case["cursor"], "python")
        await app[pairserver.RUNNER].stop()
        modules = app[pairserver.MODULES]
        pairserver._PARSED.__init__(pairserver.PARSE_CACHE_BYTES)
        return measure(lambda case: [s["label"] for s in pairserver.suggest(
            case["code"], case["cursor"], modules=modules)["suggestions"]])

    # one engine at a time, the cases in the same order
    results = {"pairserver": asyncio.run(pairserver_rows()), "jedi": measure(jedi_labels)}
    kinds = sorted({c["kind"] for c in cases})
    print(f"autocomplete: {len(cases)} cases from {len({c['path'] for c in cases})} stdlib files "
          f"(seed {' '.join(map(str, seeds))})")
    print(f"{'kind':10} {'n':>4}  {'top-1':>13} {'top-5':>13} {'MRR':>13}   pairserver / jedi")
    for kind in kinds + ["all"]:
        row = []
        for engine in ("pairserver", "jedi"):
            ranks = [r for k, r, _ in results[engine] if kind in ("all", k)]
            row.append((sum(r == 1 for r in ranks) / len(ranks), sum(bool(r) and r <= 5 for r in ranks) / len(ranks),
                        sum(1 / r for r in ranks if r) / len(ranks), len(ranks)))
        (p1, p5, pm, n), (j1, j5, jm, _) = row
        print(f"{kind:10} {n:4}  {p1:6.2f}/{j1:<6.2f} {p5:6.2f}/{j5:<6.2f} {pm:6.2f}/{jm:<6.2f}")
    for engine, rows in results.items():
        times = [t for _, _, t in rows]
        print(f"latency {engine:10} p50 {percentile(times, .5):7.2f} ms   p95 {percentile(times, .95):7.2f} ms")
    ratio = percentile([t for _, _, t in results["pairserver"]], .5) / percentile(
        [t for _, _, t in results["jedi"]], .5)
    print(f"p50 latency pairserver / jedi: {ratio:.3f} (target <= 0.05)")
    port = free_port()
    proc = start("pairserver", port)
    try:
        times = asyncio.run(autocomplete_over_http(port, cases))
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"POST /autocomplete over loopback, each case again once learned: p50 "
          f"{percentile(times, .5):.2f} ms   p95 {percentile(times, .95):.2f} ms (target p50 <= 5 ms)")


async def autocomplete_over_http(port: int, cases: list[dict]) -> list[float]:
    """Each case posted to a real server twice (the first time it learns the modules the case
    uses, as a server has after its first requests); the second times, in s, client included."""
    times = []
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        for measured in (False, True):
            for case in cases:
                units = len(case["code"][:case["cursor"]].encode("utf-16-le")) // 2
                started = time.perf_counter()
                async with http.post("/autocomplete", json={"code": case["code"],
                                                            "cursorPosition": units}) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
                if measured:
                    times.append(time.perf_counter() - started)
    return times


def hostile(args: argparse.Namespace) -> None:
    import sysconfig
    import pairserver
    m = 1_000_000
    texts = {"name line": "a" * m, "underscores": "\n".join(["_" * 299] * (m // 300)),
             "name line, dot": "a" * (m - 1) + ".",
             "dots": "a." * (m // 2),
             "brackets": "(" * m, "newlines": "\n" * m, "x lines": "x\n" * (m // 2),
             "assignments": "value = 1\n" * (m // 10), "quotes": "'\"" * (m // 2),
             "triple quotes": "'''a" * (m // 4), "from import (": "from os import (" + "a,\n" * (m // 3),
             "spaces, dot": "a" + " " * (m - 2) + ".", "calls": "f(" * (m // 4),
             "defs": "def f():\n    pass\n" * (m // 18), "broken ifs": "if x\n" * (m // 5),
             "comment": "#" * m, "a class": "class C:\n" + "    def f(self, x):\n        return x\n\n" * 600,
             "a class, broken": "class C:\n" + "    def f(self, x):\n        return x(\n\n" * 600}

    def cpu_ms(code: str, cursor: int) -> float:
        started = time.process_time()
        pairserver.suggest(code, cursor)
        return (time.process_time() - started) * 1000

    typing = Path(sysconfig.get_paths()["stdlib"], "typing.py").read_text()
    baseline = statistics.median(cpu_ms(typing, len(typing) * i // 10) for i in range(1, 10))
    print(f"hostile: suggest() CPU ms on 1 MB texts; typing.py ({len(typing):,} chars) "
          f"p50 {baseline:.1f} ms")
    worst = 0.0
    for name, code in texts.items():
        for where, cursor in (("end", len(code)), ("middle", len(code) // 2)):
            first, again = cpu_ms(code, cursor), cpu_ms(code, cursor)
            worst = max(worst, first, again)
            print(f"{name:16} {where:7} first {first:7.1f}   again {again:7.1f}")
    print(f"worst {worst:.1f} ms = {worst / baseline:.1f}x typing.py's (target <= 50 ms)")
    port = free_port()
    proc = start("pairserver", port, "--pool", "0")
    try:
        before, after = asyncio.run(completion_memory(proc, port))
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"server memory: {before / 1024:.0f} MiB at start, {after / 1024:.0f} MiB after completing "
          "in six 700 KB files at nine places each (caches bounded at 64 MiB)")


async def completion_memory(proc: subprocess.Popen, port: int) -> tuple[int, int]:
    """The server's RSS before and after completing in six big files."""
    files = ["".join(f"def f{i}_{n}(a, b):\n    return a + b * {n}\n" for n in range(16_000))
             for i in range(6)]
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        before = rss_kib(proc.pid)
        for code in files:
            for cursor in range(0, len(code), len(code) // 8):
                body = json.dumps({"code": code, "cursorPosition": cursor}).encode()
                await http.post("/autocomplete", data=io.BytesIO(body),
                                headers={"Content-Type": "application/json"})
        return before, rss_kib(proc.pid)


# ---------------------------------------------------------------------------
# page: the editor in real browsers
# ---------------------------------------------------------------------------

NOW = "performance.timeOrigin + performance.now()"  # the same clock on every page of the machine


async def open_pair(browser, port: int, code: str):
    """Alice's and Bob's pages in a new room holding code, Alice's caret at the end."""
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{port}/rooms", json={"code": code})
        room = (await resp.json())["roomId"]
    pages = []
    for name in ("Alice", "Bob"):
        page = await (await browser.new_context()).new_page()
        await page.add_init_script(f"localStorage.setItem('pairserver.name', '{name}')")
        await page.goto(f"http://localhost:{port}/#room={room}")
        await page.locator("#status.online").wait_for(timeout=15000)
        pages.append(page)
    alice, bob = pages
    await alice.evaluate(f"""window.keys = []; window.handled = [];
        addEventListener("keydown", () => keys.push({NOW}), true);
        pairserver.S.onLocal = () => handled.push({NOW});
        pairserver.view.focus(); pairserver.view.dispatch({{selection: {{anchor: {len(code)}}}}})""")
    await bob.evaluate(f"window.seen = []; pairserver.S.onRemote = () => seen.push({NOW})")
    return alice, bob


async def clock_offset(alice, bob) -> float:
    """Bob's page clock minus Alice's, in ms: each page has its own time origin.
    Read Alice's, Bob's, Alice's again; the tightest of 30 tries bounds the error."""
    best = (float("inf"), 0.0)
    for _ in range(30):
        a1, b1, a2 = await alice.evaluate(NOW), await bob.evaluate(NOW), await alice.evaluate(NOW)
        best = min(best, (a2 - a1, b1 - (a1 + a2) / 2))
    return best[1]


async def keys_to_other_screen(alice, bob, keys: int) -> tuple[list[float], list[float]]:
    """Per key: (key down to the other screen, key down to handled in its own page), in ms."""
    await alice.evaluate("keys.length = 0; handled.length = 0")
    await bob.evaluate("seen.length = 0")
    for i in range(keys):
        await alice.keyboard.press("x")
        await bob.wait_for_function(f"seen.length > {i}")
    offset = await clock_offset(alice, bob)
    down, handled, seen = [await alice.evaluate(v) for v in ("keys", "handled")] + [await bob.evaluate("seen")]
    return [s - offset - d for d, s in zip(down, seen)], [h - d for d, h in zip(down, handled)]


TEXTAREA_PAGE = "d763021"  #: the last commit whose page was a textarea, not CodeMirror


async def textarea_page(browser, port: int, code: str, keys: int) -> list[float]:
    """The same keys on the page as it was before CodeMirror (its script's
    globals: the textarea `ed`, `receive`), served by this server."""
    async with aiohttp.ClientSession() as http:
        room = (await (await http.post(f"http://127.0.0.1:{port}/rooms", json={"code": code})).json())["roomId"]
    alice, bob = [await (await browser.new_context()).new_page() for _ in range(2)]
    for page in (alice, bob):
        await page.goto(f"http://localhost:{port}/#room={room}")
        await page.locator("#status.online").wait_for(timeout=15000)
    await alice.evaluate(f"window.keys = []; addEventListener('keydown', () => keys.push({NOW}), true); "
                         "ed.focus(); ed.setSelectionRange(ed.value.length, ed.value.length)")
    await bob.evaluate(f"window.seen = []; const r = receive; receive = m => {{ r(m); "
                       f"if (m.type === 'code_update') seen.push({NOW}); }}; 0")
    for i in range(keys + 3):
        await alice.keyboard.press("x")
        await bob.wait_for_function(f"seen.length > {i}")
    offset = await clock_offset(alice, bob)
    keys_down, seen = (await alice.evaluate("keys"))[3:], (await bob.evaluate("seen"))[3:]
    for page in (alice, bob):
        await page.context.close()
    return [s - offset - d for d, s in zip(keys_down, seen)]


async def page_bench(port: int, keys: int, old_port: int | None) -> None:
    from playwright.async_api import async_playwright
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        rows = {}
        for lines in (20, 2000, 10000):
            code = "".join(f"value_{i} = {i} * 2  # line {i}\n" for i in range(lines))
            alice, bob = await open_pair(browser, port, code)
            await keys_to_other_screen(alice, bob, 3)  # warm up
            rows[lines] = await keys_to_other_screen(alice, bob, keys)
            if lines == 20:
                rows["floor"] = await floor_times(alice, bob, keys)
            for page in (alice, bob):  # each measurement with only its own two pages open
                await page.context.close()
            if old_port and lines < 10000:
                rows["textarea", lines] = await textarea_page(browser, old_port, code, keys)
        await browser.close()
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"page: {keys} keys each, median ms (Chromium headless, key presses injected by Playwright)")
    base = med(rows["floor"])
    print(f"key down -> a message to the other page, no editor (floor) {base:7.2f}")
    for lines, target in ((20, 3), (2000, 5)):
        other = med(rows[lines][0])
        print(f"key down -> the other screen, {lines:>5} lines               {other:7.2f}   "
              f"{other / base:.2f}x the floor; the editor adds {other - base:.2f} (target <= {target})")
        if ("textarea", lines) in rows:
            old = med(rows["textarea", lines])
            print(f"   the textarea page of {TEXTAREA_PAGE}, {lines:>5} lines           {old:7.2f}   "
                  f"this page takes {other / old:.2f}x its time")
    own, small = med(rows[10000][1]), med(rows[20][1])
    print(f"key down -> handled in its own page, 10,000 lines        {own:7.2f}   "
          f"{own / small:.2f}x a 20-line file ({small:.2f}; target < 16)")


async def floor_times(alice, bob, keys: int) -> list[float]:
    """The floor: a key that the editor ignores (F2), whose keydown handler
    sends a message straight into the socket; the other page hears it. The
    same path as a typed key (the same injected input, the same frame after it,
    the server, the other page) without the editor."""
    await alice.evaluate("window.sentAt = []; addEventListener('keydown', e => e.key === 'F2' && "
                         f"(sentAt.push({NOW}), pairserver.S.ws.send(JSON.stringify("
                         "{type: 'cursor', position: 0}))), true)")
    await bob.evaluate("window.heardAt = []; pairserver.S.ws.addEventListener('message', e => "
                       f"JSON.parse(e.data).type === 'cursor' && heardAt.push({NOW}))")
    for i in range(keys):
        await alice.keyboard.press("F2")
        await bob.wait_for_function(f"heardAt.length > {i}")
    offset = await clock_offset(alice, bob)
    return [h - offset - s for s, h in zip(await alice.evaluate("sentAt"), await bob.evaluate("heardAt"))]


def page(args: argparse.Namespace) -> None:
    """This page, and the textarea page before it (from git, if this is a
    clone), each served by this server."""
    port, old_port, procs = free_port(), None, []
    old = tempfile.mkdtemp(prefix="pairserver-textarea-")
    shown = subprocess.run(["git", "show", f"{TEXTAREA_PAGE}:static/index.html"], cwd=HERE,
                           capture_output=True, text=True)
    try:
        procs.append(start("pairserver", port, "--rooms-per-minute", "0"))
        if shown.returncode == 0:
            Path(old, "index.html").write_text(shown.stdout)
            old_port = free_port()
            procs.append(start("pairserver", old_port, "--rooms-per-minute", "0", "--static-dir", old))
        asyncio.run(page_bench(port, args.keys, old_port))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="name", required=True)
    c = sub.add_parser("collab", help="rooms of typists: latency, throughput, memory")
    c.add_argument("--rooms", type=int, default=50)
    c.add_argument("--clients", type=int, default=6)
    c.add_argument("--rate", type=float, default=5.0, help="edits per second per client")
    c.add_argument("--seconds", type=float, default=10.0)
    c.add_argument("--repeat", type=int, default=1, help="runs of each server, taking the medians")
    c.add_argument("--idle", type=int, default=1000, help="idle connections for the memory figure")
    c.add_argument("--db", action="append", help="also measure rooms kept in: sqlite, postgres (a server "
                                                 "of the benchmark's own), or a path or URL; repeatable")
    e = sub.add_parser("execute", help="run round trips against cold starts, and throughput")
    e.add_argument("--runs", type=int, default=50)
    e.add_argument("--seconds", type=float, default=10.0, help="length of the throughput test")
    a = sub.add_parser("autocomplete", help="completion quality and latency against Jedi")
    a.add_argument("--files", type=int, default=25)
    a.add_argument("--per-file", type=int, default=8)
    a.add_argument("--seed", type=int, action="append", help="which files and places (default 7); "
                                                            "repeat to pool the cases of several")
    sub.add_parser("hostile", help="autocomplete's CPU time on texts made to be slow")
    g = sub.add_parser("page", help="key to the other person's screen, in real browsers")
    g.add_argument("--keys", type=int, default=20)
    r = sub.add_parser("relay", help="run the bare relay (the baseline) alone")
    r.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    if args.name == "relay":
        web.run_app(relay_app(), port=args.port, print=None, access_log=None)
    else:
        {"collab": collab, "execute": execute, "autocomplete": autocomplete,
         "hostile": hostile, "page": page}[args.name](args)


if __name__ == "__main__":
    main()
