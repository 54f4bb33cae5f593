"""The NodeAgent: one process acting as the kubelet of a few nodes, composing the agent's
parts (nodes, volumes, pods and their containers) and the kubelet API's log endpoint."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from kubernetes import config

from finetune_devcluster.agent.containers import Containers
from finetune_devcluster.agent.nodes import DEFAULT_NODES, Nodes, NodeSpec
from finetune_devcluster.agent.pods import Pods
from finetune_devcluster.agent.volumes import Volumes
from finetune_devcluster.logserver import LogServer

LOG = logging.getLogger("node-agent")


class NodeAgent:
    def __init__(self, *, state_dir: Path, nodes: tuple[NodeSpec, ...] = DEFAULT_NODES) -> None:
        self.state_dir = state_dir.resolve()
        self.node_names = {n.name for n in nodes}
        kubeconfig = self.state_dir / "system-node-agent.kubeconfig"
        if not kubeconfig.is_file():
            kubeconfig = self.state_dir / "kubeconfig"
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.api_client.configuration.connection_pool_maxsize = 32
        self.stopping = threading.Event()
        self.pods_dir = self.state_dir / "pods"
        self.log_server: LogServer | None = None
        self.nodes = Nodes(self.api_client, nodes)
        self.volumes = Volumes(self.api_client, volumes_dir=self.state_dir / "volumes")
        self.pods = Pods(
            self.api_client,
            node_names=self.node_names,
            pods_dir=self.pods_dir,
            volumes=self.volumes,
            containers=Containers(self.api_client, state_dir=self.state_dir),
            stopping=self.stopping,
        )

    def register_nodes(self) -> None:
        self.nodes.register(kubelet_port=self.log_server.port if self.log_server else None)
        self.volumes.ensure_storage_class()
        self.nodes.heartbeat()

    def run(self) -> None:
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self._start_log_server()
        self.register_nodes()
        threads = [
            threading.Thread(target=self.nodes.heartbeat_loop, args=(self.stopping,), name="heartbeat", daemon=True),
            threading.Thread(
                target=self.volumes.provision_loop, args=(self.stopping,), name="provisioner", daemon=True
            ),
            threading.Thread(target=self.pods.watch_loop, name="pods", daemon=True),
        ]
        for thread in threads:
            thread.start()
        LOG.info("event=agent-started nodes=%s", ",".join(sorted(self.node_names)))
        self.stopping.wait()

    def _start_log_server(self) -> None:
        # Any serving certificate will do: the apiserver does not check the kubelet's unless told
        # to (--kubelet-certificate-authority); the cluster's own one names 127.0.0.1.
        cert, key = self.state_dir / "pki" / "apiserver.crt", self.state_dir / "pki" / "apiserver.key"
        if not (cert.is_file() and key.is_file()):
            LOG.warning("event=no-kubelet-api reason=no-certificate path=%s (kubectl logs will not work)", cert)
            return
        self.log_server = LogServer(
            cert=cert, key=key, find=self.pods.container_log, running=self.pods.container_running
        )
        self.log_server.start()
        LOG.info("event=kubelet-api-started port=%d", self.log_server.port)

    def stop(self) -> None:
        self.stopping.set()
        if self.log_server is not None:
            self.log_server.stop()
        self.pods.stop()
