#!/usr/bin/env python3
"""A connect storm from a client that is not the lobby's harness: Python's ssl (OpenSSL).

Every connection is a full TLS handshake (TLS 1.3 unless --tls12) with a device certificate
from DIR/devices (`lobby certs init --devices N`), then MQTT 3.1.1 CONNECT, CONNACK, close.
The client reads the server's TLS 1.3 session ticket as any OpenSSL client does, but never
offers it back. With --server-pid it prints the server's CPU time per connect (utime+stime
from /proc/PID/stat, so the client's own cost does not count).

    loadtest/ossl-storm.py --port 28883 --certs DIR [--threads 8] [--rounds 1] [--server-pid P]

The last line on stdout is one JSON object:
{"connects", "failed", "seconds", "connects_per_sec", "server_cpu_us_per_connect"}.
"""

import argparse
import glob
import json
import os
import socket
import ssl
import struct
import threading
import time


def connect_packet(client_id: bytes) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s."""
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(client_id)) + client_id
    return bytes([0x10, len(body)]) + body


def server_cpu_us(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks * 1_000_000 / os.sysconf("SC_CLK_TCK")


def contexts(certs: str, ca: str, tls12: bool) -> list:
    out = []
    for pem in sorted(glob.glob(os.path.join(certs, "devices", "*.pem"))):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca)
        ctx.load_cert_chain(pem, pem[:-4] + ".key")
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        else:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        out.append((os.path.basename(pem)[:-4].encode(), ctx))
    if not out:
        raise SystemExit(f"no device certificates in {certs}/devices")
    return out


def storm(host, port, jobs, threads, timeout):
    lock = threading.Lock()
    failed = [0]
    queue = list(jobs)

    def work():
        while True:
            with lock:
                if not queue:
                    return
                name, ctx = queue.pop()
            try:
                with socket.create_connection((host, port), timeout=timeout) as raw:
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                        tls.sendall(connect_packet(name))
                        ack = b""
                        while len(ack) < 4:
                            chunk = tls.recv(4 - len(ack))
                            if not chunk:
                                raise ConnectionError("closed before CONNACK")
                            ack += chunk
                        if ack[0] != 0x20 or ack[3] != 0:
                            raise ConnectionError(f"CONNACK {ack.hex()}")
            except (OSError, ConnectionError):
                with lock:
                    failed[0] += 1

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return failed[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--certs", required=True, help="a `lobby certs init` directory")
    p.add_argument("--ca", help="server CA (default: CERTS/ca.pem)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="passes over the devices")
    p.add_argument("--tls12", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--server-pid", type=int)
    a = p.parse_args()
    devices = contexts(a.certs, a.ca or os.path.join(a.certs, "ca.pem"), a.tls12)
    jobs = devices * a.rounds
    cpu0 = server_cpu_us(a.server_pid) if a.server_pid else None
    t0 = time.monotonic()
    failed = storm(a.host, a.port, jobs, a.threads, a.timeout)
    seconds = time.monotonic() - t0
    time.sleep(0.5)  # the server's last closes
    out = {
        "connects": len(jobs),
        "failed": failed,
        "seconds": round(seconds, 2),
        "connects_per_sec": round(len(jobs) / seconds, 1),
    }
    if cpu0 is not None:
        out["server_cpu_us_per_connect"] = round((server_cpu_us(a.server_pid) - cpu0) / len(jobs))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
