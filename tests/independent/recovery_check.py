#!/usr/bin/env python3
"""The offline recovery recipient of phi-envelope, written from
docs/RECOVERY.md and docs/FORMAT.md alone (not from the Rust sources): the
recovery key and its fingerprint, HPKE (RFC 9180) base mode with
DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, and Shamir shares over
GF(2^8) with their checksummed text.

Needs only the Python standard library and `cryptography` (X25519, AES-GCM),
as pinned in scripts/install-deps.sh.

Usage:
  recovery_check.py --generate
      Prints tests/vectors/recovery-v1.json, made from fixed seeds.
  recovery_check.py --vector tests/vectors/recovery-v1.json
      Recomputes every value of every vector, opens every wrapped key,
      restores every key from several share subsets, and checks that every
      `invalid_shares` entry is refused at the step it names. Prints a JSON
      summary; exits 1 on the first mismatch.
  recovery_check.py --restore SHARE_FILE... --wrapped HEX --key-ref REF [--context K=V ...]
      Restores the key from the share files and opens one wrapped key;
      prints {"fingerprint", "dek"} (hex) as JSON.
"""

import argparse
import hashlib
import hmac
import itertools
import json
import struct
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


class Failure(Exception):
    pass


class Refused(Exception):
    """A share or a set of shares refused; `step` is "read" or "combine"."""

    def __init__(self, step, message):
        super().__init__(message)
        self.step = step


def sha256(data):
    return hashlib.sha256(data).digest()


# --- section 3: the key --------------------------------------------------

FP_LABEL = b"phi-envelope/v1 hpke-recovery fingerprint\x00"
PUBLIC_TAG = "phi-recovery-public-v1"
PROVIDER = "hpke-recovery"


def public_key(sk):
    pk = X25519PrivateKey.from_private_bytes(sk).public_key()
    return pk.public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint(pk):
    return sha256(FP_LABEL + pk)[:16]


def key_ref(pk):
    return PROVIDER + ":" + fingerprint(pk).hex()


# --- section 4: HPKE and the wrapped key ---------------------------------

KEM_SUITE = b"KEM" + struct.pack(">H", 0x0020)
HPKE_SUITE = b"HPKE" + struct.pack(">HHH", 0x0020, 0x0001, 0x0002)
INFO = b"phi-envelope/v1 hpke-recovery"
WRAP_LABEL = b"phi-envelope/v1 hpke-recovery wrap\x00"


def labeled_extract(suite, salt, label, ikm):
    return hmac.new(salt, b"HPKE-v1" + suite + label + ikm, hashlib.sha256).digest()


def hkdf_expand(prk, info, length):
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:length]


def labeled_expand(suite, prk, label, info, length):
    return hkdf_expand(prk, struct.pack(">H", length) + b"HPKE-v1" + suite + label + info, length)


def dh(sk, pk):
    out = X25519PrivateKey.from_private_bytes(sk).exchange(X25519PublicKey.from_public_bytes(pk))
    if out == bytes(32):
        raise Failure("all-zero DH output")
    return out


def shared_secret(dh_out, enc, pk_r):
    eae_prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", dh_out)
    return labeled_expand(KEM_SUITE, eae_prk, b"shared_secret", enc + pk_r, 32)


def key_schedule(ss, info):
    ksc = (
        b"\x00"
        + labeled_extract(HPKE_SUITE, b"", b"psk_id_hash", b"")
        + labeled_extract(HPKE_SUITE, b"", b"info_hash", info)
    )
    secret = labeled_extract(HPKE_SUITE, ss, b"secret", b"")
    key = labeled_expand(HPKE_SUITE, secret, b"key", ksc, 32)
    nonce = labeled_expand(HPKE_SUITE, secret, b"base_nonce", ksc, 12)
    return key, nonce


def canonical_pairs(context):
    items = sorted((k.encode(), v.encode()) for k, v in context.items())
    out = struct.pack(">H", len(items))
    for k, v in items:
        out += struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v
    return out


def wrap_aad(ref, context):
    r = ref.encode()
    return WRAP_LABEL + struct.pack(">H", len(r)) + r + struct.pack(">I", 1) + canonical_pairs(context)


