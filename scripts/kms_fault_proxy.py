#!/usr/bin/env python3
"""Fault-injecting HTTP proxy for AWS KMS and S3 tests (stdlib only).

Sits on loopback between the AWS SDK and a local KMS or S3 (moto_server) and forwards every
request unchanged (method, path, headers, body; status, headers, body) unless a fault rule
matches. Control endpoints live on the same port under /__fault__:

  POST   /__fault__            add one rule (JSON object) or several ({"rules": [...]})
  GET    /__fault__            list active rules
  DELETE /__fault__            clear all rules
  GET    /__fault__/stats      request counters: {"total", "by_target", "faults"}
  DELETE /__fault__/stats      reset the counters
  POST   /__fault__/config     {"enforce_key_state": true|false}
  GET    /__fault__/health     200 {"ok": true}

A rule (fields other than "action" are optional):
  {"action": "delay", "seconds": 2.5}              sleep, then forward
  {"action": "drop"}                               read the request, close the connection
                                                   without an answer ("reset": true sends
                                                   a TCP RST instead of a FIN)
  {"action": "drop_response"}                      forward upstream (side effects happen),
                                                   then close without an answer
  {"action": "cut_body"}                           forward upstream, answer with the status,
                                                   the headers (the full Content-Length)
                                                   and half of the body, then close: a
                                                   connection dropped mid-transfer
  {"action": "error", "error_type": "DisabledException", "message": "...", "status": 400}
       answers with the KMS JSON protocol error: body {"__type": T, "message": M},
       content-type application/x-amz-json-1.1, header x-amzn-ErrorType: T.
       Default status: 500 for KMSInternalException/InternalFailure, 503 for
       ServiceUnavailable(Exception)/KMSUnavailable..., 400 otherwise (including
       ThrottlingException).
       With "protocol": "s3" the error is S3's instead: an XML body
       <Error><Code>T</Code><Message>M</Message></Error>, content-type application/xml;
       default status 503 for SlowDown and ServiceUnavailable, 500 otherwise.
  "target": "TrentService.Decrypt" (or just "Decrypt")  only requests with that X-Amz-Target
  "method": "PUT"   only requests with that HTTP method (S3: PUT is UploadPart, GET GetObject)
  "path_contains": "partNumber="  only requests whose path and query contain this text
  "count": N        apply to the next N matching requests, then the rule expires;
                    omitted or null: every matching request until DELETE /__fault__
  "skip": K         let the first K matching requests through unchanged first

Rules are tried in the order they were added; the first live match applies.

Key-state enforcement (off by default, --enforce-key-state or POST /__fault__/config):
moto does not refuse Encrypt/Decrypt/GenerateDataKey*/ReEncrypt on Disabled or
PendingDeletion keys, real KMS does. When enabled, after a successful upstream answer to one
of those operations the proxy asks upstream DescribeKey for every KeyId in the answer and
replaces the answer with the error real KMS gives: DisabledException (Disabled) or
KMSInvalidStateException (PendingDeletion and other non-Enabled states), status 400.

Usage:
  kms_fault_proxy.py --upstream http://127.0.0.1:5000 [--host 127.0.0.1] [--port 0]
                     [--port-file FILE] [--enforce-key-state]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}

KEY_USING_OPS = {
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
    "Sign",
    "Verify",
}

CONTROL_PREFIX = "/__fault__"


def default_status(error_type: str) -> int:
    if error_type in ("KMSInternalException", "InternalFailure", "InternalServerError"):
        return 500
    if error_type in (
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "KMSUnavailableException",
    ):
        return 503
    return 400


def normalize_target(target: str | None) -> str | None:
    if target is None:
        return None
    target = str(target)
    return target if "." in target else "TrentService." + target


class State:
    def __init__(self, upstream: str, enforce_key_state: bool) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.lock = threading.Lock()
        self.rules: list[dict] = []
        self.total = 0
        self.by_target: dict[str, int] = {}
        self.faults: dict[str, int] = {}
        self.enforce_key_state = enforce_key_state
        self.next_rule_id = 1

    # -- rules ---------------------------------------------------------------------------
    def add_rule(self, raw: dict) -> dict:
        if not isinstance(raw, dict):
            raise ValueError("a rule must be a JSON object")
        action = raw.get("action")
        if action not in ("delay", "drop", "drop_response", "cut_body", "error"):
            raise ValueError(f"unknown action {action!r}")
        rule = {
            "action": action,
            "target": normalize_target(raw.get("target")),
            "count": raw.get("count"),
            "skip": int(raw.get("skip") or 0),
            "method": raw.get("method"),
            "path_contains": raw.get("path_contains"),
            "protocol": raw.get("protocol") or "kms",
        }
        if rule["count"] is not None:
            rule["count"] = int(rule["count"])
            if rule["count"] < 1:
                raise ValueError("count must be >= 1 (omit it for 'until cleared')")
        if action == "delay":
            rule["seconds"] = float(raw.get("seconds", raw.get("delay", 1.0)))
        if action == "drop":
            rule["reset"] = bool(raw.get("reset", False))
        if action == "error":
            s3 = rule["protocol"] == "s3"
            etype = str(raw.get("error_type") or raw.get("type")
                        or ("InternalError" if s3 else "KMSInternalException"))
            rule["error_type"] = etype
            if s3:
                default = 503 if etype in ("SlowDown", "ServiceUnavailable") else 500
            else:
                default = default_status(etype)
            rule["status"] = int(raw.get("status") or default)
            rule["message"] = str(raw.get("message") or f"Injected {etype} (kms_fault_proxy)")
        with self.lock:
            rule["id"] = self.next_rule_id
            self.next_rule_id += 1
            self.rules.append(rule)
        return rule

    def clear_rules(self) -> int:
        with self.lock:
            n = len(self.rules)
            self.rules.clear()
            return n

    def take_rule(self, target: str | None, method: str = "", path: str = "") -> dict | None:
        """Return a copy of the first rule that applies to this request, consuming it."""
        with self.lock:
            for rule in self.rules:
                if rule["target"] is not None and rule["target"] != target:
                    continue
                if rule.get("method") is not None and rule["method"] != method:
                    continue
                if rule.get("path_contains") is not None and rule["path_contains"] not in path:
                    continue
                if rule["skip"] > 0:
                    rule["skip"] -= 1
                    continue  # this request passes this rule; later rules may still match
                applied = dict(rule)
                if rule["count"] is not None:
                    rule["count"] -= 1
                    if rule["count"] <= 0:
                        self.rules.remove(rule)
                self.faults[rule["action"]] = self.faults.get(rule["action"], 0) + 1
                return applied
        return None

    def count(self, target: str) -> None:
        with self.lock:
            self.total += 1
            self.by_target[target] = self.by_target.get(target, 0) + 1

    def stats(self) -> dict:
        with self.lock:
            return {
                "total": self.total,
                "by_target": dict(self.by_target),
                "faults": dict(self.faults),
                "active_rules": len(self.rules),
                "enforce_key_state": self.enforce_key_state,
            }

    def reset_stats(self) -> None:
        with self.lock:
            self.total = 0
            self.by_target.clear()
            self.faults.clear()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kms-fault-proxy/1"
    state: State  # set on the class by main()
    quiet = False

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if not self.quiet:
            sys.stderr.write(
                "%s [%s] %s\n" % (self.address_string(), self.log_date_time_string(), format % args)
            )

    # All methods go through one entry point.
    def do_GET(self) -> None:
        self.dispatch()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET

    # -- plumbing ------------------------------------------------------------------------
    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_raw(self, status: int, headers: list[tuple[str, str]], body: bytes,
                 length: str | None = None) -> None:
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            # A HEAD answer's Content-Length is the object's (S3 HeadObject).
            self.send_header("Content-Length", length or str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def send_json(self, status: int, obj) -> None:
        body = json.dumps(obj, indent=None, sort_keys=True).encode()
        self.send_raw(status, [("Content-Type", "application/json")], body)

    def send_kms_error(self, status: int, error_type: str, message: str) -> None:
        body = json.dumps({"__type": error_type, "message": message}).encode()
        self.send_raw(
            status,
            [
                ("Content-Type", "application/x-amz-json-1.1"),
                ("x-amzn-ErrorType", error_type),
                ("x-amzn-RequestId", str(uuid.uuid4())),
            ],
            body,
        )

    def send_s3_error(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{uuid.uuid4()}</RequestId></Error>"
        ).encode()
        self.send_raw(status, [("Content-Type", "application/xml")], body)

    def send_cut(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """The status, the headers with the full Content-Length, half the body, then close."""
        self.close_connection = True
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def drop(self, reset: bool = False) -> None:
        self.close_connection = True
        try:
            if reset:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def upstream(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        conn = http.client.HTTPConnection(
            self.state.upstream_host, self.state.upstream_port, timeout=120
        )
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    # -- request handling ----------------------------------------------------------------
    def dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            self.control(path)
            return
        self.proxy()

    def control(self, path: str) -> None:
        st = self.state
        body = self.read_body()
        try:
            payload = json.loads(body) if body.strip() else None
        except ValueError as e:
            self.send_json(400, {"error": f"invalid JSON: {e}"})
            return
        sub = path[len(CONTROL_PREFIX):].strip("/")
        try:
            if sub == "" and self.command == "POST":
                raws = payload.get("rules") if isinstance(payload, dict) and "rules" in payload else [payload]
                added = [st.add_rule(r) for r in raws]
                self.send_json(200, {"added": added})
            elif sub == "" and self.command == "GET":
                with st.lock:
                    rules = [dict(r) for r in st.rules]
                self.send_json(200, {"rules": rules})
            elif sub == "" and self.command == "DELETE":
                self.send_json(200, {"cleared": st.clear_rules()})
            elif sub == "stats" and self.command == "GET":
                self.send_json(200, st.stats())
            elif sub == "stats" and self.command == "DELETE":
                st.reset_stats()
                self.send_json(200, {"reset": True})
            elif sub == "config" and self.command in ("POST", "PUT"):
                if isinstance(payload, dict) and "enforce_key_state" in payload:
                    with st.lock:
                        st.enforce_key_state = bool(payload["enforce_key_state"])
                self.send_json(200, {"enforce_key_state": st.enforce_key_state})
            elif sub == "health":
                self.send_json(200, {"ok": True})
            else:
                self.send_json(404, {"error": f"no control endpoint {self.command} {path}"})
        except (ValueError, TypeError, AttributeError) as e:
            self.send_json(400, {"error": str(e)})

    def proxy(self) -> None:
        st = self.state
        body = self.read_body()
        target = self.headers.get("X-Amz-Target") or f"{self.command} {self.path}"
        st.count(target)
        rule = st.take_rule(self.headers.get("X-Amz-Target"), self.command, self.path)
        if rule is not None:
            action = rule["action"]
            if action == "delay":
                time.sleep(rule["seconds"])
            elif action == "drop":
                self.drop(reset=rule.get("reset", False))
                return
            elif action == "error" and rule.get("protocol") == "s3":
                self.send_s3_error(rule["status"], rule["error_type"], rule["message"])
                return
            elif action == "error":
                self.send_kms_error(rule["status"], rule["error_type"], rule["message"])
                return

        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP
                   and k.lower() != "content-length"]
        try:
            status, resp_headers, data = self.upstream(self.command, self.path, headers, body)
        except OSError as e:
            self.send_kms_error(502, "KMSInternalException", f"kms_fault_proxy: upstream error: {e}")
            return

        if rule is not None and rule["action"] == "drop_response":
            self.drop()
            return

        if st.enforce_key_state and status == 200:
            op = (self.headers.get("X-Amz-Target") or "").rpartition(".")[2]
            if op in KEY_USING_OPS:
                err = self.key_state_error(data, headers)
                if err is not None:
                    self.send_kms_error(400, err[0], err[1])
                    return

        out = [(k, v) for k, v in resp_headers if k.lower() not in HOP_BY_HOP
               and k.lower() != "content-length"]
        if rule is not None and rule["action"] == "cut_body":
            self.send_cut(status, out, data)
            return
        length = None
        if self.command == "HEAD":
            length = next((v for k, v in resp_headers if k.lower() == "content-length"), None)
        self.send_raw(status, out, data, length)

    def key_state_error(self, data: bytes, req_headers: list[tuple[str, str]]):
        try:
            resp = json.loads(data)
        except ValueError:
            return None
        key_ids = [resp[k] for k in ("SourceKeyId", "KeyId") if isinstance(resp.get(k), str)]
        keep = {"authorization", "x-amz-date", "x-amz-security-token", "host", "user-agent"}
        hdrs = [(k, v) for k, v in req_headers if k.lower() in keep]
        hdrs += [("Content-Type", "application/x-amz-json-1.1"),
                 ("X-Amz-Target", "TrentService.DescribeKey")]
        for key_id in key_ids:
            try:
                status, _, body = self.upstream(
                    "POST", "/", hdrs, json.dumps({"KeyId": key_id}).encode()
                )
                meta = json.loads(body).get("KeyMetadata", {}) if status == 200 else {}
            except (OSError, ValueError):
                continue
            state = meta.get("KeyState")
            arn = meta.get("Arn", key_id)
            if state == "Disabled":
                return "DisabledException", f"{arn} is disabled."
            if state == "PendingDeletion":
                return "KMSInvalidStateException", f"{arn} is pending deletion."
            if state not in (None, "Enabled"):
                return "KMSInvalidStateException", f"{arn} is {state}."
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of moto_server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--enforce-key-state", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = ap.parse_args()

    Handler.state = State(args.upstream, args.enforce_key_state)
    Handler.quiet = args.quiet
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    port = server.server_address[1]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{port}\n")
        os.replace(args.port_file + ".tmp", args.port_file)
    print(f"kms_fault_proxy listening on http://{args.host}:{port} -> {args.upstream}",
          file=sys.stderr, flush=True)

    def stop(signum, _frame):
        print(f"kms_fault_proxy: signal {signum}, shutting down", file=sys.stderr, flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    print("kms_fault_proxy: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
