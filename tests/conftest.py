"""Shared fixtures and helpers: tiny tokenizers and a tiny randomly
initialised Llama (built here, so no test needs the network or the embedded
model), one Ray instance for the whole session, and the ways tests run the
pipeline: in this process through the CLI's own entry (`run_sweep`), or as a
real `python pipeline.py` process where the process boundary is what is
tested (`run_cli`)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
# Ray workers (and pipeline subprocesses) find the project and the test plugins through this.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
# The paper's random_bd lists the right answer twice in 34 of its 1570 questions: a sweep on it says so.
PAPER_DATA = "allow_repeated_answers=true"
SMALL_DATA = ["random_bd.facts_per_split=4", "random_bd.num_dev=2"]
# The suite's numeric path, given rather than measured: `auto` times bf16
# against fp32 when a sweep starts, so under load the same test could take
# either path. Tests of the bf16 path or of the policy give their own.
NUMERIC_PATH = "device.bf16_autocast=false"


def cpu_policy():
    """The suite's numeric path for tests that load a model themselves: CPU,
    fp32, no bf16 autocast (auto would time bf16 and take it on some CPUs)."""
    from toolkit.device import resolve_device_policy

    return resolve_device_policy({"device": "cpu", "bf16_autocast": False})


def on_the_suites_path(overrides) -> list[str]:
    overrides = list(overrides)
    given = any(o.lstrip("+~").startswith("device.bf16_autocast=") for o in overrides)
    return overrides if given else [*overrides, NUMERIC_PATH]


# ---------------------------------------------------------------- running the pipeline


def config(name: str = "lora_smoketest", overrides=()):
    """A config composed as the CLI composes it (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name=name, overrides=on_the_suites_path(overrides))


@dataclass
class Finished:
    """What a pipeline command returned, in or out of this process."""

    returncode: int
    stdout: str
    stderr: str


def _split_args(args) -> tuple[str, list[str]]:
    names = [a.split("=", 1)[1] for a in args if a.startswith("--config-name=")]
    return (names[-1] if names else "default"), [a for a in args if not a.startswith("--config-name=")]


def run_sweep(args) -> Finished:
    """`python pipeline.py ARGS` in this process: the same config composition
    and the same entry (`pipeline.drive`), on the session's Ray instance when
    one is up. Registry rows a plugin adds are removed afterwards (and the
    plugin module forgotten, so a later sweep imports it again); so are the probe rows."""
    import pipeline

    name, overrides = _split_args(args)
    from toolkit.probes import PROBE_REGISTRY

    cfg = config(name, overrides)
    methods, probes, modules = dict(pipeline.METHODS), dict(PROBE_REGISTRY), set(sys.modules)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = pipeline.drive(cfg)
    finally:
        pipeline.METHODS.clear()
        pipeline.METHODS.update(methods)
        PROBE_REGISTRY.clear()
        PROBE_REGISTRY.update(probes)
        for plugin in set(cfg.plugins or ()) - modules:
            sys.modules.pop(plugin, None)
    return Finished(code, out.getvalue(), err.getvalue())


def pipeline_command(args) -> list[str]:
    """`python pipeline.py ARGS` on the suite's numeric path."""
    return [sys.executable, str(ROOT / "pipeline.py"), *on_the_suites_path(args)]


def run_cli(args, cwd, timeout=600, env=None) -> Finished:
    """A real `python pipeline.py` process (its own Ray instance)."""
    result = subprocess.run(pipeline_command(args), cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return Finished(result.returncode, result.stdout, result.stderr)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) for every in-process sweep of the session."""
    import ray

    import pipeline
    from toolkit.sweep_settings import RaySettings

    pipeline.configure_logging("lines")
    pipeline.start_ray(RaySettings(address=None, num_cpus=2, cpus_per_task=1, gpus_per_task="auto", max_retries=0), "lines")
    yield
    ray.shutdown()


def assert_refused(result: Finished, message: str, root: Path) -> None:
    """Exit status 2, `message` on the one and last `error:` line, and no
    model or results folder written under `root`."""
    assert result.returncode == 2, result.stderr[-2000:] + result.stdout[-1000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], result.stderr[-2000:]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert not (root / "models").exists() and not (root / "evals").exists()


def sweep_settings(data_root, *overrides, name: str = "default"):
    """The sweep's settings for a config, read as `python pipeline.py` reads them."""
    import pipeline

    return pipeline.read_settings(config(name, [f"data_root={data_root}", "device.device=cpu", *overrides]))


