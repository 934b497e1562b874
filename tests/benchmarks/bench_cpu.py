"""The fast CPU path, measured: `make bench` (not part of the test run).

Every figure is a ratio against a baseline measured in the same run, each the
median of interleaved repetitions (the machines are noisy), on the embedded
model with one thread (a Ray task with one CPU):

  ratio full_step_bf16_vs_fp32     full-parameter GD step, bf16 autocast / fp32
  ratio lora_step_bf16_vs_fp32     LoRA r=8 step, bf16 autocast / fp32
  ratio lora_vs_full_step_fp32     LoRA r=8 step / full-parameter step, fp32
  ratio lora_vs_full_step_bf16     the same under bf16 autocast
  ratio eval_speedup_vs_paper      the paper's MCQ evaluation time / ours (same questions)
  ratio lora_vs_full_peak_rss      peak RSS of LoRA unlearning / full-parameter GD, each in its own process
  ratio adapter_vs_merged_bytes    adapter folder / merged checkpoint at r=8
  bytes NAME VALUE                 the sizes behind the last two

and, on the second edition's configuration (conf/rank_study_speed.yaml, fp32):

  ratio rtt_job_vs_baseline        one RTT job (its steps and its V scoring along the budget) / the same job
                                   with train.head_at_labels, train.length_buckets off and lion_update=library
  ratio stop_checks_share          the stop checks' share of an unlearning run (LoRA rank 64), sampled checks
  ratio step_fp32_vs_roofline      achieved FLOP/s of an fp32 RTT step / a matmul of the same FLOPs (goal >= 0.5)

A step is the pipeline's own (`unlearn_corpus.Training.step`): 4 forget + 4
retain MCQ rows, gradient difference, Lion. `--reps` sets the repetitions.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pipeline  # noqa: E402
from toolkit.data import data_file, load_mcq  # noqa: E402
from toolkit.device import bf16_matmul_speedup, cpu_has_native_bf16, resolve_device_policy  # noqa: E402
from toolkit.evaluation import Evaluator, letter_logits  # noqa: E402
from toolkit.facts import RandomBdSpec, write_random_bd_dataset  # noqa: E402
from toolkit.grid import GridPoint  # noqa: E402
from toolkit.models import attach_lora, load_model, load_tokenizer, resolve_model_path, save_checkpoint  # noqa: E402
from toolkit.names import Datasets, LossType  # noqa: E402
from toolkit.planner import Planner  # noqa: E402
from toolkit.prompts import Encoded, answer_letter_token_ids, collate, mcq_prompt  # noqa: E402
from toolkit.settings import EvalFiles, build_settings  # noqa: E402
from toolkit.stage import Training  # noqa: E402
from toolkit.training import make_optimizer, warmup_then_constant  # noqa: E402
from unlearn_corpus import GRADIENT_DIFFERENCE, unlearn  # noqa: E402

FORGET = [f"random_bd/split_{i}" for i in range(5)]
RETAIN = [f"random_bd/split_{i}" for i in range(5, 10)]


def facts(root: Path) -> Path:
    if not (root / "random_bd").exists():
        spec = build_settings(RandomBdSpec, compose([]).random_bd, "random_bd", facts_per_split=16)
        write_random_bd_dataset(root / "random_bd", spec)
    return root


def compose(overrides: list[str]):
    """conf/default.yaml with overrides, composed as the CLI composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="default", overrides=overrides)


def settings(model: str, data_root: Path, *, lora_rank: int | None, autocast: bool, save: str | None = None,
             epochs: int = 1):
    """The demo's unlearning settings (MCQ form, batch 4 + 4, Lion) for one
    configuration, built by the planner as in a sweep."""
    sweep = pipeline.read_settings(compose([
        f"data_root={data_root}", "device.device=cpu", f"device.bf16_autocast={str(autocast).lower()}", "progress=off",
        "unlearn.batch_size=4", "unlearn.warmup_steps=0", "unlearn.data_format=MCQ", "unlearn.types=[GD,LORA]"]))
    point = GridPoint("LORA" if lora_rank else "GD", Datasets.RANDOM_BD_SAME_RETAIN, LossType.LETTER_ANSWER, 1e-3,
                      epochs, 2.0, 999999, lora_rank=lora_rank or 0)
    return Planner(sweep).unlearn_settings(point, model, save)


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(numerator) / statistics.median(denominator)


