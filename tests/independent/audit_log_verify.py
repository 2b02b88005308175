#!/usr/bin/env python3
"""An independent verifier of the phi-envelope file audit log (format
phi-envelope-audit/1), written from docs/AUDIT-LOG.md with Python's standard
library only: `json` parses, but every line is re-encoded by the canonical
encoder below (written from the document) and compared byte for byte;
`hashlib` and `hmac` compute the chain.

  audit_log_verify.py --vector tests/vectors/audit-log-v1.json
      checks every log of the vector (hashes, key id, counts, last anchor)
      and every case (the outcome a verifier must give).
  audit_log_verify.py [--key-hex HEX | --key-file FILE] [--anchor SEQ:HASH]
                      [--start-after SEQ:HASH] (LOG | --files FILE...)
      verifies the log whose first file is LOG (and LOG.000002, ... found
      beside it, listed under a shared flock on LOG as section 8 says), or
      the files given, in that order.

Prints one JSON object. Exit status 0: the log verifies (the vector checks
out); 1: it does not (the first bad line is named); 2: a usage or I/O error.
"""
import argparse
import fcntl
import hashlib
import hmac
import json
import os
import re
import sys

FORMAT = "phi-envelope-audit/1"
DOMAIN = b"phi-envelope-audit/1\x00"
KEY_ID_MESSAGE = b"phi-envelope-audit/1 key-id\x00"
MAX_LINE = 65536
MAX_DEPTH = 128
U64 = 2**64
U32 = 2**32
ZERO = bytes(32)
OPERATIONS = {
    "generate", "wrap", "unwrap", "rewrap", "create-key", "rotate", "set-state",
    "destroy", "describe", "cache-hit-encrypt", "cache-hit-decrypt", "set-policy",
}
KEY_STATES = {"enabled", "decrypt-only", "disabled", "destroyed"}
HEX64 = re.compile(rb"[0-9a-f]{64}\Z")
SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}\Z')
TIMESTAMP = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{6})Z\Z")
SEGMENT_SUFFIX = re.compile(r"[0-9]{6,}\Z")


class Bad(Exception):
    """The first bad line: a problem name (section 9) and the line's seq if read."""

    def __init__(self, problem, seq=None):
        super().__init__(problem)
        self.problem = problem
        self.seq = seq


class Malformed(Exception):
    pass


# ------------------------------------------------------------ canonical JSON (section 2)

def enc_str(s):
    if any(0xD800 <= ord(c) <= 0xDFFF for c in s):
        raise Malformed("a lone surrogate")
    out = ['"']
    for c in s:
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif c == "\b":
            out.append("\\b")
        elif c == "\f":
            out.append("\\f")
        elif ord(c) < 0x20:
            out.append("\\u%04x" % ord(c))
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def enc_opt_str(v):
    return "null" if v is None else enc_str(v)


def is_uint(v, bound=U64):
    return type(v) is int and 0 <= v < bound


def days_in_month(y, m):
    if m in (1, 3, 5, 7, 8, 10, 12):
        return 31
    if m in (4, 6, 9, 11):
        return 30
    return 29 if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 28


def check_timestamp(v):
    """A timestamp is canonical iff it parses: its encoding is the string itself."""
    if type(v) is not str:
        raise Malformed("a timestamp must be a string")
    m = TIMESTAMP.match(v)
    if not m:
        raise Malformed("not YYYY-MM-DDTHH:MM:SS.ffffffZ")
    y, mo, d, h, mi, s = (int(x) for x in m.groups()[:6])
    if not (1 <= mo <= 12 and 1 <= d <= days_in_month(y, mo) and h <= 23 and mi <= 59 and s <= 59):
        raise Malformed("not a valid date and time")
    return enc_str(v)


def req(obj, key, kind):
    if key not in obj:
        raise Malformed("missing " + key)
    v = obj[key]
    if kind == "str" and type(v) is not str:
        raise Malformed(key + " must be a string")
    if kind == "optstr" and v is not None and type(v) is not str:
        raise Malformed(key + " must be a string or null")
    return v


