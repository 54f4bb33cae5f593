"""Assemble and run the operator: API client, reconciler, kopf watches, HTTP endpoints,
leader election, and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

import kopf

from finetune_operator.handlers import build_registry
from finetune_operator.kubeapi import KubeAPI
from finetune_operator.leader import LeaderElector
from finetune_operator.metrics import Metrics
from finetune_operator.reconciler import Reconciler
from finetune_operator.reports import ProgressStore
from finetune_operator.servers import (
    Health,
    ProgressHandler,
    health_app,
    metrics_app,
    progress_app,
    serve,
    tls_context,
)
from finetune_operator.settings import OperatorSettings
from finetune_operator.tokens import TokenGate

LOG = logging.getLogger("finetune_operator")


async def run_operator(settings: OperatorSettings, *, stop: asyncio.Event | None = None) -> int:
    """Run until ``stop`` is set or SIGTERM/SIGINT arrives; return the exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)

    import tracemalloc

    if tracemalloc.is_tracing():
        # Started with -X tracemalloc: SIGUSR2 writes where the memory went (for profiling).
        def dump_memory() -> None:
            stats = tracemalloc.take_snapshot().statistics("lineno")[:40]
            LOG.warning("memory, top allocations:\n%s", "\n".join(str(stat) for stat in stats))

        loop.add_signal_handler(signal.SIGUSR2, dump_memory)

    if settings.kubeconfig:
        # kopf's own login reads KUBECONFIG; keep both clients on one cluster.
        os.environ["KUBECONFIG"] = settings.kubeconfig
    api = KubeAPI()
    metrics = Metrics(per_job=settings.metrics_per_job)
    store = ProgressStore()
    elector: LeaderElector | None = None
    if settings.leader_election:
        elector = LeaderElector(
            api,
            namespace=settings.lease_namespace or "default",
            name=settings.lease_name,
            identity=settings.identity,
        )
    is_leader = elector.is_leader if elector else (lambda: True)
    reconciler = Reconciler(api, settings, progress=store, metrics=metrics, is_leader=is_leader)
    store.on_update = lambda key, final: reconciler.enqueue(key)
    metrics.bind_jobs(reconciler.job_views)
    health = Health()

    async def review_report_token(token: str) -> dict[str, Any]:
        return await api.review_token(token, audience=settings.report_audience)

    gate = TokenGate(
        review_report_token,
        audience=settings.report_audience,
        on_review=lambda result: metrics.token_reviews.labels("report", result).inc(),
    )
    runners = [
        await serve(
            progress_app(
                ProgressHandler(reconciler=reconciler, store=store, gate=gate, metrics=metrics, is_leader=is_leader)
            ),
            host=settings.bind_address,
            port=settings.progress_port,
            ssl_context=tls_context(settings),
        ),
        await serve(metrics_app(metrics), host=settings.bind_address, port=settings.metrics_port),
        # Ready once logged in: an operator that cannot read its credentials (a kubeconfig it may
        # not open, a missing token) is not ready, whatever else runs. Followers are ready too:
        # they keep caches warm and answer reports with 503, which trainers retry (the Service
        # then reaches the leader).
        await serve(
            health_app(health, ready=lambda: api.logged_in), host=settings.bind_address, port=settings.health_port
        ),
    ]
    if settings.web:
        from finetune_operator.web import web_app

        runners.append(
            await serve(
                web_app(reconciler, store, api, metrics=metrics, audience=settings.web_audience),
                host=settings.bind_address,
                port=settings.web_port,
                ssl_context=tls_context(settings) if settings.web_tls else None,
            )
        )

    registry = build_registry(reconciler)

    def credentials(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not settings.kubeconfig:
            return kopf.login_with_service_account(**kwargs)
        return kopf.login_with_kubeconfig(**kwargs)

    async def relogin() -> None:
        info = credentials(logger=LOG)
        if info is not None:
            api.configure(info, relogin=relogin)

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = credentials(**kwargs)
        if info is not None:
            # Our own calls use the same identity kopf watches with.
            api.configure(info, relogin=relogin)
        return info

    tasks: list[asyncio.Task[object]] = []
    exit_code = 0

    def lost() -> None:
        nonlocal exit_code
        exit_code = 3
        stop.set()

    if elector is not None:
        tasks.append(
            asyncio.create_task(elector.run(on_started_leading=reconciler.enqueue_all, on_lost=lost), name="leader")
        )
    stop_flag: asyncio.Future[object] = loop.create_future()
    ready_flag: asyncio.Event = asyncio.Event()
    operator_task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=settings.cluster_wide,
            namespaces=list(settings.namespaces),
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        ),
        name="kopf",
    )
    health.started = True
    LOG.info(
        "event=operator-started namespaces=%s leader_election=%s progress_port=%d metrics_port=%d",
        ",".join(settings.namespaces) or "*",
        settings.leader_election,
        settings.progress_port,
        settings.metrics_port,
    )
    stop_waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({operator_task, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
    if operator_task in done and operator_task.exception() is not None:
        LOG.error("event=operator-crashed error=%r", operator_task.exception())
        exit_code = 1
    LOG.info("event=operator-stopping")
    health.started = False
    if not stop_flag.done():
        stop_flag.set_result(None)
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
        await asyncio.wait_for(operator_task, timeout=10)
    stop_waiter.cancel()
    for task in tasks:
        task.cancel()
    if elector is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(elector.release(), timeout=5)
    await reconciler.stop()
    for runner in runners:
        await runner.cleanup()
    await api.close()
    LOG.info("event=operator-stopped exit_code=%d", exit_code)
    return exit_code
