#!/usr/bin/env python3
"""Writes the seeds of the `fetch_stream` fuzz target (fuzz/seeds/fetch_stream/).

The encoding mirrors the `decode_*` functions of fuzz_targets/fetch_stream.rs (little-endian,
length-prefixed). Three kinds of seeds:

- `cap-<server>-<case>-*`: real responses captured from Dovecot 2.3 and Cyrus 3.6
  (fuzz/captures/<server>/<case>.txt, see capture.py), converted into structured plans (every
  line mapped to the element that renders it back byte for byte, so the model knows the
  outcome), in several chunkings; plus the same bytes as a raw plan (no prediction, the
  exact server bytes).
- `shape-*`: the shapes servers send for a message that went away or changed under the
  session (BODY[] NIL, "", no body item, NO/OK [EXPUNGEISSUED], EXPUNGE, VANISHED, EXISTS,
  FETCH (FLAGS ..)) before, between and after the streamed literal, with read-ahead, ranged
  and prefetched FETCHes.
- `split-*`: one response (Dovecot's expunged-under-session answer and a normal streamed one)
  written with every split point: a chunk schedule `[k, 4096]` for every k over the
  response, so each byte boundary is a read boundary once.

Usage: fetch_stream_seeds.py [OUT_DIR]  (default: the seeds directory next to this script).
"""

import os
import re
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.dirname(HERE)


def u8(v):
    return struct.pack("<B", v & 0xFF)


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


# --- operations -------------------------------------------------------------------------


def uidb(u):
    if u == 0xFFFFFFFF:
        return u8(255)
    assert 0 <= u < 255
    return u8(u)


def uids(others):
    assert len(others) <= 4
    return u8(len(others)) + b"".join(uidb(o) for o in others)


def op_start(uid, others=()):
    return u8(0) + uidb(uid) + uids(others)


def op_start_at(uid, origin):
    if origin == 0:
        return u8(1) + uidb(uid) + u8(0)
    if origin < 256:
        return u8(1) + uidb(uid) + u8(1) + u8(origin)
    if origin < 65536:
        return u8(1) + uidb(uid) + u8(2) + u16(origin)
    return u8(1) + uidb(uid) + u8(3) + u32(origin)


def op_next(mx):
    return u8(2) + u16(mx)


def op_read_all(mx):
    return u8(3) + u16(mx)


OP_SETTLE = u8(4)
OP_TAKE = u8(5)
OP_NOOP = u8(7)


def op_prefetch(uid, others=()):
    return u8(6) + uidb(uid) + uids(others)


# --- plans ------------------------------------------------------------------------------

# UID selectors.
CUR = u8(0)


def other(i):
    return u8(1 + i)


def foreign(b):
    return u8(5) + u8(b)


ZERO = u8(6)
MAXUID = u8(7)


def noise(tpl, n=0, text=b""):
    return u8(0) + u8(tpl) + u32(n) + u8(len(text)) + text


def it_uid(sel):
    return u8(0) + sel


def it_size(n):
    return u8(1) + u32(n)


def it_flags(i):
    return u8(2) + u8(i)


def it_modseq(n):
    return u8(3) + u32(n)


# Origin selectors: natural, <origin>, bare, explicit.
NATURAL, ANGLE, BARE = u8(0), u8(1), u8(2)


def explicit(o):
    return u8(3) + u32(o)


def it_body(value, origin=NATURAL):
    return u8(4) + origin + value


def literal(data):
    return u8(0) + u16(len(data)) + data


def quoted(data):
    assert len(data) < 256
    return u8(1) + u8(len(data)) + data


NIL = u8(2)
EMPTY = u8(3)


def big(which, seed=0):
    """0: 512 KiB, 1: 512 KiB + 1, 2: 70,000, 3: 4 MiB + 1."""
    return u8(4) + u8(which) + u8(seed)


def pattern(n, seed=0):
    return u8(5) + u16(n) + u8(seed)


def fetch(seq, *items):
    assert len(items) <= 8
    return u8(1) + u16(seq) + u8(len(items)) + b"".join(items)


