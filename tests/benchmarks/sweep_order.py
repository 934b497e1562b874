"""The sweep's job order (`pipeline.JobQueue`) against starting every
unlearning run first, simulated: no model, no Ray, seconds to run.

Jobs are shaped like the CPU demo's (measured there: an unlearning run takes
about 8 minutes, varying with the step where the stop rule stops it; an RTT
run about 1 minute; a quantization probe about half a minute; a third of the
runs are flagged and get no probes). Each draw gives the runs random
lengths; both orders run the same draw on the same number of slots. Prints,
as ratios against starting every run first (medians over the draws): the
sweep's total time, and the time until the first run has all its probes
(the first complete row of the table).
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import JobQueue  # noqa: E402


@dataclass
class RunsFirst(JobQueue):
    """The baseline: every unlearning run starts before any probe or control."""

    def pop(self):
        return next(jobs for jobs in (self.runs, self.probes, self.others) if jobs).popleft()


@dataclass(frozen=True, eq=False)
class Job:
    minutes: float
    run: int | None = None  # the unlearning run this probe needs
    probes: tuple = field(default=())  # an unlearning run's probes


def draw(rng: random.Random, runs: int) -> tuple[list[Job], list[Job]]:
    unlearning = []
    for i in range(runs):
        flagged = rng.random() < 1 / 3
        probes = () if flagged else (Job(1.0, i), Job(1.0, i), Job(0.5, i), Job(0.5, i))
        unlearning.append(Job(rng.uniform(4, 12), None, probes))
    controls = [Job(1.0) for _ in range(8)] + [Job(0.5) for _ in range(2)]  # C per seed and split, floor, quant
    return unlearning, controls


def simulate(queue: JobQueue, unlearning: list[Job], controls: list[Job]) -> tuple[float, float]:
    """(total time, time of the first run whose probes are all done)."""
    queue.runs.extend(unlearning)
    queue.others.extend(controls)
    left = {i: len(job.probes) for i, job in enumerate(unlearning)}
    running: list = []
    first_row = now = 0.0

    def fill(now: float) -> None:
        while len(running) < queue.at_once and queue:
            job = queue.pop()
            heapq.heappush(running, (now + job.minutes, id(job), job))

    fill(0.0)
    while running:
        now, _, job = heapq.heappop(running)
        if job.probes:
            queue.probes.extend(job.probes)
        elif job.run is not None:
            left[job.run] -= 1
            if left[job.run] == 0 and not first_row:
                first_row = now
        fill(now)
    return now, first_row or now


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args(argv)
    total, first = [], []
    for seed in range(args.draws):
        ours = simulate(JobQueue(args.slots), *draw(random.Random(seed), args.runs))
        base = simulate(RunsFirst(args.slots), *draw(random.Random(seed), args.runs))
        total.append(ours[0] / base[0])
        first.append(ours[1] / base[1])
    print(f"# {args.draws} draws, {args.runs} unlearning runs, {args.slots} slots")
    print(f"ratio total_time_vs_runs_first {statistics.median(total):.3f} (5-95%: "
          f"{statistics.quantiles(total, n=20)[0]:.3f}-{statistics.quantiles(total, n=20)[-1]:.3f})")
    print(f"ratio first_row_vs_runs_first {statistics.median(first):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
