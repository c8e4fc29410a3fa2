"""Benchmarks for pairserver, each beside a baseline measured in the same run.

    python bench.py collab [--rooms 50 --clients 6 --rate 5 --seconds 10]
    python bench.py execute [--runs 50 --seconds 10]

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
"""

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
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
    """Measure both servers under the same load; print the figures and ratios."""
    print(f"collab: {args.rooms} rooms x {args.clients} clients x {args.rate} edits/s, "
          f"{args.seconds:g} s measured after 2 s warm-up")
    results = {}
    for kind in ("relay", "pairserver"):
        port = free_port()
        proc = start(kind, port, *(["--max-rooms", "5000"] if kind == "pairserver" else []))
        try:
            figures = asyncio.run(collab_load(port, args.rooms, args.clients, args.rate, args.seconds))
            figures["kib"] = asyncio.run(idle_memory(proc, port, args.idle, kind == "pairserver"))
        finally:
            proc.terminate()
            proc.wait(10)
        results[kind] = figures
        if figures["errors"]:
            print(f"warning: {kind} refused {figures['errors']} updates")
    print(f"{'':12} {'p50 ms':>8} {'p99 ms':>8} {'updates/s':>10} {'KiB/idle conn':>14}")
    for kind, f in results.items():
        print(f"{kind:12} {f['p50']:8.2f} {f['p99']:8.2f} {f['updates']:10.0f} {f['kib']:14.1f}")
    r, p = results["relay"], results["pairserver"]
    print(f"pairserver / relay: p50 {p['p50'] / r['p50']:.2f}x, p99 {p['p99'] / r['p99']:.2f}x "
          f"(target <= 2x), memory {p['kib'] / r['kib']:.2f}x ({p['kib']:.1f} KiB, target <= 25)")


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
    python = runner.languages["python"].executable
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
        port = free_port()
        proc = start("pairserver", port, *flags)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="name", required=True)
    c = sub.add_parser("collab", help="rooms of typists: latency, throughput, memory")
    c.add_argument("--rooms", type=int, default=50)
    c.add_argument("--clients", type=int, default=6)
    c.add_argument("--rate", type=float, default=5.0, help="edits per second per client")
    c.add_argument("--seconds", type=float, default=10.0)
    c.add_argument("--idle", type=int, default=1000, help="idle connections for the memory figure")
    e = sub.add_parser("execute", help="run round trips against cold starts, and throughput")
    e.add_argument("--runs", type=int, default=50)
    e.add_argument("--seconds", type=float, default=10.0, help="length of the throughput test")
    r = sub.add_parser("relay", help="run the bare relay (the baseline) alone")
    r.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    if args.name == "relay":
        web.run_app(relay_app(), port=args.port, print=None, access_log=None)
    else:
        {"collab": collab, "execute": execute}[args.name](args)


if __name__ == "__main__":
    main()