def tagged(kind="OK", code=None, text=b""):
    k = {"OK": 0, "NO": 1, "BAD": 2}[kind]
    c = {None: 0, "EXPUNGEISSUED": 1, "SERVERBUG": 2, "UNAVAILABLE": 3}[code]
    assert len(text) < 256
    return u8(2) + u8(k + 3 * c) + u8(len(text)) + text


def bye(text=b"going"):
    return u8(3) + u8(len(text)) + text


CUT = u8(4)
STALL = u8(5)


def raw_el(data):
    return u8(6) + u16(len(data)) + data


def other_literal(tpl, data):
    return u8(7) + u8(tpl) + u16(len(data)) + data


def std_body(sel, data):
    return u8(8) + sel + u16(len(data)) + data


def flag_update(sel, flags=0):
    return u8(9) + sel + u8(flags)


def plan(*elems, lf=False, lower=False):
    assert len(elems) <= 16, len(elems)
    return u8(0) + u8((1 if lf else 0) | (2 if lower else 0)) + u8(len(elems)) + b"".join(elems)


def raw_plan(data):
    return u8(3) + u16(len(data)) + data


def seed(ops, plans, chunks=(7,), flags=0):
    assert 1 <= len(chunks) <= 8 and len(ops) <= 32
    head = u8(flags) + u8(len(chunks) - 1) + b"".join(u8(0 if c == 4096 else c) for c in chunks)
    return head + u8(len(ops)) + b"".join(ops) + b"".join(plans)


# --- converting a captured response -----------------------------------------------------

NOISE_TPL = [
    (re.compile(rb"^\* (\d+) EXISTS$"), 0),
    (re.compile(rb"^\* (\d+) EXPUNGE$"), 1),
    (re.compile(rb"^\* (\d+) RECENT$"), 2),
]

FLAG_LISTS = [
    b"\\Seen",
    b"\\Seen \\Deleted",
    b"",
    b"$Forwarded $MDNSent \\Answered",
    b"\\Recent \\Flagged",
    b"$POP3Deleted \\Seen",
    b"\\Draft NonJunk",
    b"\\Seen \\Recent",
    b"\\Recent \\Seen",
    b"\\Recent \\Deleted",
]


class Unconvertible(Exception):
    pass


def split_lines(resp):
    """Response bytes into (line without EOL, literal bytes or None) pieces, in order."""
    out = []
    i = 0
    while i < len(resp):
        j = resp.index(b"\n", i)
        line = resp[i : j + 1]
        i = j + 1
        m = re.search(rb"\{(\d+)\}\r?\n$", line)
        if m:
            n = int(m.group(1))
            out.append((line, resp[i : i + n]))
            i += n
        else:
            out.append((line, None))
    return out


