"""Another process doing TCP on loopback at the same time: none of it may be counted for the target."""
import socket
import sys

rounds = int(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
port = listener.getsockname()[1]
for _ in range(rounds):
    c = socket.socket()
    c.connect(("127.0.0.1", port))
    s, _ = listener.accept()
    c.sendall(b"x")
    s.recv(1)
    c.close()
    s.close()
print("noise done", flush=True)
