#!/usr/bin/env python3
"""Model-based concurrency check of popbridge (issue #13 item 3), run by tests/mailbox_changes.rs.

    model_check.py --imap PORT --pop3 MODE=PORT... --user MODE=NAME... --password PW
                   --seed S --rounds N [--trash Trash] [--archive Archive]

Each round (seed S+i, mode chosen by the seed among hide/expunge/move) empties the mode's
mailboxes, appends a few messages, then runs one to three POP3 clients (Python's poplib, through
popbridge) that run random sessions (STAT, LIST, UIDL, RETR, TOP, DELE, RSET, NOOP, QUIT, a
dropped connection, a connection dropped inside a RETR) while an IMAP client (imaplib) appends,
sets and clears flags (the hide keyword too), stores \\Deleted and expunges, MOVEs messages out
to the archive folder and COPYs them back in. Both sides pause 0 to 1.5 s between steps; the POP3
clients also "poke" the IMAP client to change the very message they are about to read, the one
popbridge prefetches, the one being streamed, or one they marked, right after login, before a
RETR, inside a body, before QUIT: so changes land at every point of a session.

Everything random in a round follows from its seed: the round's plan, the IMAP client's plan and
each POP3 client's plan come from random.Random streams seeded from it, so SEED=<round seed> with
one round replays the same choices (thread timing aside).

The model. Every change is an event on one UID with the time window [t0, t1] of the command that
made it (sent .. answered, one clock for all threads): created (APPEND, COPY in: "visible", or
"hidden" when the copied message carries the hide keyword, which COPY keeps),
hidden (the hide keyword set by the IMAP client, or a POP3 commit in hide mode), visible again
(the keyword cleared), gone (UID EXPUNGE, MOVE out, or a POP3 commit in expunge/move mode).
A commit whose QUIT got +OK is definite; one whose QUIT got -ERR or no answer is in doubt (it
may have applied any part of it); a session that ends without sending QUIT (dropped connection)
commits nothing, so it has no events. For a time window [a, b] `possible` gives the states a
UID may have been in: every event may take effect at any instant of its window, one in doubt
may not take effect at all, "gone" is final. Asserted, per round:
  * a session's listing (its UIDL; the snapshot is taken between PASS sent and +OK) holds a UID
    only if the UID may have been visible then, and lacks it only if it may have been invisible:
    nothing that no one deleted disappears, nothing hidden or deleted shows; UIDL is %08x UID
    then %08x UIDVALIDITY; LIST sizes are the sizes of the bytes appended;
  * STAT, LIST and UIDL never change inside a session: each answer is what the snapshot says,
    less what the session itself marked (DELE) and not yet unmarked (RSET);
  * every +OK RETR/TOP carries exactly the bytes of the message whose UID its UIDL names (TOP n:
    the headers, the blank line, the first n body lines); -ERR only for a message the session
    marked, or one another client may have expunged or moved away before the answer;
  * no session dies from a mailbox change (EOF, reset, timeout, -ERR [SYS/TEMP]), and every QUIT
    is answered +OK (a commit must not fail because a marked message is already gone);
  * at the end, upstream, every UID is in a state the model allows: deletions happened only
    through a QUIT (+OK, or in doubt); every message marked by a QUIT answered +OK is deleted
    (hidden, expunged, or in the Trash folder) unless another client removed it or cleared the
    keyword later; nothing else is deleted or hidden;
  * a last session, in a quiet mailbox, lists exactly the visible messages and reads them all.

Prints one JSON object with the figures and the violations; the log of every failing round
(every step of every actor, with times) goes to stderr.
"""
import argparse
import hashlib
import imaplib
import json
import poplib
import random
import re
import socket
import sys
import threading
import time
from collections import Counter

poplib._MAXLINE = 1 << 20
HIDE_KEYWORD = "$POP3Deleted"
T0 = time.monotonic()
IO_TIMEOUT = 30.0


def now():
    return time.monotonic() - T0


FIGURES_LOCK = threading.Lock()


def bump(counter, key):
    """Counts one of `key` in a figure shared by the threads."""
    with FIGURES_LOCK:
        counter[key] += 1


# ---------------------------------------------------------------------------------------------
# Messages


WORDS = (
    "the quick brown fox jumps over lazy dog mail server bridge session snapshot literal "
    "fetch expunge move copy flag keyword hidden visible listing message octets body header "
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho"
).split()
DOT_LINES = [".", "..", "...", ".leading dot", "..two dots", ". space after a dot", ".\t.tab"]
SIZE_CLASSES = [
    # (name, weight, min body, max body): read ahead (<= 64 KiB), streamed read ahead
    # (<= 256 KiB), streamed alone.
    ("tiny", 30, 0, 300),
    ("small", 28, 1_000, 16_000),
    ("medium", 16, 16_000, 64_000),
    ("large", 15, 64_000, 256_000),
    ("huge", 11, 256_000, 600_000),
]


