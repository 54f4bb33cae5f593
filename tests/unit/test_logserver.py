"""The node agent's container-log endpoint, as the apiserver calls it for `kubectl logs`."""

from __future__ import annotations

import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_devcluster.logserver import LogServer


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pki")
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-days", "1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class Node:
    """One pod "trainer" container whose log grows while ``alive`` is set."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.alive = threading.Event()
        self.alive.set()

    def find(self, namespace: str, pod: str, container: str) -> Path | None:
        return self.log if (namespace, pod, container) == ("ns", "pod-1", "trainer") else None

    def running(self, namespace: str, pod: str, container: str) -> bool:
        return self.alive.is_set()


@pytest.fixture
def node(tmp_path: Path, certificate: tuple[Path, Path]) -> Iterator[tuple[Node, LogServer]]:
    log = tmp_path / "trainer.log"
    log.write_bytes(b"".join(f"line {i}\n".encode() for i in range(10)))
    state = Node(log)
    server = LogServer(cert=certificate[0], key=certificate[1], find=state.find, running=state.running).start()
    yield state, server
    server.stop()


def get(server: LogServer, path: str) -> tuple[int, str]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # as the apiserver calls a kubelet without a CA to check
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{server.port}{path}", context=context, timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_whole_log_its_tail_and_a_byte_limit(node: tuple[Node, LogServer]) -> None:
    _, server = node
    code, text = get(server, "/containerLogs/ns/pod-1/trainer")
    assert code == 200 and text.splitlines() == [f"line {i}" for i in range(10)]
    assert get(server, "/containerLogs/ns/pod-1/trainer?tailLines=2")[1] == "line 8\nline 9\n"
    assert get(server, "/containerLogs/ns/pod-1/trainer?tailLines=0")[1] == ""
    assert get(server, "/containerLogs/ns/pod-1/trainer?limitBytes=9")[1] == "line 0\nli"


def test_follow_streams_new_lines_and_ends_with_the_container(node: tuple[Node, LogServer]) -> None:
    state, server = node

    def trainer() -> None:
        for i in range(10, 13):
            time.sleep(0.3)
            with open(state.log, "a") as handle:
                handle.write(f"line {i}\n")
        state.alive.clear()

    writer = threading.Thread(target=trainer)
    writer.start()
    started = time.monotonic()
    code, text = get(server, "/containerLogs/ns/pod-1/trainer?follow=true&tailLines=1")
    writer.join()
    assert code == 200
    assert text.splitlines() == ["line 9", "line 10", "line 11", "line 12"]
    assert time.monotonic() - started >= 0.9  # it waited for the lines written after the request


def test_unknown_containers_previous_instances_and_other_paths_are_refused(node: tuple[Node, LogServer]) -> None:
    _, server = node
    code, text = get(server, "/containerLogs/ns/pod-1/sidecar")
    assert code == 404 and 'container "sidecar" in pod "pod-1"' in text
    code, text = get(server, "/containerLogs/ns/pod-1/trainer?previous=true")
    assert code == 400 and "previous terminated container" in text
    assert get(server, "/exec/ns/pod-1/trainer")[0] == 404
    assert get(server, "/containerLogs/ns/../etc")[0] == 404