# ---------------------------------------------------------------- steps


def step_times(model: str, data_root: Path, reps: int) -> dict[str, list[float]]:
    configs = {"full_fp32": (None, False), "full_bf16": (None, True), "lora_fp32": (8, False), "lora_bf16": (8, True)}
    trainings = {}
    for name, (rank, autocast) in configs.items():
        s = settings(model, data_root, lora_rank=rank, autocast=autocast)
        trainings[name] = Training.setup(s.train, GRADIENT_DIFFERENCE(s))
    return interleaved_step_times(trainings, reps)


def interleaved_step_times(trainings: dict[str, Training], reps: int, warmup: int = 1,
                           sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per step of each training, one step of each in turn per round
    (so drift hits all alike); the first `warmup` rounds are not kept.
    `sync` waits for queued device work (CUDA) before each clock reading."""
    batches = next(iter(trainings.values())).objective.epoch_steps(1)
    times: dict[str, list[float]] = {name: [] for name in trainings}
    names = list(trainings)
    for rep in range(reps + warmup):
        # the order turns each round: the first of a round measured up to 30% slower on one machine
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            training = trainings[name]
            sync()
            start = time.perf_counter()
            training.step(batches[rep % len(batches)])
            sync()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def paper_letter_logits(model, tokenizer, rows, batch_size: int = 8) -> torch.Tensor:
    """The paper's way: fp32, full logits at every position, batch 8, in file
    order, prompts tokenised at every evaluation."""
    letters = answer_letter_token_ids(tokenizer)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        encoded = [Encoded(ids := tokenizer(mcq_prompt(r)).input_ids, ids) for r in chunk]
        batch = collate(encoded, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = batch["attention_mask"].sum(1) - 1
        out.append(logits[torch.arange(len(chunk)), last][:, letters].float())
    return torch.cat(out)


def eval_times(model_path: str, data_root: Path, reps: int) -> tuple[list[float], list[float], int, int]:
    policy = resolve_device_policy({"device": "cpu"})  # this machine's policy (bf16 only where it is faster)
    tokenizer, model = load_tokenizer(model_path), load_model(model_path, policy).eval()
    rows = [r for name in FORGET for r in load_mcq(data_file(data_root, name))][:80]
    evaluator = Evaluator.build(tokenizer, EvalFiles(tuple(FORGET), (), "", ""), str(data_root), 0, 16, policy)
    ours_files = evaluator.forget
    ours, paper = [], []
    agree = total = 0
    for rep in range(reps + 1):
        start = time.perf_counter()
        mine = torch.cat([letter_logits(model, f.prompts, evaluator.letter_ids, evaluator.pad_token_id, 16,
                                           policy.autocast) for f in ours_files])[: len(rows)]
        middle = time.perf_counter()
        theirs = paper_letter_logits(model, tokenizer, rows)
        end = time.perf_counter()
        if rep:
            ours.append(middle - start)
            paper.append(end - middle)
        agree, total = int((mine.argmax(1) == theirs.argmax(1)).sum()), len(rows)
    return ours, paper, agree, total


# ---------------------------------------------------------------- memory and bytes


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM: unlike getrusage's
    maxrss, it does not carry over the parent's peak through fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_child(kind: str, model: str, data_root: Path, out: Path) -> None:
    """In its own process: one unlearning stage as the pipeline runs it (load,
    evaluate, 4 steps of 4 + 4 rows, evaluate, save merged) under this machine's policy."""
    torch.set_num_threads(1)
    policy = resolve_device_policy({"device": "cpu"})
    s = settings(model, data_root, lora_rank=8 if kind == "lora" else None, autocast=policy.autocast_dtype is not None,
                 save=str(out))
    s = replace(s, max_samples=16, evals=EvalFiles((FORGET[0],), (RETAIN[0],), "", ""))
    unlearn(s)
    print(json.dumps({"peak_rss": peak_rss_bytes()}))


def peak_rss(kind: str, model: str, data_root: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, __file__, "--child", kind, "--model", model, "--data", str(data_root),
                                 "--out", str(Path(tmp) / "model")], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss"]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkpoint_bytes(model: str) -> tuple[int, int]:
    policy = resolve_device_policy({"device": "cpu", "bf16_autocast": False})
    tokenizer = load_tokenizer(model)
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("adapter", "merged"):
            peft_model = attach_lora(load_model(model, policy), 8)
            save_checkpoint(peft_model, tokenizer, Path(tmp) / fmt, fmt, model)
        return folder_bytes(Path(tmp) / "adapter"), folder_bytes(Path(tmp) / "merged")


# ---------------------------------------------------------------- report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--parts", default="steps,eval,memory,bytes,rtt_steps,rtt_job,checks",
                        help="comma-separated: steps,eval,memory,bytes and, on the second edition's configuration, "
                             "rtt_steps (with the roofline), rtt_job, checks")
    parser.add_argument("--job-reps", type=int, default=2, help="interleaved repetitions of the RTT job (minutes each)")
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--data", default=str(ROOT / "data" / "bench"))
    parser.add_argument("--model", help="a local checkpoint folder (default: the embedded model)")
    parser.add_argument("--child", choices=["full", "lora"])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.child:
        peak_rss_child(args.child, args.model, Path(args.data), Path(args.out))
        return 0
    if args.reps < 5:
        parser.error(f"--reps={args.reps} is not allowed; use 5 or more")
    torch.set_num_threads(1)
    model = args.model or resolve_model_path("smollm2-135m", args.models_dir)
    data_root = facts(Path(args.data))
    parts = set(args.parts.split(","))
    print(f"# {model}; torch {torch.__version__}, one thread, {args.reps} interleaved repetitions; CPU native bf16: "
          f"{cpu_has_native_bf16()}, bf16/fp32 matmul speed {bf16_matmul_speedup(1):.2f}x, "
          f"policy: {'bf16 autocast' if resolve_device_policy({'device': 'cpu'}).autocast_dtype else 'fp32'}")
    if "steps" in parts:
        report_steps(model, data_root, args.reps)
    if "eval" in parts:
        report_eval(model, data_root, args.reps)
    if "memory" in parts:
        report_memory(model, data_root, args.reps)
    if "bytes" in parts:
        report_bytes(model)
    if parts & {"rtt_steps", "rtt_job", "checks"}:
        report_study(args.models_dir, args.reps, args.job_reps, parts)
    return 0


