"""schemathesis against the gateway's OpenAPI document of deployed endpoints (real gateway process, real replicas):
generated and malformed requests (bad JSON, odd path parameters, missing or wrong tokens) never get a 5xx."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from duanflow._local import servers
from fixtures.gateway_stack import Stack, deploy, gateway_stack, load_module
from hypothesis import HealthCheck, given, settings, strategies
from hypothesis.errors import Unsatisfiable

pytestmark = pytest.mark.timeout(300)

APP_SOURCE = """
import duanflow as df

app = df.App("{app}", env={{"API_TOKEN": "sk-{app}"}})


@app.endpoint(method="POST", path="/{app}/echo")
def echo(request):
    return {{"got": request.json()}}


@app.endpoint(method="GET", path="/{app}/items/{{item_id}}")
def item(request):
    return {{"id": request.path_params["item_id"], "query": request.query}}


@app.endpoint(method="PUT", path="/{app}/private/{{name}}", auth=df.Auth.bearer("API_TOKEN"))
def private(request):
    return request.text()


@app.endpoint(method="POST", path="/{app}/kwargs")
def kwargs(**fields):
    return sorted(fields)
"""


@pytest.fixture(scope="module")
def stack(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("fuzz")
    app = "fz" + uuid.uuid4().hex[:8]
    (root / "app").mkdir()
    path = root / "app" / f"fuzz_{app}.py"
    path.write_text(textwrap.dedent(APP_SOURCE.format(app=app)))
    module = load_module(path, f"fuzz_{app}")
    with gateway_stack(nats_server, root, max_body_bytes="65536") as s:
        deploy(s, module, root / "app")
        s.app = app  # type: ignore[attr-defined]
        yield s


def test_generated_requests_never_get_a_5xx(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.gateway_url}/openapi.json")
    app = stack.app  # type: ignore[attr-defined]
    # the session's NATS may hold other tests' routes too: only this app's
    operations = [
        op
        for op in (result.ok() for result in schema.get_all_operations())  # type: ignore[union-attr]
        if op.path.startswith(f"/{app}/")
    ]
    assert len(operations) == 4
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
                resp = case.call(base_url=stack.gateway_url, timeout=30)
                assert resp.status_code < 500, (case.method, case.path, resp.status_code, resp.text[:300])

            try:
                check()
            except Unsatisfiable:
                # Nothing in this operation can be made invalid (any JSON body, string path parameters).
                assert mode == schemathesis.GenerationMode.NEGATIVE


def test_malformed_bodies_and_headers_never_get_a_5xx(stack: Stack) -> None:
    app = stack.app  # type: ignore[attr-defined]

    @given(
        body=strategies.binary(max_size=300),
        ctype=strategies.sampled_from(["", "application/json", "text/plain", "application/octet-stream", "x/y;;=="]),
        auth=strategies.sampled_from(["", "Bearer", "Bearer ,,", "Basic x", "Bearer " + "a" * 5000, "Bearer é"]),
        path=strategies.sampled_from(["echo", "kwargs", "items/%00", "items/..%2f", "private/x", "nowhere/x/y"]),
        method=strategies.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
    )
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(body: bytes, ctype: str, auth: str, path: str, method: str) -> None:
        headers: dict[bytes, bytes] = {}
        if ctype:
            headers[b"content-type"] = ctype.encode()
        if auth:
            headers[b"authorization"] = auth.encode()
        resp = httpx.request(method, f"{stack.gateway_url}/{app}/{path}", content=body, headers=headers, timeout=30)
        assert resp.status_code < 500, (method, path, resp.status_code, resp.text[:300])
        if resp.status_code >= 400:
            assert set(resp.json()) == {"error"}

    check()
