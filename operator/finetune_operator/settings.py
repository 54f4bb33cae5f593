"""The operator's settings, from flags and environment variables (flags win)."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune_api import job_policy
from finetune_api.contract import REPORT_AUDIENCE
from finetune_api.rules import QUANTITY_PATTERN
from finetune_operator import __version__, usage
from finetune_operator.render.egress import DEFAULT_DENIED, parse_denied

# A namespace's name (an RFC 1123 label): what --namespace takes.
NAMESPACE_NAME = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DEFAULT_TRAINER_IMAGE = f"ghcr.io/finetune-operator/trainer:{__version__}"
# What a trainer pod may write to its node's disk: /cache (downloads, the latent cache) and /tmp.
DEFAULT_CACHE_SIZE_LIMIT = "200Gi"
DEFAULT_TMP_SIZE_LIMIT = "20Gi"
DEFAULT_GPU_TOLERATIONS: list[dict[str, Any]] = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
]


@dataclass(frozen=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = ()
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    trainer_image_pull_secrets: tuple[str, ...] = ()
    image_pull_policy: str = "IfNotPresent"
    gpu_resource: str = "nvidia.com/gpu"
    default_tolerations: tuple[dict[str, Any], ...] = tuple(DEFAULT_GPU_TOLERATIONS)
    report_url: str = ""
    report_audience: str = REPORT_AUDIENCE
    metrics_port: int = 8080
    progress_port: int = 8081
    health_port: int = 8082
    bind_address: str = "0.0.0.0"
    status_interval: float = 3.0
    # How long a finer reason alone (same phase, no progress), or a step a pod passes in a
    # moment (Scheduling, PodStarting), must hold before it is written.
    reason_settle: float = 1.0
    leader_election: bool = False
    lease_name: str = "finetune-operator"
    lease_namespace: str = ""
    identity: str = field(default_factory=lambda: os.environ.get("POD_NAME") or os.uname().nodename)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    web: bool = False
    # Series per FineTuneJob on /metrics (namespace, name, phase, step, loss, speed): off, the
    # port shows counts by phase, queue and namespace only, so no tenant reads another's jobs.
    metrics_per_job: bool = False
    web_port: int = 8083
    # The web page over TLS, with the progress endpoint's certificate (tls_cert_file, tls_key_file).
    web_tls: bool = False
    # The audience a web page token must be minted for; "": any token the apiserver takes (the
    # chart sets finetune-web).
    web_audience: str = ""
    workers: int = 16
    kubeconfig: str = ""
    trainer_uid: int = 1000
    cache_size_limit: str = DEFAULT_CACHE_SIZE_LIMIT
    tmp_size_limit: str = DEFAULT_TMP_SIZE_LIMIT
    # What one job may ask for here (finetune_api.job_policy, with the lists below); 0 and "": no limit.
    max_gpus_per_job: int = 0
    max_memory_per_job: str = ""
    # What one job may name here (finetune_api.job_policy): comma-separated prefixes; "": any.
    allowed_images: str = ""
    allowed_secrets: str = ""
    allowed_claims: str = ""
    allowed_writable_claims: str = ""
    allowed_priority_classes: str = ""
    allowed_gpu_resources: str = ""
    # Placement profiles by name, JSON (finetune_api.job_policy.parse_profiles); and whether a job
    # is held to them (its own node selector, tolerations, affinity, priority class refused).
    placement_profiles: str = ""
    placement_profiles_only: bool = False
    # Addresses trainer pods may not connect to (render.egress): comma-separated CIDRs; "": no policy.
    trainer_egress_deny: str = ",".join(DEFAULT_DENIED)
    # status.usage: the node label naming a node's GPU model, and prices per GPU-hour by its value.
    gpu_product_label: str = "nvidia.com/gpu.product"
    gpu_hour_prices: str = ""
    currency: str = "USD"
    # status.estimate: the ConfigMap (in the operator's namespace) of finished jobs' speeds; "": none kept.
    speeds_configmap: str = "finetune-operator-speeds"
    operator_namespace: str = field(default_factory=lambda: os.environ.get("POD_NAMESPACE") or "default")

    def policy(self) -> job_policy.JobPolicy:
        """What one job may name and ask for here, from the --allowed-*, placement and --max-* flags."""
        return job_policy.JobPolicy.from_lists(
            images=self.allowed_images,
            secrets=self.allowed_secrets,
            claims=self.allowed_claims,
            writable_claims=self.allowed_writable_claims,
            priority_classes=self.allowed_priority_classes,
            gpu_resources=self.allowed_gpu_resources,
            profiles=job_policy.parse_profiles(self.placement_profiles),
            free_placement=not self.placement_profiles_only,
            max_gpus=self.max_gpus_per_job,
            max_memory=self.max_memory_per_job,
        )

    @property
    def cluster_wide(self) -> bool:
        return not self.namespaces


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Option:
    """One flag of ``finetune-operator run``: its environment variable (flags win) and help."""

    flag: str
    env: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    dest: str = ""


# Every option, with the variable of the same name (--report-url: FINETUNE_REPORT_URL).
OPTIONS: tuple[Option, ...] = (
    Option(
        "--trainer-image",
        "FINETUNE_TRAINER_IMAGE",
        DEFAULT_TRAINER_IMAGE,
        "the trainer image of jobs that name none (spec.image)",
    ),
    Option(
        "--trainer-image-pull-secrets",
        "FINETUNE_TRAINER_IMAGE_PULL_SECRETS",
        "",
        "comma-separated names of Secrets, in each job's namespace, that trainer pods pull their image with",
    ),
    Option(
        "--image-pull-policy",
        "FINETUNE_IMAGE_PULL_POLICY",
        "IfNotPresent",
        "the trainer container's imagePullPolicy (Always, IfNotPresent, Never)",
    ),
    Option(
        "--gpu-resource",
        "FINETUNE_GPU_RESOURCE",
        "nvidia.com/gpu",
        "the extended resource a job's GPUs are asked as, unless the job names its own (spec.resources.gpuResource)",
    ),
    Option(
        "--default-tolerations",
        "FINETUNE_DEFAULT_TOLERATIONS",
        json.dumps(DEFAULT_GPU_TOLERATIONS),
        "JSON list of tolerations every trainer pod gets (GPU nodes are usually tainted)",
    ),
    Option(
        "--report-url",
        "FINETUNE_REPORT_URL",
        "",
        "base URL at which trainer pods reach this operator's progress endpoint (the chart sets its Service's)",
    ),
    Option(
        "--report-audience",
        "FINETUNE_REPORT_AUDIENCE",
        REPORT_AUDIENCE,
        "audience of the projected service-account tokens trainer pods report with",
    ),
    Option("--metrics-port", "FINETUNE_METRICS_PORT", 8080, "port of /metrics (Prometheus)", int),
    Option("--progress-port", "FINETUNE_PROGRESS_PORT", 8081, "port trainer pods push their progress to", int),
    Option("--health-port", "FINETUNE_HEALTH_PORT", 8082, "port of /healthz and /readyz (kubelet probes)", int),
    Option("--bind-address", "FINETUNE_BIND_ADDRESS", "0.0.0.0", "address every port listens on"),
    Option(
        "--status-interval",
        "FINETUNE_STATUS_INTERVAL",
        3.0,
        "seconds between two progress patches of one job's status (phases are written at once)",
        float,
    ),
    Option("--lease-name", "FINETUNE_LEASE_NAME", "finetune-operator", "the Lease that leader election holds"),
    Option(
        "--lease-namespace",
        "FINETUNE_LEASE_NAMESPACE",
        "",
        "namespace of the Lease; default: the pod's own (POD_NAMESPACE)",
    ),
    Option("--tls-cert-file", "FINETUNE_TLS_CERT_FILE", "", "certificate of the progress endpoint; none: plain HTTP"),
    Option("--tls-key-file", "FINETUNE_TLS_KEY_FILE", "", "private key of --tls-cert-file"),
    Option(
        "--tls-ca-file",
        "FINETUNE_TLS_CA_FILE",
        "",
        "CA bundle trainers verify the progress endpoint's certificate against (copied into each job's Secret)",
    ),
    Option("--web-port", "FINETUNE_WEB_PORT", 8083, "port of the web page (with --web)", int),
    Option(
        "--web-audience",
        "FINETUNE_WEB_AUDIENCE",
        "",
        "audience a token must be minted for to open the web page (the chart sets finetune-web: kubectl create "
        "token ACCOUNT --audience finetune-web), so that a token given to the page is no use against the "
        "apiserver itself; empty: any token the apiserver accepts, a person's kubeconfig token included",
    ),
    Option(
        "--workers",
        "FINETUNE_WORKERS",
        16,
        "FineTuneJobs reconciled at once (more is not faster on a busy apiserver)",
        int,
    ),
    Option("--kubeconfig", "KUBECONFIG", "", "kubeconfig to use outside a cluster; default: the pod's service account"),
    Option(
        "--trainer-uid",
        "FINETUNE_TRAINER_UID",
        1000,
        "user id the trainer container runs as (runAsUser, and the fsGroup of its volumes)",
        int,
    ),
    Option(
        "--cache-size-limit",
        "FINETUNE_CACHE_SIZE_LIMIT",
        DEFAULT_CACHE_SIZE_LIMIT,
        "most a trainer pod may write to /cache on its node (past it the kubelet evicts the pod); empty: no limit",
    ),
    Option(
        "--tmp-size-limit",
        "FINETUNE_TMP_SIZE_LIMIT",
        DEFAULT_TMP_SIZE_LIMIT,
        "most a trainer pod may write to /tmp on its node; empty: no limit",
    ),
    Option(
        "--max-gpus-per-job",
        "FINETUNE_MAX_GPUS_PER_JOB",
        0,
        "most GPUs one FineTuneJob may ask for (spec.resources.gpus); more fails it with InvalidSpec; 0: no limit",
        int,
    ),
    Option(
        "--gpu-product-label",
        "FINETUNE_GPU_PRODUCT_LABEL",
        "nvidia.com/gpu.product",
        "node label whose value names the GPU model, read from the node each training pod runs on for "
        "status.usage.gpuProduct (needs get on nodes; NVIDIA's GPU feature discovery sets the default); "
        "empty: not read",
    ),
    Option(
        "--gpu-hour-prices",
        "FINETUNE_GPU_HOUR_PRICES",
        "",
        "price of one GPU-hour by GPU product, PRODUCT=PRICE,... (e.g. NVIDIA-H100-80GB-HBM3=2.49), for "
        "status.usage.cost; empty: no cost",
    ),
    Option("--currency", "FINETUNE_CURRENCY", "USD", "the currency of --gpu-hour-prices"),
    Option(
        "--allowed-images",
        "FINETUNE_ALLOWED_IMAGES",
        "",
        "prefixes, comma-separated, one of which a FineTuneJob's spec.image must start with (its default, the "
        "trainer image, is always allowed); otherwise it fails with InvalidSpec; empty: any image",
    ),
    Option(
        "--allowed-secrets",
        "FINETUNE_ALLOWED_SECRETS",
        "",
        "prefixes, comma-separated, one of which spec.baseModel.credentialsSecret must start with; empty: any",
    ),
    Option(
        "--allowed-claims",
        "FINETUNE_ALLOWED_CLAIMS",
        "",
        "prefixes, comma-separated, one of which every claim a pvc:// URI names must start with; empty: any",
    ),
    Option(
        "--allowed-writable-claims",
        "FINETUNE_ALLOWED_WRITABLE_CLAIMS",
        "",
        "prefixes, comma-separated, one of which every claim the trainer writes to (output, class images) must "
        "start with; empty: any",
    ),
    Option(
        "--allowed-priority-classes",
        "FINETUNE_ALLOWED_PRIORITY_CLASSES",
        "",
        "prefixes, comma-separated, one of which spec.resources.priorityClassName must start with; empty: any",
    ),
    Option(
        "--allowed-gpu-resources",
        "FINETUNE_ALLOWED_GPU_RESOURCES",
        "",
        "prefixes, comma-separated, one of which a spec.resources.gpuResource a job names itself must start with "
        "(one it leaves unset is --gpu-resource); empty: any extended resource",
    ),
    Option(
        "--placement-profiles",
        "FINETUNE_PLACEMENT_PROFILES",
        "",
        'placement profiles a job picks by name (spec.resources.placementProfile), JSON: {"a100": {"nodeSelector": '
        '{...}, "tolerations": [...], "affinity": {...}, "priorityClassName": "..."}}; empty: none',
    ),
    Option(
        "--trainer-egress-deny",
        "FINETUNE_TRAINER_EGRESS_DENY",
        ",".join(DEFAULT_DENIED),
        "addresses (CIDRs, comma-separated) trainer pods may not connect to, by a NetworkPolicy beside each Job "
        "(the clouds' metadata services by default: they hand out the node's credentials); empty: no NetworkPolicy",
    ),
    Option(
        "--speeds-configmap",
        "FINETUNE_SPEEDS_CONFIGMAP",
        "finetune-operator-speeds",
        "ConfigMap in the operator's namespace (POD_NAMESPACE) where finished jobs' speeds are kept for "
        "status.estimate; empty: no estimates",
    ),
    Option(
        "--max-memory-per-job",
        "FINETUNE_MAX_MEMORY_PER_JOB",
        "",
        "most memory one FineTuneJob may ask for (spec.resources.memory, a quantity); more fails it with "
        "InvalidSpec; empty: no limit",
    ),
)
# Older names of variables, still read where the new one is not set.
OLD_VARIABLES = {"FINETUNE_REPORT_URL": "FINETUNE_REPORT_BASE_URL"}
SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("--leader-election", "FINETUNE_LEADER_ELECTION", "hold a Lease so one of several replicas works at a time"),
    ("--web", "FINETUNE_WEB", "serve the web page of jobs, their progress and samples"),
    (
        "--metrics-per-job",
        "FINETUNE_METRICS_PER_JOB",
        "one series per FineTuneJob on /metrics (its namespace, name, phase, step, loss, speed): whoever reaches "
        "the port reads every namespace's jobs; off, only counts by phase, queue and namespace",
    ),
    (
        "--web-tls",
        "FINETUNE_WEB_TLS",
        "serve the web page over TLS with --tls-cert-file and --tls-key-file (the progress endpoint's certificate, "
        "which names the operator's Service): the bearer tokens it takes do not cross the network in the clear",
    ),
    (
        "--placement-profiles-only",
        "FINETUNE_PLACEMENT_PROFILES_ONLY",
        "place trainer pods by their job's placement profile alone: a FineTuneJob that sets its own nodeSelector, "
        "tolerations, affinity or priorityClassName fails with InvalidSpec",
    ),
)


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None and name in OLD_VARIABLES:
        value = os.environ.get(OLD_VARIABLES[name])
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``run``, each with its help, its variable and its default."""
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        dest="namespaces",
        default=None,
        help="watch this namespace (repeat for more) (env FINETUNE_WATCH_NAMESPACES, comma-separated; "
        "default: all namespaces)",
    )
    for option in OPTIONS:
        raw = _env(option.env)
        default = option.default if raw is None else option.type(raw)
        shown = option.default if option.default != "" else "none"
        parser.add_argument(
            option.flag,
            type=option.type,
            default=default,
            help=f"{option.help} (env {option.env}; default: {shown})",
        )
    for flag, env, text in SWITCHES:
        parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            default=_env_bool(env, False),
            help=f"{text} (env {env}; default: off)",
        )


