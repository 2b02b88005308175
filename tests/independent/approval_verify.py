#!/usr/bin/env python3
"""Check phi-envelope dual-control approvals, written from docs/APPROVALS.md
alone (not from the Rust sources).

Needs only the Python standard library and `cryptography` (Ed25519), as
pinned in scripts/install-deps.sh.

Usage:
  approval_verify.py --vector tests/vectors/approval-v1.json
      Rebuilds every case's message from its fields, signs it with the
      vector's seed and checks message, signature and public key; prints a
      JSON summary; exits 1 on the first mismatch.
  approval_verify.py --approval FILE --public-key HEX
      Verifies an approval file (phi-envelope-approval/1) under a
      custodian's Ed25519 public key; prints {"ok", "message"} as JSON and
      exits 1 if the signature does not verify.
"""

import argparse
import json
import struct
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

LABEL = b"phi-envelope/v1 approval"
OPERATIONS = ("destroy", "disable", "enable", "decrypt-only")


def field(b):
    return struct.pack(">I", len(b)) + b


def message(operation, key_ref, version, expires_at, nonce):
    if operation not in OPERATIONS:
        raise ValueError("unknown operation %r" % operation)
    if not 16 <= len(nonce) <= 64:
        raise ValueError("nonce must be 16 to 64 bytes")
    return (
        field(LABEL)
        + field(operation.encode("ascii"))
        + field(key_ref.encode("utf-8"))
        + field(struct.pack(">I", version))
        + field(struct.pack(">Q", expires_at))
        + field(nonce)
    )


def fail(what):
    print(json.dumps({"ok": False, "error": what}))
    sys.exit(1)


def check_vector(path):
    v = json.load(open(path))
    sk = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["seed"]))
    pk = sk.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    if pk.hex() != v["public_key"]:
        fail("public key")
    for i, c in enumerate(v["cases"]):
        m = message(
            c["operation"],
            c["key_ref"],
            c["version"],
            c["expires_at"],
            bytes.fromhex(c["nonce"]),
        )
        if m.hex() != c["message"]:
            fail("case %d: message" % i)
        if sk.sign(m).hex() != c["signature"]:
            fail("case %d: signature" % i)
    print(json.dumps({"ok": True, "cases": len(v["cases"])}))


def check_approval(path, public_key_hex):
    a = json.load(open(path))
    if a.get("format") != "phi-envelope-approval/1":
        fail("format")
    m = message(
        a["operation"],
        a["key_ref"],
        a["version"],
        a["expires_at"],
        bytes.fromhex(a["nonce"]),
    )
    pk = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
    try:
        pk.verify(bytes.fromhex(a["signature"]), m)
    except InvalidSignature:
        fail("signature does not verify")
    print(json.dumps({"ok": True, "message": m.hex()}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vector")
    p.add_argument("--approval")
    p.add_argument("--public-key")
    args = p.parse_args()
    if args.vector:
        check_vector(args.vector)
    elif args.approval and args.public_key:
        check_approval(args.approval, args.public_key)
    else:
        p.error("give --vector FILE, or --approval FILE --public-key HEX")


if __name__ == "__main__":
    main()
