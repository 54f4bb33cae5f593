"""The Helm chart: lint, render, server-side validation, install, least-privilege RBAC proven by
running the operator with the chart's ServiceAccount, upgrade and uninstall."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_devcluster import binaries
from finetune_devcluster.cluster import write_kubeconfig
from tests.bad_specs import good_manifest
from tests.conftest import ARTIFACTS, ROOT
from tests.kube import Kube, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

CHART = ROOT / "helm" / "finetune-operator"
RELEASE = "ftop"
RELEASE_NAMESPACE = "finetune-system"
FULLNAME = "ftop-finetune-operator"
# The chart's roles for people (aggregated into edit and view), not the operator's.
PEOPLE_ROLES = ("finetune-edit", "finetune-view")
ALL_FEATURES = [
    "--set", "replicaCount=2",
    "--set", "networkPolicy.enabled=true",
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "progressTLS.enabled=true",
    "--set", "progressTLS.secretName=progress-tls",
    "--set", "web.enabled=true",
    "--set", "web.tls=true",
    "--set", "grafanaDashboard.enabled=true",
    "--set", "watchNamespaces={team-a,team-b}",
    "--set", "imagePullSecrets[0].name=regcred",
    "--set", "imagePullSecrets[1].name=mirror",
]  # fmt: skip

# A minimal stand-in for the Prometheus operator's CRD, so that the apiserver knows the
# ServiceMonitor kind (the test asserts only that our object is well-formed for it).
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


def helm(cluster_kubeconfig: Path | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = binaries.ensure(["helm"])["helm"]
    env_args = [f"--kubeconfig={cluster_kubeconfig}"] if cluster_kubeconfig else []
    result = subprocess.run([str(binary), *args, *env_args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def template(*args: str) -> list[dict[str, Any]]:
    out = helm(None, "template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--kube-version", "1.36.3", *args)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_lint_is_clean() -> None:
    result = helm(None, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def test_chart_crd_is_the_generated_one_and_versions_match() -> None:
    chart_files = sorted(p.name for p in (CHART / "crds").iterdir())
    assert (
        chart_files
        == sorted(p.name for p in (ROOT / "crds").iterdir())
        == [
            "finetunejobs.finetune.dev.yaml",
            "immutable-spec.finetune.dev.yaml",
            "job-policy.finetune.dev.yaml",
        ]
    )
    for name in chart_files:
        assert (CHART / "crds" / name).read_text() == (ROOT / "crds" / name).read_text(), (
            f"helm/finetune-operator/crds/{name} is stale: run `make crds`"
        )
    from finetune_operator import __version__

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__


def test_the_chart_refuses_a_cluster_without_validating_admission_policies() -> None:
    """The immutability policy in crds/ is admissionregistration.k8s.io/v1, GA in 1.30."""
    result = helm(None, "template", RELEASE, str(CHART), "--kube-version", "1.29.10", check=False)
    assert result.returncode != 0
    assert ">=1.30.0-0" in result.stderr and "1.29.10" in result.stderr
    assert helm(None, "template", RELEASE, str(CHART), "--kube-version", "1.30.0").returncode == 0


def test_values_table_in_the_chart_readme_is_current() -> None:
    result = subprocess.run(
        ["python", str(ROOT / "scripts" / "chart_docs.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_charts_job_policy_gives_admission_and_the_operator_the_same_policy(tmp_path: Path) -> None:
    """The ConfigMap the admission policy reads and the flags the operator reads, from one set of
    values (tests/policy_cases.py's), say the same thing."""
    from finetune_operator.cli import build_parser
    from finetune_operator.settings import from_arguments
    from tests.policy_cases import POLICY, PROFILES, PROFILES_ONLY, job_policy

    values = {
        "jobPolicy": {
            "images": ["registry.example/finetune/"],
            **{
                key: POLICY[key].split(",")
                for key in ("secrets", "claims", "writableClaims", "priorityClasses", "gpuResources")
            },
            "placementProfiles": PROFILES,
            "freePlacement": False,
        },
        "jobLimits": {"maxGPUs": int(POLICY["maxGPUs"]), "maxMemory": POLICY["maxMemory"]},
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    docs = template("-f", str(path))
    data = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-job-policy"))["data"]
    assert data == {
        **POLICY,
        **PROFILES_ONLY,
        "images": "ghcr.io/finetune-operator/trainer:,ghcr.io/finetune-operator/trainer@,registry.example/finetune/",
    }
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    operator = from_arguments(build_parser().parse_args(args)).policy()
    assert operator == job_policy({**PROFILES_ONLY, "images": data["images"]})
    # Not set, the chart lets jobs place their pods, at any priority class, and defines no profile.
    default = next(d for d in template() if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-job-policy"))
    assert (default["data"]["freePlacement"], default["data"]["placementProfiles"]) == ("true", "")


def test_digests_pin_the_operator_and_trainer_images() -> None:
    digest = "sha256:" + "0123456789abcdef" * 4
    docs = template("--set", f"image.digest={digest}", "--set", f"trainer.image.digest={digest}")
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/finetune-operator/operator@{digest}"
    assert f"--trainer-image=ghcr.io/finetune-operator/trainer@{digest}" in container["args"]
    # The job policy admits the pinned trainer image (its repository, by tag or digest).
    assert any(a == "--allowed-images=ghcr.io/finetune-operator/trainer:,ghcr.io/finetune-operator/trainer@"
               for a in container["args"])  # fmt: skip


def test_the_web_pages_tls_needs_the_progress_certificate() -> None:
    args = ("template", RELEASE, str(CHART), "--kube-version", "1.36.3", "--set", "web.enabled=true")
    result = helm(None, *args, "--set", "web.tls=true", check=False)
    assert result.returncode != 0 and "set progressTLS.enabled and progressTLS.secretName" in result.stderr


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": "two"}, "replicaCount"),
        ({"replicas": 2}, "additional properties 'replicas'"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
    ],
)
def test_schema_rejects_wrong_types_and_unknown_keys(tmp_path: Path, values: dict[str, Any], complaint: str) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm(None, "template", RELEASE, str(CHART), "--kube-version", "1.36.3", "-f", str(path), check=False)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_rbac_has_no_wildcards_and_secures_the_pod() -> None:
    docs = template()
    kinds = sorted(d["kind"] for d in docs)
    assert "ClusterRole" in kinds and "Deployment" in kinds and "PodDisruptionBudget" not in kinds
    for doc in docs:
        for rule in doc.get("rules", []):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule
            # Without the web page, nobody's access is the operator's to ask about.
            assert "subjectaccessreviews" not in rule["resources"], rule
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "--leader-election" not in container["args"]


def test_every_optional_feature_renders() -> None:
    docs = template(*ALL_FEATURES)
    kinds = [d["kind"] for d in docs]
    for kind in ("ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget"):
        assert kind in kinds
    # Watching two namespaces: the job permissions are Roles there; only the reviews are cluster-wide
    # (TokenReviews; with the web page, SubjectAccessReviews for its readers).
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] not in PEOPLE_ROLES]
    assert [r["rules"] for r in cluster_roles] == [
        [
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
            # status.usage.gpuProduct: the node a training pod runs on, read for its GPU product label.
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        ]
    ]
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] in ("team-a", "team-b")]
    assert len(roles) == 2
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--leader-election" in args
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert any(a.startswith("--tls-cert-file=") for a in args)
    assert any(a.startswith("--report-url=https://") for a in args)
    # The pull secrets reach the operator's pod, and by name its trainer pods.
    assert "--trainer-image-pull-secrets=regcred,mirror" in args
    # Trainer pods' /cache and /tmp are bounded by default.
    assert "--cache-size-limit=200Gi" in args and "--tmp-size-limit=20Gi" in args
    # The web page takes tokens minted for its own audience only, over TLS with progressTLS's certificate.
    assert "--web-audience=finetune-web" in args and "--web-tls" in args
    # Trainer pods may not reach the clouds' metadata services (a NetworkPolicy beside each Job).
    assert "--trainer-egress-deny=169.254.169.254/32,fd00:ec2::254/128" in args
    for role in roles:
        assert {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "create"]} in (
            role["rules"]
        )
    # The progress port takes trainer pods of the watched namespaces only (by the name label the
    # API server sets), not any pod that carries a trainer's labels.
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    progress = next(rule for rule in policy["spec"]["ingress"] if {"port": "progress"} in rule["ports"])
    assert progress["from"][0]["namespaceSelector"] == {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]
    }


