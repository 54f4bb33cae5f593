"""``kubectl ftj``: FineTuneJobs at a glance, their sample pictures, and the trainer's log.

kubectl finds this as a plugin (the console script ``kubectl-ftj`` on the PATH):

    kubectl ftj list [-n NS | -A]                 step, loss, ETA, samples, output of each job
    kubectl ftj samples NAME -o DIR [-n NS]       the newest sample thumbnails (or, for an
                                                  object-store output, the full contact sheet)
    kubectl ftj logs NAME [-n NS] [-f]            the trainer's log, current attempt
    kubectl ftj save|sample|stop NAME [-n NS]     a checkpoint now, the samples now, or stop now
                                                  and export what there is (a request annotation
                                                  the trainer acts on at its next step)

It talks to the cluster through kubectl itself (your kubeconfig, context and namespace), and
for thumbnails to the operator's read-only web API: through ``kubectl port-forward`` to its
Service by default, or at ``--operator-url`` / ``$FINETUNE_OPERATOR_URL``.  That API lets you
see a namespace's jobs only if Kubernetes lets you list its FineTuneJobs: it is sent your
bearer token (``--token``, ``$FINETUNE_TOKEN``, or your kubeconfig's).  The apiserver's
service proxy would not pass the token on, so it is not used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _kubectl_base(args: argparse.Namespace) -> list[str]:
    """kubectl with the plugin's own --kubeconfig and --context, when given."""
    base = ["kubectl"]
    if args.kubeconfig:
        base.append(f"--kubeconfig={args.kubeconfig}")
    if args.context:
        base.append(f"--context={args.context}")
    return base


def _kubectl(args: argparse.Namespace, *command: str, capture: bool = True) -> str:
    result = subprocess.run([*_kubectl_base(args), *command], capture_output=capture, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(command)}: {(result.stderr or '').strip()}")
    return result.stdout or ""


def _namespace_args(args: argparse.Namespace) -> list[str]:
    if getattr(args, "all_namespaces", False):
        return ["--all-namespaces"]
    return ["-n", args.namespace] if args.namespace else []


def _jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    return list(json.loads(_kubectl(args, "get", "finetunejobs", *_namespace_args(args), "-o", "json"))["items"])


def _job(args: argparse.Namespace, name: str) -> dict[str, Any]:
    return dict(json.loads(_kubectl(args, "get", "finetunejob", name, *_namespace_args(args), "-o", "json")))


def _row(job: dict[str, Any]) -> list[str]:
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    output = status.get("output") or {}
    step = f"{progress.get('step', 0)}/{progress['totalSteps']}" if progress.get("totalSteps") else "-"
    loss = f"{progress['loss']:.4f}" if isinstance(progress.get("loss"), (int, float)) else "-"
    return [
        job["metadata"]["namespace"],
        job["metadata"]["name"],
        status.get("phase") or "Pending",
        step,
        loss,
        status.get("etaText") or "-",
        str(len(output.get("samples") or [])),
        # Where the result goes: the spec says it before the trainer reports it.
        output.get("uri") or ((job.get("spec") or {}).get("output") or {}).get("uri", "-").rstrip("/") or "-",
    ]


def list_jobs(args: argparse.Namespace) -> int:
    rows = [["NAMESPACE", "NAME", "PHASE", "STEP", "LOSS", "ETA", "SAMPLES", "OUTPUT"]]
    rows += [
        _row(job) for job in sorted(_jobs(args), key=lambda j: (j["metadata"]["namespace"], j["metadata"]["name"]))
    ]
    if len(rows) == 1:
        print("No FineTuneJobs found.", file=sys.stderr)
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("FINETUNE_TOKEN", "")
    if token:
        return str(token)
    token = _kubectl(args, "config", "view", "--minify", "--raw", "-o", "jsonpath={.users[0].user.token}").strip()
    if not token:
        raise SystemExit(
            "the operator's web API needs a bearer token and your kubeconfig has none (client certificates or "
            "an exec plugin): pass --token (e.g. from kubectl create token) or set FINETUNE_TOKEN"
        )
    return token


