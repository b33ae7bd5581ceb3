# Set-up commands. Each installs what it needs into .venv on a fresh machine (about 3 minutes).
# torch is pinned here (CPU build) so pip never pulls the multi-GB CUDA build; pyproject keeps a range.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install test demo bench-env

# torch goes in first and alone (here pip then takes the local CPU wheel), and the rest installs under
# a constraint that keeps exactly that build: in one combined command, pip's backtracking over
# s3fs/aiobotocore/datasets re-collected torch==2.13.0 from the index and installed the CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip freeze | grep -i '^torch==' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev]"
	$(PY) -c "import torch; print('torch', torch.__version__)"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/thresher demo

# kronfluence (the influence benchmark's reference) depends on torchvision, which would pull a CUDA
# torch: install it without dependencies and add its other requirements by hand.
bench-env: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps kronfluence==1.0.1
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt accelerate einops einconv opt-einsum