def planned(cfg):
    """The plan `python pipeline.py` would run for a composed config (nothing runs)."""
    import pipeline
    from toolkit.planner import build_plan

    return build_plan(pipeline.read_settings(cfg))


def made_up_facts(**values):
    """conf/default.yaml's `random_bd` settings, with `values` instead where given."""
    from toolkit.facts import RandomBdSpec
    from toolkit.settings import build_settings

    return build_settings(RandomBdSpec, config("default").random_bd, "random_bd", **values)


def unlearn_settings(model, data_root, save_path, method: str, *, forget, retain, val, val_retain, lr=3e-3,
                     epochs=2, retain_coeff=0.0, lora_rank=0, steering_coeff=None, overrides=()):
    """One unlearning run's settings, built by the planner as in a sweep, on
    the tests' small file lists (keys given as `unlearn.*` overrides)."""
    from dataclasses import replace

    from toolkit.grid import GridPoint
    from toolkit.names import Datasets, LossType
    from toolkit.planner import Planner
    from toolkit.settings import EvalFiles

    sweep = sweep_settings(data_root, "unlearn.optimizer=adamw", "unlearn.warmup_steps=0", "unlearn.batch_size=4",
                           *overrides)
    point = GridPoint(method, Datasets.RANDOM_BD_SAME_RETAIN, LossType.CORPUS, lr, epochs, retain_coeff, 999999,
                      steering_coeff=steering_coeff, lora_rank=lora_rank)
    settings = Planner(sweep).unlearn_settings(point, str(model), str(save_path))
    return replace(settings, forget_files=tuple(forget), retain_files=tuple(retain),
                   evals=EvalFiles(tuple(val), tuple(val_retain), "", ""))


def finetune_settings(model, data_root, *, train_files, val_files, val_retain_files=(), lr, epochs,
                      probe: str = "rtt", overrides=()):
    """One RTT run's settings, built by the planner as in a sweep (`ft.*`
    overrides), on the tests' small file lists."""
    from dataclasses import replace

    from toolkit.names import Datasets
    from toolkit.planner import Planner
    from toolkit.settings import EvalFiles

    sweep = sweep_settings(data_root, f"ft.lrs=[{lr}]", f"ft.epochs_lst=[{epochs}]", f"ft.lora_rtt.lrs=[{lr}]",
                           f"ft.lora_rtt.epochs_lst=[{epochs}]", "ft.num_splits=1", *overrides)
    jobs = Planner(sweep).rtt_jobs(str(model), Datasets.RANDOM_BD_SAME_RETAIN, "baseline", upstream="", seeds=[0])
    [job] = [job for job in jobs if job.probe == probe]
    return replace(job.settings, train_files=tuple(train_files),
                   evals=EvalFiles(tuple(val_files), tuple(val_retain_files), "", ""))


def smoketest_args(model, root: Path, *extra, data_root=None) -> list[str]:
    """The LoRA smoketest on a tiny model, everything written under `root`."""
    return ["--config-name=lora_smoketest", f"model_id={model}", f"data_root={data_root or root / 'data'}",
            f"models_dir={root}/models", f"results_dir={root}/evals", "ray.num_cpus=2", "quant.bits=[]",
            *([] if data_root else SMALL_DATA), *extra]


def rows(root: Path, stage: str):
    """Every row a sweep under `root` wrote for one stage folder."""
    import pandas as pd

    paths = sorted((root / "evals" / stage).glob("*.csv"))
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True) if paths else pd.DataFrame()


def _training_text() -> list[str]:
    lines = [f"Answer: {letter}. {year}" for letter in "ABCD" for year in range(1900, 2030, 7)]
    lines += [f"{letter}. choice\nAnswer: {letter}" for letter in "ABCD"]
    lines += ["When was Aaron Abernathy born? Aaron Abernathy was born in 1965. In 1965, someone was born."]
    if SHARED_DATA.is_dir():
        for path in sorted((SHARED_DATA / "random_bd").glob("*.jsonl"))[:6]:
            lines += path.read_text(encoding="utf-8").splitlines()[:200]
    return lines


