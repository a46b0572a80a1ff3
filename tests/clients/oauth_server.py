#!/usr/bin/env python3
"""A small OAuth 2.0 authorization server for the tests, on Python's own HTTP stack.

    oauth_server.py --client-id ID --client-secret SECRET --public-key PEM --service-account EMAIL

prints `PORT` on its first line of output, then serves 127.0.0.1:PORT until killed:

  POST /token             RFC 6749 token endpoint: client_credentials (client_secret, or a
                          client_assertion signed by the key whose public half is PEM, RFC 7523
                          2.2), the JWT bearer grant naming a user (RFC 7523 2.1, signed by the
                          same key, iss = the service account), refresh_token (rotated on every
                          use: an old one is invalid_grant), device_code (RFC 8628).
  POST /device            RFC 8628 device authorization.
  POST /introspect/USER   what Dovecot's oauth2 passdb asks (RFC 7662 shape): active when the
                          token is live and belongs to USER (application tokens belong to all).
  POST /control           JSON: {"expires_in": N, "approve_after": N, "device_user": U,
                          "deny": bool, "fail": "" | "503" | "hang", "revoke": U,
                          "expire_all": true, "mint": U, "pad": N (answers with a new token of U's,
                          N octets longer than usual)}
  GET  /stats             JSON: token requests by grant and result, refreshes by user,
                          the most refreshes in flight at once per user, every token issued.

Signatures are checked with `openssl dgst` (RS256). Nothing is persisted.
"""

import argparse
import base64
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLIENT_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"
ANY_USER = "*"

