"""The GPU step, measured (not part of the test run; needs CUDA).

The pipeline's own `Training.step` (4 forget + 4 retain MCQ rows, gradient
difference) under the CUDA policy (bf16 weights, sdpa or flash-attention),
interleaved, medians of `--reps` repetitions after 3 warm-ups:

  ratio lora_vs_full_step_bf16          LoRA r=8 step / full-parameter step (Triton Lion both)
  ratio triton_vs_plain_lion_full_step  full step with Triton Lion / with lion-pytorch's plain update

`--model PATH` takes any local checkpoint (default: the embedded model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cpu  # noqa: E402
import torch  # noqa: E402

from toolkit.models import resolve_model_path
from toolkit.settings import DeviceSettings
from toolkit.stage import Training
from unlearn_corpus import GRADIENT_DIFFERENCE

CONFIGS = {"full_triton": (None, True), "full_plain": (None, False), "lora8_triton": (8, True), "lora8_plain": (8, False)}


def training(model: str, data_root: Path, rank: int | None, triton: bool, device: str) -> Training:
    s = bench_cpu.settings(model, data_root, lora_rank=rank, autocast=False)
    train = replace(s.train, device=DeviceSettings(device=device, dtype="auto", attn_implementation="auto",
                                                       triton_lion=triton and device == "cuda", bf16_autocast="auto"))
    return Training.setup(train, GRADIENT_DIFFERENCE(replace(s, train=train)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local checkpoint folder (default: the embedded model)")
    parser.add_argument("--models-dir", default=str(bench_cpu.ROOT / "models"))
    parser.add_argument("--data", default=str(bench_cpu.ROOT / "data" / "bench"))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this script")
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.error(f"--reps={args.reps} is not allowed; use 5 or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda: CUDA is not available on this machine; this benchmark needs a GPU")
    model = args.model or resolve_model_path("smollm2-135m", args.models_dir)
    data_root = bench_cpu.facts(Path(args.data))
    trainings = {name: training(model, data_root, rank, triton, args.device) for name, (rank, triton) in CONFIGS.items()}
    policy = trainings["full_triton"].stage.policy
    print(f"# {model}; torch {torch.__version__}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; "
          f"policy {policy.dtype}, {policy.attn_implementation}; {args.reps} interleaved repetitions")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = bench_cpu.interleaved_step_times(trainings, args.reps, warmup=3, sync=sync)
    for name, values in times.items():
        print(f"# step {name}: median {1000 * statistics.median(values):.1f} ms")
    print(f"ratio lora_vs_full_step_bf16 {bench_cpu.median_ratio(times['lora8_triton'], times['full_triton']):.3f}")
    print(f"ratio triton_vs_plain_lion_full_step {bench_cpu.median_ratio(times['full_triton'], times['full_plain']):.3f}")
    if args.device == "cuda":
        print(f"bytes peak_gpu_memory_all_four {torch.cuda.max_memory_allocated()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