@pytest.mark.parametrize("features", [[], ALL_FEATURES], ids=["defaults", "all-features"])
def test_rendered_manifests_pass_server_side_validation(kube: Kube, features: list[str]) -> None:
    kube.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
    kube.kubectl("wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com", "--timeout=30s")
    for namespace in (RELEASE_NAMESPACE, "team-a", "team-b"):
        kube.kubectl("create", "namespace", namespace, check=False)
    rendered = helm(
        None, "template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--kube-version", "1.36.3", *features
    ).stdout
    # Every object names its namespace; kubectl fails (and raises here) on any refusal.
    out = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    assert out.count("(server dry run)") == len([d for d in yaml.safe_load_all(rendered) if d])


@pytest.fixture(scope="module")
def installed(kube: Kube, operator: OperatorProcess, kueue: object) -> Iterator[Path]:
    """The chart installed for real; yields a kubeconfig with its ServiceAccount's token.

    The shared test operator (cluster-admin) is stopped meanwhile: two operators must not act
    on the same jobs.  Kueue runs (started first, since starting it restarts the shared
    operator), so the chart's permissions are tested with Kueue's API there.
    """
    kubeconfig = kube.cluster.kubeconfig
    helm(kubeconfig, "uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait", check=False)
    helm(kubeconfig, "install", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--create-namespace")
    token = kube.kubectl("-n", RELEASE_NAMESPACE, "create", "token", FULLNAME, "--duration=2h").strip()
    sa_kubeconfig = ARTIFACTS / "helm" / "sa.kubeconfig"
    sa_kubeconfig.parent.mkdir(parents=True, exist_ok=True)
    write_kubeconfig(
        sa_kubeconfig, server=kube.cluster.server, ca_file=kube.cluster.ca_file, token=token, user=FULLNAME
    )
    operator.stop()
    try:
        yield sa_kubeconfig
    finally:
        operator.start()


def _operator_with(kubeconfig: Path, name: str) -> OperatorProcess:
    # As the chart's pod runs it: in the release's namespace, keeping speeds in the chart's ConfigMap.
    proc = OperatorProcess(
        kubeconfig=kubeconfig,
        log_dir=ARTIFACTS / "helm" / name,
        env={"POD_NAMESPACE": RELEASE_NAMESPACE},
        extra_args=[f"--speeds-configmap={FULLNAME}-speeds"],
    )
    if proc.log.exists():
        proc.log.unlink()
    return proc


def test_operator_under_the_charts_service_account_runs_a_job_without_denials(
    kube: Kube, installed: Path, namespace: str, tiny_assets: Path
) -> None:
    from tests.jobs import job_manifest, prepare_claims

    assert "yes" in kube.kubectl(
        "auth", "can-i", "patch", "finetunejobs.finetune.dev", "--subresource=status",
        f"--as=system:serviceaccount:{RELEASE_NAMESPACE}:{FULLNAME}", "-A", check=False,
    )  # fmt: skip
    # A request annotation (save/sample/stop-now) is removed once done: a patch of the object.
    assert "yes" in kube.kubectl(
        "auth", "can-i", "patch", "finetunejobs.finetune.dev",
        f"--as=system:serviceaccount:{RELEASE_NAMESPACE}:{FULLNAME}", "-A", check=False,
    )  # fmt: skip
    assert "no" in kube.kubectl(
        "auth", "can-i", "delete", "secrets", f"--as=system:serviceaccount:{RELEASE_NAMESPACE}:{FULLNAME}", "-A",
        check=False,
    )  # fmt: skip
    prepare_claims(kube, namespace, tiny_assets)
    operator = _operator_with(installed, "least-privilege").start()
    try:
        # The demo's 60 steps make every call a job makes (checkpoints, samples, export).
        kube.create_ftj(namespace, job_manifest("charted"))
        status = kube.wait_phase(namespace, "charted", "Succeeded", "Failed", timeout=300)
        assert status["phase"] == "Succeeded", status
        assert status["output"]["files"]
        kube.kubectl("-n", namespace, "delete", "ftj", "charted", "--wait=true")
        log = operator.log.read_text()
    finally:
        operator.stop()
    denials = [line for line in log.splitlines() if "forbidden" in line.lower() or '"403 ' in line]
    assert not denials, "RBAC denials in the operator's log:\n" + "\n".join(denials[:5])


def test_the_charts_job_policy_admits_its_trainer_image_and_refuses_another(
    kube: Kube, installed: Path, namespace: str
) -> None:
    """By default a FineTuneJob runs the chart's trainer image (spec.image empty or that
    repository's) and no other."""

    def create(image: str) -> str:
        manifest = good_manifest(f"image-{len(image)}")
        manifest["spec"]["image"] = image
        return kube.kubectl(
            "-n", namespace, "create", "--dry-run=server", "-f", "-", check=False, input=json.dumps(manifest)
        )  # fmt: skip

    # The release's binding is in force once the API server's informers have it and its ConfigMap.
    wait_for(lambda: "is not allowed on this cluster" in create("docker.io/someone/miner:latest"), what="the binding")
    for image in (
        "",
        "ghcr.io/finetune-operator/trainer:0.1.0",
        "ghcr.io/finetune-operator/trainer@sha256:" + "a" * 64,
    ):
        assert "created (server dry run)" in create(image), image
    for image in ("docker.io/someone/miner:latest", "ghcr.io/finetune-operator/trainer-evil:1"):
        out = create(image)
        assert f"image {image} is not allowed on this cluster" in out and "jobPolicy.images" in out, out


def test_the_charts_job_policy_refuses_what_its_lists_do_not_allow_in_the_operators_words(
    kube: Kube, installed: Path, namespace: str
) -> None:
    """The release's ConfigMap set to tests/policy_cases.py's lists: the API server refuses each
    case the operator refuses (tests/unit/test_job_policy.py), in the same words, and admits the
    allowed spec.  (Through the release's binding: on Kubernetes 1.36.3 a binding made after
    another of the policy was deleted found no params for minutes.)"""
    from tests.policy_cases import POLICY, PROFILES_ONLY, REFUSED, allowed_manifest, placed_freely

    def create(manifest: dict[str, Any]) -> str:
        return kube.kubectl(
            "-n", namespace, "create", "--dry-run=server", "-f", "-", check=False, input=json.dumps(manifest)
        )  # fmt: skip

    configmap = f"{FULLNAME}-job-policy"
    before = kube.core.read_namespaced_config_map(configmap, RELEASE_NAMESPACE).data
    try:
        for overrides, admitted in (({}, [allowed_manifest(), placed_freely()]), (PROFILES_ONLY, [allowed_manifest()])):
            kube.core.patch_namespaced_config_map(configmap, RELEASE_NAMESPACE, {"data": {**POLICY, **overrides}})
            cases = [case for case in REFUSED if case.policy == overrides]
            wait_for(lambda c=cases[-1]: c.words in create(c.manifest("probe")), what=f"the lists {overrides}")
            for case in cases:
                out = create(case.manifest(f"refused-{case.id.lower()}"))
                assert "ValidatingAdmissionPolicy 'job-policy.finetune.dev'" in out, (case.id, out)
                assert case.words in out, (case.id, out)
                # (The claims' sentence names every refused claim at once, each field not.)
                assert "claim" in case.words or f"{case.field}: " in out, (case.id, out)
            for manifest in admitted:
                out = create(manifest)
                assert "created (server dry run)" in out, (overrides, manifest["metadata"]["name"], out)
    finally:
        kube.core.patch_namespaced_config_map(configmap, RELEASE_NAMESPACE, {"data": before})


def test_the_charts_service_account_runs_a_queued_job_through_kueue_without_denials(
    kube: Kube, installed: Path, namespace: str, tiny_assets: Path
) -> None:
    """Watch Workloads, deactivate one (runPolicy.suspend), read a position: all allowed."""
    from tests.jobs import job_manifest, prepare_claims
    from tests.queues import GROUP, VERSION, Queues, workloads

    prepare_claims(kube, namespace, tiny_assets)
    queues = Queues(kube)
    operator = _operator_with(installed, "least-privilege-kueue").start()
    try:
        cluster_queue = queues.gpu_queue(namespace, gpus=0)
        manifest = job_manifest(
            "queued",
            training={"maxSteps": 20},
            samples={"prompts": [], "everySteps": 0},
            resources={"gpus": 1, "cpu": "1", "memory": "2Gi"},
            runPolicy={"queueName": "gpu", "suspend": True},
        )
        kube.create_ftj(namespace, manifest)
        kube.wait_phase(namespace, "queued", "Suspended", timeout=60)
        wait_for(
            lambda: [w for w in workloads(kube, namespace) if w["spec"].get("active") is False],
            timeout=60,
            what="the Workload deactivated by the operator",
        )
        kube.patch_ftj(namespace, "queued", {"spec": {"runPolicy": {"suspend": False}}})
        waiting = wait_for(
            lambda: (s := kube.status(namespace, "queued")).get("queue", {}).get("position") and s,
            timeout=60,
            what="a position from the pending-workloads API",
        )
        assert waiting["phase"] == "Queued" and "insufficient" in waiting["message"], waiting
        queue = kube.custom.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", cluster_queue)
        queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"][2]["nominalQuota"] = 1
        kube.custom.replace_cluster_custom_object(GROUP, VERSION, "clusterqueues", cluster_queue, queue)
        status = kube.wait_phase(namespace, "queued", "Succeeded", "Failed", timeout=300)
        assert status["phase"] == "Succeeded", status
        log = operator.log.read_text()
    finally:
        operator.stop()
        queues.delete_all()
    denials = [line for line in log.splitlines() if "forbidden" in line.lower() or '"403 ' in line]
    assert not denials, "RBAC denials in the operator's log:\n" + "\n".join(denials[:5])


def test_with_a_verb_removed_the_denial_shows(kube: Kube, installed: Path, namespace: str) -> None:
    from tests.bad_specs import good_manifest

    role = kube.rbac.read_cluster_role(FULLNAME)
    original = kube.plain(role)
    rules = original["rules"]
    for rule in rules:
        if rule["resources"] == ["jobs"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "create"]
    kube.rbac.patch_cluster_role(FULLNAME, {"rules": rules})
    operator = _operator_with(installed, "missing-verb").start()
    try:
        manifest = good_manifest("denied")
        manifest["spec"]["resources"] = {"gpus": 4}
        kube.create_ftj(namespace, manifest)
        wait_for(
            lambda: "403 jobs.batch is forbidden" in operator.log.read_text(),
            timeout=60,
            what="the denial in the operator log",
        )
        assert not kube.batch.list_namespaced_job(namespace).items
    finally:
        operator.stop()
        helm(kube.cluster.kubeconfig, "upgrade", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--reuse-values")
    restored = kube.plain(kube.rbac.read_cluster_role(FULLNAME))
    assert any("create" in r["verbs"] for r in restored["rules"] if r["resources"] == ["jobs"])


def test_upgrade_rolls_the_deployment_and_uninstall_keeps_crd_and_jobs(
    kube: Kube, installed: Path, namespace: str
) -> None:
    from tests.bad_specs import good_manifest

    kubeconfig = kube.cluster.kubeconfig
    before = kube.apps.read_namespaced_deployment(FULLNAME, RELEASE_NAMESPACE)
    helm(
        kubeconfig,
        "upgrade",
        RELEASE,
        str(CHART),
        "-n",
        RELEASE_NAMESPACE,
        "--reuse-values",
        "--set",
        "statusInterval=5",
    )
    after = kube.apps.read_namespaced_deployment(FULLNAME, RELEASE_NAMESPACE)
    assert after.metadata.generation > before.metadata.generation
    assert "--status-interval=5" in after.spec.template.spec.containers[0].args
    assert (
        after.spec.template.metadata.annotations["checksum/values"]
        != before.spec.template.metadata.annotations["checksum/values"]
    )
    wait_for(
        lambda: len(kube.apps.list_namespaced_replica_set(RELEASE_NAMESPACE).items) >= 2,
        timeout=30,
        what="a new ReplicaSet (the rollout)",
    )

    kube.create_ftj(namespace, good_manifest("survivor"))
    helm(kubeconfig, "uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait")
    assert kube.kubectl("get", "crd", "finetunejobs.finetune.dev", check=False).count("finetunejobs") == 1
    assert kube.ftj(namespace, "survivor")["metadata"]["name"] == "survivor"
    assert "NotFound" in kube.kubectl("-n", RELEASE_NAMESPACE, "get", "deployment", FULLNAME, check=False)


def test_the_charts_arguments_fit_the_operator_images_entrypoint() -> None:
    dockerfile = (ROOT / "operator" / "Dockerfile").read_text()
    entrypoint = next(
        json.loads(line.split(" ", 1)[1]) for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT")
    )
    assert entrypoint == ["finetune-operator"]
    deployment = next(d for d in template() if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container
    args = container["args"]
    assert args[0] == "run"
    # Every flag the chart passes is one the operator knows.
    from finetune_operator.cli import main

    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    assert info.value.code == 0
    import argparse

    from finetune_operator.settings import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--log-format")
    parsed = parser.parse_args(args[1:])
    assert parsed.report_url.startswith("http://ftop-finetune-operator.finetune-system.svc:")
    user = next(line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER"))
    assert user.split(":")[0] == str(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"])


def test_local_queues_from_values_are_real_kueue_queues(kube: Kube, kueue: object, namespace: str) -> None:
    from tests.queues import Queues, active

    queues = Queues(kube)
    try:
        cluster_queue = queues.gpu_queue(namespace, gpus=1)
        docs = template(
            "--set", f"kueue.localQueues[0].namespace={namespace}",
            "--set", "kueue.localQueues[0].name=charted",
            "--set", f"kueue.localQueues[0].clusterQueue={cluster_queue}",
        )  # fmt: skip
        (local_queue,) = [d for d in docs if d["kind"] == "LocalQueue"]
        kube.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(local_queue))
        wait_for(
            lambda: active(
                kube.custom.get_namespaced_custom_object(
                    "kueue.x-k8s.io", "v1beta2", namespace, "localqueues", "charted"
                )
            ),
            timeout=60,
            what="the chart's LocalQueue active in Kueue",
        )
    finally:
        queues.delete_all()
    assert not [d for d in template() if d["kind"] == "LocalQueue"]


def test_the_operator_may_read_kueues_workloads_and_positions() -> None:
    rules = next(d for d in template() if d["kind"] == "ClusterRole")["rules"]
    assert {
        "apiGroups": ["kueue.x-k8s.io"],
        "resources": ["workloads"],
        "verbs": ["get", "list", "watch", "patch"],
    } in rules
    assert {
        "apiGroups": ["visibility.kueue.x-k8s.io"],
        "resources": ["localqueues/pendingworkloads"],
        "verbs": ["get"],
    } in rules


def test_people_who_may_edit_or_view_a_namespace_may_run_or_read_its_finetunejobs(kube: Kube, namespace: str) -> None:
    """The chart's finetune-edit and finetune-view are aggregated into Kubernetes' edit, admin and
    view roles (by the controller manager's aggregation controller, for real)."""
    roles = [d for d in template() if d["kind"] == "ClusterRole" and d["metadata"]["name"] in PEOPLE_ROLES]
    assert sorted(r["metadata"]["name"] for r in roles) == sorted(PEOPLE_ROLES)
    assert not [
        d for d in template("--set", "rbac.aggregateToDefaultRoles=false") if d["metadata"]["name"] in PEOPLE_ROLES
    ]
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": roles}))
    for role in ("edit", "view"):
        kube.kubectl("-n", namespace, "create", "serviceaccount", f"a-{role}")
        kube.kubectl(
            "-n", namespace, "create", "rolebinding", f"a-{role}", f"--clusterrole={role}",
            f"--serviceaccount={namespace}:a-{role}",
        )  # fmt: skip

    def may(role: str, verb: str) -> bool:
        out = kube.kubectl(
            "auth", "can-i", verb, "finetunejobs.finetune.dev", "-n", namespace,
            f"--as=system:serviceaccount:{namespace}:a-{role}", check=False,
        )  # fmt: skip
        return out.strip() == "yes"

    wait_for(lambda: may("edit", "create") and may("view", "list"), timeout=60, what="the roles aggregated")
    assert may("edit", "delete") and may("view", "get")
    assert not may("view", "create") and not may("view", "delete")
    # Roles this test applied (not a release's) go, so that a later `helm install` can own them.
    for role in PEOPLE_ROLES:
        live = json.loads(kube.kubectl("get", "clusterrole", role, "-o", "json"))
        if "meta.helm.sh/release-name" not in (live["metadata"].get("annotations") or {}):
            kube.kubectl("delete", "clusterrole", role)


def test_metrics_name_jobs_only_where_the_values_ask() -> None:
    def args(*values: str) -> list[str]:
        docs = template(*values)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])

    assert "--metrics-per-job" not in args()
    assert "--metrics-per-job" in args("--set", "metrics.perJob=true")


def test_the_charts_job_limits_reach_the_operator() -> None:
    def args(*values: str) -> list[str]:
        docs = template(*values)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])

    assert not [a for a in args() if a.startswith("--max-")]
    limited = args("--set", "jobLimits.maxGPUs=4", "--set", "jobLimits.maxMemory=128Gi")
    assert "--max-gpus-per-job=4" in limited and "--max-memory-per-job=128Gi" in limited
    refused = helm(None, "template", RELEASE, str(CHART), "--set", "jobLimits.maxMemory=lots", check=False)
    assert refused.returncode != 0 and "maxMemory" in refused.stderr


