"""/readyz: an operator that has not logged in (credentials it cannot read) is not ready."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiohttp.test_utils import TestClient, TestServer

from finetune_operator.kubeapi import KubeAPI
from finetune_operator.servers import Health, health_app


def test_readyz_waits_for_a_login_and_healthz_does_not() -> None:
    async def scenario() -> list[int]:
        api = KubeAPI()
        health = Health(started=True)
        codes = []
        async with TestClient(TestServer(health_app(health, ready=lambda: api.logged_in))) as client:
            codes.append((await client.get("/readyz")).status)
            codes.append((await client.get("/healthz")).status)
            info = SimpleNamespace(server="https://127.0.0.1:6443", as_http_headers=dict, as_ssl_context=lambda: False)
            api.configure(info)
            codes.append((await client.get("/readyz")).status)
        await api.close()
        return codes

    assert asyncio.run(scenario()) == [503, 200, 200]