def make_message(rng, mid, user):
    names = [c[0] for c in SIZE_CLASSES]
    cls = rng.choices(names, weights=[c[1] for c in SIZE_CLASSES])[0]
    lo, hi = next((c[2], c[3]) for c in SIZE_CLASSES if c[0] == cls)
    target = rng.randint(lo, hi)
    head = (
        "From: Model <model@example.test>\r\n"
        f"To: {user}@example.test\r\n"
        f"Subject: model message {mid} ({cls})\r\n"
        "Date: Tue, 1 Jul 2025 10:00:00 +0000\r\n"
        f"Message-ID: <{mid}@model.example.test>\r\n"
        f"X-Model-Id: {mid}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    )
    lines = []
    size = 0
    n = 0
    while size < target:
        r = rng.random()
        if r < 0.08:
            line = rng.choice(DOT_LINES)
        elif r < 0.12:
            line = ""
        else:
            words = rng.choices(WORDS, k=rng.randint(1, 14))
            line = " ".join(words)
        if n % 97 == 0:
            line = f"{line} [{mid} line {n}]"
        lines.append(line)
        size += len(line) + 2
        n += 1
    body = "".join(line + "\r\n" for line in lines)
    return cls, (head + body).encode("ascii")


def expected_top(data, n):
    """RFC 1939 TOP n: all header lines, the blank line, then the first n body lines."""
    sep = data.find(b"\r\n\r\n")
    if sep < 0:
        return data
    out = data[: sep + 4]
    rest = data[sep + 4 :]
    pos = 0
    for _ in range(n):
        if pos >= len(rest):
            break
        end = rest.find(b"\r\n", pos)
        end = len(rest) if end < 0 else end + 2
        pos = end
    return out + rest[:pos]


def model_id(data):
    m = re.search(rb"^X-Model-Id: (\S+)\r?$", data[:2000], re.M)
    return m.group(1).decode() if m else None


def sha(data):
    return hashlib.sha1(data).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The model of the mailbox


class Event:
    __slots__ = ("t0", "t1", "kind", "definite", "who")

    def __init__(self, t0, t1, kind, definite, who):
        self.t0, self.t1, self.kind, self.definite, self.who = t0, t1, kind, definite, who

    def __repr__(self):
        d = "" if self.definite else "?"
        return f"{self.kind}{d}[{self.t0:.3f},{self.t1:.3f}]({self.who})"


def possible(events, a, b):
    """The states ("absent", "visible", "hidden", "gone") one UID may have been in at some time
    in [a, b], given its events. An event takes effect at some instant inside its window; an
    event in doubt may not take effect at all. "gone" is final: nothing after it has an effect.
    """
    if any(g.definite and g.kind == "gone" and g.t1 < a for g in events):
        return {"gone"}
    out = set()
    for e in events:
        if e.t0 > b:
            continue  # began after the window
        if e.kind != "gone":
            # Overwritten for sure before the window began.
            if any(f.definite and f.t0 > e.t1 and f.t1 < a for f in events):
                continue
            # Came after a sure "gone": had no effect.
            if any(g.definite and g.kind == "gone" and g.t1 < e.t0 for g in events):
                continue
        out.add(e.kind)
    if not any(f.definite and f.t1 < a for f in events):
        out.add("absent")
    return out


class Box:
    """What the model knows of one round's INBOX: the bytes of every UID and its events."""

    def __init__(self, mode):
        self.mode = mode
        self.lock = threading.Lock()
        self.data = {}  # uid -> bytes
        self.events = {}  # uid -> [Event]
        self.alive = []  # UIDs the IMAP client has not removed (its own view)
        self.archived = {}  # model id -> bytes, moved to the archive folder
        self.deleted_flag = set()  # UIDs the IMAP client flagged \Deleted
        self.uidvalidity = None
        self.log = []
        self.focus = []  # UIDs the active POP3 session is about to read

    def note(self, line):
        with self.lock:
            self.log.append(f"{now():8.3f} {line}")

    def created(self, uid, data, t0, t1, who, kind="visible"):
        with self.lock:
            self.data[uid] = data
            self.events.setdefault(uid, []).append(Event(t0, t1, kind, True, who))
            self.alive.append(uid)

    def event(self, uid, kind, t0, t1, definite, who):
        with self.lock:
            self.events.setdefault(uid, []).append(Event(t0, t1, kind, definite, who))
            if kind == "gone" and who == "imap" and uid in self.alive:
                self.alive.remove(uid)
                self.deleted_flag.discard(uid)

    def alive_uids(self):
        with self.lock:
            return list(self.alive)

    def events_of(self, uid):
        with self.lock:
            return list(self.events.get(uid, []))

    def gone_before(self, uid, t):
        """May `uid` have been expunged or moved away before time `t`?"""
        return any(e.kind == "gone" and e.t0 < t for e in self.events_of(uid))


# ---------------------------------------------------------------------------------------------
# The IMAP client that changes the mailbox


def pause(rng):
    r = rng.random()
    if r < 0.4:
        return 0.0
    if r < 0.75:
        return rng.uniform(0.0, 0.2)
    return rng.uniform(0.2, 1.5)


CHANGES = [
    # kind, weight
    ("append", 22),
    ("flag", 12),
    ("unflag", 6),
    ("hide", 10),
    ("unhide", 8),
    ("delete-flag", 6),
    ("undelete-flag", 3),
    ("expunge", 14),
    ("move-out", 11),
    ("copy-in", 9),
]
OTHER_FLAGS = ["\\Seen", "\\Flagged", "\\Answered", "$Work", "$Label1"]


class Imap:
    def __init__(self, args, user, mailbox):
        self.m = imaplib.IMAP4("127.0.0.1", args.imap, timeout=IO_TIMEOUT)
        self.m.login(user, args.password)
        self.mailbox = mailbox
        typ, data = self.m.select(mailbox)
        if typ != "OK":
            raise RuntimeError(f"SELECT {mailbox}: {data}")

    def cmd(self, *words):
        """A command whose tagged answer text is wanted (imaplib's uid() drops it)."""
        typ, data = self.m._simple_command(*words)
        text = b" ".join(d for d in data if isinstance(d, bytes)).decode("latin-1")
        return typ, text

    def close(self):
        try:
            self.m.logout()
        except Exception:
            pass


class Changer(threading.Thread):
    def __init__(self, ctx, box, rng):
        super().__init__(daemon=True)
        self.ctx, self.box, self.rng = ctx, box, rng
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.pokes = []
        self.error = None
        self.n = 0
        self.inbox = Imap(ctx.args, ctx.user, "INBOX")
        self.archive = Imap(ctx.args, ctx.user, ctx.args.archive)
        uv = self.inbox.m.response("UIDVALIDITY")[1][0]
        box.uidvalidity = int(uv)

    def close(self):
        self.inbox.close()
        self.archive.close()

    # Changes; each touches one message and records what it did.

    def append(self):
        self.n += 1
        mid = f"m{self.ctx.seed}n{self.n:05d}z"
        cls, data = make_message(self.rng, mid, self.ctx.user)
        t0 = now()
        typ, dat = self.inbox.m.append("INBOX", None, None, data)
        t1 = now()
        text = b" ".join(d for d in dat if isinstance(d, bytes)).decode("latin-1")
        m = re.search(r"APPENDUID (\d+) (\d+)", text)
        if typ != "OK" or not m:
            raise RuntimeError(f"APPEND: {typ} {text}")
        uid = int(m.group(2))
        self.box.created(uid, data, t0, t1, "imap")
        bump(self.ctx.changes, "append")
        self.box.note(f"imap APPEND uid {uid} {mid} {cls} {len(data)} octets [{t0:.3f},{t1:.3f}]")
        return uid

    def exists(self, uid):
        """Whether `uid` is still in INBOX (as this connection sees it now)."""
        # Unsolicited FETCH responses (flag changes) wait in imaplib's list: not an answer.
        self.inbox.m.untagged_responses.pop("FETCH", None)
        typ, data = self.inbox.m.uid("FETCH", str(uid), "(UID)")
        pat = re.compile(rb"^\d+ \(UID %d\)$" % uid)
        return typ == "OK" and any(isinstance(d, bytes) and pat.match(d) for d in data)

    def store(self, uid, op, flag, kind, what):
        t0 = now()
        typ, text = self.inbox.cmd("UID", "STORE", str(uid), op, f"({flag})")
        t1 = now()
        self.box.note(f"imap {what} uid {uid}: {typ} {text.strip()} [{t0:.3f},{t1:.3f}]")
        if typ == "OK" and kind and self.box.mode == "hide":
            self.box.event(uid, kind, t0, t1, True, "imap")
        bump(self.ctx.changes, what)

    def remove(self, uid, what, *words):
        """UID EXPUNGE or UID MOVE out: "gone" when the UID is no longer there afterwards. A NO
        (the message was already expunged by a POP3 commit this connection was not told of)
        changes nothing."""
        t0 = now()
        typ, text = self.inbox.cmd(*words)
        t1 = now()
        gone = typ == "OK" and not self.exists(uid)
        self.box.note(f"imap {' '.join(words)}: {typ} {text.strip()} [{t0:.3f},{t1:.3f}]"
                      f"{'' if gone else ' (nothing removed)'}")
        if gone:
            self.box.event(uid, "gone", t0, t1, True, "imap")
            bump(self.ctx.changes, what)
        elif not self.exists(uid):
            with self.box.lock:
                if uid in self.box.alive:
                    self.box.alive.remove(uid)
        return gone

    def do(self, kind, uid):
        box = self.box
        if kind == "append":
            self.append()
            return
        if uid is None:
            return
        # Let this connection learn of messages appended or copied in since its last command:
        # a UID STORE or UID EXPUNGE of a UID it does not know yet does nothing.
        self.inbox.m.noop()
        if kind == "flag":
            self.store(uid, "+FLAGS.SILENT", self.rng.choice(OTHER_FLAGS), None, kind)
        elif kind == "unflag":
            self.store(uid, "-FLAGS.SILENT", self.rng.choice(OTHER_FLAGS), None, kind)
        elif kind == "hide":
            self.store(uid, "+FLAGS.SILENT", HIDE_KEYWORD, "hidden", kind)
        elif kind == "unhide":
            self.store(uid, "-FLAGS.SILENT", HIDE_KEYWORD, "visible", kind)
        elif kind == "delete-flag":
            self.store(uid, "+FLAGS.SILENT", "\\Deleted", None, kind)
            with box.lock:
                box.deleted_flag.add(uid)
        elif kind == "undelete-flag":
            self.store(uid, "-FLAGS.SILENT", "\\Deleted", None, kind)
            with box.lock:
                box.deleted_flag.discard(uid)
        elif kind == "expunge":
            with box.lock:
                flagged = uid in box.deleted_flag
            if not flagged:
                self.inbox.cmd("UID", "STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")
            self.remove(uid, kind, "UID", "EXPUNGE", str(uid))
        elif kind == "move-out":
            with box.lock:
                data = box.data.get(uid)
            if self.remove(uid, kind, "UID", "MOVE", str(uid), self.ctx.args.archive) and data:
                with box.lock:
                    box.archived[model_id(data)] = data

    def copy_in(self):
        box = self.box
        with box.lock:
            mids = sorted(box.archived)
        if not mids:
            return self.append()
        mid = self.rng.choice(mids)
        a = self.archive
        a.m.noop()
        typ, found = a.m.uid("SEARCH", "HEADER", "X-Model-Id", mid)
        auids = found[0].split() if typ == "OK" and found and found[0] else []
        if not auids:
            box.note(f"imap copy-in of {mid}: not found in the archive")
            return
        auid = auids[0].decode()
        # COPY keeps the flags: a message hidden before it was moved out comes back hidden.
        a.m.untagged_responses.pop("FETCH", None)
        typ, flags = a.m.uid("FETCH", auid, "(FLAGS)")
        hidden = any(isinstance(f, bytes) and HIDE_KEYWORD.lower().encode() in f.lower()
                     for f in flags)
        kind = "hidden" if hidden and box.mode == "hide" else "visible"
        t0 = now()
        typ, text = a.cmd("UID", "COPY", auid, "INBOX")
        t1 = now()
        m = re.search(r"COPYUID \d+ \S+ (\d+)", text)
        box.note(f"imap UID COPY {mid} in ({kind}): {typ} {text.strip()} [{t0:.3f},{t1:.3f}]")
        if typ != "OK" or not m:
            raise RuntimeError(f"UID COPY in: {typ} {text}")
        with box.lock:
            data = box.archived[mid]
        box.created(int(m.group(1)), data, t0, t1, "imap", kind)
        bump(self.ctx.changes, "copy-in")

    def planned(self):
        """One change from the plan: its kind and target follow from the rng alone; the target
        is the active session's focus (what it reads next) or any message."""
        kind = self.rng.choices([c[0] for c in CHANGES], weights=[c[1] for c in CHANGES])[0]
        sel, use_focus = self.rng.random(), self.rng.random() < 0.4
        if kind == "copy-in":
            return self.copy_in()
        with self.box.lock:
            focus = [u for u in self.box.focus if u in self.box.alive]
            alive = list(self.box.alive)
            flagged = sorted(self.box.deleted_flag)
        if kind == "expunge" and flagged and not use_focus:
            pool = flagged
        else:
            pool = focus if use_focus and focus else alive
        uid = pool[int(sel * len(pool))] if pool else None
        self.do(kind, uid)

    def poke(self, kind, uid, wait, place):
        """Asked by a POP3 client: make this change now. Waits (bounded) when `wait`."""
        done = threading.Event()
        with self.cond:
            self.pokes.append((kind, uid, done, place))
            self.cond.notify()
        if wait:
            done.wait(5.0)

    def run(self):
        try:
            while not self.stop.is_set():
                deadline = time.monotonic() + pause(self.rng)
                while True:
                    with self.cond:
                        left = deadline - time.monotonic()
                        if not self.pokes and left > 0 and not self.stop.is_set():
                            self.cond.wait(left)
                        pokes, self.pokes = self.pokes, []
                    for kind, uid, done, place in pokes:
                        try:
                            if uid in self.box.alive_uids() or kind == "append":
                                self.box.note(f"imap poke {kind} uid {uid}")
                                self.do(kind, uid)
                                bump(self.ctx.pokes, place)
                        finally:
                            done.set()
                    if self.stop.is_set() or time.monotonic() >= deadline:
                        break
                if self.stop.is_set():
                    break
                self.planned()
        except Exception as e:  # a harness failure, not popbridge's
            self.error = f"IMAP client failed: {e!r}"
            self.box.note(self.error)
        finally:
            with self.cond:
                for _, _, done, _ in self.pokes:
                    done.set()
                self.pokes = []


# ---------------------------------------------------------------------------------------------
# POP3 clients (poplib, through popbridge)


class Dead(Exception):
    """The connection died under a command (EOF, reset, timeout)."""


class POP3(poplib.POP3):
    def __init__(self, port, rcvbuf):
        self.rcvbuf = rcvbuf
        super().__init__("127.0.0.1", port, timeout=IO_TIMEOUT)

    def _create_socket(self, timeout):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf:
            # A slow reader with a small window: popbridge is still streaming the body from
            # upstream while the client pauses in the middle of it.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        s.settimeout(timeout)
        s.connect((self.host, self.port))
        return s

    def short(self, line):
        """Sends `line`; returns (ok, status line). Raises Dead."""
        try:
            self._putcmd(line)
            resp = self._getline()[0]
        except (OSError, EOFError) as e:
            raise Dead(repr(e))
        except poplib.error_proto as e:
            raise Dead(str(e))
        return resp.startswith(b"+OK"), resp.decode("latin-1")

    def long_body(self, on_line=None):
        """Reads a multi-line body after a +OK; `on_line(i)` may pause or drop (returns False
        to stop reading). Returns the data with CRLF line ends, dot-unstuffed, or None when
        `on_line` stopped it."""
        out = []
        i = 0
        try:
            while True:
                line = self._getline()[0]
                if line == b".":
                    break
                if line.startswith(b".."):
                    line = line[1:]
                out.append(line)
                i += 1
                if on_line and on_line(i) is False:
                    return None
        except (OSError, EOFError) as e:
            raise Dead(repr(e))
        except poplib.error_proto as e:
            raise Dead(str(e))
        return b"".join(line + b"\r\n" for line in out)

    def drop(self):
        try:
            # Linger 0: a reset, as a client that dies would leave.
            linger = b"\x01\x00\x00\x00\x00\x00\x00\x00"
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        try:
            self.close()
        except OSError:
            pass


class Session:
    """What one POP3 session did, for the checks at the end of the round."""

    def __init__(self, name):
        self.name = name
        self.pass_t0 = self.pass_t1 = None
        self.steps = []  # dicts: cmd, t0, t1, ok, resp, ...
        self.end = None  # quit-ok, quit-err, dropped, dead
        self.marks_at_quit = []  # UIDs
        self.quit_t0 = self.quit_t1 = None
        self.uidl = None  # first full UIDL: [(n, uidl)]
        self.slow = False  # reads through a small receive buffer
        self.dead = None  # how the connection died


POP_COMMANDS = [
    ("stat", 8),
    ("list", 7),
    ("uidl", 7),
    ("retr", 30),
    ("top", 12),
    ("dele", 14),
    ("rset", 3),
    ("noop", 4),
]
POKE_KINDS = ["expunge", "move-out", "hide", "flag", "delete-flag", "expunge", "move-out"]


class Client(threading.Thread):
    def __init__(self, ctx, box, changer, rng, name, sessions):
        super().__init__(daemon=True)
        self.ctx, self.box, self.changer, self.rng = ctx, box, changer, rng
        self.name_, self.nsessions = name, sessions
        self.sessions = []
        self.error = None

    def run(self):
        try:
            time.sleep(pause(self.rng))
            for i in range(self.nsessions):
                s = Session(f"{self.name_}s{i}")
                self.session(s)
                if s.pass_t1 is not None or s.end == "dead":
                    self.sessions.append(s)
                time.sleep(pause(self.rng))
        except Exception as e:
            import traceback

            self.error = f"POP3 client {self.name_} failed: {e!r} {traceback.format_exc()}"
            self.box.note(self.error)

    def note(self, s, text):
        self.box.note(f"{s.name} {text}")

    def step(self, s, conn, line, **extra):
        t0 = now()
        ok, resp = conn.short(line)
        t1 = now()
        st = dict(cmd=line, t0=t0, t1=t1, ok=ok, resp=resp, **extra)
        s.steps.append(st)
        with self.box.lock:
            self.ctx.steps += 1
        return st

    def login(self, s, final):
        """Connects and logs in, retrying after IN-USE (bounded). Returns the connection."""
        rng = self.rng
        slow = (not final) and rng.random() < 0.35
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = POP3(self.ctx.port, 4096 if slow else 0)
            except (OSError, EOFError, poplib.error_proto) as e:
                raise Dead(f"connect: {e!r}")
            s.slow = slow
            st = self.step(s, conn, f"USER {self.ctx.user}")
            if not st["ok"]:
                raise RuntimeError(f"USER: {st['resp']}")
            t0 = now()
            st = self.step(s, conn, f"PASS {self.ctx.args.password}")
            if st["ok"]:
                s.pass_t0, s.pass_t1 = t0, st["t1"]
                how = " (slow reader)" if slow else ""
                self.note(s, f"logged in [{s.pass_t0:.3f},{s.pass_t1:.3f}]{how}")
                return conn
            conn.drop()
            if "[IN-USE]" in st["resp"]:
                with self.box.lock:
                    self.ctx.in_use += 1
                if time.monotonic() > deadline:
                    s.steps.append(dict(cmd="(login)", violation="still IN-USE after 20 s"))
                    return None
                if not final and rng.random() < 0.4:
                    self.note(s, "IN-USE: gives up this session")
                    return None
                time.sleep(max(0.05, pause(rng)))
                s.steps.clear()
                continue
            bump(self.ctx.errs, err_reason(st["resp"]))
            s.steps.append(dict(cmd="(login)", violation=f"PASS refused: {st['resp']}"))
            s.end = "dead"
            return None

    def listing(self, s, conn, what):
        st = self.step(s, conn, what.upper())
        if not st["ok"]:
            bump(self.ctx.errs, err_reason(st["resp"]))
            return st
        body = conn.long_body()
        st["t1"] = now()
        st["lines"] = body.decode("latin-1").split("\r\n")[:-1]
        if what == "uidl" and s.uidl is None:
            s.uidl = [tuple(x.split(" ", 1)) for x in st["lines"]]
        self.note(s, f"{what.upper()} -> {st['resp']} ({len(st['lines'])} lines)")
        return st

    def committed(self, s, definite):
        """Records the deletions of a QUIT: sure after +OK, in doubt after -ERR or no answer."""
        kind = "hidden" if self.box.mode == "hide" else "gone"
        for uid in s.marks_at_quit:
            self.box.event(uid, kind, s.quit_t0, s.quit_t1, definite, f"{s.name} QUIT")

    def uid_of(self, s, n):
        if s.uidl is None or not 1 <= n <= len(s.uidl):
            return None
        try:
            return int(s.uidl[n - 1][1][:8], 16)
        except ValueError:
            return None

    def session(self, s, final=False):
        rng, ctx, box = self.rng, self.ctx, self.box
        try:
            conn = self.login(s, final)
        except Dead as e:
            s.end, s.dead = "dead", f"at login: {e}"
            return
        if conn is None:
            return
        marks = set()
        cursor = 1
        try:
            if not final and rng.random() < 0.3:
                # A change right after login, before the listing.
                kind = rng.choice(POKE_KINDS + ["append", "unhide"])
                alive = box.alive_uids()
                uid = alive[int(rng.random() * len(alive))] if alive else None
                self.note(s, f"poke after login: {kind} uid {uid}")
                self.changer.poke(kind, uid, rng.random() < 0.7, "after login")
                time.sleep(pause(rng) / 3)
            if final:
                # Quiet now: it lists, then reads every message in order.
                plan = ["uidl", "list", "stat"] + ["retr"] * 100_000
            else:
                names, weights = [c[0] for c in POP_COMMANDS], [c[1] for c in POP_COMMANDS]
                plan = [rng.choices(names, weights=weights)[0] for _ in range(rng.randint(2, 9))]
                if rng.random() < 0.5:
                    plan.insert(0, rng.choice(["uidl", "stat", "list"]))
            ending = "quit" if final else rng.choices(
                ["quit", "quit-poke", "drop", "drop-in-retr"], weights=[60, 15, 13, 12])[0]
            if ending == "drop-in-retr":
                plan.append("retr")
            for i, cmd in enumerate(plan):
                if not final:
                    time.sleep(pause(rng))
                sel, k, extra = rng.random(), rng.randint(0, 12), rng.random()
                if cmd in ("stat", "list", "uidl", "noop", "rset"):
                    if cmd == "stat" or cmd == "noop" or cmd == "rset":
                        st = self.step(s, conn, cmd.upper(), marks=sorted(marks))
                        if not st["ok"]:
                            bump(ctx.errs, err_reason(st["resp"]))
                        if cmd == "rset" and st["ok"]:
                            marks.clear()
                        self.note(s, f"{cmd.upper()} -> {st['resp']}")
                    else:
                        st = self.listing(s, conn, cmd)
                        st["marks"] = sorted(marks)
                    continue
                if s.uidl is None:
                    st = self.listing(s, conn, "uidl")
                    st["marks"] = sorted(marks)
                    if not st["ok"]:
                        continue
                count = len(s.uidl)
                if final and cursor > count:
                    break
                if count == 0:
                    continue
                # Mostly in order, as clients download; sometimes anywhere.
                if sel < 0.6 or final:
                    while cursor <= count and cursor in marks:
                        cursor += 1
                    n = cursor if cursor <= count else 1 + int(extra * count)
                    cursor = n + 1
                else:
                    n = 1 + int(extra * count)
                uid = self.uid_of(s, n)
                nxt = self.uid_of(s, n + 1)
                with box.lock:
                    box.focus = [u for u in (uid, nxt) if u is not None]
                if cmd == "dele":
                    st = self.step(s, conn, f"DELE {n}", n=n, uid=uid, marks=sorted(marks))
                    if st["ok"]:
                        marks.add(n)
                    else:
                        bump(ctx.errs, err_reason(st["resp"]))
                    self.note(s, f"DELE {n} (uid {uid}) -> {st['resp']}")
                    continue
                # RETR / TOP
                if not final and rng.random() < 0.3:
                    target = uid if rng.random() < 0.5 else nxt
                    kind = rng.choice(POKE_KINDS)
                    wait = rng.random() < 0.7
                    self.note(s, f"poke before {cmd.upper()} {n}: {kind} uid {target}")
                    self.changer.poke(kind, target, wait,
                                      "before RETR/TOP" if target == uid else "before a prefetch")
                line = f"RETR {n}" if cmd == "retr" else f"TOP {n} {k}"
                last = ending == "drop-in-retr" and i == len(plan) - 1
                mid_poke = (not final) and s.slow and rng.random() < 0.5
                poke_kind, poke_next = rng.choice(POKE_KINDS), rng.random() < 0.4
                with box.lock:
                    nlines = box.data.get(uid, b"").count(b"\r\n") if uid else 0
                if cmd == "top":
                    nlines = min(nlines, 12 + k)
                drop_at, mid_at = 1 + int(rng.random() * nlines), 1 + int(rng.random() * nlines)
                st = self.step(s, conn, line, n=n, uid=uid, k=(None if cmd == "retr" else k),
                               marks=sorted(marks))
                if not st["ok"]:
                    bump(ctx.errs, err_reason(st["resp"]))
                    self.note(s, f"{line} (uid {uid}) -> {st['resp']}")
                    continue

                def on_line(j, st=st):
                    if last and j >= drop_at:
                        return False
                    if mid_poke and j == mid_at:
                        target = nxt if poke_next else uid
                        self.note(s, f"poke inside {line} at line {j}: {poke_kind} uid {target}")
                        st["mid_poke"] = (poke_kind, target)
                        self.changer.poke(poke_kind, target, True, "inside a body")
                        time.sleep(pause(rng) / 3)
                    return True

                data = conn.long_body(on_line)
                st["t1"] = now()
                if data is None:
                    self.note(s, f"{line} (uid {uid}): drops the connection inside the body")
                    conn.drop()
                    s.end = "dropped"
                    return
                st["sha"], st["len"], st["mid"] = sha(data), len(data), model_id(data)
                self.note(s, f"{line} (uid {uid}) -> {st['resp']} {len(data)} octets of "
                             f"{st['mid']}")
            if ending == "drop" or ending == "drop-in-retr":
                self.note(s, "drops the connection")
                conn.drop()
                s.end = "dropped"
                return
            if ending == "quit-poke" and marks:
                target = self.uid_of(s, sorted(marks)[int(rng.random() * len(marks))])
                kind = rng.choice(["expunge", "move-out", "hide", "unhide", "flag"])
                self.note(s, f"poke before QUIT: {kind} uid {target}")
                self.changer.poke(kind, target, rng.random() < 0.7, "before QUIT")
            s.marks_at_quit = sorted(u for u in (self.uid_of(s, n) for n in marks) if u is not None)
            s.quit_t0 = now()
            st = self.step(s, conn, "QUIT", marks=sorted(marks))
            s.quit_t1 = st["t1"]
            s.end = "quit-ok" if st["ok"] else "quit-err"
            self.committed(s, st["ok"])
            if not st["ok"]:
                bump(ctx.errs, err_reason(st["resp"]))
            self.note(s, f"QUIT (marks uids {s.marks_at_quit}) -> {st['resp']} "
                         f"[{s.quit_t0:.3f},{s.quit_t1:.3f}]")
            conn.drop()
        except Dead as e:
            s.end = "dead"
            s.dead = str(e)
            s.marks_at_quit = sorted(u for u in (self.uid_of(s, n) for n in marks) if u is not None)
            if s.quit_t0 is not None:
                # QUIT sent, no answer: each mark may or may not have been applied.
                s.quit_t1 = now()
                self.committed(s, False)
            self.note(s, f"connection died: {e}")
            conn.drop()
        finally:
            with box.lock:
                box.focus = []


def err_reason(resp):
    if "[IN-USE]" in resp:
        return "in-use"
    if "[SYS/TEMP]" in resp:
        return "sys-temp"
    if "[SYS/PERM]" in resp:
        return "sys-perm"
    if "no longer exists" in resp:
        return "gone"
    if "already deleted" in resp:
        return "marked"
    if "no such message" in resp:
        return "no-such-message"
    return "other"


# ---------------------------------------------------------------------------------------------
# The checks


def check_session(s, box, v):
    """Appends to `v` every way session `s` broke the promise."""
    name = s.name

    def bad(text):
        v.append(f"{name}: {text}")

    for st in s.steps:
        if "violation" in st:
            bad(st["violation"])
    if s.pass_t1 is None:
        return
    uv = box.uidvalidity
    snap = None  # [(n, uid)]
    if s.uidl is not None:
        snap = []
        for i, (n, u) in enumerate(s.uidl):
            if n != str(i + 1):
                bad(f"UIDL numbers are not 1..N at login: {s.uidl}")
            if not re.fullmatch(r"[0-9a-f]{16}", u) or int(u[8:], 16) != uv:
                bad(f"UIDL {u} of message {n} is not %08x UID %08x UIDVALIDITY ({uv:08x})")
            snap.append((i + 1, int(u[:8], 16)))
        listed = {uid for _, uid in snap}
        # The listing against the model, UID by UID.
        a, b = s.pass_t0, s.pass_t1
        for uid in sorted(set(box.events) | listed):
            states = possible(box.events_of(uid), a, b)
            if uid in listed and "visible" not in states:
                bad(f"listed UID {uid}, which cannot have been visible at login "
                    f"[{a:.3f},{b:.3f}]: {box.events_of(uid)}")
            if uid not in listed and states == {"visible"}:
                bad(f"UID {uid} missing from the listing although visible all through the "
                    f"login [{a:.3f},{b:.3f}]: {box.events_of(uid)}")
        for uid in listed:
            if uid not in box.data:
                bad(f"listed UID {uid}, which no one created")
    size_of = {}
    if snap is not None:
        for n, uid in snap:
            if uid in box.data:
                size_of[n] = len(box.data[uid])
    stat_seen = None
    list_seen = None
    for st in s.steps:
        if "violation" in st or st["cmd"].startswith(("USER", "PASS")):
            continue
        cmd = st["cmd"].split()[0]
        marks = set(st.get("marks", []))
        resp = st["resp"]
        if cmd in ("NOOP", "RSET", "DELE"):
            want_ok = not (cmd == "DELE" and st["n"] in marks)
            if st["ok"] != want_ok:
                bad(f"{st['cmd']} (marked {sorted(marks)}) answered {resp!r}")
            continue
        if cmd == "QUIT":
            if not st["ok"]:
                bad(f"QUIT answered {resp!r} (marks {s.marks_at_quit}): a mailbox change broke "
                    "the commit")
            continue
        if cmd == "STAT":
            if not st["ok"]:
                bad(f"STAT answered {resp!r}")
                continue
            got = tuple(int(x) for x in resp.split()[1:3])
            if snap is not None and len(size_of) == len(snap):
                live = [n for n, _ in snap if n not in marks]
                want = (len(live), sum(size_of[n] for n in live))
                if got != want:
                    bad(f"STAT (marked {sorted(marks)}) answered {resp!r}, the snapshot says "
                        f"{want}")
            if not marks:
                if stat_seen is not None and stat_seen != got:
                    bad(f"STAT changed inside the session: {stat_seen} then {got}")
                stat_seen = got
            continue
        if cmd in ("LIST", "UIDL"):
            if not st["ok"]:
                bad(f"{cmd} answered {resp!r}")
                continue
            lines = st["lines"]
            if snap is None:
                if cmd == "LIST" and not marks:
                    if list_seen is not None and list_seen != lines:
                        bad(f"LIST changed inside the session: {list_seen} then {lines}")
                    list_seen = lines
                continue
            live = [(n, uid) for n, uid in snap if n not in marks]
            if cmd == "UIDL":
                want = [f"{n} {s.uidl[n - 1][1]}" for n, _ in live]
            else:
                want = [f"{n} {size_of.get(n, '?')}" for n, _ in live]
            if lines != want:
                bad(f"{cmd} (marked {sorted(marks)}) answered {lines}, the snapshot says {want}")
            continue
        if cmd in ("RETR", "TOP"):
            n, uid = st["n"], st["uid"]
            if snap is None or uid is None:
                continue
            if n in marks:
                if st["ok"]:
                    bad(f"{st['cmd']} of a message the session marked answered +OK")
                continue
            if not st["ok"]:
                if "no longer exists" in resp and not "[SYS" in resp:
                    if not box.gone_before(uid, st["t1"]):
                        bad(f"{st['cmd']} (UID {uid}) answered {resp!r}, but no one expunged or "
                            f"moved it: {box.events_of(uid)}")
                else:
                    bad(f"{st['cmd']} (UID {uid}) answered {resp!r}: a session must survive "
                        f"mailbox changes (events of the UID: {box.events_of(uid)})")
                continue
            if "sha" not in st:
                continue  # dropped inside the body on purpose
            data = box.data.get(uid)
            if data is None:
                bad(f"{st['cmd']} served UID {uid}, which no one created")
                continue
            want = data if cmd == "RETR" else expected_top(data, st["k"])
            if st["sha"] != sha(want):
                bad(f"{st['cmd']} (UID {uid}, {model_id(data)}, {len(want)} octets expected) "
                    f"carried {st['len']} octets of {st['mid']}: not the bytes its UIDL names "
                    f"(events of the UID: {box.events_of(uid)})")


def final_upstream(ctx, box, sessions, v):
    """The mailbox after the round, against the model."""
    args = ctx.args
    m = Imap(args, ctx.user, "INBOX")
    typ, data = m.m.uid("FETCH", "1:*", "(UID FLAGS)")
    present = {}
    for item in data:
        if not isinstance(item, bytes):
            continue
        mu = re.search(rb"UID (\d+)", item)
        mf = re.search(rb"FLAGS \(([^)]*)\)", item)
        if mu:
            present[int(mu.group(1))] = (mf.group(1).decode() if mf else "").split()
    m.close()
    t = now()
    for uid in sorted(set(box.events) | set(present)):
        if uid not in box.events:
            v.append(f"upstream: UID {uid} in INBOX, which the model never created")
            continue
        states = possible(box.events_of(uid), t, t)
        if uid not in present:
            actual = "gone"
        elif box.mode == "hide" and any(f.lower() == HIDE_KEYWORD.lower() for f in present[uid]):
            actual = "hidden"
        else:
            actual = "visible"
        if actual not in states:
            v.append(f"upstream: UID {uid} is {actual} at the end, the model allows "
                     f"{sorted(states)}: {box.events_of(uid)}")
    if box.mode == "move":
        t = Imap(args, ctx.user, args.trash)
        typ, data = t.m.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (X-Model-Id)])")
        t.close()
        in_trash = Counter()
        for item in data:
            if isinstance(item, tuple):
                mid = model_id(item[1])
                if mid:
                    in_trash[mid] += 1
        committed, doubtful = set(), set()
        for s in sessions:
            for uid in s.marks_at_quit:
                (committed if s.end == "quit-ok" else doubtful).add(uid)
        mids_ok = set()
        for uid in committed | doubtful:
            if uid in box.data:
                mids_ok.add(model_id(box.data[uid]))
        for uid in committed:
            changer_gone = any(e.kind == "gone" and e.who == "imap" for e in box.events_of(uid))
            mid = model_id(box.data.get(uid, b""))
            if not changer_gone and in_trash[mid] < 1:
                v.append(f"move mode: UID {uid} ({mid}) was committed by a QUIT +OK but is not "
                         f"in {args.trash}")
        for mid, n in in_trash.items():
            if mid not in mids_ok:
                v.append(f"move mode: {mid} is in {args.trash} but no QUIT marked it")
    return present


