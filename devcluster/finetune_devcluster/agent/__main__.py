"""``python -m finetune_devcluster.agent --state-dir .cluster``: the node agent as the local
cluster starts it (``cluster.py``), until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from finetune_devcluster import agent as package
from finetune_devcluster.agent.node_agent import NodeAgent
from finetune_devcluster.agent.nodes import DEFAULT_NODES, parse_nodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_devcluster.agent", description=(package.__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--state-dir", type=Path, default=Path(".cluster"))
    parser.add_argument(
        "--nodes", default=os.environ.get("FINETUNE_AGENT_NODES", ""), help="e.g. gpu-node-1=1,gpu-node-2=2"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    agent = NodeAgent(state_dir=args.state_dir, nodes=parse_nodes(args.nodes) or DEFAULT_NODES)

    def _stop(*_: object) -> None:
        threading.Thread(target=agent.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        agent.run()
    finally:
        agent.stop()
        shutil.rmtree(agent.pods_dir / ".tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