def encode_event(e):
    """The canonical event object (section 5), from a parsed object; Malformed
    if a member is missing or of the wrong type."""
    if type(e) is not dict:
        raise Malformed("event must be an object")
    out = ['{"timestamp":', check_timestamp(req(e, "timestamp", "str"))]
    op = req(e, "operation", "str")
    if op not in OPERATIONS:
        raise Malformed("unknown operation")
    out += [',"operation":', enc_str(op)]
    out += [',"provider":', enc_str(req(e, "provider", "str"))]
    out += [',"key_ref":', enc_opt_str(req(e, "key_ref", "optstr"))]
    kv = req(e, "key_version", "any")
    if kv is not None and not is_uint(kv, U32):
        raise Malformed("key_version must be a u32 or null")
    out += [',"key_version":', "null" if kv is None else str(kv)]
    if "key_state" in e:
        ks = e["key_state"]
        if type(ks) is not str or ks not in KEY_STATES:
            raise Malformed("bad key_state")
        out += [',"key_state":', enc_str(ks)]
    if "approvers" in e:
        ap = e["approvers"]
        if type(ap) is not list or any(type(a) is not str for a in ap):
            raise Malformed("approvers must be an array of strings")
        if ap:
            out += [',"approvers":[', ",".join(enc_str(a) for a in ap), "]"]
    present = [k in e for k in ("uses", "first_use", "last_use")]
    if any(present):
        if not all(present):
            raise Malformed("uses, first_use and last_use go together")
        n = e["uses"]
        if not is_uint(n) or n < 1:
            raise Malformed("uses must be an integer of at least 1")
        first = check_timestamp(e["first_use"])
        last = check_timestamp(e["last_use"])
        if last < first:  # fixed width: text order is time order
            raise Malformed("last_use before first_use")
        out += [',"uses":', str(n), ',"first_use":', first, ',"last_use":', last]
    out += [',"actor":', enc_opt_str(req(e, "actor", "optstr"))]
    out += [',"purpose":', enc_opt_str(req(e, "purpose", "optstr"))]
    out += [',"context_fingerprint":', enc_opt_str(req(e, "context_fingerprint", "optstr"))]
    oc = req(e, "outcome", "str")
    if oc not in ("success", "denied", "rejected") and not oc.startswith("failed:"):
        raise Malformed("unknown outcome")
    out += [',"outcome":', enc_str(oc)]
    du = req(e, "duration_us", "any")
    if not is_uint(du):
        raise Malformed("duration_us must be an unsigned integer")
    out += [',"duration_us":', str(du), "}"]
    return "".join(out)


def nesting_depth(text):
    depth = best = 0
    in_str = esc = False
    for c in text:
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            best = max(best, depth)
        elif c in "]}":
            depth -= 1
    return best


def no_constants(name):
    raise ValueError("not JSON: " + name)


def parse_int(s):
    # A negative integer is no unsigned integer: read it as a number of
    # another kind so that it is malformed, like a fraction or an exponent.
    return float(s) if s.startswith("-") else int(s)


def decode(raw):
    """One line without its newline -> (seq, kind, fields, prev, hash, body).
    Raises Bad("malformed") or Bad("not-canonical") (section 3)."""
    if len(raw) < 77:
        raise Bad("malformed")
    body, suffix = raw[:-75], raw[-75:]
    m = SUFFIX.match(suffix)
    if not m:
        raise Bad("malformed")
    stored = bytes.fromhex(m.group(1).decode())
    try:
        text = body.decode("utf-8")
        if nesting_depth(text + "}") > MAX_DEPTH:
            raise Malformed("nested too deeply")
        obj = json.loads(text + "}", parse_constant=no_constants, parse_int=parse_int)
        if type(obj) is not dict:
            raise Malformed("not an object")
        seq = obj.get("seq")
        if not is_uint(seq):
            raise Malformed("no seq")
        prev = req(obj, "prev", "str")
        if not HEX64.match(prev.encode()):
            raise Malformed("prev is not 64 hex digits")
        kind = req(obj, "type", "str")
        head = '{"seq":%d,"type":%s' % (seq, enc_str(kind))
        fields = {}
        if kind == "header":
            if req(obj, "format", "str") != FORMAT:
                raise Malformed("unknown format")
            mac = req(obj, "mac", "str")
            if mac not in ("sha256", "hmac-sha256"):
                raise Malformed("unknown mac")
            key_id = req(obj, "key_id", "optstr")
            segment = obj.get("segment")
            if not is_uint(segment, U32) or segment < 1:
                raise Malformed("no valid segment")
            prev_file = req(obj, "prev_file", "optstr")
            time = check_timestamp(req(obj, "time", "str"))
            mid = ',"format":%s,"mac":%s,"key_id":%s,"segment":%d,"prev_file":%s,"time":%s' % (
                enc_str(FORMAT), enc_str(mac), enc_opt_str(key_id), segment, enc_opt_str(prev_file), time)
            fields = {"mac": mac, "key_id": key_id, "segment": segment}
        elif kind == "event":
            mid = ',"event":' + encode_event(req(obj, "event", "any"))
        elif kind == "gap":
            lost = obj.get("lost")
            if not is_uint(lost):
                raise Malformed("no lost")
            reason = req(obj, "reason", "str")
            time = check_timestamp(req(obj, "time", "str"))
            mid = ',"lost":%d,"reason":%s,"time":%s' % (lost, enc_str(reason), time)
            fields = {"lost": lost, "reason": reason}
        else:
            raise Malformed("unknown line type")
        canonical = (head + mid + ',"prev":' + enc_str(prev)).encode("utf-8")
    except (Malformed, ValueError, UnicodeError, RecursionError):
        raise Bad("malformed")
    if canonical != body:
        raise Bad("not-canonical")
    return seq, kind, fields, bytes.fromhex(prev), stored, body


