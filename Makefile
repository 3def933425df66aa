# Two commands do all the set-up on a fresh machine:
#   make demo   installs, then quantizes the built-in demo transformer (python -m qpipeline.quantize)
#   make test   installs, then runs the test suite (GPU tests are skipped without a GPU)
#   make test-deps  (root) headless Chromium for the web page's test; CI runs it before make test
# Both create or reuse the virtual environment $(VENV). A Python whose torch already sees a
# GPU is kept (the venv sees its site-packages); otherwise the CPU build torch==2.13.0 is
# installed, never the multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qkernels-installed

.PHONY: setup demo test test-triton-oldest test-deps gpu-suite clean

setup: $(STAMP)

$(STAMP): setup.py
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "using this Python's CUDA torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_SPEC)"; $(PY) -m pip install -q "$(TORCH_SPEC)"; }
	@echo "installing qkernels (editable) with its [dev] extra: pytest, triton, diffusers, transformers, accelerate, peft, pillow, matplotlib"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

demo: setup
	$(PY) -m qpipeline.quantize --out out/demo --overwrite

test: setup
	$(PY) -m pytest -q

# The launcher's fast path (qkernels/triton/_launch.py) reads Triton internals that moved between
# releases: check it against the oldest Triton the backends accept (capabilities.TRITON_MIN_VERSION),
# installed beside the venv's own and put first on the path for this one run.
TRITON_OLDEST ?= 3.4.0
test-triton-oldest: setup
	$(PY) -m pip install -q --no-deps --target $(VENV)/triton-$(TRITON_OLDEST) "triton==$(TRITON_OLDEST)"
	PYTHONPATH=$(VENV)/triton-$(TRITON_OLDEST) $(PY) tests/simulated_launch_checks.py
	PYTHONPATH=$(VENV)/triton-$(TRITON_OLDEST) $(PY) tests/contraction_checks.py

# Headless Chromium + chromedriver (Debian packages) for the web page's browser test; needs root.
test-deps:
	bash tests/install_browser.sh

gpu-suite:
	bash benchmarks/run_gpu_suite.sh out/gpu

clean:
	rm -rf $(VENV) out
