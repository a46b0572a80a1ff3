#!/usr/bin/env python3
"""Captures real FETCH responses from a private Dovecot 2.3 and a private Cyrus 3.6 into
fuzz/captures/<server>/<case>.txt (seeds for the fetch_stream target are made from them by
fetch_stream_seeds.py).

Run as root from anywhere:

    POPBRIDGE_CYRUS_IMAPD=/work/main/target/cyrus-imapd/usr/lib/cyrus/bin/imapd \\
        python3 fuzz/scripts/capture.py [dovecot] [cyrus]

Dovecot is started with scripts/dovecot-sandbox (in a temp dir, on free ports) and stopped
afterwards; Cyrus as tests/support/cyrus.rs does it (own imapd.conf / cyrus.conf, sasldb in
realm localhost, `master` in its own process group, killed afterwards). Mail is added with
APPEND. Every command is sent on a raw socket and its response is kept byte for byte, up to
and including the tagged completion (literals counted, not parsed as lines).

Cases (the UIDs are those of the six messages appended):
  one            UID FETCH 1 (UID BODY.PEEK[])
  several        UID FETCH 2,3,4 (UID BODY.PEEK[])
  partial        UID FETCH 1 (UID BODY.PEEK[]<100.50>)
  rest           UID FETCH 1 (UID BODY.PEEK[]<100.2147483547>)   (what popbridge sends)
  flags-changed  another session sets \\Seen on 2, then UID FETCH 2 (UID BODY.PEEK[])
  gone-one       another session expunges 3, then (no NOOP) UID FETCH 3 (UID BODY.PEEK[])
  gone-ahead     another session expunges 5, then UID FETCH 4,5,6 (UID BODY.PEEK[])
  gone-streamed  another session expunges 6, then UID FETCH 6,4 (UID BODY.PEEK[])
  gone-ranged    another session expunges 1, then UID FETCH 1 (UID BODY.PEEK[]<100.2147483547>)
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.dirname(HERE)
REPO = os.path.dirname(FUZZ)

MESSAGES = [
    # 1: headers, a dot line, protocol-looking lines, > 150 bytes so <100.50> is inside it.
    b"Return-Path: <alice@example.org>\r\nFrom: Alice <alice@example.org>\r\n"
    b"To: bob@example.org\r\nSubject: streamed {5}\r\nMessage-ID: <1@example.org>\r\n\r\n"
    b"Hello,\r\n.\r\n..two dots\r\n* 1 FETCH (UID 1 BODY[] {3}\r\nP9 OK done\r\n-- \r\nA\r\n",
    # 2: small.
    b"From: b@example.org\r\nSubject: two\r\n\r\nsecond\r\n",
    # 3: some 8-bit and a long line.
    b"From: c@example.org\r\nSubject: three\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"caf\xc3\xa9 " + b"x" * 300 + b"\r\n",
    # 4
    b"From: d@example.org\r\nSubject: four\r\n\r\nfourth\r\n",
    # 5
    b"From: e@example.org\r\nSubject: five\r\n\r\nfifth\r\n",
    # 6: no final line end.
    b"From: f@example.org\r\nSubject: six\r\n\r\nsixth, no final newline",
]

RANGE = 2147483647


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Imap:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.n = 0
        self.greeting = self.line()

    def line(self):
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError(self.buf)
            self.buf += d
        i = self.buf.index(b"\n") + 1
        l, self.buf = self.buf[:i], self.buf[i:]
        return l

    def exact(self, n):
        while len(self.buf) < n:
            d = self.s.recv(65536)
            if not d:
                raise EOFError(self.buf)
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def run(self, cmd, literal=None):
        """Sends `cmd` (with a synchronising literal if given); returns (tag, raw response)."""
        self.n += 1
        tag = b"P%d" % self.n
        if literal is not None:
            self.s.sendall(tag + b" " + cmd + b" {%d}\r\n" % len(literal))
            l = self.line()
            assert l.startswith(b"+"), l
            self.s.sendall(literal + b"\r\n")
        else:
            self.s.sendall(tag + b" " + cmd + b"\r\n")
        out = b""
        while True:
            l = self.line()
            out += l
            m = re.search(rb"\{(\d+)\}\r?\n$", l)
            if m:
                out += self.exact(int(m.group(1)))
                continue
            if l.startswith(tag + b" "):
                if not re.match(rb"^\S+ OK", l) and not cmd.startswith(b"UID FETCH"):
                    raise RuntimeError("%r: %r" % (cmd, out))
                return tag, out


def capture(port, user, pw, outdir, server):
    os.makedirs(outdir, exist_ok=True)
    a = Imap(port)
    a.run(b"LOGIN %s %s" % (user, pw))
    for m in MESSAGES:
        a.run(b"APPEND INBOX", m)
    a.run(b"SELECT INBOX")
    b = Imap(port)
    b.run(b"LOGIN %s %s" % (user, pw))
    b.run(b"SELECT INBOX")

    def save(case, cmd, uids, origin=0):
        tag, resp = a.run(cmd)
        head = b"# server: %s\n# command: %s\n# tag: %s\n# uids: %s\n# origin: %d\n" % (
            a.greeting.strip(),
            cmd,
            tag,
            b" ".join(b"%d" % u for u in uids),
            origin,
        )
        with open(os.path.join(outdir, case + ".txt"), "wb") as f:
            f.write(head + resp)
        print("%s %s: %d bytes" % (server, case, len(resp)))

    def expunge(uid):
        b.run(b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uid)
        b.run(b"UID EXPUNGE %d" % uid)

    save("one", b"UID FETCH 1 (UID BODY.PEEK[])", [1])
    save("several", b"UID FETCH 2,3,4 (UID BODY.PEEK[])", [2, 3, 4])
    save("partial", b"UID FETCH 1 (UID BODY.PEEK[]<100.50>)", [1], 100)
    save("rest", b"UID FETCH 1 (UID BODY.PEEK[]<100.%d>)" % (RANGE - 100), [1], 100)
    b.run(b"UID STORE 2 +FLAGS.SILENT (\\Seen)")
    save("flags-changed", b"UID FETCH 2 (UID BODY.PEEK[])", [2])
    expunge(3)
    save("gone-one", b"UID FETCH 3 (UID BODY.PEEK[])", [3])
    expunge(5)
    save("gone-ahead", b"UID FETCH 4,5,6 (UID BODY.PEEK[])", [4, 5, 6])
    expunge(6)
    save("gone-streamed", b"UID FETCH 6,4 (UID BODY.PEEK[])", [6, 4])
    expunge(1)
    save("gone-ranged", b"UID FETCH 1 (UID BODY.PEEK[]<100.%d>)" % (RANGE - 100), [1], 100)
    for c in (a, b):
        try:
            c.run(b"LOGOUT")
        except Exception:
            pass


def dovecot():
    d = tempfile.mkdtemp(prefix="pbfzdc", dir="/tmp")
    ports = [free_port() for _ in range(4)]
    sb = os.path.join(REPO, "scripts", "dovecot-sandbox")
    subprocess.run(
        [sb, "start", d, "--imap-port", str(ports[0]), "--imaps-port", str(ports[1]),
         "--pop3-port", str(ports[2]), "--pop3s-port", str(ports[3])],
        check=True,
    )
    try:
        subprocess.run([sb, "adduser", d, "alice", "pw"], check=True)
        capture(ports[0], b"alice", b"pw", os.path.join(FUZZ, "captures", "dovecot"), "dovecot")
    finally:
        subprocess.run([sb, "stop", d, "--fast"])
        shutil.rmtree(d, ignore_errors=True)


def cyrus():
    imapd = os.environ.get("POPBRIDGE_CYRUS_IMAPD") or os.path.join(
        REPO, "target/cyrus-imapd/usr/lib/cyrus/bin/imapd")
    d = tempfile.mkdtemp(prefix="pbfzcy", dir="/tmp")
    for sub in ["conf", "part", "run", "bin", "sieve"]:
        os.mkdir(os.path.join(d, sub))
    shutil.copy(imapd, os.path.join(d, "bin/imapd"))
    port = free_port()
    conf = (
        f"configdirectory: {d}/conf\npartition-default: {d}/part\ndefaultpartition: default\n"
        f"sievedir: {d}/sieve\nservername: localhost\nadmins: cyrus\nallowplaintext: yes\n"
        f"sasl_pwcheck_method: auxprop\nsasl_auxprop_plugin: sasldb\nsasl_sasldb_path: {d}/sasldb2\n"
        f"sasl_mech_list: PLAIN LOGIN\nfailedloginpause: 0\nmunge8bit: no\n"
        f"idlesocket: {d}/run/idle\nnotifysocket: {d}/run/notify\nlmtpsocket: {d}/run/lmtp\n"
        f"proc_path: {d}/run/proc\nmboxname_lockpath: {d}/run/lock\n"
    )
    open(os.path.join(d, "imapd.conf"), "w").write(conf)
    open(os.path.join(d, "cyrus.conf"), "w").write(
        f'START {{\n  recover cmd="/usr/lib/cyrus/bin/ctl_cyrusdb -C {d}/imapd.conf -r"\n}}\n'
        f'SERVICES {{\n  imap cmd="{d}/bin/imapd -C {d}/imapd.conf" listen="127.0.0.1:{port}" '
        f'prefork=0 maxchild=20\n}}\nEVENTS {{\n}}\n')
    for user, pw in [("cyrus", "cyrus-admin-pw"), ("alice", "pw")]:
        subprocess.run(["/usr/sbin/saslpasswd2", "-p", "-c", "-u", "localhost", "-f",
                        os.path.join(d, "sasldb2"), user], input=pw.encode(), check=True)
    subprocess.run(["chown", "-R", "cyrus:mail", d], check=True)
    log = open(os.path.join(d, "master.log"), "wb")
    master = subprocess.Popen(
        ["/usr/lib/cyrus/bin/master", "-C", os.path.join(d, "imapd.conf"), "-M",
         os.path.join(d, "cyrus.conf"), "-p", os.path.join(d, "master.pid")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, process_group=0)
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if master.poll() is not None or time.time() > deadline:
                    raise RuntimeError("cyrus did not start: " + open(os.path.join(d, "master.log")).read())
                time.sleep(0.2)
        admin = Imap(port)
        admin.run(b"LOGIN cyrus cyrus-admin-pw")
        admin.run(b"CREATE user/alice")
        admin.run(b"LOGOUT")
        capture(port, b"alice", b"pw", os.path.join(FUZZ, "captures", "cyrus"), "cyrus")
    finally:
        os.killpg(master.pid, signal.SIGKILL)
        master.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    which = sys.argv[1:] or ["dovecot", "cyrus"]
    if "dovecot" in which:
        dovecot()
    if "cyrus" in which:
        cyrus()