lock = threading.Lock()
state = {
    "expires_in": 3600,
    "approve_after": 2,
    "device_user": "alice",
    "deny": False,
    "fail": "",
    # token -> {"user", "expires"}
    "access": {},
    # refresh token -> user (only the live one of each chain)
    "refresh": {},
    # device_code -> {"polls", "expires", "user_code"}
    "devices": {},
    "stats": {"requests": {}, "refreshes": {}, "in_flight": {}, "max_in_flight": {}, "issued": []},
}


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify_jwt(jwt, public_key, audience):
    """The claims of an RS256 JWT signed by `public_key` for `audience`, or None."""
    try:
        header_b64, claims_b64, sig_b64 = jwt.split(".")
        header = json.loads(b64url_decode(header_b64))
        claims = json.loads(b64url_decode(claims_b64))
        sig = b64url_decode(sig_b64)
    except ValueError:
        return None
    if header.get("alg") != "RS256":
        return None
    with tempfile.TemporaryDirectory() as d:
        data_path, sig_path = os.path.join(d, "data"), os.path.join(d, "sig")
        with open(data_path, "wb") as f:
            f.write(f"{header_b64}.{claims_b64}".encode())
        with open(sig_path, "wb") as f:
            f.write(sig)
        ok = subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", public_key, "-signature", sig_path, data_path],
            capture_output=True,
        ).returncode == 0
    now = time.time()
    if not ok or claims.get("aud") != audience or not (claims.get("exp", 0) > now):
        return None
    return claims


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def form(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode()
        return {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}

    def do_GET(self):
        if self.path == "/stats":
            with lock:
                return self.answer(200, state["stats"])
        self.answer(404, {"error": "not_found"})

    def do_POST(self):
        if self.path == "/control":
            n = int(self.headers.get("Content-Length") or 0)
            control = json.loads(self.rfile.read(n) or b"{}")
            with lock:
                for key in ("expires_in", "approve_after", "device_user", "deny", "fail"):
                    if key in control:
                        state[key] = control[key]
                if "revoke" in control:
                    user = control["revoke"]
                    state["refresh"] = {t: u for t, u in state["refresh"].items() if u != user}
                    state["access"] = {t: a for t, a in state["access"].items() if a["user"] != user}
                if control.get("expire_all"):
                    for a in state["access"].values():
                        a["expires"] = 0
            if "mint" in control:
                # A token the user's own mail client would have got (way 1: the client brings it).
                return self.answer(200, self.issue(control["mint"], pad=control.get("pad", 0))[1])
            return self.answer(200, {"ok": True})
        if self.path.startswith("/introspect/"):
            user = urllib.parse.unquote(self.path[len("/introspect/"):])
            token = self.form().get("token", "")
            with lock:
                a = state["access"].get(token)
                live = a is not None and a["expires"] > time.time() and a["user"] in (user, ANY_USER)
            return self.answer(200, {"active": True, "username": user} if live else {"active": False})
        if state["fail"] == "hang":
            time.sleep(30)
        if state["fail"] == "503":
            return self.answer(503, {"error": "temporarily_unavailable"})
        if self.path == "/device":
            f = self.form()
            if f.get("client_id") != args.client_id:
                return self.answer(401, {"error": "invalid_client"})
            code = secrets.token_urlsafe(24)
            user_code = "".join(secrets.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(8))
            with lock:
                state["devices"][code] = {"polls": 0, "expires": time.time() + 60, "user_code": user_code}
            return self.answer(200, {
                "device_code": code, "user_code": user_code,
                "verification_uri": f"http://127.0.0.1:{port}/activate",
                "expires_in": 60, "interval": 1,
            })
        if self.path == "/token":
            status, body, grant = self.token(self.form())
            with lock:
                key = f"{grant}:{'ok' if status == 200 else body.get('error')}"
                state["stats"]["requests"][key] = state["stats"]["requests"].get(key, 0) + 1
            return self.answer(status, body)
        self.answer(404, {"error": "not_found"})

    def client_ok(self, f):
        """RFC 6749 2.3 client authentication: a secret or a signed assertion."""
        if f.get("client_id") != args.client_id:
            return False
        if f.get("client_assertion_type") == CLIENT_ASSERTION:
            claims = verify_jwt(f.get("client_assertion", ""), args.public_key, token_url)
            return bool(claims) and claims.get("iss") == claims.get("sub") == args.client_id
        return f.get("client_secret") == args.client_secret

    def issue(self, user, refresh=False, pad=0):
        token = "at-" + secrets.token_urlsafe(32) + "p" * pad
        with lock:
            state["access"][token] = {"user": user, "expires": time.time() + state["expires_in"]}
            body = {"access_token": token, "token_type": "Bearer", "expires_in": state["expires_in"]}
            state["stats"]["issued"].append(token)
            if refresh:
                rt = "rt-" + secrets.token_urlsafe(32)
                state["refresh"][rt] = user
                body["refresh_token"] = rt
                state["stats"]["issued"].append(rt)
        return 200, body

    def token(self, f):
        grant = f.get("grant_type", "")
        if grant == "client_credentials":
            if not self.client_ok(f):
                return 401, {"error": "invalid_client"}, "client_credentials"
            return (*self.issue(ANY_USER), "client_credentials")
        if grant == JWT_BEARER:
            claims = verify_jwt(f.get("assertion", ""), args.public_key, token_url)
            if not claims or claims.get("iss") != args.service_account or not claims.get("sub"):
                return 400, {"error": "invalid_grant"}, "jwt_bearer"
            return (*self.issue(claims["sub"]), "jwt_bearer")
        if grant == "refresh_token":
            if not self.client_ok(f):
                return 401, {"error": "invalid_client"}, "refresh_token"
            rt = f.get("refresh_token", "")
            stats = state["stats"]
            with lock:
                user = state["refresh"].pop(rt, None)
                if user is not None:
                    stats["refreshes"][user] = stats["refreshes"].get(user, 0) + 1
                    n = stats["in_flight"].get(user, 0) + 1
                    stats["in_flight"][user] = n
                    stats["max_in_flight"][user] = max(n, stats["max_in_flight"].get(user, 0))
            if user is None:
                return 400, {"error": "invalid_grant"}, "refresh_token"
            time.sleep(0.3)  # a slow endpoint: racing refreshes overlap here
            with lock:
                stats["in_flight"][user] -= 1
            return (*self.issue(user, refresh=True), "refresh_token")
        if grant == DEVICE_CODE:
            if not self.client_ok(f):
                return 401, {"error": "invalid_client"}, "device_code"
            with lock:
                d = state["devices"].get(f.get("device_code", ""))
                if d is None:
                    return 400, {"error": "invalid_grant"}, "device_code"
                if d["expires"] < time.time():
                    return 400, {"error": "expired_token"}, "device_code"
                if state["deny"]:
                    return 400, {"error": "access_denied"}, "device_code"
                d["polls"] += 1
                if d["polls"] <= state["approve_after"]:
                    return 400, {"error": "authorization_pending"}, "device_code"
                del state["devices"][f["device_code"]]
            return (*self.issue(state["device_user"], refresh=True), "device_code")
        return 400, {"error": "unsupported_grant_type"}, grant or "none"


parser = argparse.ArgumentParser()
parser.add_argument("--client-id", required=True)
parser.add_argument("--client-secret", required=True)
parser.add_argument("--public-key", required=True)
parser.add_argument("--service-account", required=True)
args = parser.parse_args()

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
port = server.server_address[1]
token_url = f"http://127.0.0.1:{port}/token"
print(port, flush=True)
sys.stdout.close()
server.serve_forever()