def report_steps(model: str, data_root: Path, reps: int) -> None:
    times = step_times(model, data_root, reps)
    for name, values in times.items():
        print(f"# step {name}: median {statistics.median(values):.3f} s")
    print(f"ratio full_step_bf16_vs_fp32 {median_ratio(times['full_bf16'], times['full_fp32']):.3f}")
    print(f"ratio lora_step_bf16_vs_fp32 {median_ratio(times['lora_bf16'], times['lora_fp32']):.3f}")
    print(f"ratio lora_vs_full_step_fp32 {median_ratio(times['lora_fp32'], times['full_fp32']):.3f}")
    print(f"ratio lora_vs_full_step_bf16 {median_ratio(times['lora_bf16'], times['full_bf16']):.3f}")


def report_eval(model: str, data_root: Path, reps: int) -> None:
    ours, paper, agree, total = eval_times(model, data_root, reps)
    print(f"# evaluation of {total} questions: ours {statistics.median(ours):.2f} s, the paper's way "
          f"{statistics.median(paper):.2f} s; same answer on {agree} of {total}")
    print(f"ratio eval_speedup_vs_paper {median_ratio(paper, ours):.2f}")


def report_memory(model: str, data_root: Path, reps: int) -> None:
    rss: dict[str, list[int]] = {"full": [], "lora": []}
    for _ in range(reps):
        for kind in rss:
            rss[kind].append(peak_rss(kind, model, data_root))
    full_rss, lora_rss = statistics.median(rss["full"]), statistics.median(rss["lora"])
    print(f"bytes peak_rss_full_gd {full_rss:.0f}")
    print(f"bytes peak_rss_lora {lora_rss:.0f}")
    print(f"ratio lora_vs_full_peak_rss {lora_rss / full_rss:.3f}")


