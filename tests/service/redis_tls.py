"""A real Redis behind TLS, for tests: certificates made with `cryptography`, and a TLS
terminator on a free loopback port that pipes each connection to a private Redis (the
`redis-server` the tests run may be built without TLS; the client's side, where
certificates are verified, is the same either way)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.local import free_port


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _pem(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
         ) -> None:
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def make_pki(folder: Path, **servers: tuple[str, ...]) -> Path:
    """`ca.crt` and, per keyword, `<name>.crt` / `<name>.key`: a server certificate the CA
    signed whose subjectAltName holds the given host names and IP addresses (none: no
    subjectAltName at all). Returns `folder`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def builder(subject: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(_name(subject))
                .issuer_name(_name("hero-test-redis-ca")).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    ca = builder("hero-test-redis-ca", ca_key).add_extension(
        x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(
        ca_key, hashes.SHA256())
    _pem(folder, "ca", ca, ca_key)
    for name, hosts in servers.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = builder(f"redis-{name}", key).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True)
        if hosts:
            cert = cert.add_extension(_san(hosts), critical=False)
        _pem(folder, name, cert.sign(ca_key, hashes.SHA256()), key)
    return folder


class TlsTerminator:
    """Accepts TLS on 127.0.0.1:<free port> with one certificate and pipes every
    connection to the plain Redis on `backend_port`, in a thread with its own loop."""

    def __init__(self, backend_port: int, cert_file: Path, key_file: Path):
        self.backend_port, self.port = backend_port, free_port()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"rediss://{host}:{self.port}/0"

    def start(self) -> TlsTerminator:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._accept, "127.0.0.1", self.port, ssl=self.context), self.loop).result(10)
        return self

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.pipes.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                 self.backend_port)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            writer.close()
            self.pipes.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
                writer.close()

    def stop(self) -> None:
        async def shut() -> None:
            if self.server is not None:
                self.server.close()
            for task in list(self.pipes):
                task.cancel()
            await asyncio.gather(*self.pipes, return_exceptions=True)

        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.loop.close()
