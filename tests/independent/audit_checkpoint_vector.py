#!/usr/bin/env python3
"""Writes tests/vectors/audit-checkpoint-v1.json independently of the crate:
an unkeyed audit trail of three lines (docs: the rustdoc of phi_envelope::audit,
"Line format" and "Chain construction"), its public trail digest after each line
and an Ed25519 checkpoint of it (docs/AUDIT-CHECKPOINT.md), with Python's
hashlib and 'cryptography'. Run from the repository root."""
import hashlib, json, struct, sys, datetime
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization

ZERO = bytes(32)

def line(body_prefix, prev):
    body = body_prefix + ',"prev":"' + prev.hex() + '"'
    h = hashlib.sha256(b"phi-envelope-audit/1\0" + prev + body.encode()).digest()
    return body + ',"hash":"' + h.hex() + '"}', h

header = ('{"seq":0,"type":"header","format":"phi-envelope-audit/1","mac":"sha256","key_id":null,'
          '"segment":1,"prev_file":null,"time":"2026-12-04T02:00:00.000000Z"')
ev = lambda seq, ts, actor, op: (
    '{"seq":%d,"type":"event","event":{"timestamp":"%s","operation":"%s","provider":"local",'
    '"key_ref":"local:records","key_version":1,"actor":"%s","purpose":"treatment",'
    '"context_fingerprint":null,"outcome":"success","duration_us":412}' % (seq, ts, op, actor))
lines, prev = [], ZERO
for b in [header, ev(1, "2026-12-04T02:00:01.000001Z", "lab-service", "generate"),
          ev(2, "2026-12-04T02:00:02.000002Z", "billing", "unwrap")]:
    l, prev = line(b, prev)
    lines.append(l)

digests, d = [], ZERO
for l in lines:
    d = hashlib.sha256(b"phi-envelope-audit-digest/1\0" + d + l.encode()).digest()
    digests.append(d.hex())

seed = bytes(range(1, 33))
sk = Ed25519PrivateKey.from_private_bytes(seed)
pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
signer = hashlib.sha256(pk).digest()[:8].hex()
seq, time = 2, "2026-12-04T02:05:00.123456Z"
t = datetime.datetime(2026, 12, 4, 2, 5, 0, 123456, tzinfo=datetime.timezone.utc)
micros = int((t - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)).total_seconds()) * 1000000 + 123456
msg = (b"phi-envelope-audit-checkpoint/1\0" + struct.pack(">Q", seq) + struct.pack(">q", micros)
       + prev + bytes.fromhex(digests[-1]))
sig = sk.sign(msg)
cp = ('{"format":"phi-envelope-audit-checkpoint/1","seq":%d,"time":"%s","head":"%s","digest":"%s",'
      '"signer":"%s","sig":"%s"}' % (seq, time, prev.hex(), digests[-1], signer, sig.hex()))
out = {
    "description": "phi-envelope audit checkpoint v1 (docs/AUDIT-CHECKPOINT.md): a three-line unkeyed trail, its public digest after each line, and an Ed25519 checkpoint of it (RFC 8032, deterministic). Generated independently of the crate by tests/independent/audit_checkpoint_vector.py (Python hashlib and 'cryptography').",
    "seed": seed.hex(),
    "public_key": pk.hex(),
    "signer": signer,
    "lines": lines,
    "digests": digests,
    "message": msg.hex(),
    "checkpoint": cp,
}
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "tests/vectors/audit-checkpoint-v1.json", "w"), indent=2)
print("ok")