# ------------------------------------------------------------ the chain (sections 4, 9)

def key_id_of(key):
    return hmac.new(key, KEY_ID_MESSAGE, hashlib.sha256).digest()[:8].hex()


def line_hash(key, prev, body):
    msg = DOMAIN + prev + body
    if key is None:
        return hashlib.sha256(msg).digest()
    return hmac.new(key, msg, hashlib.sha256).digest()


def parse_anchor(text):
    m = re.fullmatch(r"([0-9]+):([0-9a-f]{64})", text or "")
    if not m or int(m.group(1)) >= U64:
        raise ValueError("not an anchor SEQ:HASH: %r" % text)
    return int(m.group(1)), bytes.fromhex(m.group(2))


class Failure(Exception):
    def __init__(self, problem, file, line, seq):
        super().__init__(problem)
        self.result = {"ok": False, "problem": problem, "file": file, "line": line, "seq": seq}


def verify(files, key=None, anchor=None, start_after=None):
    """files: [(name, bytes)] in chain order. Returns the report (a dict) and
    the hash of every line; raises Failure at the first bad line."""
    expected = start_after[0] + 1 if start_after else 0
    prev = start_after[1] if start_after else ZERO
    mac_name = None
    segment = 0
    anchor_seen = False
    lines = entries = 0
    gaps, hashes = [], []
    listed = 0
    last = (0, ZERO)
    last_place = (files[0][0], 0)
    for index, (name, data) in enumerate(files):
        pos = line_no = 0
        while pos < len(data):
            chunk = data[pos:pos + MAX_LINE + 1]
            line_no += 1
            nl = chunk.find(b"\n")
            if nl < 0:
                raise Failure("too-long" if len(chunk) > MAX_LINE else "incomplete", name, line_no, None)
            raw = chunk[:nl]
            pos += nl + 1
            try:
                seq, kind, f, line_prev, stored, body = decode(raw)
            except Bad as b:
                raise Failure(b.problem, name, line_no, None)
            fail = lambda problem: Failure(problem, name, line_no, seq)
            if kind == "header" and line_no == 1:
                described = f["mac"] if f["key_id"] is None else "%s (key id %s)" % (f["mac"], f["key_id"])
                if index == 0:
                    if start_after is None and (f["segment"] != 1 or seq != 0):
                        raise fail("not-genesis")
                    if f["mac"] == "sha256":
                        if key is not None:
                            raise fail("unkeyed")
                    elif key is None:
                        raise Failure("key-required", name, 1, None)
                    elif f["key_id"] != key_id_of(key):
                        raise fail("wrong-key")
                    mac_name = described
                else:
                    if described != mac_name:
                        raise fail("mac-changed")
                    if f["segment"] != segment + 1:
                        raise fail("segment-mismatch")
                segment = f["segment"]
            elif kind == "header":
                raise fail("unexpected-header")
            elif line_no == 1:
                raise fail("header-expected")
            elif kind == "event":
                entries += 1
            else:
                gaps.append({"seq": seq, "lost": f["lost"], "reason": f["reason"]})
            if seq != expected:
                raise fail("seq-mismatch")
            if line_prev != prev:
                raise fail("prev-mismatch")
            # The header checks above leave a key exactly when the log is keyed.
            computed = line_hash(key, line_prev, body)
            if not hmac.compare_digest(computed, stored):
                raise fail("hash-mismatch")
            if anchor is not None and anchor[0] == seq:
                if anchor[1] != stored:
                    raise fail("anchor-mismatch")
                anchor_seen = True
            prev = stored
            expected += 1
            lines += 1
            last = (seq, stored)
            hashes.append(stored.hex())
        if line_no == 0:
            if index > 0 and index + 1 == len(files):
                continue  # a rotation cut short before its header (section 7)
            raise Failure("empty-file", name, 1, None)
        listed += 1
        last_place = (name, line_no)
    if anchor is not None and not anchor_seen:
        raise Failure("missing-tail", last_place[0], last_place[1] + 1, None)
    report = {
        "ok": True, "files": listed, "lines": lines, "entries": entries, "gaps": gaps,
        "last": "%d:%s" % (last[0], last[1].hex()), "mac": mac_name,
    }
    return report, hashes


