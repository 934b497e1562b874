"""What each Ray task asks for, checked against the nodes before any task
waits for it: a task no node can hold would wait for ever, so it is refused
in one line, and a wait notices when the nodes that could hold it are gone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from toolkit.settings import ConfigError

NodeResources = Mapping[str, float]  # one node's total resources, as Ray reports them ({"CPU": 2, "GPU": 1})


@dataclass(frozen=True)
class Resources:
    num_cpus: float
    num_gpus: float
    at_once: int = 1  # tasks of this size the cluster runs side by side

    def options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def largest(nodes: Sequence[NodeResources], resource: str) -> float:
    return max((float(node.get(resource, 0)) for node in nodes), default=0.0)


def check_fits(cpus: float, gpus: float, nodes: Sequence[NodeResources], key: str) -> None:
    """Refuse a task that no single node can run (Ray would queue it for ever)."""
    if not any(float(n.get("CPU", 0)) >= cpus and float(n.get("GPU", 0)) >= gpus for n in nodes):
        have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes) or "no live node"
        what = f"{cpus:g} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
        raise ConfigError(f"{key}: a task of {what} is more than any node of the Ray cluster has ({have}); "
                          f"use at most {largest(nodes, 'CPU'):g} CPU(s) and {largest(nodes, 'GPU'):g} GPU(s) a task")


def task_resources(cpus: float, gpus_setting, nodes: Sequence[NodeResources], key: str = "ray") -> Resources:
    """Per-task CPUs and GPUs from the config and the nodes: a task never asks
    for a GPU the cluster lacks (the paper's code hung on CPU), nor for more
    than one node holds."""
    have_gpus = largest(nodes, "GPU")
    gpus = (1.0 if have_gpus >= 1 else 0.0) if gpus_setting in (None, "auto") else float(gpus_setting)
    if gpus > have_gpus:
        raise ConfigError(f"{key}.gpus_per_task: {gpus:g} is more than the {have_gpus:g} GPU(s) the largest node of "
                          "the Ray cluster has; use auto or 0")
    if cpus > largest(nodes, "CPU"):
        raise ConfigError(f"{key}.cpus_per_task: {cpus:g} is more than the {largest(nodes, 'CPU'):g} CPU(s) the "
                          "largest node of the Ray cluster has; use at most that")
    check_fits(cpus, gpus, nodes, key)
    at_once = sum(min(float(n.get("CPU", 0)) // cpus, float(n.get("GPU", 0)) // gpus if gpus else math.inf)
                  for n in nodes)
    return Resources(float(cpus), gpus, max(1, int(at_once)))


def live_nodes() -> list[dict]:
    """Each live node's total resources (Ray must be up)."""
    import ray

    return [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]


def wait_for_one(refs: Sequence, needs: Resources, poll_s: float = 15.0, nodes=live_nodes):
    """The first of `refs` to finish. While none has, every `poll_s` the live
    nodes are asked whether one can still run a task of this size (a node may
    leave mid-sweep): if none can, the wait ends in a clear error, not a hang."""
    import ray

    while True:
        done, _ = ray.wait(list(refs), num_returns=1, timeout=poll_s)
        if done:
            return done[0]
        try:
            check_fits(needs.num_cpus, needs.num_gpus, nodes(), "ray")
        except ConfigError as err:
            raise ConfigError(f"{err}; the nodes that could run the sweep's tasks have left the cluster") from None
