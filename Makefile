# Two commands from a fresh machine: `make demo` (the whole pipeline on digits) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Every pip install in the venv uses the tested versions; without the pin pip pulls the newest
# torch plus several GB of CUDA wheels.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: venv demo test ffcv clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,demo,plots]'
	touch $@

# ffcv needs system headers (libturbojpeg, OpenCV core/imgproc): the script installs them with apt.
ffcv: venv
	bash .ci/install-ffcv.sh $(VENV)

# The whole pipeline on digits (offline): pretrain -> bip / hydra / omp at 4 keep ratios ->
# finetune, on this machine; then the index, the plots and the summary table, and the report
# (DEMO_ROOT/report/index.html, docs/report.md).
DEMO_ROOT ?= demo-runs
demo: venv
	$(BIN)/python launch/grid.py configs/grids/demo.yml --local --root $(DEMO_ROOT)
	$(BIN)/python launch/collect.py $(DEMO_ROOT) --plots
	$(BIN)/python -m bip.report $(DEMO_ROOT)

# The import contracts of setup.cfg first (seconds), then two pytest-xdist workers, one test
# file each at a time (module fixtures stay in one worker); the Slurm file runs first, mostly
# waiting on its jobs, beside the CPU-bound files.
TEST_WORKERS ?= 2
test: venv
	$(BIN)/lint-imports --config setup.cfg
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) demo-runs
