"""A 200 MB blob through the blob store over loopback, against a plain file copy over loopback.

Four processes, each measured on its own: our blob store (uvicorn, the ``/blobs`` router, a
SQLite database) and our client (``blob_client.upload_file`` / ``download_to_file``); the
baseline is a plain TCP server and client (Python, 1 MiB ``sendall`` / ``recv_into``, the
received bytes written to a file and fsynced), no HTTP, no hashing. Same bytes, same disk,
same loopback. Per direction:

- **throughput**: MB/s of wall time from the first byte read to the file fsynced (ours
  includes the client's hashing pass before an upload, the hash checks on both ends and the
  database record);
- **peak RSS**: each process's ``VmHWM`` (reset before every transfer through
  ``/proc/<pid>/clear_refs``) minus its RSS before the transfer: what the transfer cost.

Each transfer is repeated (``--runs``, different bytes every upload); the median is reported.

    python -m bench.blobs [--mb 200] [--runs 3]

Targets: each throughput >= 0.5 of the plain copy's; each process's peak RSS growth <= 32 MB
(a 200 MB blob is never held). Results: bench/results/blobs.json and .md. No regtest network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, cpu_seconds, free_port, markdown_table, write

MB = 1_000_000
MiB = 1024 * 1024
CHUNK = MiB
RSS_TARGET_MB = 32.0
KEY_ENV = "FEDSTR_BENCH_BLOB_KEY"
THROUGHPUT_TARGET = 0.5


# ----------------------------------------------------------------------- process memory


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def reset_peak(pid: int) -> int:
    """Reset the process's peak RSS to its current RSS (Linux clear_refs 5); returns that RSS (kB)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss_kb(pid)


def peak_growth_mb(pid: int, before_kb: int) -> float:
    return round((rss_kb(pid, "VmHWM") - before_kb) / 1024, 1)


# ------------------------------------------------------------------- the processes' code


def _serve_blobs(directory: Path, port: int, pubkey: str) -> None:
    """Our blob store: the /blobs router under uvicorn (as service.app mounts it), SQLite."""
    from types import SimpleNamespace

    import uvicorn
    from fastapi import FastAPI

    from service.api import blobs, errors
    from service.db import create_engine, session_factory
    from service.migrate import upgrade_async

    url = f"sqlite+aiosqlite:///{directory / 'blobs.sqlite3'}"
    asyncio.run(upgrade_async(url))
    app = FastAPI()
    errors.install(app)
    app.include_router(blobs.router)
    app.state.settings = SimpleNamespace(
        blob_dir=str(directory / "store"), blob_allowed_pubkeys=[pubkey], public_url=None
    )  # every other setting at its default (512 MiB per blob)
    app.state.sessions = session_factory(create_engine(url))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def _serve_plain(directory: Path, port: int) -> None:
    """The baseline: one line ``PUT <size> <name>`` or ``GET <name>``, then the raw bytes."""
    srv = socket.create_server(("127.0.0.1", port))
    buf = bytearray(CHUNK)
    while True:
        conn, _ = srv.accept()
        with conn, conn.makefile("rb") as r:
            verb, *args = r.readline().decode().split() or [""]  # a bare connect (the readiness probe)
            if verb == "PUT":
                size, name = int(args[0]), args[1]
                with open(directory / name, "wb") as f:
                    left = size
                    while left:
                        n = r.readinto(memoryview(buf)[: min(CHUNK, left)])
                        if not n:
                            break
                        f.write(memoryview(buf)[:n])
                        left -= n
                    f.flush()
                    os.fsync(f.fileno())
                conn.sendall(b"OK\n")
            elif verb == "GET":
                with open(directory / args[0], "rb") as f:
                    while n := f.readinto(buf):
                        conn.sendall(memoryview(buf)[:n])


