#!/usr/bin/env python3
"""Hostile clients against a running `rustci dev` (issue 8, items 4 and 5).

Loopback only, bounded loops. Start the daemon first, e.g.

    ./target/release/rustci dev --data-dir /tmp/h --listen 127.0.0.1:18411 &
    python3 scripts/hostile_http.py --server 127.0.0.1:18411 --pid $! SCENARIO

Scenarios (each prints one JSON line per result):
  drip        N connections drip one body byte every 5 s; a new client's
              /healthz is timed every second meanwhile.
  fill        submit jobs until the daemon holds --jobs of them (queued).
  list-unread N clients request the job list and never read; resident
              memory before, during, and after they hang up.
  list-load   8 clients page through the whole job list in a loop while one
              client submits; submission latency p50/p99. With --no-submit
              it only lists (measure submissions from another process,
              e.g. `rustci bench submit --server`, so that this script's
              GIL does not count against the daemon).
  log-unread  N clients request an attempt's log and never read.
"""

import argparse
import json
import os
import socket
import statistics
import threading
import time


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return -1


def connect(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(s):
    """Reads one response (Content-Length or chunked). Returns (status, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the head")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            rest += chunk
        return status, rest[:n]
    body = b""
    while True:
        while b"\r\n" not in rest:
            rest += s.recv(65536)
        size, rest = rest.split(b"\r\n", 1)
        n = int(size, 16)
        while len(rest) < n + 2:
            rest += s.recv(65536)
        body += rest[:n]
        rest = rest[n + 2:]
        if n == 0:
            return status, body


def request(s, method, path, body=None):
    data = b"" if body is None else json.dumps(body).encode()
    s.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
        f"Content-Type: application/json\r\n\r\n".encode() + data
    )
    return read_response(s)


def healthz_ms(addr):
    t = time.monotonic()
    s = connect(addr)
    status, _ = request(s, "GET", "/healthz")
    s.close()
    assert status == 200, status
    return (time.monotonic() - t) * 1000


def emit(**kv):
    print(json.dumps(kv), flush=True)


def drip(args):
    socks = []
    for i in range(args.clients):
        try:
            s = connect(args.server)
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            s.setblocking(False)
            socks.append(s)
        except OSError as e:
            emit(scenario="drip", note=f"connection {i} failed: {e}")
            break
    emit(scenario="drip", opened=len(socks), rss_mib=round(rss_mib(args.pid), 1))
    samples = []
    end = time.monotonic() + args.seconds
    next_drip = time.monotonic()
    reopened = 0
    while time.monotonic() < end:
        if time.monotonic() >= next_drip:
            # One byte on each; a connection the server closed is reopened,
            # so the attacker keeps every slot it can.
            for i, s in enumerate(socks):
                try:
                    s.send(b" ")
                except OSError:
                    s.close()
                    try:
                        n = connect(args.server)
                        n.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
                        n.setblocking(False)
                        socks[i] = n
                        reopened += 1
                    except OSError:
                        pass
            next_drip = time.monotonic() + 5
        samples.append(healthz_ms(args.server))
        time.sleep(1)
    samples.sort()
    emit(
        scenario="drip",
        clients=args.clients,
        healthz_samples=len(samples),
        healthz_p50_ms=round(statistics.median(samples), 1),
        healthz_max_ms=round(samples[-1], 1),
        attacker_reconnects=reopened,
    )
    for s in socks:
        s.close()


def fill(args):
    s = connect(args.server)
    _, body = request(s, "GET", "/v1/cluster")
    have = sum(json.loads(body)["jobs"].values())
    t = time.monotonic()
    for _ in range(max(0, args.jobs - have)):
        status, body = request(
            s, "POST", "/v1/jobs", {"command": ["true"], "constraints": {"os": "plan9"}}
        )
        assert status == 201, body
    emit(scenario="fill", jobs=args.jobs, seconds=round(time.monotonic() - t, 1))


def list_unread(args):
    before = rss_mib(args.pid)
    socks = []
    path = f"/v1/jobs?limit={args.limit}" if args.limit else "/v1/jobs"
    for _ in range(args.clients):
        s = connect(args.server)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        socks.append(s)
    time.sleep(3)
    during = rss_mib(args.pid)
    for s in socks:
        s.close()
    time.sleep(args.settle)
    after = rss_mib(args.pid)
    emit(
        scenario="list-unread",
        clients=args.clients,
        path=path,
        rss_before_mib=round(before, 1),
        rss_during_mib=round(during, 1),
        growth_mib=round(during - before, 1),
        rss_after_mib=round(after, 1),
    )


def page_all(s, limit):
    cursor = None
    n = 0
    while True:
        path = f"/v1/jobs?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        status, body = request(s, "GET", path)
        assert status == 200, body
        page = json.loads(body)
        n += len(page["jobs"])
        cursor = page["next_cursor"]
        if cursor is None:
            return n


def list_load(args):
    stop = threading.Event()
    pages = [0]

    def lister():
        s = connect(args.server)
        while not stop.is_set():
            page_all(s, args.limit or 1000)
            pages[0] += 1
        s.close()

    threads = [threading.Thread(target=lister) for _ in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(1)
    if args.no_submit:
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        emit(scenario="list-load", listers=args.clients, page_limit=args.limit or 1000,
             full_listings=pages[0], seconds=args.seconds, rss_mib=round(rss_mib(args.pid), 1))
        return
    s = connect(args.server)
    lat = []
    hz = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        t = time.monotonic()
        status, body = request(
            s, "POST", "/v1/jobs", {"command": ["true"], "constraints": {"os": "plan9"}}
        )
        assert status == 201, body
        lat.append((time.monotonic() - t) * 1000)
        if len(lat) % 50 == 0:
            hz.append(healthz_ms(args.server))
        time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join()
    lat.sort()
    hz.sort()
    emit(
        scenario="list-load",
        listers=args.clients,
        page_limit=args.limit or 1000,
        full_listings=pages[0],
        submissions=len(lat),
        submit_p50_ms=round(lat[len(lat) // 2], 2),
        submit_p99_ms=round(lat[int(len(lat) * 0.99)], 2),
        submit_max_ms=round(lat[-1], 2),
        healthz_p50_ms=round(hz[len(hz) // 2], 2) if hz else None,
        rss_mib=round(rss_mib(args.pid), 1),
    )


def log_unread(args):
    before = rss_mib(args.pid)
    socks = []
    for _ in range(args.clients):
        s = connect(args.server)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET /v1/jobs/{args.job}/logs HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        socks.append(s)
    time.sleep(3)
    during = rss_mib(args.pid)
    hz = healthz_ms(args.server)
    for s in socks:
        s.close()
    time.sleep(args.settle)
    emit(
        scenario="log-unread",
        clients=args.clients,
        rss_before_mib=round(before, 1),
        rss_during_mib=round(during, 1),
        growth_mib=round(during - before, 1),
        rss_after_mib=round(rss_mib(args.pid), 1),
        healthz_ms=round(hz, 1),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["drip", "fill", "list-unread", "list-load", "log-unread"])
    p.add_argument("--server", required=True)
    p.add_argument("--pid", type=int, required=True, help="the daemon's pid, for its RSS")
    p.add_argument("--clients", type=int, default=30)
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--job", type=int, default=1)
    p.add_argument("--settle", type=float, default=10)
    p.add_argument("--no-submit", action="store_true")
    args = p.parse_args()
    host = args.server.rsplit(":", 1)[0]
    assert host in ("127.0.0.1", "localhost", "::1"), "loopback only"
    {"drip": drip, "fill": fill, "list-unread": list_unread, "list-load": list_load,
     "log-unread": log_unread}[args.scenario](args)


if __name__ == "__main__":
    main()
