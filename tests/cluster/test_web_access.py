"""The web page shows a namespace's jobs (photos of real people among them) only to those
Kubernetes lets list that namespace's FineTuneJobs: the operator asks the apiserver."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.bad_specs import good_manifest
from tests.kube import Kube, OperatorProcess, instead_of, wait_for

pytestmark = pytest.mark.cluster


def get(operator: OperatorProcess, path: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{operator.web_port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def viewer_token(kube: Kube, namespace: str, *, audience: str | None = None) -> str:
    """A ServiceAccount's token that may list FineTuneJobs in ``namespace`` and nowhere else
    (minted for ``audience``; None: the apiserver's own)."""
    kube.core.create_namespaced_service_account(namespace, {"metadata": {"name": "viewer"}})
    kube.rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "ftj-viewer"},
            "rules": [{"apiGroups": ["finetune.dev"], "resources": ["finetunejobs"], "verbs": ["get", "list"]}],
        },
    )
    kube.rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "ftj-viewer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ftj-viewer"},
            "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": namespace}],
        },
    )
    request = {"spec": {"expirationSeconds": 3600, **({"audiences": [audience]} if audience else {})}}
    return str(kube.core.create_namespaced_service_account_token("viewer", namespace, request).status.token)


def test_with_an_audience_the_page_takes_only_tokens_minted_for_it(
    kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the chart runs it (web.tokenAudience: finetune-web), against the real apiserver: the
    admin's own token, and the viewer's token for the apiserver, are refused; the viewer's token
    minted for the page's audience opens its namespace and no other.  A token the page takes is
    refused by the apiserver itself."""
    import asyncio
    import logging

    import kopf

    from finetune_operator.kubeapi import KubeAPI
    from finetune_operator.web import Access, WebAccess

    monkeypatch.setenv("KUBECONFIG", str(kube.cluster.kubeconfig))
    for_page = viewer_token(kube, namespace, audience="finetune-web")
    request = {"spec": {"expirationSeconds": 3600}}
    for_apiserver = str(kube.core.create_namespaced_service_account_token("viewer", namespace, request).status.token)

    async def verdicts() -> dict[str, Access]:
        api = KubeAPI()
        api.configure(kopf.login_with_kubeconfig(settings=kopf.OperatorSettings(), logger=logging.getLogger("test")))
        access = WebAccess(api, audience="finetune-web")
        try:
            return {
                "admin": await access.check(kube.cluster.admin_token, namespace),
                "for the apiserver": await access.check(for_apiserver, namespace),
                "for the page": await access.check(for_page, namespace),
                "for the page, all namespaces": await access.check(for_page, ""),
            }
        finally:
            await api.close()

    assert asyncio.run(verdicts()) == {
        "admin": Access.UNAUTHENTICATED,
        "for the apiserver": Access.UNAUTHENTICATED,
        "for the page": Access.ALLOWED,
        "for the page, all namespaces": Access.FORBIDDEN,
    }
    # The page's token is no use against the apiserver.
    listing = urllib.request.Request(
        f"{kube.cluster.server}/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs",
        headers={"Authorization": f"Bearer {for_page}"},
    )
    context = ssl.create_default_context(cafile=str(kube.cluster.ca_file))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(listing, context=context, timeout=10)
    assert refused.value.code == 401


def test_the_web_api_shows_a_namespace_only_to_those_who_may_list_its_jobs(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    other = f"{namespace[:50]}-other"
    kube.create_namespace(other)
    try:
        for where, name in ((namespace, "mine"), (other, "theirs")):
            manifest = good_manifest(name)
            manifest["spec"]["resources"] = {"gpus": 8}
            kube.create_ftj(where, manifest)
        admin = kube.cluster.admin_token
        wait_for(
            lambda: get(operator, f"/api/jobs?namespace={other}", admin)[1].get("items"),
            timeout=30,
            what="the operator to see both jobs",
        )
        viewer = viewer_token(kube, namespace)

        # No token, a made-up token: nothing, whatever the filter says.
        for path in (f"/api/jobs?namespace={namespace}", "/api/jobs", f"/api/jobs/{namespace}/mine"):
            assert get(operator, path, None)[0] == 401, path
            assert get(operator, path, "made-up-token")[0] == 401, path
        # The viewer sees its namespace...
        code, body = get(operator, f"/api/jobs?namespace={namespace}", viewer)
        assert code == 200 and [j["name"] for j in body["items"]] == ["mine"]
        assert get(operator, f"/api/jobs/{namespace}/mine", viewer)[0] == 200
        # ...and not another one, nor all of them; ?namespace= is a question, not a filter.
        for path in (f"/api/jobs?namespace={other}", "/api/jobs", f"/api/jobs/{other}/theirs"):
            code, body = get(operator, path, viewer)
            assert code == 403, (path, body)
            assert "may not list finetunejobs" in body["message"]
        code, _ = get(operator, f"/api/jobs/{other}/theirs/thumbnails/0.jpg", viewer)
        assert code == 403
        # Someone who may list everywhere sees everything.
        code, body = get(operator, "/api/jobs", admin)
        assert code == 200 and {"mine", "theirs"} <= {j["name"] for j in body["items"]}
        # The page itself carries no data and opens without a token.
        with urllib.request.urlopen(f"http://127.0.0.1:{operator.web_port}/", timeout=10) as page:
            assert page.status == 200 and b"auth.js" in page.read()
    finally:
        kube.core.delete_namespace(other)


def test_with_web_tls_the_page_is_served_over_tls_only(kube: Kube, operator: OperatorProcess, tmp_path: Path) -> None:
    """--web-tls (the chart's web.tls) serves the page with the progress endpoint's certificate."""
    from tests.certs import self_signed
    from tests.conftest import ARTIFACTS

    cert, key = self_signed(tmp_path)
    tls = OperatorProcess(
        kubeconfig=kube.cluster.kubeconfig,
        log_dir=ARTIFACTS / "web-tls",
        extra_args=[f"--tls-cert-file={cert}", f"--tls-key-file={key}", "--web-tls"],
    )
    with instead_of(operator, tls):
        context = ssl.create_default_context(cafile=cert)
        with urllib.request.urlopen(f"https://127.0.0.1:{tls.web_port}/", context=context, timeout=10) as page:
            assert page.status == 200 and b"FineTuneJobs" in page.read()
        # Plain HTTP gets no page.
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{tls.web_port}/", timeout=10).read()