# ------------------------------------------------------------ files on disk (section 8)

def log_files(base):
    directory = os.path.dirname(base) or "."
    name = os.path.basename(base)
    found = []
    for entry in os.listdir(directory):
        if entry == name:
            found.append((1, base))
        elif entry.startswith(name + "."):
            rest = entry[len(name) + 1:]
            if SEGMENT_SUFFIX.match(rest):
                n = int(rest)
                if 2 <= n < U32 and rest == "%06d" % n:
                    found.append((n, os.path.join(directory, entry)))
    found.sort()
    if not found or found[0][0] != 1:
        found.insert(0, (1, base))
    return [p for _, p in found]


def read_log(base):
    """The files of the log at `base` and their bytes, the last one read up to
    the length it had under a shared lock on the first file."""
    fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        paths = log_files(base)
        last_len = os.lstat(paths[-1]).st_size
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    out = []
    for i, p in enumerate(paths):
        with open(p, "rb") as f:
            data = f.read(last_len) if i + 1 == len(paths) else f.read()
        out.append((os.path.basename(p), data))
    return out


def read_key(args):
    if args.key_hex:
        key = bytes.fromhex(args.key_hex)
    elif args.key_file:
        raw = open(args.key_file, "rb").read()
        text = raw.decode("utf-8", "replace").strip()
        key = bytes.fromhex(text) if len(text) >= 64 and len(text) % 2 == 0 and re.fullmatch(r"[0-9a-fA-F]+", text) else raw
    else:
        return None
    if len(key) < 32:
        raise ValueError("an audit key has at least 32 bytes")
    return key


# ------------------------------------------------------------ the vector (section 10)

def check_vector(path):
    v = json.load(open(path, encoding="utf-8"))
    failures = []
    if v["key_id_message_hex"] != KEY_ID_MESSAGE.hex():
        failures.append("key_id_message_hex")
    for log in v["logs"]:
        files = [(f["name"], f["content"].encode("utf-8")) for f in log["files"]]
        key = bytes.fromhex(log["audit_key"]) if log["audit_key"] else None
        if key is not None and key_id_of(key) != log["key_id"]:
            failures.append("%s: key id %s, not %s" % (log["name"], key_id_of(key), log["key_id"]))
        try:
            report, hashes = verify(files, key)
        except Failure as e:
            failures.append("%s: %s" % (log["name"], e.result))
            continue
        for member in ("lines", "entries", "gaps", "last"):
            if report[member] != log[member]:
                failures.append("%s: %s is %r, not %r" % (log["name"], member, report[member], log[member]))
        if hashes != log["hashes"]:
            failures.append("%s: hashes differ" % log["name"])
        first = files[0][1].split(b"\n", 1)[0]
        message = DOMAIN + ZERO + first[: first.rindex(b',"hash":"')]
        if message.hex() != log["first_line_message_hex"]:
            failures.append("%s: the first line's message differs" % log["name"])
    for case in v["cases"]:
        files = [(f["name"], f["content"].encode("utf-8")) for f in case["files"]]
        key = bytes.fromhex(case["audit_key"]) if case["audit_key"] else None
        anchor = parse_anchor(case["anchor"]) if case["anchor"] else None
        start = parse_anchor(case["start_after"]) if case["start_after"] else None
        try:
            got, _ = verify(files, key, anchor, start)
            del got["mac"]
        except Failure as e:
            got = e.result
        if got != case["expect"]:
            failures.append("case %r: %r, expected %r" % (case["name"], got, case["expect"]))
    return {"ok": not failures, "logs": len(v["logs"]), "cases": len(v["cases"]), "failures": failures}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vector")
    p.add_argument("--key-hex")
    p.add_argument("--key-file")
    p.add_argument("--anchor")
    p.add_argument("--start-after")
    p.add_argument("--files", nargs="+")
    p.add_argument("log", nargs="?")
    args = p.parse_args()
    try:
        if args.vector:
            out = check_vector(args.vector)
            print(json.dumps(out))
            return 0 if out["ok"] else 1
        key = read_key(args)
        anchor = parse_anchor(args.anchor) if args.anchor else None
        start = parse_anchor(args.start_after) if args.start_after else None
        if args.files:
            files = [(os.path.basename(f), open(f, "rb").read()) for f in args.files]
        elif args.log:
            files = read_log(args.log)
        else:
            p.error("give LOG, --files or --vector")
    except (OSError, ValueError) as e:
        print(json.dumps({"ok": False, "problem": "io", "error": str(e)}))
        return 2
    try:
        report, _ = verify(files, key, anchor, start)
    except Failure as e:
        print(json.dumps(e.result))
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
