"""The operator's own watches of its Jobs and Pods (watches.Informer), against the real apiserver:
only objects with our label ever reach the process (the apiserver filters: the informer has no
filter of its own), each is filed under the FineTuneJob it names, changes and deletions follow,
and a watch started again after objects went while it was away lists again and says what went."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import kopf
import pytest

from finetune_api.contract import ANNOTATION_FULL_NAME, LABEL_MANAGED_BY, MANAGED_BY
from finetune_operator.cache import owner_key, slim_pod
from finetune_operator.kubeapi import KubeAPI
from finetune_operator.watches import Informer, listed
from tests.kube import Kube


def _pod(name: str, *, ours_for: str, labelled: bool = True) -> dict[str, Any]:
    """A pod naming FineTuneJob ``ours_for``; without our label it is someone else's that
    happens to carry the annotation, which only the apiserver's label selector keeps out."""
    meta: dict[str, Any] = {"name": name, "annotations": {ANNOTATION_FULL_NAME: ours_for}}
    if labelled:
        meta["labels"] = {LABEL_MANAGED_BY: MANAGED_BY}
    # A scheduler nobody runs: the pod stays Pending, an API object and nothing more.
    return {
        "metadata": meta,
        "spec": {"schedulerName": "nobody", "containers": [{"name": "c", "image": "none"}]},
    }


async def _until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_only_our_pods_reach_the_informer_filed_by_finetunejob_and_followed(
    kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kube.cluster.kubeconfig))
    for index in range(3):
        kube.core.create_namespaced_pod(namespace, _pod(f"a-{index}", ours_for="a"))
    for index in range(5):
        kube.core.create_namespaced_pod(namespace, _pod(f"other-{index}", ours_for="a", labelled=False))

    async def scenario() -> None:
        api = KubeAPI()
        api.configure(kopf.login_with_kubeconfig(settings=kopf.OperatorSettings(), logger=logging.getLogger("test")))
        told: list[Any] = []
        informer = Informer(
            api,
            "/api/v1/pods",
            f"{LABEL_MANAGED_BY}={MANAGED_BY}",
            slim=slim_pod,
            indexes={"pods": owner_key},
            on_change=told.append,
            namespaces=(namespace,),
        )
        pods = informer["pods"]
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(listed([informer]), timeout=30)
            assert sorted(p["metadata"]["name"] for p in pods[(namespace, "a")]) == ["a-0", "a-1", "a-2"]
            assert list(pods) == [(namespace, "a")]
            assert (namespace, "a") in told

            # Someone else's pods change and come and go: nothing reaches us.
            await asyncio.to_thread(
                kube.core.create_namespaced_pod, namespace, _pod("other-new", ours_for="b", labelled=False)
            )
            await asyncio.to_thread(kube.core.delete_namespaced_pod, "other-0", namespace, grace_period_seconds=0)
            # Ours: a new one for another FineTuneJob, a change, a deletion.
            await asyncio.to_thread(kube.core.create_namespaced_pod, namespace, _pod("b-0", ours_for="b"))
            await _until(lambda: (namespace, "b") in pods, "b's pod")
            await asyncio.to_thread(
                kube.core.patch_namespaced_pod, "a-1", namespace, {"metadata": {"labels": {"touched": "yes"}}}
            )
            await asyncio.to_thread(kube.core.delete_namespaced_pod, "a-0", namespace, grace_period_seconds=0)
            await _until(lambda: len(pods[(namespace, "a")]) == 2, "a-0 gone")
            assert (namespace, "b") in told
            held = {p["metadata"]["name"] for key in pods for p in pods[key]}
            assert held == {"a-1", "a-2", "b-0"}

            # Away while a pod goes: started again, it lists again and says whose pod went.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.to_thread(kube.core.delete_namespaced_pod, "b-0", namespace, grace_period_seconds=0)
            await _until_gone(kube, namespace, "b-0")
            told.clear()
            informer.synced.clear()
            task = asyncio.create_task(informer.run())
            await asyncio.wait_for(listed([informer]), timeout=30)
            assert (namespace, "b") not in pods and (namespace, "b") in told
            assert informer.relists == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.close()

    asyncio.run(scenario())


async def _until_gone(kube: Kube, namespace: str, name: str) -> None:
    names = lambda: {p.metadata.name for p in kube.core.list_namespaced_pod(namespace).items}  # noqa: E731
    for _ in range(600):
        if name not in await asyncio.to_thread(names):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} still there")


def test_two_writers_of_a_missing_configmap_both_land(
    kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both find it missing and both create it: the one refused with AlreadyExists patches what
    the other made (two jobs that finish together both keep their speeds)."""
    monkeypatch.setenv("KUBECONFIG", str(kube.cluster.kubeconfig))

    async def scenario() -> None:
        api = KubeAPI()
        api.configure(kopf.login_with_kubeconfig(settings=kopf.OperatorSettings(), logger=logging.getLogger("test")))
        try:
            for round_ in range(3):
                name = f"speeds-{round_}"
                writes = (api.write_configmap(namespace, name, {f"writer-{w}": "1"}) for w in range(4))
                await asyncio.gather(*writes)
                kept = await api.read_configmap(namespace, name)
                assert kept is not None and sorted(kept["data"]) == [f"writer-{w}" for w in range(4)], kept
        finally:
            await api.close()

    asyncio.run(scenario())
