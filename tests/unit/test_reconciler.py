"""The reconciler's hot path against a recording stand-in for the apiserver: what a new job costs
in writes, the echo of our own status write, Events off the creation path, one parse per spec."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
from typing import Any

import pytest

from finetune_operator import reconciler as reconciler_module
from finetune_operator.cache import slim_finetunejob, slim_job
from finetune_operator.kubeapi import ApiError, Ensured, Outcome
from finetune_operator.metrics import Metrics
from finetune_operator.reconciler import Reconciler
from finetune_operator.reports import ProgressStore
from finetune_operator.settings import OperatorSettings
from tests.bad_specs import good_manifest
from tests.unit.looptime import run


class RecordingAPI:
    """Answers as the apiserver would, and records every call the operator makes."""

    def __init__(self) -> None:
        self.version = 100
        self.jobs: dict[Any, list[dict[str, Any]]] = {}  # the Jobs index, as the watch fills it
        self.writes: list[tuple[str, str]] = []  # (verb and resource, name)
        self.events: list[dict[str, Any]] = []
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.refused: list[str] = []  # status writes answered 409
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []  # each Job as the operator rendered it
        self.policies: list[dict[str, Any]] = []  # each NetworkPolicy it created
        self.ensured: list[str] = []  # the kinds of what it created, in order

    def _next_version(self) -> str:
        self.version += 1
        return str(self.version)

    def add(self, body: dict[str, Any]) -> None:
        self.objects[(body["metadata"]["namespace"], body["metadata"]["name"])] = body

    async def ensure(self, obj: dict[str, Any], *, owner_uid: str) -> Ensured:
        self.ensured.append(obj["kind"])
        if obj["kind"] == "NetworkPolicy":
            # Kept apart from ``writes``, which the tests of status writes count.
            self.policies.append(copy.deepcopy(obj))
            return Ensured(Outcome.CREATED, obj)
        self.writes.append(("create jobs", obj["metadata"]["name"]))
        created = copy.deepcopy(obj)
        self.created.append(copy.deepcopy(obj))
        created["metadata"].update(uid=f"job-{owner_uid}", resourceVersion=self._next_version())
        self.jobs[(created["metadata"]["namespace"], created["metadata"]["name"])] = [slim_job(created)]
        return Ensured(Outcome.CREATED, created)

    async def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], *, resource_version: str = ""
    ) -> dict[str, Any] | None:
        body = self.objects[(namespace, name)]
        if resource_version and resource_version != body["metadata"]["resourceVersion"]:
            self.refused.append(name)
            raise ApiError(409, "Conflict", "the object has been modified")
        self.writes.append(("patch finetunejobs/status", name))
        body["status"] = {**body.get("status", {}), **patch}
        body["metadata"]["resourceVersion"] = self._next_version()
        return copy.deepcopy(body)

    async def post_event(self, involved: dict[str, Any], **event: Any) -> None:
        self.events.append({"name": involved["metadata"]["name"], **event})

    async def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return next(iter(self.jobs.get((namespace, name), [])), None)

    async def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.configmaps.get((namespace, name))

    async def write_configmap(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.writes.append(("write configmaps", name))
        self.configmaps[(namespace, name)] = {"data": dict(data)}

    async def read_node(self, name: str) -> dict[str, Any] | None:
        return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": "Test-GPU"}}}

    async def read_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None


def finetunejob(name: str, *, uid: str = "", generation: int = 1) -> dict[str, Any]:
    body = good_manifest(name)
    body["metadata"].update(
        namespace="team",
        uid=uid or f"uid-{name}",
        generation=generation,
        resourceVersion="1",
        creationTimestamp="2026-11-25T12:00:00Z",
    )
    return body


def invalid(name: str) -> dict[str, Any]:
    """A FineTuneJob the operator fails with InvalidSpec (and a Warning Event)."""
    body = finetunejob(name)
    body["spec"]["baseModel"]["type"] = "not-a-model-type"
    return body


class World:
    """A reconciler over plain-dict indexes, as the watches would fill them."""

    def __init__(self, *names: str, **settings: Any) -> None:
        self.api = RecordingAPI()
        self.metrics = Metrics()
        self.ftjs: dict[Any, list[dict[str, Any]]] = {}
        self.reconciler = Reconciler(
            self.api,  # type: ignore[arg-type]
            OperatorSettings(report_url="https://operator.example:8443", **settings),
            progress=ProgressStore(),
            metrics=self.metrics,
        )
        self.pods: dict[Any, list[dict[str, Any]]] = {}
        self.reconciler.bind(ftjs=self.ftjs, jobs=self.api.jobs, pods=self.pods)
        for name in names:
            self.put(finetunejob(name))

    def put(self, body: dict[str, Any]) -> None:
        """The FineTuneJob as the apiserver now has it, seen by the watch."""
        self.api.add(body)
        self.ftjs[("team", body["metadata"]["name"])] = [slim_finetunejob(copy.deepcopy(body))]

    def server(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.api.objects[("team", name)])

    def metric(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0


def pod_of(job: dict[str, Any], *, node: str | None = None, phase: str = "Pending") -> dict[str, Any]:
    """The Job's pod as the watch would have it: made, placed on ``node``, in ``phase``."""
    return {
        "metadata": {
            "name": f"{job['metadata']['name']}-abc",
            "namespace": "team",
            "uid": "pod-1",
            "creationTimestamp": "2026-11-25T12:00:02Z",
            "ownerReferences": [
                {"kind": "Job", "name": job["metadata"]["name"], "uid": job["metadata"]["uid"], "controller": True}
            ],
        },
        "spec": {"nodeName": node},
        "status": {"phase": phase},
    }