def convert(resp, tag, uid_list):
    """A captured response into structured plan elements (raises Unconvertible)."""
    sel = {u: (CUR if k == 0 else other(k - 1)) for k, u in enumerate(uid_list)}
    pieces = split_lines(resp)
    elems = []
    k = 0
    while k < len(pieces):
        line, lit = pieces[k]
        body = line.rstrip(b"\r\n")
        if body.startswith(tag + b" "):
            m = re.match(rb"^(OK|NO|BAD)(?: \[(EXPUNGEISSUED|SERVERBUG|UNAVAILABLE)\])? ?(.*)$", body[len(tag) + 1 :])
            if not m:
                raise Unconvertible(body)
            code = m.group(2).decode() if m.group(2) else None
            elems.append(tagged(m.group(1).decode(), code, m.group(3)))
            k += 1
            continue
        m = re.match(rb"^\* (\d+) FETCH \((.*)$", body)
        if m:
            seq = int(m.group(1))
            items = []
            rest = m.group(2)
            while True:
                rest = rest.lstrip(b" ")
                if rest == b")":
                    break
                mm = re.match(rb"^UID (\d+)(.*)$", rest)
                if mm:
                    u = int(mm.group(1))
                    if u in sel:
                        items.append(it_uid(sel[u]))
                    elif 900 <= u < 1155:
                        items.append(it_uid(foreign(u - 900)))
                    else:
                        raise Unconvertible(b"uid %d" % u)
                    rest = mm.group(2)
                    continue
                mm = re.match(rb"^RFC822\.SIZE (\d+)(.*)$", rest)
                if mm:
                    items.append(it_size(int(mm.group(1))))
                    rest = mm.group(2)
                    continue
                mm = re.match(rb"^FLAGS \(([^)]*)\)(.*)$", rest)
                if mm:
                    if mm.group(1) not in FLAG_LISTS:
                        raise Unconvertible(mm.group(1))
                    items.append(it_flags(FLAG_LISTS.index(mm.group(1))))
                    rest = mm.group(2)
                    continue
                mm = re.match(rb"^MODSEQ \((\d+)\)(.*)$", rest)
                if mm:
                    items.append(it_modseq(int(mm.group(1))))
                    rest = mm.group(2)
                    continue
                mm = re.match(rb"^BODY\[\](<\d+>)? (NIL|\"\"|\{\d+\})(.*)$", rest)
                if mm:
                    origin = NATURAL if mm.group(1) is None or mm.group(1) != b"<0>" else ANGLE
                    if mm.group(2) == b"NIL":
                        items.append(it_body(NIL, origin))
                        rest = mm.group(3)
                    elif mm.group(2) == b'""':
                        items.append(it_body(EMPTY, origin))
                        rest = mm.group(3)
                    else:
                        items.append(it_body(literal(lit), origin))
                        k += 1
                        rest = pieces[k][0].rstrip(b"\r\n")
                    continue
                raise Unconvertible(rest)
            elems.append(fetch(seq, *items))
            k += 1
            continue
        if lit is not None:
            raise Unconvertible(body)
        for rx, tpl in NOISE_TPL:
            mm = rx.match(body)
            if mm:
                elems.append(noise(tpl, int(mm.group(1))))
                break
        else:
            if body.startswith(b"* VANISHED "):
                raise Unconvertible(body)
            # Free text: `* ` + text (template 12).
            elems.append(noise(12, 0, body[2:]))
        k += 1
    return elems


def load_captures():
    """fuzz/captures/<server>/<case>.txt: `# uids: 1 2 3`, `# origin: 100`, `# tag: P1`
    header lines, then the response bytes."""
    caps = []
    root = os.path.join(FUZZ, "captures")
    if not os.path.isdir(root):
        return caps
    for server in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, server))):
            if not name.endswith(".txt"):
                continue
            data = open(os.path.join(root, server, name), "rb").read()
            meta = {}
            while data.startswith(b"# "):
                line, data = data.split(b"\n", 1)
                key, val = line[2:].split(b":", 1)
                meta[key.decode()] = val.strip().decode()
            caps.append((server, name[:-4], meta, data))
    return caps


# --- the seeds --------------------------------------------------------------------------

MSG = (
    b"Return-Path: <a@example.org>\r\nFrom: a@example.org\r\nTo: b@example.org\r\n"
    b"Subject: test {5}\r\n\r\nbody\r\n.\r\n..dot\r\n* 1 FETCH (UID 1 BODY[] {3}\r\nP1 OK\r\n"
)
SMALL = b"Subject: s\r\n\r\nx\r\n"


