#!/usr/bin/env python3
"""An independent implementation of docs/wire-format.md, written from the
document alone, used to cross-check the test vectors and a WAL directory.

    pip install blake3 cryptography msgpack   # msgpack only for --wal
    python3 tests/vectors/check.py                    # every vector
    python3 tests/vectors/check.py --wal DATA/wal     # a stopped server's log

Exits non-zero on the first mismatch. Not run by `cargo test` (it needs
Python packages); tests/vectors.rs checks the same vectors through the
library and a running server.
"""

import glob
import json
import os
import re
import struct
import sys

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PREFIX = b"stemedb/assertion/v1"
RETRACTION_PREFIX = b"stemedb/retraction/v1"
TIERS = ("regulatory", "clinical", "observational", "expert", "community", "anecdotal")

# --- section 2.1: timestamps -------------------------------------------------

TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+\-\u2212])(\d{2}):(\d{2}))$"
)


def days_from_civil(y, m, d):
    y -= m <= 2
    era = y // 400  # floor division (the C original truncates)
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(z):
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return (y + (m <= 2), m, d)


def days_in_month(y, m):
    if m == 2:
        return 29 if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 28
    return 30 if m in (4, 6, 9, 11) else 31


def normalize_time(s):
    g = TIME_RE.match(s)
    if not g:
        raise ValueError(f"not an RFC 3339 timestamp: {s!r}")
    y, mo, d, h, mi, sec = (int(x) for x in g.group(1, 2, 3, 4, 5, 6))
    if not (1 <= mo <= 12 and 1 <= d <= days_in_month(y, mo) and h <= 23 and mi <= 59 and sec <= 60):
        raise ValueError(f"out of range: {s!r}")
    frac = g.group(7) or ""
    nanos = int((frac[:9]).ljust(9, "0")) if frac else 0  # digits after the ninth are dropped
    leap = sec == 60
    if leap:
        sec = 59
    offset = 0
    if g.group(9):
        oh, om = int(g.group(10)), int(g.group(11))
        if oh > 23 or om > 59:
            raise ValueError(f"offset out of range: {s!r}")
        offset = (oh * 60 + om) * (-1 if g.group(9) in "-\u2212" else 1)
    total = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - offset * 60
    days, rem = divmod(total, 86400)
    y, mo, d = civil_from_days(days)
    h, rem = divmod(rem, 3600)
    mi, sec = divmod(rem, 60)
    if leap:
        sec += 1
    year = f"{y:04d}" if 0 <= y <= 9999 else f"{y:+05d}"
    if nanos == 0:
        f = ""
    elif nanos % 1_000_000 == 0:
        f = f".{nanos // 1_000_000:03d}"
    elif nanos % 1_000 == 0:
        f = f".{nanos // 1_000:06d}"
    else:
        f = f".{nanos:09d}"
    return f"{year}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{sec:02d}{f}Z"


# --- sections 1-3: validation (the parts that affect bytes) and encoding -----


def f64_be(x):
    x = float(x)
    if x == 0.0:
        x = 0.0  # -0.0 -> +0.0
    return struct.pack(">d", x)


def field(tag, b):
    return bytes([tag]) + struct.pack(">I", len(b)) + b


def object_bytes(obj):
    t, v = obj["type"], obj["value"]
    if t in ("text", "entity"):
        val = v.encode("utf-8")
    elif t == "number":
        assert isinstance(v, (int, float)) and not isinstance(v, bool)
        val = f64_be(v)
    elif t == "integer":
        assert isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63
        val = struct.pack(">q", v)
    elif t == "boolean":
        assert isinstance(v, bool)
        val = b"\x01" if v else b"\x00"
    elif t == "time":
        val = normalize_time(v).encode("ascii")
    else:
        raise ValueError(f"unknown object type {t!r}")
    return field(0x03, t.encode("ascii")) + field(0x04, val)


def present(m, k):
    return m.get(k) is not None


def canonical(a):
    out = PREFIX
    out += field(0x01, a["subject"].encode("utf-8"))
    out += field(0x02, a["predicate"].encode("utf-8"))
    out += object_bytes(a["object"])
    if present(a, "confidence"):
        out += field(0x05, f64_be(a["confidence"]))
    out += field(0x06, a["agent"].encode("utf-8"))
    if present(a, "source"):
        src = a["source"]
        out += field(0x07, src["uri"].encode("utf-8"))
        if present(src, "tier"):
            assert src["tier"] in TIERS
            out += field(0x08, src["tier"].encode("ascii"))
        if present(src, "hash"):
            out += field(0x09, bytes.fromhex(src["hash"]))
    if present(a, "valid_time"):
        out += field(0x0A, normalize_time(a["valid_time"]).encode("ascii"))
    if a.get("supersedes"):
        ids = a["supersedes"]
        assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in ids), "ids are lowercase hex"
        raw = sorted(bytes.fromhex(i) for i in ids)
        assert len(set(raw)) == len(raw), "no id twice"
        out += field(0x0B, b"".join(raw))
    return out


# --- sections 4-5: id and signatures ------------------------------------------


def assertion_id(a):
    return blake3.blake3(canonical(a)).digest()


