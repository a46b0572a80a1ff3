#!/usr/bin/env python3
"""Report the state of an IMAP account through Python's imaplib (a real IMAP client).

    imap_state.py --port P [--host H] [--tls none|implicit|starttls] [--cafile F]
                  --user U --password PW [--mailbox INBOX]

Prints one JSON object:
    {"mailboxes": {NAME: MESSAGES, ...},        # every mailbox that exists, with its count
     "mailbox": NAME, "uidvalidity": N, "uidnext": N,
     "messages": [{"uid": N, "flags": [STR...], "size": RFC822.SIZE}, ...]}   # by UID
Flags are sorted; \Recent (which only says this session saw the message first) is left out.
The mailbox is opened read-only (EXAMINE), so looking changes nothing. Exit status 1 with a
message on stderr when login or EXAMINE fails.
"""
import argparse
import imaplib
import json
import re
import ssl
import sys

LIST_RE = re.compile(rb'^\((?P<flags>[^)]*)\) (?P<delim>"(?:[^"\\]|\\.)*"|NIL) (?P<name>.+)$')
FETCH_RE = re.compile(rb"UID (\d+)|FLAGS \(([^)]*)\)|RFC822\.SIZE (\d+)")


def unquote(name):
    if name.startswith(b'"') and name.endswith(b'"'):
        name = re.sub(rb'\\(.)', rb'\1', name[1:-1])
    return name.decode("utf-8", "replace")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tls", choices=["none", "implicit", "starttls"], default="none")
    ap.add_argument("--cafile")
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--mailbox", default="INBOX")
    args = ap.parse_args()

    ctx = ssl.create_default_context(cafile=args.cafile) if args.tls != "none" else None
    try:
        if args.tls == "implicit":
            m = imaplib.IMAP4_SSL(args.host, args.port, ssl_context=ctx)
        else:
            m = imaplib.IMAP4(args.host, args.port)
            if args.tls == "starttls":
                m.starttls(ctx)
        m.login(args.user, args.password)
    except (imaplib.IMAP4.error, OSError) as e:
        print("imap_state: login failed: %s" % e, file=sys.stderr)
        return 1

    mailboxes = {}
    typ, data = m.list()
    for item in data or []:
        if not isinstance(item, bytes):
            continue
        mo = LIST_RE.match(item)
        if not mo or b"\\noselect" in mo.group("flags").lower():
            continue
        name = unquote(mo.group("name"))
        typ, st = m.status('"%s"' % name.replace("\\", "\\\\").replace('"', '\\"'), "(MESSAGES)")
        count = int(re.search(rb"MESSAGES (\d+)", st[0]).group(1))
        mailboxes[name] = count

    out = {"mailboxes": mailboxes, "mailbox": args.mailbox, "uidvalidity": None,
           "uidnext": None, "messages": []}
    typ, data = m.select('"%s"' % args.mailbox, readonly=True)
    if typ != "OK":
        print("imap_state: EXAMINE %s failed: %r" % (args.mailbox, data), file=sys.stderr)
        return 1
    out["uidvalidity"] = int(m.untagged_responses.get("UIDVALIDITY", [b"0"])[-1])
    out["uidnext"] = int(m.untagged_responses.get("UIDNEXT", [b"0"])[-1])
    if int(data[0]) > 0:
        typ, data = m.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE)")
        for item in data:
            if isinstance(item, tuple):
                item = item[0]
            if not item:
                continue
            uid = size = None
            flags = []
            for mo in FETCH_RE.finditer(item):
                if mo.group(1):
                    uid = int(mo.group(1))
                elif mo.group(2) is not None:
                    # \Recent is per-session noise: left out.
                    flags = [f.decode("utf-8", "replace") for f in mo.group(2).split()
                             if f.lower() != b"\\recent"]
                elif mo.group(3):
                    size = int(mo.group(3))
            if uid is not None:
                out["messages"].append({"uid": uid, "flags": sorted(flags), "size": size})
    out["messages"].sort(key=lambda r: r["uid"])
    m.logout()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
