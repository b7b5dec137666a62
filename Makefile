# Two commands on a fresh machine (see README):
#   make all    set up .venv, run every lab headless and the benchmarks, write results/
#   make test   set up .venv, run lint, unit tests and every notebook in smoke mode
# `make lab` opens JupyterLab on notebooks/.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are installed first, pinned, so pip takes the builds these labs are tested
# with (on these machines, from local disk). Jetson: install into NVIDIA's L4T PyTorch container
# with `make install TORCH_SPEC=` to keep its own torch (see README).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Extra `python -m venv` flags. In an L4T container, VENV_ARGS=--system-site-packages lets the venv
# see the image's CUDA torch and TensorRT (a plain venv cannot, and pip would fetch a CPU torch).
VENV_ARGS ?=
STAMP := $(VENV)/.installed
RESULTS ?= results
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0

NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# What `make results` executes: the labs, and chapter 06 as its solutions (the student copies in
# notebooks/ stop at their first exercise by design; the solutions are what the answer key is read from).
RESULT_NOTEBOOKS := $(filter-out notebooks/06_%,$(NOTEBOOKS)) $(sort $(wildcard solutions/06_*.ipynb))

.PHONY: all install test lint format lab results bench report readme-table clean test-gpu

all: results

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(PY) -m pip install $(TORCH_SPEC))
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Unit tests, then every notebook in smoke mode (LAB_SMOKE=1 shrinks rounds and data, keeps every
# code path). pytest's exit code 5 means it collected nothing: that is a broken test run here.
test: lint
	@set +e; LAB_SMOKE=1 $(PY) -m pytest tests notebooks solutions --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=1200 --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: check the paths above"; exit 1; fi; exit $$rc

# Tests that need a CUDA GPU or a Jetson; elsewhere they are all skipped or deselected (exit 5 is fine).
test-gpu: $(STAMP)
	@set +e; $(PY) -m pytest tests -m "gpu or jetson"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no GPU/Jetson tests selected here"; exit 0; fi; exit $$rc

# The prepared check on a CUDA machine (CI: .github/workflows/ci-gpu.yml, ci-jetson.yml): installs
# the gpu extra (may fail: TensorRT comes from NVIDIA's index), prints the device report, runs
# test-gpu and notebook 04 with LAB_DEVICE=cuda in smoke mode, writes results/gpu_check/summary.json.
# Without a CUDA GPU it stops with a one-line reason (exit 3). GPU_CHECK_ARGS=--skip-install on a
# Jetson image that ships TensorRT; --dry-run lists the commands.
.PHONY: gpu-check
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(PY) -m labsupport.gpu_check --out $(RESULTS)/gpu_check $(GPU_CHECK_ARGS)

# JupyterLab on the project's Python with the repository's settings (jupyter/): offline and quiet
# (no news, no update check, no PyPI listing), loopback only, no first-start questions.
lab: $(STAMP)
	$(PY) -m labsupport.labserver notebooks/

# The main job: every lab and chapter 06's solutions in full mode (executed copies and figures under
# results/), the benchmarks, and the results table in results/README.md. It writes nothing tracked:
# refreshing the README's own table from those results is a maintainer's step, `make readme-table`.
results: $(STAMP)
	mkdir -p $(RESULTS)/notebooks
	rm -f $(RESULTS)/notebook_times.tsv
	@for nb in $(RESULT_NOTEBOOKS); do \
		echo "== $$nb"; start=$$(date +%s); \
		LAB_RESULTS_DIR=$(abspath $(RESULTS)) $(VENV)/bin/papermill --cwd $$(dirname $$nb) --kernel python3 \
			$$nb $(RESULTS)/notebooks/$$(basename $$nb) || exit 1; \
		secs=$$(( $$(date +%s) - start )); echo "   $$secs s"; \
		printf '%s\t%s\n' "$$(basename $$nb)" "$$secs" >> $(RESULTS)/notebook_times.tsv; \
	done
	$(PY) -m labsupport.notebook_check $(RESULTS)/notebooks
	$(PY) -m labsupport.answer_key $(RESULTS)/notebooks $(RESULTS)/answer_key
	LAB_BROWSER_NOTEBOOKS=all $(PY) -m pytest tests/browser -q
	$(MAKE) bench report

bench: $(STAMP)
	LAB_RESULTS_DIR=$(abspath $(RESULTS)) $(PY) -m labsupport.bench all

report: $(STAMP)
	LAB_RESULTS_DIR=$(abspath $(RESULTS)) $(PY) -m labsupport.report

readme-table: $(STAMP)
	LAB_RESULTS_DIR=$(abspath $(RESULTS)) $(PY) -m labsupport.report --readme README.md

clean:
	rm -rf $(RESULTS) .pytest_cache .ruff_cache