def retraction_message(id_bytes):
    return blake3.blake3(RETRACTION_PREFIX + id_bytes).digest()


def check_vector(path):
    v = json.load(open(path, encoding="utf-8"))
    a = v["input"]
    c = canonical(a)
    assert c.hex() == v["canonical_hex"], f"{path}: canonical bytes differ\n ours {c.hex()}\n file {v['canonical_hex']}"
    i = blake3.blake3(c).digest()
    assert i.hex() == v["id"], f"{path}: id differs"
    if v["seed_hex"] is not None:
        sk = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["seed_hex"]))
        pk = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        assert pk.hex() == v["public_key_hex"] == a["agent"], f"{path}: public key differs"
        assert sk.sign(i).hex() == v["signature_hex"] == a["signature"].lower(), f"{path}: signature differs"
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(a["agent"])).verify(bytes.fromhex(a["signature"]), i)
        m = retraction_message(i)
        assert m.hex() == v["retraction_message_hex"], f"{path}: retraction message differs"
        assert sk.sign(m).hex() == v["retraction_signature_hex"], f"{path}: retraction signature differs"
    else:
        assert "signature" not in a or a["signature"] is None
    return v["id"]


# --- section 8: the WAL ------------------------------------------------------

CRC_TABLE = []
for n in range(256):
    c = n
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    CRC_TABLE.append(c)


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def assertion_from_log(m):
    """The JSON-shaped assertion of a log record, for recomputing its id."""
    a = dict(m)
    if "supersedes" in a:
        a["supersedes"] = [bytes(x).hex() for x in a["supersedes"]]
    return a


def check_wal(wal_dir):
    import msgpack

    assert crc32c(b"123456789") == 0xE3069283
    names = sorted(n for n in os.listdir(wal_dir) if n.endswith(".wal"))
    expected = None
    records = 0
    for name in names:
        data = open(os.path.join(wal_dir, name), "rb").read()
        assert re.fullmatch(r"\d{20}\.wal", name), name
        magic, version, first, crc = struct.unpack("<8sIQI", data[:24])
        assert magic == b"STEMEWAL" and version == 1 and crc == crc32c(data[:20]), f"{name}: bad header"
        assert first == int(name[:20]), f"{name}: header position differs from name"
        assert expected is None or first == expected, f"{name}: gap"
        pos, off = first, 24
        while off < len(data):
            ln, crc, fp, count = struct.unpack("<IIQI", data[off : off + 20])
            payload = data[off + 20 : off + 20 + ln]
            assert ln > 0 and count > 0 and len(payload) == ln, f"{name}@{off}: torn frame"
            assert crc == crc32c(payload, crc32c(data[off + 8 : off + 20])), f"{name}@{off}: crc"
            assert fp == pos, f"{name}@{off}: position {fp}, expected {pos}"
            recs = msgpack.unpackb(payload, raw=False)
            assert len(recs) == count
            for k, r in enumerate(recs):
                assert r["position"] == pos + k
                assert normalize_time(r["recorded_at"]) == r["recorded_at"], f"recorded_at not in normal form: {r}"
                (kind, ev), = r["event"].items()
                if kind == "AssertionRecorded":
                    got = assertion_id(assertion_from_log(ev["assertion"]))
                    assert got == bytes(ev["id"]), f"position {pos + k}: stored id differs from recomputed id"
                else:
                    assert kind == "AssertionRetracted" and len(bytes(ev["id"])) == 32 and "reason" in ev, r
                records += 1
            pos += count
            off += 20 + ln
        expected = pos
    print(f"WAL ok: {len(names)} segment(s), {records} record(s), ids recomputed")


def self_test():
    cases = {
        "2026-01-31T12:00:00.120+05:30": "2026-01-31T06:30:00.120Z",
        "2025-06-01T17:45:30.1234-07:00": "2025-06-02T00:45:30.123400Z",
        "2026-01-31t12:00:00z": "2026-01-31T12:00:00Z",
        "2026-01-31 12:00:00.000Z": "2026-01-31T12:00:00Z",
        "2026-01-31T12:00:00.1234567891Z": "2026-01-31T12:00:00.123456789Z",
        "2026-01-31T12:00:00.000000001Z": "2026-01-31T12:00:00.000000001Z",
        "2016-12-31T23:59:60.5+01:00": "2016-12-31T22:59:60.500Z",
        "0000-01-01T00:00:00+01:00": "-0001-12-31T23:00:00Z",
        "9999-12-31T23:59:59-01:00": "+10000-01-01T00:59:59Z",
        "2026-01-31T12:00:00\u221205:00": "2026-01-31T17:00:00Z",
    }
    for s, want in cases.items():
        got = normalize_time(s)
        assert got == want, f"{s}: {got} != {want}"


def main():
    self_test()
    if len(sys.argv) == 3 and sys.argv[1] == "--wal":
        check_wal(sys.argv[2])
        return
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sorted(glob.glob(os.path.join(here, "*.json")))
    assert paths, "no vectors"
    for p in paths:
        print(f"{os.path.basename(p)}: {check_vector(p)}")
    print(f"{len(paths)} vectors ok")


if __name__ == "__main__":
    main()
