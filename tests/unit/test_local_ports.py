"""Ports for the local system: never where the kernel hands out port-0 binds."""

import socket

from services.local import ephemeral_ports, free_port


def test_free_ports_lie_between_rays_worker_ports_and_the_ephemeral_range():
    """Ray binds dozens of port-0 sockets between our choice of Serve's gRPC port and
    the proxy's bind; a port from the ephemeral range could be handed to one of them
    first (the proxy then fails with "Failed to bind")."""
    low, high = ephemeral_ports()
    assert 1024 <= low < high
    ports = {free_port() for _ in range(50)}
    # and above the ports Ray gives its workers (10002-19999)
    assert all(20000 <= p < low for p in ports), sorted(ports)
    assert len(ports) > 1  # chosen at random, not one fixed port
    for port in list(ports)[:10]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_the_range_is_read_from_the_kernel(tmp_path, monkeypatch):
    import services.local as local

    path = tmp_path / "ip_local_port_range"
    path.write_text("40000\t50000\n")
    monkeypatch.setattr(local, "EPHEMERAL_RANGE", path)
    assert ephemeral_ports() == (40000, 50000)
    assert all(20000 <= free_port() < 40000 for _ in range(20))
    monkeypatch.setattr(local, "EPHEMERAL_RANGE", tmp_path / "missing")
    assert ephemeral_ports() == (32768, 60999)
