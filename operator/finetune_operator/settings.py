"""The operator's settings, from flags and environment variables (flags win)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any

from finetune_api.contract import REPORT_AUDIENCE
from finetune_operator import __version__

DEFAULT_TRAINER_IMAGE = f"ghcr.io/finetune-operator/trainer:{__version__}"
DEFAULT_GPU_TOLERATIONS: list[dict[str, Any]] = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
]


@dataclass(frozen=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = ()
    trainer_image: str = DEFAULT_TRAINER_IMAGE
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
    web_port: int = 8083
    workers: int = 16
    kubeconfig: str = ""
    trainer_uid: int = 1000

    @property
    def cluster_wide(self) -> bool:
        return not self.namespaces


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        dest="namespaces",
        default=None,
        help="watch this namespace (repeat for more); default: all (FINETUNE_WATCH_NAMESPACES, comma-separated)",
    )
    parser.add_argument("--trainer-image", default=env("FINETUNE_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE))
    parser.add_argument("--image-pull-policy", default=env("FINETUNE_IMAGE_PULL_POLICY", "IfNotPresent"))
    parser.add_argument("--gpu-resource", default=env("FINETUNE_GPU_RESOURCE", "nvidia.com/gpu"))
    parser.add_argument(
        "--default-tolerations",
        default=env("FINETUNE_DEFAULT_TOLERATIONS", json.dumps(DEFAULT_GPU_TOLERATIONS)),
        help="JSON list of tolerations every trainer pod gets",
    )
    parser.add_argument(
        "--report-url",
        default=env("FINETUNE_REPORT_BASE_URL", ""),
        help="base URL at which trainer pods reach this operator's progress endpoint",
    )
    parser.add_argument(
        "--report-audience",
        default=env("FINETUNE_REPORT_AUDIENCE", REPORT_AUDIENCE),
        help="audience of the service-account tokens trainer pods report with",
    )
    parser.add_argument("--metrics-port", type=int, default=int(env("FINETUNE_METRICS_PORT", "8080")))
    parser.add_argument("--progress-port", type=int, default=int(env("FINETUNE_PROGRESS_PORT", "8081")))
    parser.add_argument("--health-port", type=int, default=int(env("FINETUNE_HEALTH_PORT", "8082")))
    parser.add_argument("--bind-address", default=env("FINETUNE_BIND_ADDRESS", "0.0.0.0"))
    parser.add_argument(
        "--status-interval",
        type=float,
        default=float(env("FINETUNE_STATUS_INTERVAL", "3")),
        help="seconds between two progress patches of one job's status",
    )
    parser.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("FINETUNE_LEADER_ELECTION", False),
    )
    parser.add_argument("--lease-name", default=env("FINETUNE_LEASE_NAME", "finetune-operator"))
    parser.add_argument("--lease-namespace", default=env("FINETUNE_LEASE_NAMESPACE", env("POD_NAMESPACE", "")))
    parser.add_argument("--tls-cert-file", default=env("FINETUNE_TLS_CERT_FILE", ""))
    parser.add_argument("--tls-key-file", default=env("FINETUNE_TLS_KEY_FILE", ""))
    parser.add_argument(
        "--tls-ca-file",
        default=env("FINETUNE_TLS_CA_FILE", ""),
        help="CA bundle trainers verify the progress endpoint's certificate against (copied into each job's Secret)",
    )
    parser.add_argument("--web", action=argparse.BooleanOptionalAction, default=_env_bool("FINETUNE_WEB", False))
    parser.add_argument("--web-port", type=int, default=int(env("FINETUNE_WEB_PORT", "8083")))
    parser.add_argument("--workers", type=int, default=int(env("FINETUNE_WORKERS", "16")))
    parser.add_argument("--kubeconfig", default=env("KUBECONFIG", ""))
    parser.add_argument("--trainer-uid", type=int, default=int(env("FINETUNE_TRAINER_UID", "1000")))


def from_arguments(args: argparse.Namespace) -> OperatorSettings:
    namespaces = args.namespaces
    if namespaces is None:
        namespaces = [n.strip() for n in os.environ.get("FINETUNE_WATCH_NAMESPACES", "").split(",") if n.strip()]
    tolerations = json.loads(args.default_tolerations or "[]")
    if not isinstance(tolerations, list):
        raise SystemExit("--default-tolerations must be a JSON list of tolerations")
    return OperatorSettings(
        namespaces=tuple(namespaces),
        trainer_image=args.trainer_image,
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
        web_port=args.web_port,
        workers=args.workers,
        kubeconfig=args.kubeconfig,
        trainer_uid=args.trainer_uid,
    )