def seal(pk_r, sk_e, aad, dek):
    enc = public_key(sk_e)
    key, nonce = key_schedule(shared_secret(dh(sk_e, pk_r), enc, pk_r), INFO)
    return enc + AESGCM(key).encrypt(nonce, dek, aad)


def open_wrapped(sk_r, wrapped, ref, context):
    if len(wrapped) != 80:
        raise Failure("wrapped key is not 80 bytes")
    enc, ct = wrapped[:32], wrapped[32:]
    key, nonce = key_schedule(shared_secret(dh(sk_r, enc), enc, public_key(sk_r)), INFO)
    return AESGCM(key).decrypt(nonce, ct, wrap_aad(ref, context))


# --- section 5: shares ---------------------------------------------------

SHARE_TAG = "phi-recovery-share-v1"


def gf_mul(a, b):
    p = 0
    while b:
        if b & 1:
            p ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
        b >>= 1
    return p


def gf_inv(a):
    return next(x for x in range(1, 256) if gf_mul(a, x) == 1)


def split(sk, m, n, set_id, coefficients):
    fp = fingerprint(public_key(sk))
    texts = []
    for i in range(1, n + 1):
        y = bytearray(32)
        for b in range(32):
            acc, power = sk[b], 1
            for c in coefficients:
                power = gf_mul(power, i)
                acc ^= gf_mul(c[b], power)
            y[b] = acc
        texts.append(share_text(fp, set_id, m, n, i, bytes(y)))
    return texts


def share_text(fp, set_id, m, n, i, y):
    body = f"{SHARE_TAG}:{fp.hex()}:{set_id.hex()}:{m}:{n}:{i}:{y.hex()}"
    return body + ":" + sha256(body.encode())[:4].hex()


def parse_share(text):
    t = "".join(c for c in text if c not in " \t\r\n\f").lower()
    if len(t) > 200:
        raise Refused("read", "too long")
    if not t.startswith("phi-recovery-share-v"):
        raise Refused("read", "not a recovery share")
    if not t.startswith(SHARE_TAG + ":"):
        raise Refused("read", "unsupported version")
    body, _, chk = t.rpartition(":")
    if len(chk) != 8 or any(c not in "0123456789abcdef" for c in chk):
        raise Refused("read", "checksum field")
    if not hmac.compare_digest(sha256(body.encode())[:4], bytes.fromhex(chk)):
        raise Refused("read", "checksum does not match")
    fields = body.split(":")
    if len(fields) != 7:
        raise Refused("read", "field count")
    _, fp, set_id, m, n, i, y = fields

    def hexfield(v, size):
        if len(v) != 2 * size or any(c not in "0123456789abcdef" for c in v):
            raise Refused("read", "hex field")
        return bytes.fromhex(v)

    def dec(v):
        if not v.isdigit() or len(v) > 3 or (len(v) > 1 and v[0] == "0") or int(v) > 255:
            raise Refused("read", "decimal field")
        return int(v)

    s = dict(fp=hexfield(fp, 16), set=hexfield(set_id, 4), m=dec(m), n=dec(n), i=dec(i), y=hexfield(y, 32))
    if not 2 <= s["m"] <= s["n"] or not 1 <= s["i"] <= s["n"]:
        raise Refused("read", "threshold or index out of range")
    return s


def combine(shares):
    if not shares:
        raise Refused("combine", "no shares")
    first = shares[0]
    for s in shares:
        if s["fp"] != first["fp"]:
            raise Refused("combine", "different recovery keys")
        if (s["set"], s["m"], s["n"]) != (first["set"], first["m"], first["n"]):
            raise Refused("combine", "different splits")
    if len({s["i"] for s in shares}) != len(shares):
        raise Refused("combine", "given twice")
    if len(shares) < first["m"]:
        raise Refused("combine", f"{first['m'] - len(shares)} more needed")
    sk = bytearray(32)
    for s in shares:
        num = den = 1
        for o in shares:
            if o is not s:
                num = gf_mul(num, o["i"])
                den = gf_mul(den, o["i"] ^ s["i"])
        li = gf_mul(num, gf_inv(den))
        for b in range(32):
            sk[b] ^= gf_mul(li, s["y"][b])
    sk = bytes(sk)
    if fingerprint(public_key(sk)) != first["fp"]:
        raise Refused("combine", "do not combine to the key")
    return sk


