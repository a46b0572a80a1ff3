#!/usr/bin/env python3
"""Drive one POP3 session with Python's poplib and report every response byte for byte.

    pop3_session.py --port P [--host H] [--tls none|implicit|stls] [--cafile F]
                    [--no-lines] [--timeout S] STEPS_JSON

STEPS_JSON is a JSON list of steps, run in order over a single connection:
    "user NAME", "pass PW", "apop NAME PW", "capa", "stat", "list", "list N", "uidl",
    "uidl N", "retr N", "top N M", "dele N", "rset", "noop", "quit", "stls",
    "raw LINE" (send LINE verbatim, read a one-line reply),
    "rawmulti LINE" (send LINE verbatim, read a multi-line reply).
With --tls stls the STLS happens right after the greeting, before the first step.

Prints one JSON object:
    {"greeting": B64, "steps": [{"step": S, "ok": bool, "resp": STATUS_LINE,
      "raw": B64, "lines": [B64...] | null, "error": STR | null}], "fatal": STR | null}
"raw" is every byte the server sent for that step (status line, data, terminator) exactly as
received; "lines" is what poplib hands an application (dot-unstuffed, CRLF stripped), for
multi-line replies only. A step that gets -ERR is recorded (ok=false) and the script carries
on; a connection-level failure stops the script and fills "fatal". Exit status is 0 unless the
arguments are bad.
"""
import argparse
import base64
import json
import poplib
import socket
import ssl
import sys

# Long lines (10k+ characters) are part of the test mailboxes.
poplib._MAXLINE = 1 << 20


def b64(data):
    return base64.b64encode(bytes(data)).decode("ascii")


class RecordingPOP3Mixin:
    """Replaces poplib's _getline to keep the raw bytes of everything received."""

    def _init_recording(self):
        self.rec = bytearray()

    def _getline(self):
        line = self.file.readline(poplib._MAXLINE + 1)
        if len(line) > poplib._MAXLINE:
            raise poplib.error_proto("line too long")
        if not hasattr(self, "rec"):
            self.rec = bytearray()
        self.rec.extend(line)
        if not line:
            raise poplib.error_proto("-ERR EOF")
        octets = len(line)
        # Same as poplib.POP3._getline.
        if line[-2:] == poplib.CRLF:
            return line[:-2], octets
        if line[:1] == poplib.CR:
            return line[1:-1], octets
        return line[:-1], octets

    def take(self):
        data = bytes(self.rec)
        self.rec = bytearray()
        return data


class RecPOP3(RecordingPOP3Mixin, poplib.POP3):
    pass


class RecPOP3SSL(RecordingPOP3Mixin, poplib.POP3_SSL):
    pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tls", choices=["none", "implicit", "stls"], default="none")
    ap.add_argument("--cafile")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--no-lines", action="store_true", help="omit poplib's lines (big messages)")
    ap.add_argument("steps")
    args = ap.parse_args()
    steps = json.loads(args.steps)
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        ap.error("STEPS_JSON must be a JSON list of strings")

    ctx = None
    if args.tls != "none":
        ctx = ssl.create_default_context(cafile=args.cafile)

    out = {"greeting": None, "steps": [], "fatal": None}
    try:
        if args.tls == "implicit":
            conn = RecPOP3SSL(args.host, args.port, timeout=args.timeout, context=ctx)
        else:
            conn = RecPOP3(args.host, args.port, timeout=args.timeout)
        out["greeting"] = b64(conn.take())
        if args.tls == "stls":
            conn.stls(ctx)
            out["steps"].append({"step": "stls", "ok": True, "resp": "", "raw": b64(conn.take()),
                                 "lines": None, "error": None})
    except (OSError, poplib.error_proto, ssl.SSLError) as e:
        out["fatal"] = "connect: %r" % (e,)
        print(json.dumps(out))
        return 0

    for step in steps:
        words = step.split()
        cmd = words[0].lower() if words else ""
        rec = {"step": step, "ok": False, "resp": "", "raw": "", "lines": None, "error": None}
        try:
            result = run_step(conn, cmd, words, step, ctx)
            rec["ok"] = True
            if isinstance(result, tuple):  # (resp, lines, octets)
                rec["resp"] = result[0].decode("latin-1")
                if not args.no_lines:
                    rec["lines"] = [b64(line) for line in result[1]]
            elif isinstance(result, (bytes, bytearray)):
                rec["resp"] = bytes(result).decode("latin-1")
        except poplib.error_proto as e:
            msg = e.args[0] if e.args else b""
            rec["resp"] = msg.decode("latin-1") if isinstance(msg, bytes) else str(msg)
            rec["error"] = str(e)
            if rec["resp"] in ("-ERR EOF", "line too long"):
                out["fatal"] = rec["resp"]
        except (OSError, ssl.SSLError, EOFError) as e:
            rec["error"] = repr(e)
            out["fatal"] = "%s: %r" % (step, e)
        rec["raw"] = b64(conn.take())
        out["steps"].append(rec)
        if out["fatal"] or cmd == "quit":
            break
    try:
        conn.close()
    except OSError:
        pass
    print(json.dumps(out))
    return 0


def run_step(conn, cmd, words, step, ctx):
    arg = words[1:]
    if cmd == "user":
        return conn.user(arg[0])
    if cmd == "pass":
        return conn.pass_(step.split(" ", 1)[1] if " " in step else "")
    if cmd == "apop":
        return conn.apop(arg[0], arg[1])
    if cmd == "capa":
        conn._putcmd("CAPA")
        return conn._getlongresp()
    if cmd == "stat":
        conn._putcmd("STAT")
        return conn._getresp()
    if cmd == "list":
        return conn.list(arg[0]) if arg else conn.list()
    if cmd == "uidl":
        return conn.uidl(arg[0]) if arg else conn.uidl()
    if cmd == "retr":
        return conn.retr(arg[0])
    if cmd == "top":
        return conn.top(arg[0], arg[1])
    if cmd == "dele":
        return conn.dele(arg[0])
    if cmd == "rset":
        return conn.rset()
    if cmd == "noop":
        return conn.noop()
    if cmd == "quit":
        return conn.quit()
    if cmd == "stls":
        return conn.stls(ctx)
    if cmd == "raw":
        return conn._shortcmd(step.split(" ", 1)[1])
    if cmd == "rawmulti":
        return conn._longcmd(step.split(" ", 1)[1])
    raise SystemExit("unknown step: %r" % step)


if __name__ == "__main__":
    sys.exit(main())
