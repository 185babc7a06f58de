"""A real process with a scripted TCP life, for leakwatch's kernel tests.

Prints its pid, waits for a line on stdin (so probes can attach first), then on 127.0.0.1:
opens a listener, connects N clients and accepts them, fully closes the first M pairs, closes only the
client side of the next K pairs (their server side stays in CLOSE_WAIT), starts and joins T threads,
prints "done <port>", and holds everything until stdin closes or gets another line.
"""
import os
import socket
import sys
import threading
import time

n, m, k, t = (int(a) for a in sys.argv[1:5])
print(os.getpid(), flush=True)
sys.stdin.readline()

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("127.0.0.1", 0))
listener.listen(256)
port = listener.getsockname()[1]
clients, servers = [], []
for _ in range(n):
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.connect(("127.0.0.1", port))
    s, _ = listener.accept()
    clients.append(c)
    servers.append(s)
for i in range(m):
    clients[i].close()
    servers[i].close()
for i in range(m, m + k):
    clients[i].close()
threads = [threading.Thread(target=time.sleep, args=(0.01,)) for _ in range(t)]
for th in threads:
    th.start()
for th in threads:
    th.join()
print(f"done {port}", flush=True)
sys.stdin.readline()