def _client(kind: str, op: str, port: int, path: Path, extra: str) -> dict:
    """One transfer, timed in this (fresh) process; the parent reads its RSS."""
    if kind == "ours":
        from service.api import blob_client
        from service.nostr.nip01 import SecretKey

        base = f"http://127.0.0.1:{port}/blobs"
        t0 = time.perf_counter()
        if op == "up":
            key = SecretKey.from_hex(os.environ[KEY_ENV])  # a throwaway key, never on a command line
            asyncio.run(blob_client.upload_file(base, key, path))
        else:
            asyncio.run(blob_client.download_to_file(base, extra, path, max_bytes=1 << 40))
        return {"seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        buf = bytearray(CHUNK)
        if op == "up":
            size = path.stat().st_size
            s.sendall(f"PUT {size} {extra}\n".encode())
            with open(path, "rb") as f:
                while n := f.readinto(buf):
                    s.sendall(memoryview(buf)[:n])
            assert s.makefile("rb").readline() == b"OK\n"
        else:
            s.sendall(f"GET {extra}\n".encode())
            with open(path, "wb") as f:
                while n := s.recv_into(buf):
                    f.write(memoryview(buf)[:n])
                f.flush()
                os.fsync(f.fileno())
    return {"seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------- driver


def _spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.blobs", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def _transfer(
    server_pid: int, kind: str, op: str, port: int, path: Path, extra: str, env: dict[str, str] | None = None
) -> dict:
    """Run one client transfer; the client waits for 'go' so that both peaks are reset first."""
    client = _spawn("_client", kind, op, str(port), str(path), extra, env=env)
    assert client.stdin is not None and client.stdout is not None
    assert client.stdout.readline().strip() == "ready"
    os.sync()  # the previous transfer's dirty pages are not written back during this one
    server_before = reset_peak(server_pid)
    client_before = reset_peak(client.pid)
    cpu_before = cpu_seconds(pid=server_pid), cpu_seconds(pid=client.pid)
    client.stdin.write("go\n")
    client.stdin.flush()
    out = json.loads(client.stdout.readline())
    out["server_cpu_s"] = round(cpu_seconds(pid=server_pid) - cpu_before[0], 3)
    out["client_cpu_s"] = round(cpu_seconds(pid=client.pid) - cpu_before[1], 3)
    out["server_peak_mb"] = peak_growth_mb(server_pid, server_before)
    out["client_peak_mb"] = peak_growth_mb(client.pid, client_before)
    client.stdin.close()
    client.wait(30)
    return out


def _perturb(path: Path, run: int) -> str:
    """Make the file's bytes differ from the previous run's (a new blob every upload); its hash."""
    from service.api.blob_client import file_sha256

    with open(path, "r+b") as f:
        f.write(run.to_bytes(8, "big") * 4)
    return file_sha256(path)[0]


def _median(runs: list[dict], field: str) -> float:
    return round(statistics.median(r[field] for r in runs), 3)


def measure(size_mb: int, runs: int) -> dict:
    from service.nostr.nip01 import SecretKey

    key = SecretKey.generate()
    size = size_mb * MB
    with tempfile.TemporaryDirectory(prefix="bench-blobs-") as tmp:
        d = Path(tmp)
        (d / "ours").mkdir()
        (d / "plain").mkdir()
        src = d / "model.bin"
        with open(src, "wb") as f:  # incompressible, written 1 MiB at a time
            for _ in range(0, size, CHUNK):
                f.write(os.urandom(min(CHUNK, size - f.tell())))
        ours_port, plain_port = free_port(), free_port()
        ours = _spawn("_serve_blobs", str(d / "ours"), str(ours_port), key.public_key_hex)
        plain = _spawn("_serve_plain", str(d / "plain"), str(plain_port))
        results: dict[str, dict[str, list[dict]]] = {"ours": {"up": [], "down": []}, "plain": {"up": [], "down": []}}
        try:
            _wait_port(ours_port)
            _wait_port(plain_port)
            idle = {"ours_server_rss_mb": round(rss_kb(ours.pid) / 1024, 1)}
            for run in range(runs):
                digest = _perturb(src, run)
                name = f"blob-{run}"
                results["plain"]["up"].append(_transfer(plain.pid, "plain", "up", plain_port, src, name))
                results["ours"]["up"].append(
                    _transfer(ours.pid, "ours", "up", ours_port, src, "", env={KEY_ENV: key.to_hex()})
                )
                results["plain"]["down"].append(
                    _transfer(plain.pid, "plain", "down", plain_port, d / "got-plain", name)
                )
                results["ours"]["down"].append(_transfer(ours.pid, "ours", "down", ours_port, d / "got-ours", digest))
                from service.api.blob_client import file_sha256

                assert file_sha256(d / "got-ours") == (digest, size), "our download is not the blob"
                assert file_sha256(d / "got-plain") == (digest, size), "the plain copy is not the blob"
                for p in (d / "got-ours", d / "got-plain", d / "plain" / name):
                    p.unlink()
        finally:
            for proc in (ours, plain):
                proc.terminate()
                proc.wait(10)
    out: dict = {"size_mb": size_mb, "runs": runs, "idle": idle, "load_average": os.getloadavg()}
    for op in ("up", "down"):
        o, p = results["ours"][op], results["plain"][op]
        ours_mbps = round(size_mb / _median(o, "seconds"), 1)
        plain_mbps = round(size_mb / _median(p, "seconds"), 1)
        ours_cpu = _median([{"c": r["server_cpu_s"] + r["client_cpu_s"]} for r in o], "c")
        plain_cpu = _median([{"c": r["server_cpu_s"] + r["client_cpu_s"]} for r in p], "c")
        out[op] = {
            "ours_mb_per_s": ours_mbps,
            "plain_mb_per_s": plain_mbps,
            "ratio": round(ours_mbps / plain_mbps, 3),
            "ours_cpu_s": ours_cpu,  # server + client, the median run
            "plain_cpu_s": plain_cpu,
            "cpu_ratio": round(ours_cpu / plain_cpu, 2) if plain_cpu else None,
            "ours_server_peak_mb": max(r["server_peak_mb"] for r in o),
            "ours_client_peak_mb": max(r["client_peak_mb"] for r in o),
            "plain_server_peak_mb": max(r["server_peak_mb"] for r in p),
            "plain_client_peak_mb": max(r["client_peak_mb"] for r in p),
            "runs": {"ours": o, "plain": p},
        }
        peaks = (out[op]["ours_server_peak_mb"], out[op]["ours_client_peak_mb"])
        out[op]["met"] = {
            "throughput": out[op]["ratio"] >= THROUGHPUT_TARGET,
            "rss": max(peaks) <= RSS_TARGET_MB,
        }
    return out


def report(r: dict) -> str:
    rows = []
    for op, label in (("up", "upload"), ("down", "download")):
        x = r[op]
        rows.append(
            (
                f"{label} {r['size_mb']} MB: MB/s",
                x["plain_mb_per_s"],
                x["ours_mb_per_s"],
                x["ratio"],
                f">= {THROUGHPUT_TARGET}",
                "pass" if x["met"]["throughput"] else "MISS",
            )
        )
        rows.append(
            (
                f"{label}: CPU seconds, server + client",
                x["plain_cpu_s"],
                x["ours_cpu_s"],
                x["cpu_ratio"],
                "",
                "",
            )
        )
        rows.append(
            (
                f"{label}: server peak RSS growth (MB)",
                x["plain_server_peak_mb"],
                x["ours_server_peak_mb"],
                "",
                f"<= {RSS_TARGET_MB:g}",
                "pass" if x["ours_server_peak_mb"] <= RSS_TARGET_MB else "MISS",
            )
        )
        rows.append(
            (
                f"{label}: client peak RSS growth (MB)",
                x["plain_client_peak_mb"],
                x["ours_client_peak_mb"],
                "",
                f"<= {RSS_TARGET_MB:g}",
                "pass" if x["ours_client_peak_mb"] <= RSS_TARGET_MB else "MISS",
            )
        )
    head = (
        f"# A {r['size_mb']} MB blob through the blob store vs a plain copy over loopback\n\n"
        f"`python -m bench.blobs --mb {r['size_mb']} --runs {r['runs']}` (median of {r['runs']} runs, "
        f"peaks the largest); measured {r['when']} on commit {r['commit']}; details in blobs.json.\n\n"
    )
    notes = (
        "\n- ours: uvicorn + the `/blobs` router + SQLite (server); `blob_client.upload_file` (a hashing "
        "pass, then the file streamed with its Content-Length) and `download_to_file` (hashed while "
        "written, fsynced, renamed) (client). The server hashes while it writes, fsyncs, records the "
        "blob in the database and renames; a download is read from the file 1 MiB at a time.\n"
        "- plain: a Python TCP server and client, 1 MiB `sendall` / `recv_into`, the receiver writes "
        "the bytes to a file and fsyncs: no HTTP, no hashing, no database.\n"
        "- peak RSS growth = VmHWM after the transfer minus VmRSS before it (VmHWM reset through "
        "/proc/<pid>/clear_refs), per process. Idle RSS of our server: "
        f"{r['idle']['ours_server_rss_mb']} MB.\n"
        f"- machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}, load average "
        f"{', '.join(f'{x:.1f}' for x in r['load_average'])} at the end (other work shares the machine: "
        "wall-time figures are noisy, CPU seconds are not); the blob file is in the page cache (just "
        "written) for both, and dirty pages are synced before every transfer.\n"
    )
    return head + markdown_table(rows, ("figure", "plain copy", "ours", "ours/plain", "target", "")) + notes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200, help="blob size in MB (default %(default)s)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    result = measure(args.mb, args.runs)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result["commit"] = commit.stdout.strip()
    path = write("blobs", result)
    stored = json.loads(path.read_text())
    text = report(stored)
    (RESULTS / "blobs.md").write_text(text)
    print(text)


def _entry() -> None:
    """Subcommands run in child processes (``_serve_blobs``, ``_serve_plain``, ``_client``)."""
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "_serve_blobs":
        _serve_blobs(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif cmd == "_serve_plain":
        _serve_plain(Path(sys.argv[2]), int(sys.argv[3]))
    elif cmd == "_client":
        kind, op, port, path, extra = sys.argv[2:7]
        if kind == "ours":  # imported before the peak is reset: the transfer's cost, not the imports'
            import service.api.blob_client
            import service.nostr.nip01  # noqa: F401
        print("ready", flush=True)
        assert sys.stdin.readline().strip() == "go"
        print(json.dumps(_client(kind, op, int(port), Path(path), extra)), flush=True)
        sys.stdin.readline()  # stay alive until the parent has read our peak RSS
    else:
        main()


if __name__ == "__main__":
    _entry()