def test_the_charts_usage_settings_reach_the_operator() -> None:
    """status.usage: the GPU product label (and get on nodes to read it), prices per GPU-hour."""

    def rendered(*values: str) -> tuple[list[str], list[dict[str, Any]]]:
        docs = template(*values)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        rules = [r for d in docs if d["kind"] == "ClusterRole" for r in d.get("rules", [])]
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"]), rules

    nodes = {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}
    args, rules = rendered()
    assert "--gpu-product-label=nvidia.com/gpu.product" in args and nodes in rules
    assert not [a for a in args if a.startswith(("--gpu-hour-prices", "--currency"))]
    args, _ = rendered(
        "--set-json", 'usage.gpuHourPrices={"NVIDIA-H100-80GB-HBM3": 2.49, "L4": 0.7}', "--set", "usage.currency=EUR"
    )
    prices = next(a for a in args if a.startswith("--gpu-hour-prices="))
    assert set(filter(None, prices.removeprefix("--gpu-hour-prices=").split(","))) == {
        "NVIDIA-H100-80GB-HBM3=2.49",
        "L4=0.7",
    }
    assert "--currency=EUR" in args
    args, rules = rendered("--set", "usage.gpuProductLabel=")
    assert "--gpu-product-label=" in args and nodes not in rules
    refused = helm(None, "template", RELEASE, str(CHART), "--set", "usage.gpuHourPrices.H100=cheap", check=False)
    assert refused.returncode != 0 and "gpuHourPrices" in refused.stderr
