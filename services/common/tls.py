"""TLS credentials for the services' gRPC hops (optional mutual TLS)."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: Path | str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(cert_file: Path | str, key_file: Path | str,
                       client_ca_file: Path | str | None = None) -> grpc.ServerCredentials:
    """TLS for a server; with `client_ca_file`, clients must present a certificate it
    signed (mutual TLS)."""
    pair = (_read(key_file), _read(cert_file))
    ca = _read(client_ca_file)
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)


def channel_credentials(ca_file: Path | str | None = None, cert_file: Path | str | None = None,
                        key_file: Path | str | None = None) -> grpc.ChannelCredentials:
    """TLS for a client: trust `ca_file` (system roots if None) and, for mutual TLS,
    present `cert_file` / `key_file`."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca_file),
                                        private_key=_read(key_file),
                                        certificate_chain=_read(cert_file))