def shapes():
    s = {}
    body7 = std_body(CUR, MSG)
    # Normal: one UID, UID before / after the body, quoted, lower case, LF line ends.
    s["one-uid-first"] = seed([op_start(7), op_read_all(1000), OP_NOOP], [plan(body7, tagged("OK", text=b"Fetch completed."))])
    s["one-uid-after"] = seed(
        [op_start(7), op_read_all(100), OP_NOOP],
        [plan(fetch(2, it_body(literal(MSG)), it_uid(CUR), it_flags(0)), tagged())],
        chunks=(1,),
    )
    s["quoted-body"] = seed(
        [op_start(9), op_next(4), op_read_all(3), OP_NOOP],
        [plan(fetch(1, it_body(quoted(b'Subject: "x" \\ y')), it_uid(CUR)), tagged())],
    )
    s["lower-lf"] = seed(
        [op_start(7), op_read_all(64), OP_NOOP],
        [plan(fetch(3, it_uid(CUR), it_size(len(MSG)), it_body(literal(MSG))), tagged(), lf=True, lower=True)],
        chunks=(3, 1, 200),
        flags=2,
    )
    # Dovecot's answer for a message expunged under the session, and variants.
    s["gone-dovecot"] = seed(
        [op_start(5), op_read_all(100), OP_NOOP],
        [plan(fetch(5, it_uid(CUR), it_size(0), it_body(NIL)), noise(1, 5),
              tagged("OK", "EXPUNGEISSUED", b"Some messages were already expunged."))],
        chunks=(1,),
        flags=1,
    )
    s["gone-nil-uid-after"] = seed([op_start(9), OP_NOOP], [plan(fetch(5, it_body(NIL), it_uid(CUR)), tagged(text=b"done"), lower=True)])
    s["gone-empty-quoted"] = seed([op_start(9), op_read_all(10), OP_NOOP], [plan(fetch(5, it_uid(CUR), it_body(EMPTY)), tagged())])
    s["gone-no-data-no"] = seed(
        [op_start(9), OP_NOOP],
        [plan(noise(1, 5), noise(0, 4), tagged("NO", "EXPUNGEISSUED", b"gone"))],
        chunks=(2,),
    )
    s["gone-vanished-flags"] = seed(
        [op_start(9), OP_NOOP],
        [plan(noise(5, 9), fetch(5, it_uid(CUR), it_flags(1)), tagged())],
    )
    s["gone-modseq-exists"] = seed(
        [op_start(9), OP_NOOP],
        [plan(fetch(2, it_flags(5), it_modseq(77), it_uid(CUR)), noise(0, 6), tagged())],
    )
    s["gone-only-completion"] = seed([op_start(9), OP_NOOP], [plan(tagged("OK", "EXPUNGEISSUED", b"gone"))])
    s["gone-bad"] = seed([op_start(9), OP_NOOP], [plan(tagged("BAD", None, b"Error in IMAP command"))])
    # Noise before, between and after the streamed literal, with read-ahead.
    s["ahead-around"] = seed(
        [op_start(5), op_read_all(1000), op_start(5, [3, 6, 8]), op_next(10), OP_TAKE, op_read_all(50), OP_SETTLE, OP_TAKE, OP_NOOP],
        [
            plan(fetch(2, it_uid(CUR), it_body(literal(MSG))), tagged()),
            plan(
                noise(0, 3), fetch(1, it_uid(other(0)), it_flags(0)),
                fetch(1, it_uid(other(0)), it_body(literal(SMALL))),
                fetch(4, it_uid(other(1)), it_body(NIL)), noise(4, 6),
                fetch(2, it_uid(CUR), it_body(literal(MSG)), it_flags(0)),
                noise(1, 1), fetch(3, it_uid(other(2)), it_body(quoted(b'a "q" b'))),
                fetch(2, it_flags(1), it_modseq(9), it_uid(CUR)), noise(0, 9),
                tagged("NO", "EXPUNGEISSUED", b"Some messages were already expunged."),
            ),
        ],
        chunks=(5, 17, 1),
    )
    s["ahead-limits"] = seed(
        [op_start(5), op_read_all(60000), op_start(5, [3, 4]), op_read_all(60000), OP_SETTLE, OP_TAKE, OP_NOOP],
        [
            plan(fetch(1, it_uid(CUR), it_body(pattern(300))), tagged()),
            plan(fetch(1, it_uid(other(0)), it_body(big(0, 3))), fetch(2, it_uid(CUR), it_body(pattern(200, 1))),
                 fetch(3, it_uid(other(1)), it_body(big(1))), tagged()),
        ],
        chunks=(4096,),
    )
    s["ahead-uid-after-refused"] = seed(
        [op_start(5), op_read_all(1000), op_start(5, [6]), op_read_all(1000), OP_NOOP],
        [plan(std_body(CUR, SMALL), tagged()),
         plan(fetch(1, it_body(literal(SMALL)), it_uid(other(0))), fetch(2, it_uid(CUR), it_body(literal(SMALL))), tagged())],
    )
    s["ahead-before-order-known"] = seed([op_start(5, [6]), op_start(5), op_read_all(100), OP_NOOP], [])
    # Ranged FETCH (the rest of a TOP): origin echoed, wrong origin refused, abandoned read to the end.
    s["ranged"] = seed(
        [op_start_at(7, 100), op_next(10), OP_SETTLE, op_start_at(7, 100), op_read_all(100), OP_NOOP],
        [plan(fetch(1, it_uid(CUR), it_body(big(2))), tagged()),
         plan(fetch(1, it_uid(CUR), it_body(literal(SMALL), explicit(0))), tagged())],
        chunks=(4096, 100),
    )
    s["ranged-uid-after"] = seed(
        [op_start_at(7, 1 << 20), op_read_all(7), OP_NOOP],
        [plan(noise(0, 2), fetch(1, it_body(literal(SMALL), ANGLE), it_uid(CUR)), tagged())],
    )
    # Prefetch: served without a command; drained before another command; foreign body.
    s["prefetch-served"] = seed(
        [op_start(7), op_read_all(1000), op_prefetch(8, [9]), OP_SETTLE, op_start(8), op_read_all(1000), OP_SETTLE, OP_TAKE, OP_NOOP],
        [plan(std_body(CUR, MSG), tagged()),
         plan(std_body(CUR, MSG), fetch(3, it_uid(other(0)), it_body(literal(SMALL))), tagged())],
    )
    s["prefetch-drained"] = seed(
        [op_start(7), op_read_all(1000), op_prefetch(8), OP_NOOP, op_start(11), op_read_all(1000), op_prefetch(12), op_start(13), OP_NOOP],
        [plan(std_body(CUR, MSG), tagged()),
         plan(std_body(CUR, MSG), tagged()),
         plan(std_body(CUR, SMALL), tagged()),
         plan(fetch(2, it_uid(CUR), it_body(NIL)), fetch(3, it_uid(foreign(3)), it_body(quoted(b"x"))), noise(1, 2),
              tagged("OK", "EXPUNGEISSUED", b"x")),
         plan(std_body(CUR, SMALL), tagged())],
    )
    s["prefetch-foreign"] = seed(
        [op_start(7), op_read_all(1000), op_prefetch(8), OP_NOOP],
        [plan(std_body(CUR, MSG), tagged()), plan(std_body(foreign(1), SMALL), tagged())],
    )
    s["prefetch-over-drain-max"] = seed(
        [op_start(7), op_read_all(1000), op_prefetch(8), OP_NOOP],
        [plan(std_body(CUR, MSG), tagged()), plan(fetch(1, it_uid(CUR), it_body(big(3))), tagged())],
    )
    s["abandon-over-drain-max"] = seed(
        [op_start(7), op_next(100), OP_NOOP],
        [plan(fetch(1, it_uid(CUR), it_body(big(3))), tagged())],
        chunks=(4096,),
    )
    # Refusals that must not break the connection.
    s["refusals"] = seed(
        [op_start(0), op_start(3, [3]), op_start(3, [0]), op_next(5), op_prefetch(4), OP_NOOP, op_start(3), op_read_all(100), op_prefetch(4), op_prefetch(5), OP_NOOP],
        [],
    )
    # Broken: BYE, EOF, silence, two UIDs, two bodies, UID 0, a body for a UID not asked.
    for name, p in [
        ("bye", plan(noise(0, 3), bye(b"server shutting down"))),
        ("eof-mid", plan(fetch(1, it_uid(CUR), it_flags(0)), CUT)),
        ("stall", plan(noise(0, 3), STALL)),
        ("two-uids", plan(fetch(1, it_uid(CUR), it_body(literal(SMALL)), it_uid(foreign(2))), tagged())),
        ("two-bodies", plan(fetch(1, it_uid(CUR), it_body(NIL), it_body(literal(SMALL))), tagged())),
        ("uid-zero", plan(fetch(1, it_uid(ZERO), it_body(NIL)), tagged())),
        ("foreign-body", plan(std_body(foreign(4), SMALL), tagged())),
        ("eof-after-ok", plan(std_body(CUR, SMALL), tagged(), noise(0, 4), CUT)),
        ("bye-after-ok", plan(std_body(CUR, SMALL), tagged(), bye())),
    ]:
        s["broken-" + name] = seed([op_start(7), op_read_all(100), OP_SETTLE, OP_NOOP, op_start(8)], [p])
    # An untagged response with a literal (see Findings in README.md).
    s["untagged-literal"] = seed(
        [op_start(7), op_read_all(100), OP_NOOP],
        [plan(other_literal(0, b"abc"), std_body(CUR, SMALL), tagged())],
    )
    # Raw: protocol-looking bytes and a lying literal length.
    s["raw-lying"] = seed(
        [op_start(7), op_read_all(10), OP_NOOP],
        [raw_plan(b"* 1 FETCH (UID 7 BODY[] {10}\r\nshort)\r\n{tag} OK done\r\n")],
    )
    s["raw-mixed"] = seed(
        [op_start(7), op_read_all(10), OP_SETTLE, OP_NOOP],
        [plan(noise(0, 1), raw_el(b"* 2 FETCH (UID 7 BODY[] {3}\r\nabc)\r\n"), tagged())],
    )
    return s