def test_a_new_job_costs_its_network_policy_one_job_create_and_one_status_write_and_no_event_inline() -> None:
    async def main() -> World:
        world = World("nick")
        await world.reconciler.reconcile(("team", "nick"))
        return world

    world = run(main())
    # The pods' egress policy first: no pod of the Job runs without it.
    assert world.api.ensured == ["NetworkPolicy", "Job"]
    assert [p["metadata"]["name"] for p in world.api.policies] == ["nick"]
    assert world.api.writes == [("create jobs", "nick"), ("patch finetunejobs/status", "nick")]
    assert world.server("nick")["status"]["jobName"] == "nick"
    assert world.api.events == []


def test_the_jobs_start_time_alone_is_no_write_and_rides_along_with_the_next() -> None:
    """The Job controller stamps the Job's startTime before it makes the pod: at a burst of
    jobs that alone was one more status write per job while the pods were being made."""

    async def main() -> World:
        world = World("nick")
        # Not the status interval's wait between a phase and a finer reason, nor the settling of
        # a finer reason: only what is news.
        world.reconciler.settings = dataclasses.replace(world.reconciler.settings, status_interval=0, reason_settle=0)
        key = ("team", "nick")
        await world.reconciler.reconcile(key)
        world.put(world.server("nick"))
        (job,) = world.api.jobs[key]
        job["status"] = {"startTime": "2026-11-25T12:00:01Z"}
        await world.reconciler.reconcile(key)
        assert len(world.api.writes) == 2
        world.pods[key] = [pod_of(job)]
        job["status"]["active"] = 1
        await world.reconciler.reconcile(key)
        return world

    world = run(main())
    assert world.api.writes[2:] == [("patch finetunejobs/status", "nick")]
    status = world.server("nick")["status"]
    assert (status["startTime"], status["reason"], status["attempts"]) == ("2026-11-25T12:00:01Z", "Scheduling", 1)


