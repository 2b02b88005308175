#!/usr/bin/env python3
"""Recover a DEK and a message's plaintext from a phi-envelope local keystore
file, its passphrase and a message, written from docs/KEYSTORE.md and
docs/FORMAT.md alone (not from the Rust sources).

Needs only the Python standard library, `cryptography` (AES-GCM, HKDF, HMAC)
and `argon2-cffi` (Argon2id), as pinned in scripts/install-deps.sh.

Usage:
  keystore_recover.py --vector tests/vectors/keystore-v2.json
      Checks every intermediate value of a committed vector; prints a JSON
      summary; exits 1 on the first mismatch.
  keystore_recover.py --keystore FILE --passphrase-file FILE --message FILE [--context K=V ...]
      Prints {"key_ref", "key_version", "dek", "plaintext"} (hex) as JSON.
"""

import argparse
import hmac
import json
import struct
import sys

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand


class Failure(Exception):
    pass


# --- KEYSTORE.md -----------------------------------------------------------

FORMAT = "phi-envelope-keystore"
UNPROTECTED_KEY = b"phi-envelope-UNPROTECTED-PUBLIC!"
WRAP_LABEL = b"phi-envelope/v1 local wrap\x00"


def passphrase_from_file(raw: bytes) -> bytes:
    """KEYSTORE.md 3.2: UTF-8; one trailing LF removed, then one CR before it."""
    text = raw.decode("utf-8")
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if not text:
        raise Failure("empty passphrase")
    return text.encode("utf-8")


def header_aad(doc: dict) -> bytes:
    """KEYSTORE.md 2.3: the compact JSON of format, version and kdf."""
    header = {"format": doc["format"], "version": doc["version"], "kdf": doc["kdf"]}
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def derive(passphrase: bytes, kdf: dict) -> bytes:
    """KEYSTORE.md 3: Argon2id v0x13, 32-byte output, no secret, no AD."""
    if kdf["alg"] != "argon2id":
        raise Failure("not a protected keystore: " + kdf["alg"])
    return hash_secret_raw(
        secret=passphrase,
        salt=bytes.fromhex(kdf["salt"]),
        time_cost=kdf["t"],
        memory_cost=kdf["m_kib"],
        parallelism=kdf["p"],
        hash_len=32,
        type=Type.ID,
        version=19,
    )


def open_table(file_bytes: bytes, passphrase):
    """Returns (derived key or None, table plaintext bytes, table dict)."""
    if not file_bytes.endswith(b"\n"):
        raise Failure("a keystore file ends with a newline")
    doc = json.loads(file_bytes)
    if doc["format"] != FORMAT or doc["version"] not in (1, 2):
        raise Failure("not a keystore of version 1 or 2")
    aad = header_aad(doc)
    # The header is the file's prefix (KEYSTORE.md 2.1).
    if not file_bytes.startswith(aad[:-1] + b',"nonce":"'):
        raise Failure("the header is not the file's prefix")
    nonce = bytes.fromhex(doc["nonce"])
    if doc["kdf"]["alg"] == "argon2id":
        key = derive(passphrase, doc["kdf"])
        table = AESGCM(key).decrypt(nonce, bytes.fromhex(doc["ciphertext"]), aad)
    elif doc["kdf"]["alg"] == "none-unprotected-insecure":
        key = None
        table = doc["table"].encode("utf-8")
        AESGCM(UNPROTECTED_KEY).decrypt(nonce, bytes.fromhex(doc["tag"]), aad + table)
    else:
        raise Failure("unknown kdf")
    parsed = json.loads(table)
    if doc["version"] == 2 and not (isinstance(parsed.get("generation"), int) and parsed["generation"] >= 1):
        raise Failure("a version-2 table has a generation >= 1")
    if doc["version"] == 1 and "generation" in parsed:
        raise Failure("a version-1 table has no generation")
    return key, table, parsed


def kek_of(table: dict, key_ref: str, version: int) -> bytes:
    if not key_ref.startswith("local:"):
        raise Failure("not a local key reference")
    name = key_ref[len("local:"):]
    for k in table["keys"]:
        if k["name"] == name:
            for v in k["versions"]:
                if v["version"] == version:
                    if "key" not in v:
                        raise Failure(f"{key_ref} version {version} is {v['state']}")
                    return bytes.fromhex(v["key"])
    raise Failure(f"no {key_ref} version {version} in the keystore")


def canonical_pairs(context: dict) -> bytes:
    """FORMAT.md 5.2."""
    out = struct.pack(">H", len(context))
    for k, v in sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items()):
        out += struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v
    return out


def wrap_aad(key_ref: str, version: int, context: dict) -> bytes:
    """KEYSTORE.md 5.2."""
    ref = key_ref.encode("utf-8")
    return WRAP_LABEL + struct.pack(">H", len(ref)) + ref + struct.pack(">I", version) + canonical_pairs(context)


def unwrap(kek: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """KEYSTORE.md 5.1: nonce (12) || ciphertext (32) || tag (16)."""
    if len(wrapped) != 60:
        raise Failure("a local wrapped key is 60 bytes")
    dek = AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], aad)
    if len(dek) != 32:
        raise Failure("a DEK is 32 bytes")
    return dek


# --- FORMAT.md -------------------------------------------------------------


