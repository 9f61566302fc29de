"""Just enough JWS/JWT to verify what clients send (ES256, RS256), written against `cryptography`
directly so the stand-ins do not share code with the libraries the tests sign with."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


class JwtError(ValueError):
    pass


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """base64url, padding optional; anything outside the URL-safe alphabet is an error."""
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except binascii.Error as e:
        raise ValueError(f"not base64url: {e}") from None


def p256_point(key: ec.EllipticCurvePublicKey) -> bytes:
    """The uncompressed X9.62 point (65 bytes, 0x04 first)."""
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def p256_key(point: bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of an uncompressed point; ValueError if it is not one."""
    if len(point) != 65 or point[0] != 4:
        raise ValueError("not an uncompressed P-256 point (65 bytes starting with 0x04)")
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


@dataclass(frozen=True)
class Jwt:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes

    @classmethod
    def parse(cls, token: str) -> Jwt:
        parts = token.split(".")
        if len(parts) != 3:
            raise JwtError("a JWS compact serialization has three parts")
        try:
            header = json.loads(b64url_decode(parts[0]))
            claims = json.loads(b64url_decode(parts[1]))
            signature = b64url_decode(parts[2])
        except (ValueError, UnicodeDecodeError) as e:
            raise JwtError(f"malformed JWT: {e}") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise JwtError("the JWT header and claims must be JSON objects")
        return cls(header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)

    def verify_es256(self, key: ec.EllipticCurvePublicKey) -> None:
        if self.header.get("alg") != "ES256":
            raise JwtError(f"alg must be ES256, not {self.header.get('alg')!r}")
        if not isinstance(key.curve, ec.SECP256R1):
            raise JwtError("ES256 needs a P-256 key")
        if len(self.signature) != 64:  # JWS ES256 is r || s, 32 bytes each (not DER)
            raise JwtError("an ES256 signature is 64 bytes (r || s)")
        r = int.from_bytes(self.signature[:32], "big")
        s = int.from_bytes(self.signature[32:], "big")
        try:
            key.verify(encode_dss_signature(r, s), self.signing_input, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise JwtError("bad signature") from None

    def verify_rs256(self, key: rsa.RSAPublicKey) -> None:
        if self.header.get("alg") != "RS256":
            raise JwtError(f"alg must be RS256, not {self.header.get('alg')!r}")
        try:
            key.verify(self.signature, self.signing_input, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise JwtError("bad signature") from None

    def int_claim(self, name: str) -> int:
        value = self.claims.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise JwtError(f"claim {name!r} must be a number")
        return int(value)