@contextlib.contextmanager
def _operator(args: argparse.Namespace) -> Iterator[str]:
    """The operator's web address: ``--operator-url``, else a ``kubectl port-forward`` to its
    Service for as long as the block runs."""
    url = args.operator_url or os.environ.get("FINETUNE_OPERATOR_URL", "")
    if url:
        yield url.rstrip("/")
        return
    forward = subprocess.Popen(
        [
            *_kubectl_base(args),
            "port-forward",
            "-n",
            args.operator_namespace,
            f"service/{args.operator_service}",
            ":web",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert forward.stdout is not None
        match = re.search(r"127\.0\.0\.1:(\d+)", forward.stdout.readline())
        if match is None:
            forward.terminate()
            error = (forward.communicate(timeout=10)[1] or "").strip()
            raise SystemExit(
                f"cannot reach the operator's web API (kubectl port-forward service/{args.operator_service} "
                f"-n {args.operator_namespace}): {error} (install the chart with web.enabled=true, or pass "
                "--operator-url)"
            )
        yield f"http://127.0.0.1:{match[1]}"
    finally:
        forward.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            forward.wait(timeout=10)


def _operator_get(base: str, path: str, token: str) -> bytes:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message", "")
        except ValueError:
            message = ""
        raise SystemExit(f"the operator's web API answered {exc.code} for {path}: {message or exc.reason}") from None


def samples(args: argparse.Namespace) -> int:
    job = _job(args, args.name)
    namespace = job["metadata"]["namespace"]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    output = (job.get("status") or {}).get("output") or {}
    uri = output.get("uri") or ""
    if uri.startswith(("s3://", "gs://")):
        return _samples_from_store(job, uri, out)
    token = _token(args)
    with _operator(args) as base:
        detail = json.loads(_operator_get(base, f"/api/jobs/{namespace}/{args.name}", token))
        thumbnails = detail.get("thumbnails") or []
        if not thumbnails:
            print(f"{namespace}/{args.name} has no samples yet", file=sys.stderr)
            return 1
        for thumb in thumbnails:
            data = _operator_get(base, f"/api/jobs/{namespace}/{args.name}/thumbnails/{thumb['index']}.jpg", token)
            target = out / (Path(thumb["name"]).stem + ".jpg")
            target.write_bytes(data)
            print(f"{target}  (step {thumb['step']}: {thumb['prompt']})")
    return 0


def _samples_from_store(job: dict[str, Any], uri: str, out: Path) -> int:
    import fsspec

    options: dict[str, Any] = {}
    endpoint = ((job.get("spec") or {}).get("storage") or {}).get("s3EndpointUrl")
    if endpoint and uri.startswith("s3://"):
        options["client_kwargs"] = {"endpoint_url": endpoint}
    fs, root = fsspec.core.url_to_fs(uri, **options)
    fetched = 0
    for path in [f"{root.rstrip('/')}/samples.png", *sorted(fs.glob(f"{root.rstrip('/')}/samples/*.png"))]:
        if fs.exists(path):
            target = out / Path(path).name
            fs.get(path, str(target))
            print(target)
            fetched += 1
    return 0 if fetched else 1


def logs(args: argparse.Namespace) -> int:
    job = _job(args, args.name)
    namespace = job["metadata"]["namespace"]
    job_name = (job.get("status") or {}).get("jobName")
    if not job_name:
        raise SystemExit(f"{namespace}/{args.name} has no Job yet")
    pods = json.loads(
        _kubectl(args, "get", "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job_name}", "-o", "json")
    )["items"]
    if not pods:
        raise SystemExit(f"the Job {job_name} has no pod yet")
    newest = max(pods, key=lambda p: p["metadata"]["creationTimestamp"])
    command = ["logs", "-n", namespace, newest["metadata"]["name"], "-c", "trainer"]
    if args.follow:
        command.append("-f")
    _kubectl(args, *command, capture=False)
    return 0


def request(args: argparse.Namespace) -> int:
    """Set the request's annotation to the time (a new value: acted on once, even if the same
    request was made before), as ``kubectl annotate --overwrite`` would."""
    import datetime as dt

    from finetune_api.contract import REQUEST_ANNOTATIONS

    value = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    annotation = REQUEST_ANNOTATIONS[args.command]
    namespace = ["-n", args.namespace] if args.namespace else []
    _kubectl(args, "annotate", "--overwrite", "finetunejobs", args.name, *namespace, f"{annotation}={value}")
    print(f"asked {args.name} to {args.command} ({annotation}={value}): the trainer acts at its next step; "
          "kubectl describe ftj shows the Event when it has")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubectl ftj", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", default="")
    parser.add_argument("--context", default="")
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", help="step, loss, ETA, samples and output of each job")
    listing.add_argument("-n", "--namespace", default="")
    listing.add_argument("-A", "--all-namespaces", action="store_true")
    listing.set_defaults(run=list_jobs)

    pictures = commands.add_parser("samples", help="download the newest sample pictures")
    pictures.add_argument("name")
    pictures.add_argument("-n", "--namespace", default="")
    pictures.add_argument("-o", "--output", required=True, help="directory to write the pictures to")
    pictures.add_argument("--operator-url", default="", help="the operator's web address (default: port-forward)")
    pictures.add_argument(
        "--token",
        default="",
        help="bearer token for the web API (default: your kubeconfig's; where the page has an audience of its "
        "own, as the chart's finetune-web, one from kubectl create token ACCOUNT --audience finetune-web)",
    )
    pictures.add_argument("--operator-namespace", default="finetune-system")
    pictures.add_argument("--operator-service", default="finetune-operator")
    pictures.set_defaults(run=samples)

    log = commands.add_parser("logs", help="the trainer's log (newest attempt)")
    log.add_argument("name")
    log.add_argument("-n", "--namespace", default="")
    log.add_argument("-f", "--follow", action="store_true")
    log.set_defaults(run=logs)

    for kind, what in (
        ("save", "save a checkpoint now"),
        ("sample", "render the samples now"),
        ("stop", "stop now and export the model as it is (Succeeded, reason StoppedEarly)"),
    ):
        asked = commands.add_parser(kind, help=what)
        asked.add_argument("name")
        asked.add_argument("-n", "--namespace", default="")
        asked.set_defaults(run=request)

    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