def build_tokenizer(kind: str, vocab_size: int = 600):
    """A small BPE tokenizer: byte-level ("ĠA") or SentencePiece-style ("▁A")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if kind == "byte_level":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(_training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def byte_level_tokenizer():
    return build_tokenizer("byte_level")


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return build_tokenizer("sentencepiece")


def build_tiny_llama(path: Path, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, byte_level_tokenizer) -> Path:
    """A randomly initialised 3-layer Llama (width 64) with its tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama", byte_level_tokenizer)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The paper's datasets (a sweep on them sets PAPER_DATA: random_bd lists some right answers twice)."""
    if not (SHARED_DATA / "random_bd").is_dir():
        pytest.skip("../shared/data (the paper's datasets) is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_facts(tmp_path_factory) -> Path:
    """Made-up facts written by the project's generator: 10 splits x 6 people (the planner keys a
    dataset by all its files; the tests train on the first three)."""

    root = tmp_path_factory.mktemp("facts")
    from toolkit.facts import write_random_bd_dataset

    write_random_bd_dataset(root / "random_bd", made_up_facts(num_splits=10, facts_per_split=6, seed=1))
    return root


# ---------------------------------------------------------------- sweeps shared by several tests

# 32 made-up facts a split: enough questions that the adapter and merged
# formats' accuracies, compared to 1e-6, would show a difference.
LORA_SWEEP = ["baseline_rtt=true", "seeds=[0,1]", "ft.lora_rtt.enabled=true", "ft.lora_rtt.lora_rank=2",
              "ft.lora_rtt.epochs_lst=[1]", "random_bd.facts_per_split=32"]
TOY_BLOCK = "{loss_type: CORPUS, datasets_config: {RANDOM_BD_SAME_RETAIN: {epochs_lst: [1], lrs: [1e-3], rcs: [0.0]}}}"
CUT_GRID = "unlearn.types_config.CUT.datasets_config.RANDOM_BD_SAME_RETAIN"


def sweep_frames(root: Path) -> dict:
    return {stage: rows(root, stage) for stage in ("unlearning", "ft")}


@pytest.fixture(scope="session")
def merged_sweep(tiny_llama, tmp_path_factory) -> Path:
    """The LoRA smoketest as a real command (exit status, no outputs/ folder):
    rank 4 at seeds 0 and 1, merged checkpoints, RTT on 2 held-out splits, the
    adapter-relearning probe and baseline RTT (C) per seed, on made-up facts
    (the CUT and TOY sweep reads the paper's files)."""
    root = tmp_path_factory.mktemp("merged-sweep")
    result = run_cli(smoketest_args(tiny_llama, root, *LORA_SWEEP), cwd=root)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    return root


@pytest.fixture(scope="session")
def adapter_sweep(tiny_llama, tmp_path_factory, ray_session) -> Path:
    """The same sweep with save_format=adapter, in this process."""
    root = tmp_path_factory.mktemp("adapter-sweep")
    result = run_sweep(smoketest_args(tiny_llama, root, *LORA_SWEEP, "unlearn.save_format=adapter"))
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    return root


@pytest.fixture(scope="session")
def methods_sweep(tiny_llama, shared_data, tmp_path_factory, ray_session) -> Path:
    """CUT (the RMU objective) and TOY, a method that tests/toy_method.py adds
    through the registry alone (its config block from the command line)."""
    root = tmp_path_factory.mktemp("methods-sweep")
    result = run_sweep(smoketest_args(
        tiny_llama, root, "plugins=[toy_method]", "unlearn.types=[CUT,TOY]", f"+unlearn.types_config.TOY={TOY_BLOCK}",
        "unlearn.cut_scs=[5]", f"{CUT_GRID}.epochs_lst=[1]", f"{CUT_GRID}.lrs=[1e-3]", f"{CUT_GRID}.rcs.add=[10]",
        "ft.num_splits=1", PAPER_DATA, data_root=shared_data))
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    return root