async def started(world: World, name: str) -> tuple[Any, dict[str, Any]]:
    """``name`` reconciled once (its Job created, Pending/Starting written), and the echo seen;
    the status interval since that write already over."""
    key = ("team", name)
    await world.reconciler.reconcile(key)
    world.put(world.server(name))
    (job,) = world.api.jobs[key]
    job["status"] = {"active": 1, "startTime": "2026-11-25T12:00:01Z"}
    await asyncio.sleep(world.reconciler.settings.status_interval)
    return key, job


def test_a_pod_placed_and_running_a_moment_after_it_was_made_costs_one_write() -> None:
    """Pending/Starting -> (Scheduling, PodStarting) -> Initializing/TrainerStarting within the
    settling time: one write, where there were three."""

    async def main() -> tuple[World, list[Any]]:
        world = World("nick")
        key, job = await started(world, "nick")
        loop = asyncio.get_running_loop()
        world.pods[key] = [pod_of(job)]
        await world.reconciler.reconcile(key)
        due = world.reconciler.queue.due(key)
        assert due is not None and 0 < due - loop.time() <= 1.0
        await asyncio.sleep(0.4)
        world.pods[key] = [pod_of(job, node="gpu-node-1")]
        await world.reconciler.reconcile(key)
        writes = list(world.api.writes)
        await asyncio.sleep(0.4)
        world.pods[key] = [pod_of(job, node="gpu-node-1", phase="Running")]
        await world.reconciler.reconcile(key)
        return world, writes

    world, writes_before_it_runs = run(main())
    assert writes_before_it_runs == [("create jobs", "nick"), ("patch finetunejobs/status", "nick")]
    assert world.api.writes[2:] == [("patch finetunejobs/status", "nick")]
    status = world.server("nick")["status"]
    assert (status["phase"], status["reason"]) == ("Initializing", "TrainerStarting")


async def reconcile_until_written(world: World, key: Any, writes: int) -> float:
    """Run the reconciler's workers until ``writes`` API writes are made; how long that took."""
    loop = asyncio.get_running_loop()
    seen = loop.time()
    world.reconciler.enqueue(key)
    world.reconciler.start()
    while len(world.api.writes) < writes:
        await asyncio.sleep(0.1)
    await world.reconciler.stop()
    return loop.time() - seen


def test_a_pod_whose_containers_take_their_time_shows_podstarting_once_it_has_held() -> None:
    async def main() -> tuple[World, float]:
        world = World("nick")
        key, job = await started(world, "nick")
        world.pods[key] = [pod_of(job, node="gpu-node-1")]
        return world, await reconcile_until_written(world, key, 3)

    world, after = run(main())
    status = world.server("nick")["status"]
    assert (status["phase"], status["reason"]) == ("Initializing", "PodStarting")
    assert 1.0 <= after < 1.2, after


def test_a_pod_that_keeps_waiting_for_a_node_shows_scheduling_once_it_has_held() -> None:
    async def main() -> tuple[World, float]:
        world = World("nick")
        key, job = await started(world, "nick")
        world.pods[key] = [pod_of(job)]
        return world, await reconcile_until_written(world, key, 3)

    world, after = run(main())
    assert world.server("nick")["status"]["reason"] == "Scheduling"
    assert 1.0 <= after < 1.2, after


def test_progress_of_the_trainer_is_not_held_back_by_the_settling() -> None:
    assert reconciler_module._progress_news({"progress": {"step": 10, "updateTime": "t"}})
    assert not reconciler_module._progress_news({"progress": {"updateTime": "t", "etaSeconds": 3}})
    assert not reconciler_module._progress_news({"reason": "Scheduling", "message": "waiting"})


def test_once_the_job_has_a_pod_its_start_time_is_news_of_its_own() -> None:
    stamp = {"startTime": "2026-11-25T12:00:01Z"}
    assert not reconciler_module._news(stamp, {"phase": "Pending"})
    assert reconciler_module._news(stamp, {"phase": "Queued", "attempts": 1})
    assert not reconciler_module._news({"etaText": "3m"}, {"phase": "Training", "attempts": 1})