# --- vectors -------------------------------------------------------------


def seed(label, size=32):
    return sha256(b"phi-envelope recovery vector: " + label.encode())[:size]


def make_vector(name, tag, m, n, context):
    sk = seed(tag + " private key")
    pk = public_key(sk)
    set_id = seed(tag + " set id", 4)
    coefficients = [seed(f"{tag} coefficient {j}") for j in range(1, m)]
    dek = seed(tag + " dek")
    sk_e = seed(tag + " ephemeral key")
    ref = key_ref(pk)
    aad = wrap_aad(ref, context)
    wrapped = seal(pk, sk_e, aad, dek)
    return {
        "name": name,
        "private_key": sk.hex(),
        "public_key": pk.hex(),
        "public_key_text": f"{PUBLIC_TAG}:{pk.hex()}",
        "fingerprint": fingerprint(pk).hex(),
        "key_ref": ref,
        "split": {
            "threshold": m,
            "shares": n,
            "set_id": set_id.hex(),
            "coefficients": [c.hex() for c in coefficients],
            "share_texts": split(sk, m, n, set_id, coefficients),
        },
        "wrap": {
            "context": context,
            "dek": dek.hex(),
            "ephemeral_private_key": sk_e.hex(),
            "info": INFO.decode(),
            "aad": aad.hex(),
            "enc": wrapped[:32].hex(),
            "wrapped": wrapped.hex(),
        },
    }


def alter_char(text, pos):
    c = text[pos]
    new = "0" if c != "0" else "1"
    return text[:pos] + new + text[pos + 1 :]


def generate():
    v1 = make_vector(
        "3 of 5, a context of two pairs",
        "v1",
        3,
        5,
        {"tenant": "st-mary", "data_class": "backup"},
    )
    v2 = make_vector("2 of 2, the empty context", "v2", 2, 2, {})
    s = v1["split"]["share_texts"]
    body = s[2].rsplit(":", 1)[0]
    forged_body = body[:-1] + ("0" if body[-1] != "0" else "1")
    forged = forged_body + ":" + sha256(forged_body.encode())[:4].hex()
    v2tag = "phi-recovery-share-v2" + s[0][len(SHARE_TAG) :].rsplit(":", 1)[0]
    v2tag = v2tag + ":" + sha256(v2tag.encode())[:4].hex()
    sk1 = bytes.fromhex(v1["private_key"])
    resplit = split(sk1, 3, 5, seed("v1 second set id", 4), [seed("v1 second split coefficient 1"), seed("v1 second split coefficient 2")])
    value_pos = s[0].rsplit(":", 2)[0].__len__() + 1 + 10
    invalid = [
        {"name": "one character of the value altered", "shares": [alter_char(s[0], value_pos)], "refused_at": "read", "error": "checksum"},
        {"name": "one character of the fingerprint altered", "shares": [alter_char(s[1], len(SHARE_TAG) + 5)], "refused_at": "read", "error": "checksum"},
        {"name": "one character of the checksum altered", "shares": [alter_char(s[3], len(s[3]) - 1)], "refused_at": "read", "error": "checksum"},
        {"name": "an unknown format version", "shares": [v2tag], "refused_at": "read", "error": "version"},
        {"name": "shares of two different keys", "shares": [s[0], s[1], v2["split"]["share_texts"][0]], "refused_at": "combine", "error": "different recovery keys"},
        {"name": "shares of two splits of one key", "shares": [s[0], s[1], resplit[2]], "refused_at": "combine", "error": "different splits"},
        {"name": "a share given twice", "shares": [s[0], s[1], s[0]], "refused_at": "combine", "error": "given twice"},
        {"name": "M - 1 shares", "shares": [s[0], s[4]], "refused_at": "combine", "error": "1 more needed"},
        {"name": "a share altered together with its checksum", "shares": [s[0], s[1], forged], "refused_at": "combine", "error": "do not combine"},
    ]
    return {
        "format": "phi-envelope-recovery-v1",
        "note": "Made by tests/independent/recovery_check.py --generate from docs/RECOVERY.md; every secret here is a published test value.",
        "vectors": [v1, v2],
        "invalid_shares": invalid,
    }


