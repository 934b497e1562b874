"""The probe registry: everything probe-specific, one row each, the way a
method is one row of toolkit.registry. A probe looks at an unlearned model
after the run (RTT with a LoRA attacker, quantization, a plugin's own): its
row gives the jobs it plans for a model, the runner that does one in a Ray
worker (and returns its result row), and its marker in the figure. Its
measure in the analysis follows from its rows: a row of the `quant` table
whose `probe` column names it scores the model's forget files under the
probe, read as A is and shown as `{name}_recovered` = (probe - A) / (base - A).

Adding a probe is one `register_probe` call in a module named in
`plugins:`, and its name in `probes:` (tests/toy_probe.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from toolkit.grid import GridPoint
from toolkit.names import PROBES, Datasets


@dataclass(frozen=True)
class ProbeTarget:
    """What a probe's job builder gets: one unlearned model of the sweep."""

    planner: Any  # toolkit.planner.Planner: settings, keys and data fingerprints for the jobs it builds
    model_path: str
    dataset: Datasets
    upstream: str  # the run key of the unlearning run whose model this is (its jobs wait for it)
    point: GridPoint
    label: str


@dataclass(frozen=True)
class Probe:
    """One probe. `jobs` is None for the probes built in with RTT and the
    quantization probe (planned by their own config sections)."""

    jobs: Callable[[ProbeTarget], list] | None = None
    runner: Callable[[Any], Any] | None = None  # job -> toolkit.jobs.JobReport (with its row), in a Ray worker
    job_type: type | None = None  # the job record its builder makes (the pipeline finds the runner by it)
    marker: str = "s"  # its place in the figure (a matplotlib marker)


# The published probes first (their measures keep their columns; lora_rtt, quant8, quant4), then what plugins add.
PROBE_REGISTRY: dict[str, Probe] = {name: Probe(marker=marker) for name, marker in zip(PROBES, ("D", "P", "X"))}


def register_probe(name: str, probe: Probe) -> None:
    """Add a probe's row; a name registered twice is a mistake, not an override."""
    if name in PROBE_REGISTRY and PROBE_REGISTRY[name] != probe:
        raise ValueError(f"probe {name!r} is already registered")
    if probe.jobs is not None and (probe.runner is None or probe.job_type is None):
        raise ValueError(f"probe {name!r} plans jobs, so it needs a runner and its job type")
    PROBE_REGISTRY[str(name)] = probe


def plannable() -> list[str]:
    """The probes a sweep can name in `probes:` (those that plan their own jobs)."""
    return [name for name, probe in PROBE_REGISTRY.items() if probe.jobs is not None]


def runner_for(job_type: type) -> Callable | None:
    return next((p.runner for p in PROBE_REGISTRY.values() if p.job_type is job_type), None)


# For a probe whose plugin the analysis did not import: a marker of its own, from its name.
SPARE_MARKERS = ("v", "^", "<", ">", "*", "h", "p", "8")


def marker_of(name: str) -> str:
    probe = PROBE_REGISTRY.get(name)
    return probe.marker if probe else SPARE_MARKERS[sum(name.encode()) % len(SPARE_MARKERS)]


def measured_probes(columns) -> list[str]:
    """The probes an analysis table holds a measure of (`{name}_recovered`), in its order."""
    return [c.removesuffix("_recovered") for c in columns if c.endswith("_recovered")]
