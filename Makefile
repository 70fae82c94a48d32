# The README's commands. Each target is one script; see scripts/.
.PHONY: demo test bench faults

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

# qt-deps.sh: the GUI benchmark needs Qt's system libraries on a bare machine.
bench:
	bash scripts/engine.sh && bash scripts/venv.sh && bash scripts/qt-deps.sh && \
		bash scripts/base-image.sh && .venv/bin/python bench/run.py

faults:
	bash scripts/faults.sh

# The private two-node Slurm test cluster of issue #16 (scripts/cluster.sh):
# up prints the DoPQ config for it; test-slurm runs the Slurm tests against it
# (they find the config in DOPQ_SLURM_CONFIG).
.PHONY: cluster-up cluster-down test-slurm
cluster-up:
	bash scripts/engine.sh && bash scripts/base-image.sh && bash scripts/cluster.sh up

cluster-down:
	bash scripts/cluster.sh down

test-slurm:
	bash scripts/engine.sh && bash scripts/venv.sh && bash scripts/base-image.sh && \
		cfg=$$(bash scripts/cluster.sh up | tail -n 1) && \
		DOPQ_SLURM_FULL=1 DOPQ_SLURM_CONFIG=$$cfg QT_QPA_PLATFORM=offscreen \
		.venv/bin/pytest -q -p no:cacheprovider -m slurm tests

# The API under load (issue 17): figures and PNG in bench/results; the "before"
# line comes from bench/results/api-before.json when it is there (bench_api.py's docstring).
.PHONY: bench-api
bench-api:
	bash scripts/engine.sh && bash scripts/venv.sh && bash scripts/base-image.sh && \
		.venv/bin/python bench/bench_api.py --json bench/results/api.json \
		--png bench/results/api.png --before bench/results/api-before.json

# Large contexts: a 1 GB checkpoint through both doors against docker build
# (bench/results/context.json); `make bench-context QUICK=1`: 100 MB, context-quick.json.
.PHONY: bench-context
bench-context:
	bash scripts/engine.sh && bash scripts/venv.sh && bash scripts/base-image.sh && \
		.venv/bin/python bench/bench_context.py $(if $(QUICK),--quick) \
		--json bench/results/context$(if $(QUICK),-quick).json

# Workload W on the Slurm test cluster (issue #16, item 4): DoPQ-on-Slurm against
# plain sbatch of the same containers; figures in bench/results/slurm.json.
.PHONY: bench-slurm
bench-slurm:
	bash scripts/engine.sh && bash scripts/venv.sh && bash scripts/base-image.sh && \
		bash scripts/cluster.sh up >/dev/null && \
		.venv/bin/python bench/bench_slurm.py --json bench/results/slurm.json
