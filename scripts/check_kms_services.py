#!/usr/bin/env python3
"""Smoke test of the local KMS services: moto_server and scripts/kms_fault_proxy.py.

Needs the env of scripts/test-services.sh (AWS_ENDPOINT_URL, PHI_KMS_PROXY_URL, ...):
    source target/test-services/env.sh && scripts/check_kms_services.py
Runs every check, exits 1 if any failed. Leaves the proxy with no rules, its counters reset
and key-state enforcement as it found it.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
import urllib.parse
import urllib.request

import boto3
import botocore.exceptions
from botocore.config import Config

MOTO = os.environ["AWS_ENDPOINT_URL"]
PROXY = os.environ["PHI_KMS_PROXY_URL"]
failures = 0


def check(name: str, cond: bool, detail: str = "") -> None:
    global failures
    print(f"{'ok  ' if cond else 'FAIL'} {name}{(': ' + detail) if detail else ''}")
    if not cond:
        failures += 1


def control(method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(PROXY + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def client(endpoint: str, attempts: int = 1, read_timeout: float = 10):
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"total_max_attempts": attempts, "mode": "standard"},
                      read_timeout=read_timeout, connect_timeout=2),
    )


def error_of(fn):
    try:
        fn()
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
    except Exception as e:  # noqa: BLE001 - the type is what we check
        return type(e).__name__, None
    return None, 200


def main() -> int:
    direct = client(MOTO)
    kms = client(PROXY)
    kms_retry = client(PROXY, attempts=3)
    control("DELETE", "/__fault__")
    control("DELETE", "/__fault__/stats")
    enforce_before = control("GET", "/__fault__/stats")["enforce_key_state"]
    control("POST", "/__fault__/config", {"enforce_key_state": False})

    # Pass-through.
    key = kms.create_key(Description="proxy check")["KeyMetadata"]
    kid, arn = key["KeyId"], key["Arn"]
    ctx = {"tenant": "t1"}
    dk = kms.generate_data_key(KeyId=kid, KeySpec="AES_256", EncryptionContext=ctx)
    blob = dk["CiphertextBlob"]
    pt = kms.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)["Plaintext"]
    check("pass-through generate_data_key + decrypt", pt == dk["Plaintext"])
    pt = direct.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)["Plaintext"]
    check("blob from proxy decrypts directly at moto", pt == dk["Plaintext"])
    check("pass-through KMS error unchanged",
          error_of(lambda: kms.decrypt(CiphertextBlob=blob, EncryptionContext={"x": "y"}))
          == ("InvalidCiphertextException", 400))
    stats = control("GET", "/__fault__/stats")
    check("stats count per X-Amz-Target",
          stats["by_target"] == {"TrentService.CreateKey": 1, "TrentService.GenerateDataKey": 1,
                                 "TrentService.Decrypt": 2}, json.dumps(stats["by_target"]))

    def dec():
        return kms.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)

    # delay
    control("POST", "/__fault__", {"action": "delay", "seconds": 1.0, "target": "Decrypt", "count": 1})
    t0 = time.monotonic()
    dec()
    dt = time.monotonic() - t0
    t0 = time.monotonic()
    dec()
    dt2 = time.monotonic() - t0
    check("delay 1.0s once, then expired", dt >= 1.0 and dt2 < 0.5, f"{dt:.2f}s then {dt2:.2f}s")
    control("POST", "/__fault__", {"action": "delay", "seconds": 2.0, "target": "Decrypt", "count": 1})
    slow = client(PROXY, read_timeout=0.5)
    check("delay beyond client read timeout -> ReadTimeoutError",
          error_of(lambda: slow.decrypt(CiphertextBlob=blob, EncryptionContext=ctx))[0]
          == "ReadTimeoutError")

    # target filter: a Decrypt rule does not touch Encrypt
    control("POST", "/__fault__", {"action": "error", "error_type": "DisabledException",
                                   "target": "TrentService.Decrypt"})
    ok_enc = error_of(lambda: kms.encrypt(KeyId=kid, Plaintext=b"x"))
    check("target filter: Encrypt unaffected by a Decrypt rule", ok_enc == (None, 200), str(ok_enc))
    check("until-cleared rule: 1st", error_of(dec) == ("DisabledException", 400))
    check("until-cleared rule: 2nd", error_of(dec) == ("DisabledException", 400))
    cleared = control("DELETE", "/__fault__")["cleared"]
    check("DELETE /__fault__ clears", cleared == 1 and error_of(dec) == (None, 200))

    # error variants (no retries)
    for etype, status in [("DisabledException", 400), ("KMSInvalidStateException", 400),
                          ("KMSInternalException", 500), ("ServiceUnavailableException", 503),
                          ("ThrottlingException", 400), ("NotFoundException", 400)]:
        control("POST", "/__fault__", {"action": "error", "error_type": etype, "count": 1})
        got = error_of(dec)
        check(f"error {etype}", got == (etype, status), str(got))
    control("POST", "/__fault__", {"action": "error", "error_type": "KMSInternalException",
                                   "status": 503, "count": 1})
    check("error with explicit status", error_of(dec) == ("KMSInternalException", 503))

    # count + retries: 2 throttles then success with 3 attempts
    control("DELETE", "/__fault__/stats")
    control("POST", "/__fault__", {"action": "error", "error_type": "ThrottlingException",
                                   "target": "Decrypt", "count": 2})
    check("2x ThrottlingException then success with 3 attempts", error_of(
        lambda: kms_retry.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)) == (None, 200))
    st = control("GET", "/__fault__/stats")
    check("stats: 3 Decrypt requests, 2 faults",
          st["by_target"].get("TrentService.Decrypt") == 3 and st["faults"].get("error") == 2,
          json.dumps(st))

    # skip
    control("POST", "/__fault__", {"action": "error", "error_type": "DisabledException",
                                   "skip": 1, "count": 1})
    check("skip 1: first passes", error_of(dec) == (None, 200))
    check("skip 1: second fails", error_of(dec) == ("DisabledException", 400))
    check("skip 1: third passes", error_of(dec) == (None, 200))

    # drop (FIN) and drop (RST)
    for reset in (False, True):
        control("POST", "/__fault__", {"action": "drop", "count": 1, "reset": reset})
        got = error_of(dec)
        check(f"drop reset={reset}: connection error without retries",
              got[0] in ("ConnectionClosedError", "EndpointConnectionError", "ProtocolError"),
              str(got))
    control("POST", "/__fault__", {"action": "drop", "count": 1, "target": "Decrypt"})
    check("drop once, retried by the client", error_of(
        lambda: kms_retry.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)) == (None, 200))

    # drop_response: the request reaches moto, the answer is lost
    before = len(direct.list_keys()["Keys"])
    control("POST", "/__fault__", {"action": "drop_response", "count": 1, "target": "CreateKey"})
    got = error_of(lambda: kms.create_key())
    after = len(direct.list_keys()["Keys"])
    check("drop_response: client error, side effect happened",
          got[0] in ("ConnectionClosedError", "ProtocolError") and after == before + 1,
          f"{got} keys {before}->{after}")

    # raw HTTP shape of an injected error
    control("POST", "/__fault__", {"action": "error", "error_type": "DisabledException",
                                   "message": "it is disabled", "count": 1})
    u = urllib.parse.urlsplit(PROXY)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    c.request("POST", "/", body=b"{}", headers={"X-Amz-Target": "TrentService.Decrypt",
                                                "Content-Type": "application/x-amz-json-1.1"})
    r = c.getresponse()
    body = json.loads(r.read())
    check("raw injected error: status/headers/body",
          r.status == 400 and r.getheader("Content-Type") == "application/x-amz-json-1.1"
          and r.getheader("x-amzn-ErrorType") == "DisabledException"
          and body == {"__type": "DisabledException", "message": "it is disabled"},
          f"{r.status} {r.getheaders()} {body}")
    c.close()

    # key-state enforcement
    control("POST", "/__fault__/config", {"enforce_key_state": True})
    check("enforce: enabled key passes", error_of(dec) == (None, 200))
    kms.disable_key(KeyId=kid)
    check("enforce: Decrypt on disabled key -> DisabledException",
          error_of(dec) == ("DisabledException", 400))
    check("enforce: Encrypt on disabled key -> DisabledException",
          error_of(lambda: kms.encrypt(KeyId=kid, Plaintext=b"x")) == ("DisabledException", 400))
    check("enforce: GenerateDataKey on disabled key -> DisabledException",
          error_of(lambda: kms.generate_data_key(KeyId=arn, KeySpec="AES_256"))
          == ("DisabledException", 400))
    check("without proxy moto itself decrypts with a disabled key",
          error_of(lambda: direct.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)) == (None, 200))
    kms.enable_key(KeyId=kid)
    check("enforce: re-enabled key passes", error_of(dec) == (None, 200))
    kms.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    check("enforce: Decrypt on key pending deletion -> KMSInvalidStateException",
          error_of(dec) == ("KMSInvalidStateException", 400))
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    check("enforce: ReEncrypt from key pending deletion -> KMSInvalidStateException",
          error_of(lambda: kms.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=ctx,
                                          DestinationKeyId=other))
          == ("KMSInvalidStateException", 400))
    control("POST", "/__fault__/config", {"enforce_key_state": False})
    check("enforce off: moto behaviour again", error_of(dec) == (None, 200))

    control("DELETE", "/__fault__")
    control("DELETE", "/__fault__/stats")
    control("POST", "/__fault__/config", {"enforce_key_state": enforce_before})
    print(f"{'all checks passed' if failures == 0 else f'{failures} check(s) FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