def split_seeds():
    """Every split point of two responses: chunk schedule [k, 4096]."""
    s = {}
    gone = [plan(fetch(5, it_uid(CUR), it_size(0), it_body(NIL)), noise(1, 5),
                 tagged("OK", "EXPUNGEISSUED", b"Some messages were already expunged."))]
    normal = [plan(noise(0, 3), fetch(1, it_uid(CUR), it_flags(0)), fetch(2, it_uid(CUR), it_body(literal(SMALL)), it_flags(0)),
                   noise(1, 1), tagged(text=b"Fetch completed (0.001 + 0.000 secs)."))]
    # Greeting `* OK ready\r\n` is 12 bytes, then the response; [k, 4096] splits at k, then at
    # k + 4096 (past the end): k from 1 to the end of the response.
    for name, p, ops, total in [
        ("gone", gone, [op_start(5), OP_NOOP], 12 + 120),
        ("normal", normal, [op_start(7), op_read_all(5), OP_NOOP], 12 + 170),
    ]:
        for k in range(1, total + 1):
            s["split-%s-%03d" % (name, k)] = seed(ops, p, chunks=(k if k < 256 else 255, 4096))
    return s


def capture_seeds():
    s = {}
    for server, case, meta, data in load_captures():
        uid_list = [int(u) for u in meta["uids"].split()]
        origin = int(meta.get("origin", "0"))
        tag = meta.get("tag", "P1").encode()
        streamed = uid_list[0]
        if origin:
            ops = [op_start_at(streamed, origin), op_read_all(1000), OP_SETTLE, OP_TAKE, OP_NOOP]
            first = []
        elif len(uid_list) > 1:
            # Read-ahead needs the server to have shown UID before BODY[]: a first, one-UID
            # FETCH (answered by a small plan), then the captured one.
            ops = [op_start(streamed), op_read_all(60000), op_start(streamed, uid_list[1:]), op_read_all(1000), OP_SETTLE, OP_TAKE, OP_NOOP]
            first = [plan(std_body(CUR, SMALL), tagged())]
        else:
            ops = [op_start(streamed), op_read_all(1000), OP_SETTLE, OP_TAKE, OP_NOOP]
            first = []
        raw = data.replace(tag + b" ", b"{tag} ")
        try:
            elems = convert(data, tag, uid_list)
        except Unconvertible as e:
            print("%s/%s: not convertible (%r), raw only" % (server, case, e), file=sys.stderr)
            elems = None
        base = "cap-%s-%s" % (server, case)
        if elems is not None and len(elems) <= 16:
            for chunks in [(1,), (7, 3), (4096,)]:
                s["%s-c%d" % (base, chunks[0])] = seed(ops, first + [plan(*elems)], chunks=chunks, flags=1)
        s[base + "-raw"] = seed(ops, first + [raw_plan(raw)], chunks=(5,), flags=1)
    return s


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(FUZZ, "seeds", "fetch_stream")
    os.makedirs(out, exist_ok=True)
    seeds = {}
    seeds.update(shapes())
    seeds.update(split_seeds())
    seeds.update(capture_seeds())
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print("%d seeds in %s" % (len(seeds), out))


if __name__ == "__main__":
    main()
