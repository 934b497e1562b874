"""The user's Ray cluster, for real: a head and a second node started with
`ray start` on this machine, a sweep joined to it from another folder with
the default relative paths, every row written by the driver, a rerun that
skips them, a node killed mid-sweep costing a retry and not a row, and the
refusals (token, storage). The fixture ends exactly the processes its
`ray start` calls created, by their ids."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil
import pytest

from conftest import ROOT, SMALL_DATA, assert_refused, pipeline_command

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A head and a worker node of one CPU each, under a private temp dir."""

    temp: Path
    port: int
    env: dict
    node_pids: dict[str, set[int]] = field(default_factory=dict)  # "head"/"worker" -> the pids its `ray start` left

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ours(self) -> set[int]:
        """Every live process of this cluster: what its `ray start` calls left, and their children."""
        pids = set()
        for pid in set().union(*self.node_pids.values()):
            try:
                process = psutil.Process(pid)
                pids |= {pid, *(c.pid for c in process.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        return pids

    def start(self, name: str, *args: str) -> None:
        before = {p.pid for p in psutil.process_iter()}
        subprocess.run([RAY, "start", *args, "--num-cpus=1", "--disable-usage-stats"], env=self.env, check=True,
                       capture_output=True, text=True, timeout=180)
        self.node_pids[name] = {p.pid for p in psutil.process_iter() if p.pid not in before
                                and str(self.temp) in " ".join(_cmdline(p))}

    def kill(self, name: str) -> None:
        """The node gone at once, as a machine that fails: its processes killed by id."""
        processes = []
        for pid in self.node_pids.pop(name):
            try:
                processes += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=10)

    def stop(self) -> None:
        processes = [psutil.Process(pid) for pid in self.ours() if psutil.pid_exists(pid)]
        for process in processes:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=15)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=10)


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


@pytest.fixture
def cluster():
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    c = Cluster(temp, free_port(), env)
    try:
        c.start("head", "--head", f"--port={c.port}", "--include-dashboard=false", f"--temp-dir={temp}/ray")
        c.start("worker", f"--address={c.address}")
        yield c
    finally:
        c.stop()
        left = c.ours()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"cluster processes left running: {sorted(left)}"


def joined(model, cluster: Cluster, *extra) -> list[str]:
    """The smoketest joined to the cluster with the default relative paths
    (data, models, evals/pipeline), as a user types it in their own folder."""
    return ["--config-name=lora_smoketest", f"model_id={model}", f"ray.address={cluster.address}", "quant.bits=[]",
            "progress=lines", *SMALL_DATA, *extra]


def home_rows(folder: Path, stage: str) -> pd.DataFrame:
    """The rows under the default results_dir (evals/pipeline) of `folder`."""
    paths = sorted((folder / "evals" / "pipeline" / stage).glob("*.csv"))
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True) if paths else pd.DataFrame()


def run_joined(args, cwd: Path, env: dict, timeout: int = 600):
    return subprocess.run(pipeline_command(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_sweep_joined_from_another_folder_writes_every_row_home_and_a_rerun_skips_them(tiny_llama, cluster,
                                                                                          tmp_path):
    folder = tmp_path / "user"
    folder.mkdir()
    assert folder.resolve() != ROOT.resolve()
    args = joined(tiny_llama, cluster, "seeds=[0,1]", "ft.num_splits=2")
    first = run_joined(args, folder, cluster.env)
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-2000:]
    assert "ray: 2 node(s) share this folder, data and models" in first.stdout
    unlearning, ft = home_rows(folder, "unlearning"), home_rows(folder, "ft")
    assert len(unlearning) == 2 and len(ft) == 4  # per seed: one run and RTT on 2 held-out splits
    assert unlearning.run_key.is_unique and ft.rtt_key.is_unique
    assert len(set(unlearning.ray_node) | set(ft.ray_node)) == 2  # jobs ran on both nodes
    assert (folder / "data" / "random_bd").is_dir() and (folder / "models" / "LORA").is_dir()
    second = run_joined(args, folder, cluster.env)
    assert second.returncode == 0 and "all 6 job(s) finished earlier; nothing to run" in second.stdout, second.stdout


def test_a_killed_node_costs_a_retry_not_a_row(tiny_llama, cluster, tmp_path):
    # long enough unlearning runs that both are in flight, one per node, when the worker node dies
    args = joined(tiny_llama, cluster, "seeds=[0,1]", "ft.num_splits=2", "ray.max_retries=3",
                  "unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN.epochs_lst=[40]")
    process = subprocess.Popen(pipeline_command(args), cwd=tmp_path, env=cluster.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    out = []
    for line in process.stdout:  # the two unlearning runs start together, one per node
        out.append(line)
        if line.startswith("sweep: "):
            time.sleep(8)
            cluster.kill("worker")
            break
    out += process.stdout.readlines()
    assert process.wait(timeout=600) == 0, "".join(out)[-4000:]
    unlearning, ft = home_rows(tmp_path, "unlearning"), home_rows(tmp_path, "ft")
    assert len(unlearning) == 2 and len(ft) == 4, "".join(out)[-3000:]
    assert unlearning.run_key.is_unique and ft.rtt_key.is_unique  # nothing lost, nothing doubled
    # every row came from the head: the run that was on the worker node ran again there
    assert len(set(unlearning.ray_node) | set(ft.ray_node)) == 1
    assert "sweep: 6 finished, 0 skipped (finished earlier), 0 failed" in "".join(out)


def test_a_driver_without_the_heads_token_is_told_so_in_one_line(tiny_llama, cluster, tmp_path):
    env = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    result = run_joined(joined(tiny_llama, cluster), tmp_path, env, timeout=120)
    assert_refused(result, "uses token authentication and refused this driver's token; export RAY_AUTH_TOKEN=",
                   tmp_path)
    assert "InvalidAuthToken" not in result.stderr + result.stdout  # not Ray's retries, line after line


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("make, data_root, models_dir, message", [
    (lambda root: None, "no_data", "models", "data_root {root}/no_data is not a readable folder there"),
    (lambda root: (root / "models").write_text("a file"), "data", "models", "models_dir {root}/models is not writable"),
])
def test_a_node_that_cannot_read_the_data_or_write_the_models_is_named_with_the_path(make, data_root, models_dir,
                                                                                      message, tmp_path):
    from toolkit.cluster import check_shared_storage
    from toolkit.settings import ConfigError

    (tmp_path / "data").mkdir()
    make(tmp_path)
    with pytest.raises(ConfigError) as refused:
        check_shared_storage(str(tmp_path), data_root, models_dir)
    line = str(refused.value)
    assert line.startswith("ray node ") and message.format(root=tmp_path) in line and "\n" not in line
    assert "storage every node mounts" in line


@pytest.mark.usefixtures("ray_session")
def test_nodes_that_share_the_folder_pass_and_leave_no_marker(tmp_path):
    from toolkit.cluster import CHECK_DIR, check_shared_storage

    (tmp_path / "data").mkdir()
    assert check_shared_storage(str(tmp_path), "data", "models") == 1
    assert (tmp_path / "models").is_dir() and not (tmp_path / "models" / CHECK_DIR).exists()
