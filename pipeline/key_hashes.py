"""Salted hashes of the REST API's keys. The settings keep only these, so nothing the service hands to Ray (Serve
stores every deployment's arguments in the cluster's key-value store) and nothing a replica holds is a usable key.

Every request is checked against every configured key, so one check must be cheap: scrypt with a small work factor
(about 2.5 ms and 1 MiB on one core) and a random 16-byte salt per key. That keeps long random keys (what
`tubescope serve` generates) safe in a stolen config; no hash makes a short, guessable key safe.

Form: `scrypt$<n>$<r>$<p>$<salt>$<digest>`, salt and digest in unpadded URL-safe base64.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os

SCHEME = "scrypt"
COST_N, BLOCK_R, PARALLEL_P = 2 ** 10, 8, 1
SALT_BYTES, DIGEST_BYTES = 16, 32
MIN_KEY_CHARS = 16
# bounds on the parameters a given key_hash may ask for: a config must not make every request cost seconds
MAX_COST_N, MAX_BLOCK_R, MAX_PARALLEL_P = 2 ** 14, 16, 4
SCRYPT_MAXMEM = 64 * 1024 * 1024       # scrypt needs about 128 * r * n bytes: 32 MiB at the bounds


def hash_key(key: str) -> str:
    """A fresh salted hash of key."""
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(key, salt, COST_N, BLOCK_R, PARALLEL_P)
    return "$".join([SCHEME, str(COST_N), str(BLOCK_R), str(PARALLEL_P), _b64(salt), _b64(digest)])


def key_matches(key_hash: str, key: str) -> bool:
    """Whether key is the one key_hash was made from (the digests are compared in constant time)."""
    n, r, p, salt, digest = parse_key_hash(key_hash)
    return hmac.compare_digest(_scrypt(key, salt, n, r, p), digest)


def parse_key_hash(key_hash: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, digest) of a well-formed hash; ValueError (never quoting it) otherwise."""
    parts = key_hash.split("$")
    try:
        if len(parts) != 6 or parts[0] != SCHEME:
            raise ValueError
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise ValueError(f"key_hash must have the form {SCHEME}$n$r$p$salt$digest") from None
    if not (1 < n <= MAX_COST_N and n & (n - 1) == 0 and 1 <= r <= MAX_BLOCK_R and 1 <= p <= MAX_PARALLEL_P):
        raise ValueError(f"key_hash parameters out of bounds (n a power of 2 up to {MAX_COST_N}, r up to "
                         f"{MAX_BLOCK_R}, p up to {MAX_PARALLEL_P})")
    if len(salt) < SALT_BYTES or len(digest) != DIGEST_BYTES:
        raise ValueError(f"key_hash needs a salt of at least {SALT_BYTES} bytes and a {DIGEST_BYTES}-byte digest")
    return n, r, p, salt, digest


def _scrypt(key: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, dklen=DIGEST_BYTES, maxmem=SCRYPT_MAXMEM)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


__all__ = ["MIN_KEY_CHARS", "hash_key", "key_matches", "parse_key_hash"]
