"""Before a sweep joins a Ray cluster: every node must see the driver's
folder, read the data and share the models folder (a checkpoint saved on
one node is loaded by RTT on another). One small task per node checks that,
before any model loads."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Sequence

from toolkit.settings import ConfigError

CHECK_DIR = ".cluster-check"  # under models_dir; removed after the check
FIX = ("put the project, data_root and models_dir on storage every node mounts at the same path "
       "(NFS, a cluster file system), or run without ray.address")


def write_marker(origin: str, data_root: str, models_dir: str, marker: str) -> tuple[str, str | None]:
    """On one node: (its host, what is wrong there or None), leaving a marker in models_dir."""
    host = socket.gethostname()
    if not Path(origin).is_dir():
        return host, f"the driver's folder {origin} does not exist there"
    data, models = Path(origin, data_root), Path(origin, models_dir)
    if not data.is_dir() or not os.access(data, os.R_OK | os.X_OK):
        return host, f"data_root {data} is not a readable folder there"
    try:
        (models / CHECK_DIR).mkdir(parents=True, exist_ok=True)
        (models / CHECK_DIR / marker).write_text(host)
    except OSError as err:
        return host, f"models_dir {models} is not writable there ({err.strerror or err})"
    return host, None


def missing_markers(origin: str, models_dir: str, markers: Sequence[str]) -> tuple[str, list[str]]:
    """On one node: the markers other nodes wrote that this node cannot see."""
    folder = Path(origin, models_dir, CHECK_DIR)
    return socket.gethostname(), [m for m in markers if not (folder / m).is_file()]


def alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def on_node(function, node_id: str):
    """`function` as a Ray task pinned to one node (Ray is imported only by the driver's cluster path)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(num_cpus=0)(function).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False))


def check_shared_storage(origin: str, data_root: str, models_dir: str, timeout_s: float = 120.0) -> int:
    """Refuse, in one line naming the node and the path, a cluster whose nodes
    do not share the driver's folder, data and models; returns the node count."""
    nodes = alive_nodes()
    run = uuid.uuid4().hex[:12]
    markers = {node["NodeID"]: f"{run}-{i}" for i, node in enumerate(nodes)}
    try:
        written = _gather([on_node(write_marker, node["NodeID"]).remote(origin, data_root, models_dir,
                                                                        markers[node["NodeID"]]) for node in nodes],
                          nodes, timeout_s)
        for node, (host, problem) in zip(nodes, written):
            if problem:
                raise ConfigError(f"ray node {host} ({node['NodeManagerAddress']}): {problem}; {FIX}")
        seen = _gather([on_node(missing_markers, node["NodeID"]).remote(origin, models_dir, list(markers.values()))
                        for node in nodes], nodes, timeout_s)
        hosts = {markers[node["NodeID"]]: host for node, (host, _) in zip(nodes, written)}
        for node, (host, missing) in zip(nodes, seen):
            if missing:
                raise ConfigError(f"ray node {host} ({node['NodeManagerAddress']}) cannot see models_dir "
                                  f"{Path(origin, models_dir)} as node {hosts[missing[0]]} wrote it (a checkpoint "
                                  f"saved there would not load here); {FIX}")
    finally:
        _remove_markers(Path(origin, models_dir, CHECK_DIR), markers.values())
    return len(nodes)


def _remove_markers(folder: Path, markers) -> None:
    try:
        for marker in markers:
            (folder / marker).unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        pass  # the folder could not be made (the refusal says why), or a node left something else there


def _gather(refs: list, nodes: list[dict], timeout_s: float) -> list:
    import ray

    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = nodes[refs.index(pending[0])]
        raise ConfigError(f"ray node {late['NodeManagerAddress']} did not answer the storage check within "
                          f"{timeout_s:g} s; check that it is alive (ray status)")
    return ray.get(refs)
