"""What the SDK says when it cannot log in, whatever the order in which the server's refusal and its reset arrive."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import duanflow as df
import pytest
from duanflow import _client, _config

INFO = b'INFO {"server_id":"x","version":"2.10.0","max_payload":1048576,"auth_required":true}\r\n'


@pytest.fixture
def resetting_server() -> Iterator[str]:
    """A loopback server that greets like nats-server, reads the CONNECT and resets the connection (no -ERR)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                conn.settimeout(5)
                conn.sendall(INFO)
                conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            except OSError:
                # The SDK's reachability probe closes at once, with the INFO unread: a reset here. The server must
                # live on to refuse the login itself (it once died here, and the login then waited out its timeout).
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"nats://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        srv.close()
        thread.join(5)


def test_a_reset_during_login_points_at_the_credentials(resetting_server: str) -> None:
    client = _client.Client(_config.Profile(nats_url=resetting_server, nats_user="client", nats_password="wrong"))
    started = time.monotonic()
    try:
        with pytest.raises(df.UnavailableError) as exc:
            client.run(client.connect)
    finally:
        client.close()
    assert time.monotonic() - started < 5  # not left to retry until the connect timeout
    message = str(exc.value)
    assert "cannot connect to DuanFlow" in message
    assert "Authorization Violation" in message and "duanflow auth login" in message, message
