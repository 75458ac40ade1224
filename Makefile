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

demo: venv
	$(BIN)/python launch/demo.py

test: venv
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo-runs