def test_a_status_meant_for_a_finetunejob_never_lands_on_the_one_made_again_under_its_name() -> None:
    """A status write goes by name: made against the version it read, a write for the deleted
    FineTuneJob (still in the cache) is refused by the one made again, which keeps its status."""

    async def main() -> World:
        world = World("nick")
        key = ("team", "nick")
        await world.reconciler.reconcile(key)
        world.put(world.server("nick"))
        # Deleted and made again under the same name; the watch has not told us yet.
        again = finetunejob("nick", uid="uid-nick-2")
        again["metadata"]["resourceVersion"] = world.api._next_version()
        world.api.add(again)
        del world.api.jobs[key]  # the old Job went with the old FineTuneJob
        await world.reconciler.reconcile(key)
        return world

    world = run(main())
    assert world.api.refused == ["nick"]
    assert "status" not in world.server("nick")
    assert world.reconciler.queue.due(("team", "nick")) is not None


def test_a_status_refused_for_a_change_the_cache_has_not_seen_lands_at_once_on_the_same_object() -> None:
    """The FineTuneJob changed on the server (kopf's own annotations on a new object) before the
    cache saw it: the write is refused, the object read again (the same uid) takes it at once,
    instead of the status waiting for a later reconcile."""

    async def main() -> World:
        world = World("nick")
        world.api.objects[("team", "nick")]["metadata"]["resourceVersion"] = world.api._next_version()
        await world.reconciler.reconcile(("team", "nick"))
        return world

    world = run(main())
    assert world.api.refused == ["nick"]
    assert world.server("nick")["status"]["phase"]
    assert ("patch finetunejobs/status", "nick") in world.api.writes


def test_the_echo_of_our_own_status_write_is_not_reconciled_and_is_counted() -> None:
    async def main() -> tuple[World, int]:
        world = World("nick")
        key = ("team", "nick")
        await world.reconciler.reconcile(key)
        echo = world.server("nick")  # what the watch delivers after our write
        world.put(echo)
        world.reconciler.changed(key, echo)
        return world, len(world.reconciler.queue)

    world, waiting = run(main())
    assert waiting == 0
    assert world.reconciler.own_writes_skipped == 1
    assert world.metric("finetune_own_status_writes_skipped_total") == 1


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda body: body["metadata"].update(resourceVersion="9999"), id="someone-elses-write"),
        pytest.param(lambda body: body["metadata"].update(generation=2), id="the-spec-changed-under-our-write"),
        pytest.param(
            lambda body: body["metadata"].update(deletionTimestamp="2026-11-25T12:01:00Z"), id="being-deleted"
        ),
        pytest.param(lambda body: body["metadata"].update(uid="another"), id="another-finetunejob-of-the-name"),
    ],
)
def test_any_other_change_is_reconciled(change: Any) -> None:
    async def main() -> tuple[World, int]:
        world = World("nick")
        key = ("team", "nick")
        await world.reconciler.reconcile(key)
        event = world.server("nick")
        change(event)
        world.reconciler.changed(key, event)
        return world, len(world.reconciler.queue)

    world, waiting = run(main())
    assert waiting == 1
    assert world.reconciler.own_writes_skipped == 0


def test_a_change_before_we_ever_wrote_is_reconciled() -> None:
    async def main() -> int:
        world = World("nick")
        world.reconciler.changed(("team", "nick"), world.server("nick"))
        return len(world.reconciler.queue)

    assert run(main()) == 1


def test_events_are_posted_in_the_background_with_the_time_they_happened() -> None:
    async def main() -> tuple[World, list[float]]:
        world = World()
        world.put(invalid("nick"))
        loop = asyncio.get_running_loop()
        before = dt.datetime.now(dt.UTC)
        await world.reconciler.reconcile(("team", "nick"))
        assert world.server("nick")["status"]["reason"] == "InvalidSpec"
        # Not posted in the reconcile's way: it waits for the emitter.
        assert world.api.events == []
        emitted = len(world.reconciler.events)
        assert emitted == 1
        world.reconciler.events.start()
        await asyncio.sleep(1)
        assert loop.time() >= 1
        await world.reconciler.stop()
        assert world.reconciler.events.posted == emitted
        return world, [(e["at"] - before).total_seconds() for e in world.api.events]

    world, offsets = run(main())
    assert world.api.events and all(e["name"] == "nick" for e in world.api.events)
    assert [(e["type"], e["reason"]) for e in world.api.events] == [("Warning", "InvalidSpec")]
    assert all(0 <= offset < 60 for offset in offsets)


