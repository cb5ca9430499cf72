"""Public-key validation that ``cryptography`` leaves to the caller.

* Ed25519: a public key of small order (the identity, or a point of order 2, 4 or 8) makes the
  all-zero-ish signatures verify for *any* message under OpenSSL's cofactored check, so a card
  carrying one could be impersonated by anyone. Such keys, and non-canonical encodings, are refused.
  Decoding and three doublings on the curve (RFC 8032, section 5.1.3) tell whether [8]A is the
  identity.
* X25519: a low-order public key gives an all-zero shared secret; HPKE (RFC 9180) then fails
  inside ``encrypt``. One exchange with a throwaway key detects it up front.
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode(point: bytes) -> tuple[int, int] | None:
    y = int.from_bytes(point, "little") & ((1 << 255) - 1)
    sign = point[31] >> 7
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        x = (x * _SQRT_M1) % _P
        if (v * x * x - u) % _P != 0:
            return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y


def _double(pt: tuple[int, int]) -> tuple[int, int]:
    x, y = pt
    t = (_D * x * x * y * y) % _P
    x3 = (2 * x * y) * pow((1 + t) % _P, _P - 2, _P) % _P
    y3 = (y * y + x * x) * pow((1 - t) % _P, _P - 2, _P) % _P
    return x3, y3


@lru_cache(maxsize=1024)
def ed25519_key_is_safe(public: bytes) -> bool:
    """True for a canonical encoding of a curve point whose order is not a divisor of 8."""
    if len(public) != 32:
        return False
    pt = _decode(public)
    if pt is None:
        return False
    for _ in range(3):
        pt = _double(pt)
    return pt != (0, 1)


@lru_cache(maxsize=1024)
def x25519_key_is_safe(public: bytes) -> bool:
    """True unless an exchange with ``public`` yields the all-zero (low-order) shared secret."""
    if len(public) != 32:
        return False
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True
