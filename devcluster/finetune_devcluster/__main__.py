"""``python -m finetune_devcluster up|down|status``: the local control plane for people."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune_devcluster import cluster, realnode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_devcluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=cluster.DEFAULT_STATE_DIR)
    parser.add_argument("--no-agent", action="store_true", help="start no node agent (no GPU nodes)")
    parser.add_argument(
        "--kueue",
        action="store_true",
        help="start Kueue too (batch/Job integration, webhooks, pending-workloads API)",
    )
    parser.add_argument(
        "--real-node",
        action="store_true",
        help="add a node run by a real kubelet and containerd, with the trainer image `make images` built",
    )
    args = parser.parse_args(argv)
    state = args.state_dir
    if args.command == "up":
        try:
            local = cluster.LocalCluster(state_dir=state).start(agent=not args.no_agent, kueue=args.kueue)
            node = realnode.RealNode(local).start(images=[realnode.trainer_image()]) if args.real_node else None
        except (cluster.ClusterError, RuntimeError) as exc:
            print(f"cluster-up failed: {exc}", file=sys.stderr)
            if args.real_node and (state / "processes.json").is_file():
                cluster.load(state).stop()
            return 1
        print(f"export KUBECONFIG={local.kubeconfig}")
        print("kubectl get nodes   # the GPU nodes; `make cluster-down` stops everything")
        if node is not None:
            print(
                f"# {node.name} is a real kubelet's node: select it with nodeSelector {realnode.NODE_LABEL}: 'true'.\n"
                f"# Its pods reach this machine at {node.address}: run the operator with\n"
                f"#   --bind-address={node.address} --report-url=http://{node.address}:8081"
            )
        if args.kueue:
            print("kubectl get clusterqueues,localqueues -A   # Kueue runs; examples/kueue/ has a setup")
        return 0
    if not (state / "processes.json").is_file():
        print(f"no cluster is running from {state}")
        return 0
    local = cluster.load(state)
    if args.command == "down":
        local.stop()
        print("cluster stopped")
        return 0
    for proc in local.processes:
        print(f"{proc.name:26} pid {proc.pid:<8} {'running' if cluster._pid_alive(proc.pid) else 'exited'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
