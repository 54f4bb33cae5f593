"""``finetune-operator``: run the operator, or print the CRD it serves."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from finetune_operator import __version__, logs
from finetune_operator.settings import add_arguments, from_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the operator (watches FineTuneJobs)")
    add_arguments(run)
    run.add_argument(
        "--log-format",
        choices=["json", "text"],
        default="json",
        help="one JSON object a line, or key=value text for a terminal (default: json)",
    )
    run.add_argument("--verbose", "-v", action="store_true", help="log at debug level (default: info)")
    commands.add_parser(
        "crd",
        help="print what to install before the operator: the FineTuneJob CRD, the admission policy that keeps "
        "its fixed fields fixed and the job policy's (bound by the chart to its jobPolicy) "
        "(kubectl apply --server-side -f -)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "crd":
        from finetune_api import job_policy
        from finetune_api.crd import render_crd
        from finetune_api.policy import render_policy

        sys.stdout.write(render_crd())
        sys.stdout.write("---\n" + render_policy())
        sys.stdout.write("---\n" + job_policy.render_policy())
        return 0

    logs.configure(logging.DEBUG if args.verbose else logging.INFO, json_output=args.log_format == "json")
    # kopf imports the official Kubernetes client when it is installed, only to recognise its
    # model classes; the operator never uses it, and it costs about 60 MB of memory.
    sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]
    from finetune_operator.app import run_operator

    settings = from_arguments(args)
    return asyncio.run(run_operator(settings))


if __name__ == "__main__":
    sys.exit(main())
