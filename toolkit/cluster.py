"""Before a sweep joins a Ray cluster: every node must see the driver's
folder, read the data and share the models folder (a checkpoint saved on
one node is loaded by RTT on another). One small task per node checks that,
before any model loads."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from toolkit.settings import ConfigError

if TYPE_CHECKING:
    from toolkit.sweep_settings import RaySettings

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


# --------------------------------------------------------------------------
# Joining: a private local instance, or a cluster that answers and accepts this driver
# --------------------------------------------------------------------------


def start_ray(ray_settings: RaySettings, progress: str) -> None:
    """A private local Ray instance unless `ray.address` names a cluster to
    join: a stale cluster address recorded on the machine is never used."""
    import ray

    if ray.is_initialized():
        return
    # Token authentication stays on; only its start-up notice is quiet.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    quiet = {"logging_level": logging.WARNING, "log_to_driver": progress == "bars", "include_dashboard": False}
    address = ray_settings.address
    if not address:
        ray.init(address="local", num_cpus=ray_settings.num_cpus, **quiet)
        return
    project = str(Path(__file__).resolve().parents[1])  # the project folder: Ray ships it to each node
    try:
        ray.init(address=address, runtime_env={"working_dir": project,
                                               "excludes": ["models", "data", "evals", "results"]}, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"ray.address: {address!r} cannot be reached ({str(err).splitlines()[0][:160]})") from None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an unreachable head for minutes; a plain TCP connect says
    in seconds whether there is anything to join ("auto" is left to Ray)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise ConfigError(f"ray.address: {address!r} cannot be reached ({err}); use host:port of a running "
                          "Ray head, or null for a local instance") from None
    check_token(address, f"{host or '127.0.0.1'}:{port}")


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 to /dev/null for a moment (what native code writes there too)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def check_token(address: str, gcs_address: str) -> None:
    """A head with token authentication refuses a driver without its token:
    say so in one line (ray.init would retry for a while, then blame the network)."""
    import ray

    try:
        with native_stderr_silenced():  # Ray's C++ client logs each refusal itself
            ray._raylet.GcsClient(address=gcs_address)
    except ray.exceptions.AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE", "")
        fix = ("export RAY_AUTH_TOKEN=<the token `ray get-auth-token` prints on the head> (or RAY_AUTH_TOKEN_PATH)"
               if mode == "token" else "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the token `ray get-auth-token` "
               "prints on the head>")
        raise ConfigError(f"ray.address: the Ray head at {address!r} uses token authentication and refused this "
                          f"driver's token; {fix}") from None
    except Exception:  # noqa: BLE001 - a private API: anything else is left to ray.init
        pass
