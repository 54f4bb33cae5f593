"""What the real node writes before it starts anything: the sandbox image, its network, the
containerd and kubelet configuration (tests/images/test_real_node.py runs them)."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import tarfile
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from finetune_devcluster import realnode


def _node(state: Path) -> realnode.RealNode:
    state.mkdir(parents=True, exist_ok=True)
    node = realnode.RealNode(SimpleNamespace(state_dir=state))  # type: ignore[arg-type]
    node.dir.mkdir(parents=True, exist_ok=True)
    return node


def test_the_pause_archive_is_a_docker_archive_ctr_imports(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF not really")
    binary.chmod(0o755)
    with tarfile.open(fileobj=io.BytesIO(realnode.pause_archive(binary))) as archive:
        files: dict[str, Any] = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    manifest = json.loads(files["manifest.json"])
    assert manifest == [{"Config": "config.json", "RepoTags": [realnode.PAUSE_IMAGE], "Layers": ["layer.tar"]}]
    config = json.loads(files["config.json"])
    assert config["config"]["Entrypoint"] == ["/pause"]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(files["layer.tar"]).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(files["layer.tar"])) as layer:
        (member,) = layer.getmembers()
    assert (member.name, member.mode & 0o111, member.uid) == ("pause", 0o111, 0)


def test_each_state_folder_gets_a_bridge_and_subnet_of_its_own(tmp_path: Path) -> None:
    one = realnode.Network.for_state(tmp_path / "a")
    assert one == realnode.Network.for_state(tmp_path / "a")
    assert one != realnode.Network.for_state(tmp_path / "b")
    assert len(one.bridge) <= 15  # the kernel's longest interface name
    assert ipaddress.ip_address(one.gateway) in ipaddress.ip_network(one.subnet)


def test_containerd_keeps_scores_it_may_not_lower_and_its_socket_fits_a_unix_path(tmp_path: Path) -> None:
    node = _node(tmp_path / ("deep" * 30) / "cluster")
    config = tomllib.loads(node._write_containerd_config().read_text())
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    # runc fails with "can't get final child's PID from pipe" where oom_score_adj may not go down.
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == realnode.PAUSE_IMAGE
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert len(config["grpc"]["address"]) < 108
    assert config["root"] == str(realnode.containerd_root())


def test_the_kubelet_listens_on_the_bridge_only_and_accepts_cgroup_v1(tmp_path: Path) -> None:
    node = _node(tmp_path / "cluster")
    config = json.loads(node._write_kubelet_config().read_text())
    assert config["failCgroupV1"] is False
    assert config["cgroupDriver"] == "cgroupfs"
    assert config["address"] == config["healthzBindAddress"] == node.address == node.network.gateway
    assert config["containerRuntimeEndpoint"] == f"unix://{node.socket}"


def test_stopping_a_cluster_without_a_real_node_touches_nothing(tmp_path: Path) -> None:
    realnode.stop_containers(tmp_path)
    realnode.clean_up(tmp_path)
    assert list(tmp_path.iterdir()) == []