def parse_header(msg: bytes):
    if msg[:6] != b"PHIENV" or msg[6] != 1 or msg[7] != 1:
        raise Failure("not a phi-envelope v1 message with suite 1")
    count = msg[8]
    if not 1 <= count <= 8:
        raise Failure("count")
    at = 9
    entries = []
    for _ in range(count):
        plen = msg[at]
        provider = msg[at + 1:at + 1 + plen].decode("ascii")
        at += 1 + plen
        (rlen,) = struct.unpack(">H", msg[at:at + 2])
        key_ref = msg[at + 2:at + 2 + rlen].decode("utf-8")
        at += 2 + rlen
        (version, wlen) = struct.unpack(">IH", msg[at:at + 6])
        wrapped = msg[at + 6:at + 6 + wlen]
        at += 6 + wlen
        entries.append((provider, key_ref, version, wrapped))
    tag = msg[at:at + 32]
    if len(tag) != 32:
        raise Failure("truncated header")
    return entries, msg[:at], tag, msg[at + 32:]


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA512(), length=length, info=info).derive(prk)


def open_message(msg: bytes, dek: bytes, context: dict) -> bytes:
    _, signed, tag, body = parse_header(msg)
    tag_key = hkdf_expand(dek, b"phi-envelope/v1 header tag", 32)
    if not hmac.compare_digest(hmac.new(tag_key, signed, "sha256").digest(), tag):
        raise Failure("header tag")
    if len(body) < 56:
        raise Failure("truncated body")
    salt, commitment, chunks = body[:24], body[24:56], body[56:]
    body_context = b"PHIENV\x01\x01" + canonical_pairs(context)
    okm = hkdf_expand(
        dek,
        b"c2sp.org/chunked-encryption@v1+" + b"AEAD_AES_256_GCM" + b"\x00" + salt + body_context,
        76,
    )
    aes_key, base_nonce = okm[:32], okm[32:44]
    if not hmac.compare_digest(okm[44:76], commitment):
        raise Failure("commitment")
    if len(chunks) % 16400 < 16:
        raise Failure("truncated body")
    gcm = AESGCM(aes_key)
    out = b""
    for i, start in enumerate(range(0, len(chunks), 16400)):
        nonce = (int.from_bytes(base_nonce, "big") ^ i).to_bytes(12, "big")
        out += gcm.decrypt(nonce, chunks[start:start + 16400], b"")
    return out


def recover(file_bytes: bytes, passphrase, msg: bytes, context: dict) -> dict:
    _, _, table = open_table(file_bytes, passphrase)
    entries, _, _, _ = parse_header(msg)
    for provider, key_ref, version, wrapped in entries:
        if provider != "local":
            continue
        dek = unwrap(kek_of(table, key_ref, version), wrapped, wrap_aad(key_ref, version, context))
        return {
            "key_ref": key_ref,
            "key_version": version,
            "dek": dek.hex(),
            "plaintext": open_message(msg, dek, context).hex(),
        }
    raise Failure("no local entry in the message")


def check_vector(path: str) -> dict:
    v = json.load(open(path, encoding="utf-8"))
    file_bytes = v["keystore_file"].encode("utf-8")
    passphrase = bytes.fromhex(v["passphrase_hex"])
    if passphrase != v["passphrase"].encode("utf-8"):
        raise Failure("passphrase and passphrase_hex differ")
    if passphrase_from_file(bytes.fromhex(v["passphrase_file_hex"])) != passphrase:
        raise Failure("passphrase_file_hex does not give the passphrase")
    key, table_bytes, table = open_table(file_bytes, passphrase)

    def same(name, got, want):
        if got != want:
            raise Failure(f"{name}: got {got!r}, want {want!r}")

    same("file format version", json.loads(file_bytes)["version"], v["format_version"])
    same("header_aad_hex", header_aad(json.loads(file_bytes)).hex(), v["header_aad_hex"])
    same("kdf_key_hex", key.hex(), v["kdf_key_hex"])
    same("table_plaintext", table_bytes.decode("utf-8"), v["table_plaintext"])
    m = v["message"]
    aad = wrap_aad(m["key_ref"], m["key_version"], m["context"])
    same("wrap_aad_hex", aad.hex(), m["wrap_aad_hex"])
    kek = kek_of(table, m["key_ref"], m["key_version"])
    same("kek_hex", kek.hex(), m["kek_hex"])
    dek = unwrap(kek, bytes.fromhex(m["wrapped_dek_hex"]), aad)
    same("dek_hex", dek.hex(), m["dek_hex"])
    got = recover(file_bytes, passphrase, bytes.fromhex(m["message_hex"]), m["context"])
    same("entry wrapped key", got["dek"], m["dek_hex"])
    same("plaintext_hex", got["plaintext"], m["plaintext_hex"])
    return {"vector": path, "ok": True, "dek": got["dek"], "plaintext": got["plaintext"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vector")
    ap.add_argument("--keystore")
    ap.add_argument("--passphrase-file")
    ap.add_argument("--message")
    ap.add_argument("--context", action="append", default=[])
    a = ap.parse_args()
    try:
        if a.vector:
            out = check_vector(a.vector)
        else:
            if not (a.keystore and a.message):
                ap.error("--keystore and --message are needed (or --vector)")
            passphrase = passphrase_from_file(open(a.passphrase_file, "rb").read()) if a.passphrase_file else None
            context = {}
            for kv in a.context:
                k, _, val = kv.partition("=")
                context[k] = val
            out = recover(open(a.keystore, "rb").read(), passphrase, open(a.message, "rb").read(), context)
    except Failure as e:
        print(f"keystore_recover: {e}", file=sys.stderr)
        return 1
    except InvalidTag:
        print("keystore_recover: an AES-GCM tag did not verify (wrong passphrase, key or context, or modified bytes)", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
