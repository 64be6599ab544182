# fedsweep: `make run` (quickstart) and `make test` install into .venv first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp

.PHONY: install run test test-all bench gpu-check sweep lint clean

install: $(STAMP)

# Re-installs only when pyproject.toml changed since the last install (a no-op otherwise).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

run: install
	$(BIN)/python -m src.run experiment=quickstart

test: install
	$(BIN)/python -m pytest -m "not slow"

test-all: install
	$(BIN)/python -m pytest

# fedsweep vs a bare training loop vs clients trained together, the shared-machine row, then the
# client-count scaling table;
# results in benchmarks/results/ (json + markdown).
bench: install
	$(BIN)/python -m benchmarks.bench
	$(BIN)/python -m benchmarks.shared_machine
	$(BIN)/python -m benchmarks.scaling

# On a GPU machine (under 8 minutes): the tests marked gpu, vit_small32 with 50 clients per round
# sequential vs trained together, fedlora on vit_tiny at 224 px and on a real-size bf16 Qwen
# (config folder: FEDSWEEP_QWEN_CONFIG); table in benchmarks/results/gpu/.
gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check

# The CPU-sized comparison of the four algorithms (3 seeds each), then its report against fedavg
# with the rounds and MB to reach 0.5.
SWEEP_DIR := outputs/multiruns/compare_algorithms_cpu
sweep: install
	$(BIN)/python -m src.run -m experiment=compare_algorithms_cpu hydra.sweep.dir=$(SWEEP_DIR) trainer.enable_progress_bar=false
	$(BIN)/python -m src.report $(SWEEP_DIR) --baseline alg=fedavg --target 0.5

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf outputs/runs outputs/multiruns .pytest_cache .ruff_cache wandb
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
