#!/usr/bin/env python3
"""Holds many TCP connections open, for RSS-per-connection figures.

  hold.py serve PORT            accept, echo the first byte, keep every socket
  hold.py open HOST PORT N      open N connections, one byte each way, then
                                print "ok N" and wait for stdin to close
"""
import selectors
import socket
import sys


def serve(port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(4096)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    held = []
    while True:
        for key, _ in sel.select():
            if key.fileobj is srv:
                c, _ = srv.accept()
                sel.register(c, selectors.EVENT_READ)
                held.append(c)
            else:
                c = key.fileobj
                data = c.recv(1)
                if data:
                    c.sendall(data)
                sel.unregister(c)


def open_many(host, port, n):
    conns = []
    for _ in range(n):
        c = socket.create_connection((host, port), timeout=10)
        c.sendall(b"x")
        conns.append(c)
    for c in conns:
        if c.recv(1) != b"x":
            raise SystemExit("no echo")
    print("ok", len(conns), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        open_many(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