# ---------------------------------------------------------------------------------------------
# Rounds


class Ctx:
    pass


def clean(args, user):
    m = imaplib.IMAP4("127.0.0.1", args.imap, timeout=IO_TIMEOUT)
    m.login(user, args.password)
    for box in ("INBOX", args.archive, args.trash):
        if box != "INBOX":
            m.create(box)  # fails when it exists: fine
        typ, _ = m.select(box)
        if typ != "OK":
            raise RuntimeError(f"cannot select {box}")
        m.uid("STORE", "1:*", "+FLAGS.SILENT", "(\\Deleted)")
        m.expunge()
    m.logout()


MODES = ["hide", "expunge", "hide", "move"]


def run_round(args, seed, figures):
    rng = random.Random(seed)
    mode = MODES[seed % len(MODES)]
    ctx = Ctx()
    ctx.args, ctx.seed, ctx.mode = args, seed, mode
    ctx.user, ctx.port = args.users[mode], args.ports[mode]
    ctx.changes, ctx.errs, ctx.pokes = figures["changes"], figures["errors"], figures["pokes"]
    ctx.steps = 0
    ctx.in_use = 0
    box = Box(mode)
    box.note(f"round seed {seed}, deletion mode {mode}, user {ctx.user}, pop3 port {ctx.port}")
    clean(args, ctx.user)
    changer = Changer(ctx, box, random.Random(rng.getrandbits(64)))
    for _ in range(rng.randint(3, 9)):
        changer.append()
    nclients = rng.choice([1, 1, 2, 2, 3])
    total = rng.randint(nclients, 4)
    per = [1] * nclients
    for _ in range(total - nclients):
        per[rng.randrange(nclients)] += 1
    clients = [Client(ctx, box, changer, random.Random(rng.getrandbits(64)), f"c{i}", per[i])
               for i in range(nclients)]
    final_rng = random.Random(rng.getrandbits(64))
    changer.start()
    for c in clients:
        c.start()
    for c in clients:
        c.join(300)
    changer.stop.set()
    with changer.cond:
        changer.cond.notify()
    changer.join(60)
    changer.close()
    v = []
    for c in clients:
        if c.is_alive():
            v.append(f"POP3 client {c.name_} still running after 300 s")
        if c.error:
            v.append(c.error)
    if changer.error:
        v.append(changer.error)
    # Quiet now: one last session must list exactly what is visible, and read all of it.
    final = Client(ctx, box, changer, final_rng, "final", 1)
    fs = Session("final")
    box.note("final session")
    final.session(fs, final=True)
    if fs.end != "quit-ok":
        v.append(f"final session ended {fs.end}: {fs.dead}")
    sessions = [s for c in clients for s in c.sessions]
    present = final_upstream(ctx, box, sessions, v)
    for s in sessions + [fs]:
        check_session(s, box, v)
    if fs.uidl is not None:
        listed = sorted(int(u[:8], 16) for _, u in fs.uidl)
        hidden = {u for u, flags in present.items()
                  if mode == "hide" and HIDE_KEYWORD.lower() in (f.lower() for f in flags)}
        visible = sorted(set(present) - hidden)
        if listed != visible:
            v.append(f"final: lists UIDs {listed} in a quiet mailbox whose visible UIDs are "
                     f"{visible}")
    for s in sessions:
        if s.end == "dead":
            v.append(f"{s.name}: the session died: {s.dead}")
    figures["rounds"] += 1
    figures["modes"][mode] += 1
    figures["pop3_steps"] += ctx.steps
    figures["in_use"] += ctx.in_use
    figures["sessions"] += len(sessions)
    figures["ends"].update(s.end for s in sessions)
    figures["violations"] += len(v)
    summary = (f"round seed {seed} ({mode}): {len(sessions)} sessions, {ctx.steps} POP3 steps, "
               f"{len(v)} violations")
    print(summary, file=sys.stderr, flush=True)
    if v:
        figures["failed"].append({"seed": seed, "mode": mode, "violations": v})
        print(f"=== round seed {seed} FAILED ({mode}); replay with SEED={seed} MODEL_ROUNDS=1",
              file=sys.stderr)
        for x in v:
            print(f"  VIOLATION {x}", file=sys.stderr)
        print("  --- every step of the round ---", file=sys.stderr)
        for line in box.log:
            print(f"  {line}", file=sys.stderr)
        sys.stderr.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imap", type=int, required=True)
    ap.add_argument("--pop3", action="append", required=True, help="MODE=PORT")
    ap.add_argument("--user", action="append", required=True, help="MODE=NAME")
    ap.add_argument("--password", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--trash", default="Trash")
    ap.add_argument("--archive", default="Archive")
    args = ap.parse_args()
    args.ports = {k: int(p) for k, p in (x.split("=", 1) for x in args.pop3)}
    args.users = dict(x.split("=", 1) for x in args.user)
    figures = {
        "seed": args.seed, "rounds": 0, "modes": Counter(), "sessions": 0, "pop3_steps": 0,
        "in_use": 0, "changes": Counter(), "errors": Counter(), "ends": Counter(),
        "pokes": Counter(), "violations": 0, "failed": [],
    }
    started = time.monotonic()
    for i in range(args.rounds):
        run_round(args, args.seed + i, figures)
    figures["secs"] = round(time.monotonic() - started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
