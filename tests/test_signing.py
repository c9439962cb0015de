import base64
from urllib.parse import parse_qsl, unquote

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from pydantic import SecretStr

from exporter.binance.signing import (
    Ed25519Signer,
    HmacSigner,
    RsaSigner,
    make_signer,
    signed_query,
)

# The worked example of Binance's "SIGNED endpoint security" documentation.
DOC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
DOC_PAYLOAD = (
    "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1"
    "&recvWindow=5000&timestamp=1499827319559"
)
DOC_SIGNATURE = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"


def test_hmac_matches_binance_published_vector() -> None:
    assert HmacSigner(SecretStr(DOC_SECRET)).sign(DOC_PAYLOAD.encode()) == DOC_SIGNATURE


def test_signature_is_the_last_parameter_over_the_exact_query() -> None:
    params = [("recvWindow", "5000"), ("timestamp", "1499827319559")]
    query = signed_query(params, HmacSigner(SecretStr(DOC_SECRET)))
    payload, _, signature = query.rpartition("&signature=")
    assert payload == "recvWindow=5000&timestamp=1499827319559"
    assert [k for k, _ in parse_qsl(query)] == ["recvWindow", "timestamp", "signature"]
    assert signature == HmacSigner(SecretStr(DOC_SECRET)).sign(payload.encode())


def test_rsa_signature_verifies_with_the_public_key() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    query = signed_query([("timestamp", "1")], make_signer(None, key))
    payload, _, signature = query.rpartition("&signature=")
    raw = base64.b64decode(unquote(signature))
    key.public_key().verify(raw, payload.encode(), padding.PKCS1v15(), hashes.SHA256())
    assert "+" not in signature
    assert "/" not in signature
    assert "=" not in signature


def test_ed25519_signature_verifies_with_the_public_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    query = signed_query([("recvWindow", "5000"), ("timestamp", "2")], make_signer(None, key))
    payload, _, signature = query.rpartition("&signature=")
    key.public_key().verify(base64.b64decode(unquote(signature)), payload.encode())


def test_signers_never_show_their_secret() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for signer in (
        HmacSigner(SecretStr(DOC_SECRET)),
        RsaSigner(rsa_key),
        Ed25519Signer(ed25519.Ed25519PrivateKey.generate()),
    ):
        assert DOC_SECRET not in repr(signer)
        assert "**" in repr(signer)


def test_make_signer_needs_a_key() -> None:
    with pytest.raises(ValueError, match="HMAC secret or an RSA/Ed25519"):
        make_signer(None, None)
