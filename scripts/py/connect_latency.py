"""Median/p99 latency of connect() (+ a 1-byte round trip) to HOST:PORT over N connections.

Run it under the shim to measure connect+handshake+key install; without, for plain TCP.
Prints one JSON object.
"""
import json
import socket
import statistics
import sys
import time

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lat = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t0 = time.perf_counter()
    s.connect((host, port))
    t1 = time.perf_counter()
    s.sendall(b"x")
    if s.recv(1) != b"x":
        sys.exit("bad echo")
    s.close()
    lat.append((t1 - t0) * 1e6)
lat.sort()
print(json.dumps({
    "n": n,
    "median_us": round(statistics.median(lat), 1),
    "p99_us": round(lat[int(0.99 * (n - 1))], 1),
    "min_us": round(lat[0], 1),
}))
