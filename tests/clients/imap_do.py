#!/usr/bin/env python3
"""Change an IMAP account through Python's imaplib, as another mail client would.

    imap_do.py --port P --user U --password PW [--mailbox INBOX] STEPS_JSON

STEPS_JSON is a JSON list of steps, each a list of strings, run in order after SELECT:
    ["uid", CMD, ARG...]     imaplib's uid(CMD, ARG...), e.g. ["uid","STORE","4","+FLAGS","(\\\\Deleted)"]
    ["expunge"]              a plain EXPUNGE
    ["append", MAILBOX, B64] APPEND a message (base64) to MAILBOX
    ["create", MAILBOX]      CREATE a mailbox
Exit status 1 with a message on stderr when any step is not OK.
"""
import argparse
import base64
import imaplib
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--mailbox", default="INBOX")
    ap.add_argument("steps")
    a = ap.parse_args()
    m = imaplib.IMAP4(a.host, a.port)
    m.login(a.user, a.password)
    typ, data = m.select(a.mailbox)
    if typ != "OK":
        sys.exit(f"SELECT {a.mailbox}: {data}")
    for step in json.loads(a.steps):
        if step[0] == "uid":
            typ, data = m.uid(*step[1:])
        elif step[0] == "expunge":
            typ, data = m.expunge()
        elif step[0] == "append":
            typ, data = m.append(step[1], None, None, base64.b64decode(step[2]))
        elif step[0] == "create":
            typ, data = m.create(step[1])
        else:
            sys.exit(f"unknown step {step!r}")
        if typ != "OK":
            sys.exit(f"step {step!r} failed: {data}")
    m.logout()


if __name__ == "__main__":
    main()
