# The README's two set-up commands are `make install && make demo` and `make install && make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test gate baseline demo bench lint default-model clean

install: $(STAMP)

# Torch is pinned (torch 2.14.1 + torchvision 0.29.1): timm needs torchvision and this
# pair is the one that installs from the build machine's local wheel store.
$(STAMP): pyproject.toml requirements-pinned.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-pinned.txt
	$(PY) -m pip install -q -c requirements-pinned.txt -e '.[train,onnxruntime,openvino,dev]'
	touch $(STAMP)

# Tests run on every core, a test file per worker (module fixtures are built once), the slowest files first
# (tests/conftest.py: SLOWEST_FILES); the slowest 15 tests are printed so growth is seen. Budget: pytest
# plus the gate in 6 minutes on 2 cores. A worker that dies is not replaced: with --dist loadfile a
# replaced worker can leave pytest-xdist 3.8 waiting forever (pytest-xdist issue #784), so the run ends
# at once and names the test the worker died in (and conftest says how its process ended).
test: install
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --max-worker-restart=0 --durations=15
	$(MAKE) gate

# The accuracy gate CI runs: build real engines from the embedded default model and fail on any
# regression against the stored report (`make baseline` refreshes it after an intended change).
GATE_BUILD := $(VENV)/bin/mtlora-export build --backend onnxruntime --backend openvino \
	--precision fp32 --precision int8 --calib-samples 64 --eval-samples 32 --out build/ci
# One command: the build's own checks are compared with the baseline (`check --baseline` would run them again).
gate: install
	$(GATE_BUILD) --baseline ci/baseline-report.json

baseline: install
	$(GATE_BUILD)
	mkdir -p ci && cp build/ci/report.json ci/baseline-report.json

demo: install
	$(PY) -m export.demo

bench: install
	$(PY) -m export.bench.page

lint: install
	$(VENV)/bin/ruff check mtlora mtlora_base export engines calibration tests

# Re-create the embedded default model (a small MTLoRA Swin trained on the synthetic set).
default-model: install
	$(VENV)/bin/mtlora train --data synthetic --preset default --out mtlora/assets/default

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