def report_bytes(model: str) -> None:
    adapter, merged = checkpoint_bytes(model)
    print(f"bytes adapter_checkpoint {adapter}")
    print(f"bytes merged_checkpoint {merged}")
    print(f"ratio adapter_vs_merged_bytes {adapter / merged:.4f}")


# ---------------------------------------------------------------- the second edition's configuration

# The switches of train.* that make a step cheaper, each at its cost-blind value (the baseline).
SWITCHED_OFF = {"head_at_labels": False, "length_buckets": False, "lion_update": "library"}


def study_plan(models_dir: str):
    """The plan of conf/rank_study_speed.yaml, seed 0, on the exact (fp32) path, written nowhere."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from toolkit.planner import build_plan

    resolve_model_path("smollm2-135m", models_dir)  # materialised once (the GGUF file converted)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = hydra_compose(config_name="rank_study_speed", overrides=[
            "slice=[0]", "quant.bits=[]", "probes=[]", f"models_dir={models_dir}", f"data_root={ROOT / 'data'}",
            "progress=off",
            f"results_dir={tempfile.mkdtemp(prefix='bench-study-')}"])
    return build_plan(pipeline.read_settings(cfg))


def with_train(settings, **switches):
    return replace(settings, train=replace(settings.train, **switches))


def rtt_job_times(job, reps: int) -> dict[str, list[float]]:
    from finetune_corpus import finetune

    variants = {"new": job.settings, "baseline": with_train(job.settings, **SWITCHED_OFF)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps):
        for name, settings in list(variants.items())[::1 if rep % 2 == 0 else -1]:
            start = time.perf_counter()
            finetune(settings)
            times[name].append(time.perf_counter() - start)
    return times


def rtt_step_times(job, reps: int) -> dict[str, list[float]]:
    """An RTT step with every switch on, each switch off alone, and all off."""
    from finetune_corpus import Finetune

    variants = {"all on": {}, **{f"{key} off": {key: value} for key, value in SWITCHED_OFF.items()},
                "all off": SWITCHED_OFF, "lion_update=lean": {"lion_update": "lean"},
                "lion_update=compiled": {"lion_update": "compiled"}}
    settings = {name: with_train(job.settings, **switches) for name, switches in variants.items()}
    trainings = {name: Training.setup(s.train, Finetune(s)) for name, s in settings.items()}
    trainings["adapter kept unmerged (rank 64)"] = unmerged_adapter_training(job)
    return interleaved_step_times(trainings, reps)


def unmerged_adapter_training(job, rank: int = 64) -> Training:
    """RTT on a model whose unlearning adapter is kept unmerged and frozen
    (the other way to keep the update exactly, issue #35): the base weights
    train under the adapter."""
    from finetune_corpus import Finetune

    training = Training.setup(job.settings.train, Finetune(job.settings))
    model = attach_lora(training.model, rank, alpha=16)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" not in name and "embed_tokens" not in name)
    optimizer = make_optimizer(job.settings.train.optimizer, model, job.settings.train.lr, training.stage.policy,
                               job.settings.train.lion_update)
    return replace(training, model=model, optimizer=optimizer, scheduler=warmup_then_constant(optimizer, 0))


def roofline(job, reps: int) -> tuple[float, float, float]:
    """(step seconds, matmul seconds, FLOPs): an fp32 RTT step against one
    square matmul with the same FLOPs, medians of interleaved repetitions."""
    from torch.utils.flop_counter import FlopCounterMode

    from finetune_corpus import Finetune

    training = Training.setup(job.settings.train, Finetune(job.settings))
    batches = training.objective.epoch_steps(1)
    batch = max(batches, key=len)
    # counted on a twin with the eager update: nothing compiles under a dispatch mode (and Lion adds no FLOPs)
    counted = with_train(job.settings, lion_update="lean")
    with FlopCounterMode(display=False) as counter:
        Training.setup(counted.train, Finetune(counted)).step(batch)
    flops = counter.get_total_flops()
    side = round((flops / 2) ** (1 / 3))
    a, b = torch.randn(side, side), torch.randn(side, side)
    step, matmul = [], []
    for _ in range(reps + 1):
        start = time.perf_counter()
        training.step(batch)
        middle = time.perf_counter()
        a @ b
        end = time.perf_counter()
        step.append(middle - start)
        matmul.append(end - middle)
    return statistics.median(step[1:]), statistics.median(matmul[1:]), flops


def stop_check_share(run, sample: int) -> tuple[float, object]:
    settings = replace(run.settings, stop=replace(run.settings.stop, stop_check_sample=sample),
                       save=replace(run.settings.save, path=None))
    result = unlearn(settings)
    phases = result.phase_seconds
    return phases.get("checks", 0.0) / sum(phases.values()), result


def report_study(models_dir: str, reps: int, job_reps: int, parts: set[str]) -> None:
    plan = study_plan(models_dir)
    job = plan.baseline_rtt[0]  # C: an RTT job as every arm's (same files, lrs, budget), from the base model
    train = job.settings.train
    print(f"# the second edition's configuration: RTT batch {train.batch_size}, lr {train.lr}, {train.epochs} "
          f"epochs, budget {job.settings.budget}, lion_update={train.lion_update}; device.bf16_autocast="
          f"{train.device.bf16_autocast}")
    if "rtt_steps" in parts:
        steps = rtt_step_times(job, reps)
        base = statistics.median(steps["all on"])
        for name, values in steps.items():
            print(f"# rtt step {name}: median {statistics.median(values):.3f} s ({statistics.median(values) / base:.2f}x)")
        step, matmul, flops = roofline(job, reps)
        print(f"# roofline: {flops / 1e9:.1f} GFLOP a step, {flops / step / 1e9:.1f} GFLOP/s in the step, "
              f"{flops / matmul / 1e9:.1f} GFLOP/s in one square matmul of the same FLOPs")
        print(f"ratio step_fp32_vs_roofline {matmul / step:.3f}")
    if "rtt_job" in parts:
        times = rtt_job_times(job, job_reps)
        print(f"# rtt job: new {statistics.median(times['new']):.1f} s, baseline "
              f"{statistics.median(times['baseline']):.1f} s (medians of {job_reps})")
        print(f"ratio rtt_job_vs_baseline {median_ratio(times['new'], times['baseline']):.3f}")
    if "checks" in parts:
        [run] = [r for r in plan.runs if r.point.lora_rank == 64]
        sample = run.settings.stop.stop_check_sample
        share, sampled = stop_check_share(run, sample)
        exact_share, exact = stop_check_share(run, 0)
        print(f"# stop checks, LoRA rank 64: sampled ({sample} a file) stop at step {sampled.stop.step} "
              f"({sampled.stop.reason}), phases {sampled.phase_seconds}; counting every question: step "
              f"{exact.stop.step} ({exact.stop.reason}), phases {exact.phase_seconds}, share {exact_share:.3f}")
        print(f"ratio stop_checks_share {share:.3f}")


if __name__ == "__main__":
    sys.exit(main())