def check_vector(v):
    sk = bytes.fromhex(v["private_key"])
    pk = public_key(sk)
    expect = {
        "public_key": pk.hex(),
        "public_key_text": f"{PUBLIC_TAG}:{pk.hex()}",
        "fingerprint": fingerprint(pk).hex(),
        "key_ref": key_ref(pk),
    }
    for k, want in expect.items():
        if v[k] != want:
            raise Failure(f"{v['name']}: {k}")
    sp = v["split"]
    m, n = sp["threshold"], sp["shares"]
    texts = split(sk, m, n, bytes.fromhex(sp["set_id"]), [bytes.fromhex(c) for c in sp["coefficients"]])
    if texts != sp["share_texts"]:
        raise Failure(f"{v['name']}: share texts")
    parsed = [parse_share(t) for t in texts]
    subsets = 0
    for k in range(m, n + 1):
        for subset in itertools.combinations(parsed, k):
            if combine(list(subset)) != sk:
                raise Failure(f"{v['name']}: combination")
            subsets += 1
    for subset in itertools.combinations(parsed, m - 1):
        try:
            combine(list(subset))
        except Refused:
            continue
        raise Failure(f"{v['name']}: M - 1 shares were not refused")
    w = v["wrap"]
    aad = wrap_aad(v["key_ref"], w["context"])
    if aad.hex() != w["aad"] or w["info"] != INFO.decode():
        raise Failure(f"{v['name']}: aad or info")
    wrapped = seal(pk, bytes.fromhex(w["ephemeral_private_key"]), aad, bytes.fromhex(w["dek"]))
    if wrapped.hex() != w["wrapped"] or wrapped[:32].hex() != w["enc"]:
        raise Failure(f"{v['name']}: wrapped")
    restored = combine(parsed[:m])
    if open_wrapped(restored, wrapped, v["key_ref"], w["context"]).hex() != w["dek"]:
        raise Failure(f"{v['name']}: open")
    try:
        open_wrapped(restored, wrapped, v["key_ref"], dict(w["context"], extra="1"))
    except InvalidTag:
        pass
    else:
        raise Failure(f"{v['name']}: opened under another context")
    return subsets


def check(path):
    doc = json.load(open(path, encoding="utf-8"))
    if doc.get("format") != "phi-envelope-recovery-v1":
        raise Failure("format")
    subsets = sum(check_vector(v) for v in doc["vectors"])
    for case in doc["invalid_shares"]:
        try:
            combine([parse_share(t) for t in case["shares"]])
        except Refused as e:
            if e.step != case["refused_at"]:
                raise Failure(f"{case['name']}: refused at {e.step}, not {case['refused_at']}")
            continue
        raise Failure(f"{case['name']}: was not refused")
    return {"ok": True, "vectors": len(doc["vectors"]), "combinations": subsets, "invalid": len(doc["invalid_shares"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--vector")
    ap.add_argument("--restore", nargs="+")
    ap.add_argument("--wrapped")
    ap.add_argument("--key-ref")
    ap.add_argument("--context", action="append", default=[])
    a = ap.parse_args()
    try:
        if a.generate:
            print(json.dumps(generate(), indent=1))
        elif a.vector:
            print(json.dumps(check(a.vector)))
        elif a.restore:
            shares = [parse_share(open(f, encoding="utf-8").read()) for f in a.restore]
            sk = combine(shares)
            context = dict(kv.split("=", 1) for kv in a.context)
            dek = open_wrapped(sk, bytes.fromhex(a.wrapped), a.key_ref, context)
            print(json.dumps({"fingerprint": fingerprint(public_key(sk)).hex(), "dek": dek.hex()}))
        else:
            ap.error("nothing to do")
    except (Failure, Refused, InvalidTag) as e:
        print(f"recovery_check: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