def from_arguments(args: argparse.Namespace) -> OperatorSettings:
    namespaces = args.namespaces
    if namespaces is None:
        namespaces = [n.strip() for n in os.environ.get("FINETUNE_WATCH_NAMESPACES", "").split(",") if n.strip()]
    patterns = [n for n in namespaces if not re.fullmatch(NAMESPACE_NAME, n)]
    if patterns:
        # kopf would take 'team-*' as a pattern and list every namespace to match it, which the
        # chart's per-namespace RBAC does not allow; the Job and Pod watches could only widen to
        # the whole cluster.  One meaning for both: names.
        raise SystemExit(
            f"--namespace takes namespace names, not {', '.join(repr(n) for n in patterns)}: name each namespace "
            "(repeat --namespace, or FINETUNE_WATCH_NAMESPACES=a,b), or leave it out to serve every namespace"
        )
    if args.max_memory_per_job and not re.fullmatch(QUANTITY_PATTERN, args.max_memory_per_job):
        raise SystemExit(f"--max-memory-per-job must be a quantity such as 64Gi, not {args.max_memory_per_job!r}")
    try:
        usage.parse_prices(args.gpu_hour_prices)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.web_tls and not (args.tls_cert_file and args.tls_key_file):
        raise SystemExit("--web-tls serves the page with the progress endpoint's certificate: set --tls-cert-file and "
                         "--tls-key-file too")  # fmt: skip
    try:
        job_policy.parse_profiles(args.placement_profiles)
        parse_denied(args.trainer_egress_deny)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    tolerations = json.loads(args.default_tolerations or "[]")
    if not isinstance(tolerations, list):
        raise SystemExit("--default-tolerations must be a JSON list of tolerations")
    return OperatorSettings(
        namespaces=tuple(namespaces),
        trainer_image=args.trainer_image,
        trainer_image_pull_secrets=tuple(n.strip() for n in args.trainer_image_pull_secrets.split(",") if n.strip()),
        image_pull_policy=args.image_pull_policy,
        gpu_resource=args.gpu_resource,
        default_tolerations=tuple(tolerations),
        report_url=args.report_url,
        report_audience=args.report_audience,
        metrics_port=args.metrics_port,
        progress_port=args.progress_port,
        health_port=args.health_port,
        bind_address=args.bind_address,
        status_interval=args.status_interval,
        leader_election=args.leader_election,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        tls_ca_file=args.tls_ca_file,
        web=args.web,
        metrics_per_job=args.metrics_per_job,
        web_port=args.web_port,
        web_audience=args.web_audience,
        web_tls=args.web_tls,
        workers=args.workers,
        kubeconfig=args.kubeconfig,
        trainer_uid=args.trainer_uid,
        cache_size_limit=args.cache_size_limit,
        tmp_size_limit=args.tmp_size_limit,
        max_gpus_per_job=args.max_gpus_per_job,
        max_memory_per_job=args.max_memory_per_job,
        allowed_images=args.allowed_images,
        allowed_secrets=args.allowed_secrets,
        allowed_claims=args.allowed_claims,
        allowed_writable_claims=args.allowed_writable_claims,
        allowed_priority_classes=args.allowed_priority_classes,
        allowed_gpu_resources=args.allowed_gpu_resources,
        placement_profiles=args.placement_profiles,
        placement_profiles_only=args.placement_profiles_only,
        trainer_egress_deny=args.trainer_egress_deny,
        gpu_product_label=args.gpu_product_label,
        gpu_hour_prices=args.gpu_hour_prices,
        currency=args.currency,
        speeds_configmap=args.speeds_configmap,
    )
