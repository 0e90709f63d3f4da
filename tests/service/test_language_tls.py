"""The language service over TLS and mutual TLS, with certificates made for the test."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hero.language.v1 import language_pb2, language_pb2_grpc

from services.common.tls import channel_credentials
from tests.service.conftest import language_config, language_server


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key) -> None:
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("hero-test-ca", ca_key, "hero-test-ca", ca_key, ca=True)
    _write(folder, "ca", ca, ca_key)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(folder, name, _cert(f"hero-{name}", key, "hero-test-ca", ca_key, ca=False), key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    _write(folder, "stranger", _cert("stranger", other_key, "stranger", other_key, ca=False),
           other_key)
    return folder


def model_info(port: int, credentials: grpc.ChannelCredentials | None):
    target = f"127.0.0.1:{port}"
    channel = (grpc.secure_channel(target, credentials) if credentials
               else grpc.insecure_channel(target))
    with channel:
        stub = language_pb2_grpc.LanguageServiceStub(channel)
        return stub.GetModelInfo(language_pb2.GetModelInfoRequest(), timeout=5)


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(language_model, pki,
                                                                      astronaut_tokens):
    from hero.common.v1 import tensor_pb2 as common_pb2

    from services.sdk.language import SyncLanguageClient

    srv = language_server(language_model, tls_cert_file=pki / "server.crt",
                          tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.crt")
    try:
        trusted = channel_credentials(pki / "ca.crt", pki / "client.crt", pki / "client.key")
        assert model_info(srv.port, trusted).feature_dim == 64
        client = SyncLanguageClient(f"127.0.0.1:{srv.port}", credentials=trusted)
        try:  # the SDK path the vision service uses
            parts = client.generate(astronaut_tokens, "What is it?", max_new_tokens=3)
        finally:
            client.close()
        assert isinstance(parts[-1], common_pb2.Usage) and parts[-1].completion_tokens >= 1
        for credentials in (None,  # plaintext
                            channel_credentials(pki / "ca.crt"),  # TLS without a client cert
                            channel_credentials(pki / "ca.crt", pki / "stranger.crt",
                                                pki / "stranger.key")):
            with pytest.raises(grpc.RpcError) as info:
                model_info(srv.port, credentials)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_server_tls_without_client_certificates(language_model, pki):
    srv = language_server(language_model, tls_cert_file=pki / "server.crt",
                          tls_key_file=pki / "server.key")
    try:
        assert model_info(srv.port, channel_credentials(pki / "ca.crt")).tokens_per_side == 24
        with pytest.raises(grpc.RpcError):
            model_info(srv.port, None)
    finally:
        srv.stop()


def test_half_a_tls_configuration_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file"):
        language_config(tls_cert_file="server.crt")
    with pytest.raises(ValidationError, match="mutual TLS"):
        language_config(tls_client_ca_file="ca.crt")
