"""`python -m services.healthcheck --ray-node`: KubeRay's probe checks without wget, against
local HTTP servers standing in for the raylet's agent, the GCS and the Serve proxy."""

from __future__ import annotations

import http.server
import threading

import pytest

from services import healthcheck


class Endpoint:
    """An HTTP server on a free loopback port answering `body` on every GET."""

    def __init__(self, body: bytes, status: int = 200):
        reply = (status, body)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(reply[0])
                self.end_headers()
                self.wfile.write(reply[1])
                Handler.paths.append(self.path)

            def log_message(self, *args):
                pass

        Handler.paths = []
        self.handler = Handler
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def paths(self) -> list[str]:
        return self.handler.paths

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def endpoints():
    made: list[Endpoint] = []

    def make(body: bytes = b"success", status: int = 200) -> Endpoint:
        made.append(Endpoint(body, status))
        return made[-1]

    yield make
    for endpoint in made:
        endpoint.close()


def args(node: str, agent: int, dashboard: int, serve: int, *extra: str) -> list[str]:
    return ["--ray-node", node, "--agent-port", str(agent), "--dashboard-port",
            str(dashboard), "--serve-port", str(serve), "--timeout", "2", *extra]


def test_a_head_is_ready_when_raylet_and_gcs_report_success(endpoints):
    agent, gcs, serve = endpoints(), endpoints(), endpoints(b"down", 503)
    assert healthcheck.main(args("head", agent.port, gcs.port, serve.port)) == 0
    assert agent.paths == ["/api/local_raylet_healthz"] and gcs.paths == ["/api/gcs_healthz"]
    assert not serve.paths  # the operator checks the head's proxy itself


def test_a_worker_is_ready_only_once_its_serve_proxy_answers(endpoints):
    agent, serve_down = endpoints(), endpoints(b"no proxy here", 503)
    assert healthcheck.main(args("worker", agent.port, 1, serve_down.port)) == 1
    serve_up = endpoints()
    assert healthcheck.main(args("worker", agent.port, 1, serve_up.port)) == 0
    assert serve_up.paths == ["/-/healthz"]
    # liveness does not depend on Serve (KubeRay's default liveness neither)
    assert healthcheck.main(args("worker", agent.port, 1, serve_down.port, "--live")) == 0


def test_a_raylet_that_does_not_report_success_or_does_not_answer_fails(endpoints):
    wrong, gcs = endpoints(b"starting"), endpoints()
    assert healthcheck.main(args("head", wrong.port, gcs.port, 1)) == 1
    closed = Endpoint(b"success")
    port = closed.port
    closed.close()
    closed.server.server_close()
    assert healthcheck.main(args("head", port, gcs.port, 1)) == 1