def test_an_event_waits_while_jobs_wait_to_be_created() -> None:
    async def main() -> tuple[int, int]:
        world = World("other")
        world.put(invalid("nick"))
        await world.reconciler.reconcile(("team", "nick"))
        world.reconciler.enqueue(("team", "other"))  # a new job: it waits for its Job
        world.reconciler.events.start()
        await asyncio.sleep(1)
        held_back = len(world.api.events)
        await world.reconciler.queue.get()  # a worker takes it
        await asyncio.sleep(1)
        posted = len(world.api.events)
        await world.reconciler.stop()
        return held_back, posted

    held_back, posted = run(main())
    assert held_back == 0
    assert posted == 1


def test_a_full_event_queue_drops_and_counts_never_blocks() -> None:
    async def main() -> World:
        world = World()
        world.reconciler.events._queue = asyncio.Queue(maxsize=2)
        body = finetunejob("nick")
        accepted = [world.reconciler.events.emit(body, type="Normal", reason=f"R{i}", message="m") for i in range(5)]
        assert accepted == [True, True, False, False, False]
        world.reconciler.events.start()
        await world.reconciler.events.stop()
        return world

    world = run(main())
    assert [e["reason"] for e in world.api.events] == ["R0", "R1"]
    assert world.reconciler.events.dropped == 3
    assert world.metric("finetune_events_dropped_total") == 3


def test_an_event_that_fails_to_post_does_not_stop_the_next() -> None:
    async def main() -> RecordingAPI:
        world = World()
        api = world.api
        calls = 0

        async def flaky(involved: dict[str, Any], **event: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionResetError("gone")
            api.events.append({"name": involved["metadata"]["name"], **event})

        api.post_event = flaky  # type: ignore[method-assign]
        for reason in ("First", "Second"):
            world.reconciler.events.emit(finetunejob("nick"), type="Normal", reason=reason, message="m")
        world.reconciler.events.start()
        await world.reconciler.events.stop()
        return api

    assert [e["reason"] for e in run(main()).events] == ["Second"]


def test_each_spec_is_parsed_once_per_generation_for_every_active_job(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    parse = reconciler_module.parse_manifest

    def counting(manifest: dict[str, Any], **kwargs: Any) -> Any:
        parsed.append(manifest["metadata"]["name"])
        return parse(manifest, **kwargs)

    monkeypatch.setattr(reconciler_module, "parse_manifest", counting)
    names = [f"job-{i:04d}" for i in range(300)]  # more than any fixed-size cache would hold

    async def main() -> World:
        world = World(*names)
        for _ in range(3):
            for name in names:
                world.put(world.server(name))
                await world.reconciler.reconcile(("team", name))
        return world

    world = run(main())
    assert sorted(parsed) == names
    # A new generation is parsed again, once.
    body = world.server("job-0000")
    body["metadata"]["generation"] = 2
    body["spec"]["training"]["stepsPerImage"] = 20

    async def again() -> None:
        world.put(body)
        await world.reconciler.reconcile(("team", "job-0000"))
        await world.reconciler.reconcile(("team", "job-0000"))

    run(again())
    assert parsed.count("job-0000") == 2


def test_a_finished_or_forgotten_job_keeps_no_parsed_spec() -> None:
    async def main() -> World:
        world = World("done", "gone")
        for name in ("done", "gone"):
            await world.reconciler.reconcile(("team", name))
        assert world.reconciler.memory[("team", "done")].parsed is not None
        finished = world.server("done")
        finished["status"]["phase"] = "Succeeded"
        world.put(finished)
        await world.reconciler.reconcile(("team", "done"))
        del world.ftjs[("team", "gone")]
        await world.reconciler.reconcile(("team", "gone"))
        return world

    world = run(main())
    assert world.reconciler.memory[("team", "done")].parsed is None
    assert ("team", "gone") not in world.reconciler.memory


class WebhookDownAPI(RecordingAPI):
    """An apiserver whose admission webhook for Jobs does not answer for the first ``failures``
    creations (Kueue's, after its manager went away)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def ensure(self, obj: dict[str, Any], *, owner_uid: str) -> Ensured:
        if self.failures:
            self.failures -= 1
            raise ApiError(
                500,
                "InternalError",
                'Internal error occurred: failed calling webhook "mjob.kb.io": failed to call webhook: Post '
                '"https://kueue-webhook-service.kueue-system.svc:443/mutate-batch-v1-job?timeout=10s": dial tcp '
                "10.0.0.7:443: connect: connection refused",
            )
        return await super().ensure(obj, owner_uid=owner_uid)


def test_a_job_create_that_keeps_failing_is_on_the_resource_from_the_first_failure_and_clears() -> None:
    """A webhook that is down refuses every Job create with a 500: that was in the operator's
    log only, and the FineTuneJob's PHASE stayed empty while it retried."""

    async def main() -> tuple[World, list[dict[str, Any]], list[int]]:
        world = World()
        world.api = WebhookDownAPI(failures=2)
        world.reconciler.api = world.api  # type: ignore[assignment]
        world.reconciler.bind(ftjs=world.ftjs, jobs=world.api.jobs, pods=world.pods)
        world.reconciler.settings = dataclasses.replace(world.reconciler.settings, status_interval=0, reason_settle=0)
        world.put(finetunejob("nick"))
        key = ("team", "nick")
        seen, events, early = [], [], []
        for _ in range(3):
            await world.reconciler.reconcile(key)
            seen.append(world.server("nick")["status"])
            events.append(len(world.reconciler.events))
            world.put(world.server("nick"))
            # The echo of that status write (or kopf's annotations) reconciles again at once: no
            # new create before the back-off is over (each such reconcile used to try again).
            creates = len([w for w in world.api.writes if w[0] == "create jobs"])
            tries = world.api.failures
            await world.reconciler.reconcile(key)
            early.append((world.api.failures, len([w for w in world.api.writes if w[0] == "create jobs"])))
            assert early[-1] == (tries, creates)
            world.reconciler.memory[key].create_not_before = 0.0  # the back-off is over
        return world, seen, events

    world, seen, events = run(main())
    first, second, made = seen
    assert (first["phase"], first["reason"]) == ("Pending", "JobCreateFailing")
    assert 'failed calling webhook "mjob.kb.io"' in first["message"]
    assert "try 2 at " in first["message"] and "(in 5s)" in first["message"]
    assert "try 3 at " in second["message"] and "(in 10s)" in second["message"]
    assert events[:2] == [1, 1]  # one Event for one error, however often it repeats
    assert made["reason"] != "JobCreateFailing" and made["jobName"] == "nick"
    assert world.api.writes.count(("create jobs", "nick")) == 1


@pytest.mark.parametrize(
    ("resources", "limits", "words"),
    [
        ({"gpus": 8}, {"max_gpus_per_job": 4}, "spec.resources.gpus: 8 is more than a job may ask for on this cluster "
         "(at most 4: the operator's --max-gpus-per-job, the chart's jobLimits.maxGPUs); ask for fewer"),
        ({"memory": "200Gi"}, {"max_memory_per_job": "128Gi"}, "spec.resources.memory: 200Gi is more than a job may "
         "ask for on this cluster (at most 128Gi: the operator's --max-memory-per-job"),
    ],
)  # fmt: skip
def test_a_job_beyond_the_clusters_limits_fails_before_any_job_is_made(
    resources: dict[str, Any], limits: dict[str, Any], words: str
) -> None:
    async def main() -> World:
        world = World(**limits)
        body = finetunejob("big")
        body["spec"]["resources"] = resources
        world.put(body)
        await world.reconciler.reconcile(("team", "big"))
        # Within the limits, the same cluster makes the Job.
        world.put(finetunejob("small"))
        await world.reconciler.reconcile(("team", "small"))
        return world

    world = run(main())
    status = world.server("big")["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert words in status["message"]
    assert [name for what, name in world.api.writes if what == "create jobs"] == ["small"]
    assert world.server("small")["status"]["phase"] != "Failed"


def test_jobs_that_finish_together_all_keep_their_speed_in_the_configmap() -> None:
    """The first write is the slower one: unless the book's writes take turns, its copy of the
    book (one job) would land after the next's and the ConfigMap would lose jobs.  The two that
    finish while it is under way share one write."""
    world = World()
    written = world.api.write_configmap
    delays = [2.0, 0.5]

    async def slow_write(namespace: str, name: str, data: dict[str, str]) -> None:
        await asyncio.sleep(delays.pop(0) if delays else 0)
        await written(namespace, name, data)

    world.api.write_configmap = slow_write  # type: ignore[method-assign]
    job_model = reconciler_module.parse_manifest(good_manifest("a"))
    succeeded = {
        "phase": "Succeeded",
        "progress": {"totalSteps": 40, "stepsPerSecond": 2.0},
        "usage": {"pods": [{"seconds": 30}], "gpuProduct": "Test-GPU"},
    }

    async def main() -> None:
        await asyncio.gather(*(world.reconciler._record_speed(("team", n), job_model, succeeded) for n in "abc"))

    run(main())
    kept = world.api.configmaps[(world.reconciler.settings.operator_namespace, "finetune-operator-speeds")]
    book = reconciler_module.speeds.SpeedBook.from_data(kept["data"])
    assert [len(samples) for samples in book.samples.values()] == [3], book.samples
    assert world.api.writes.count(("write configmaps", "finetune-operator-speeds")) == 2


def test_a_job_naming_what_the_job_policy_refuses_fails_before_any_job_is_made() -> None:
    """As for a FineTuneJob admitted before the admission policy, or with it bypassed; an allowed
    job's pod is placed by its profile."""
    from tests.policy_cases import PROFILES_ONLY, REFUSED, allowed_manifest, operator_settings

    def placed(manifest: dict[str, Any]) -> dict[str, Any]:
        body = finetunejob(manifest["metadata"]["name"])
        body["spec"] = manifest["spec"]
        return body

    toleration = next(case for case in REFUSED if case.policy == PROFILES_ONLY)

    async def main() -> World:
        world = World(**operator_settings(PROFILES_ONLY))
        world.put(placed(REFUSED[0].manifest("foreign")))
        await world.reconciler.reconcile(("team", "foreign"))
        world.put(placed(toleration.manifest("tolerated")))
        await world.reconciler.reconcile(("team", "tolerated"))
        world.put(placed(allowed_manifest("allowed")))
        await world.reconciler.reconcile(("team", "allowed"))
        return world

    world = run(main())
    for name, case in (("foreign", REFUSED[0]), ("tolerated", toleration)):
        status = world.server(name)["status"]
        assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec"), name
        assert case.words in status["message"], status["message"]
    assert [name for what, name in world.api.writes if what == "create jobs"] == ["allowed"]
    pod = world.api.created[0]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["priorityClassName"] == "batch-high"


def test_without_denied_addresses_no_network_policy_is_made() -> None:
    async def main() -> World:
        world = World("nick", trainer_egress_deny="")
        await world.reconciler.reconcile(("team", "nick"))
        return world

    assert run(main()).api.ensured == ["Job"]
