# Two commands cover a fresh machine:  `make quickstart` (set up, then train on the offline
# digits) and `make test` (set up, then run the test suite). Both create ./.venv once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	# torch-fidelity's Inception-v3 needs only torch; its torchvision requirement would pull a CUDA torch.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps torch-fidelity==0.4.0
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(PY) train_ddpm.py configs/mnist-5k-cpu.yaml

test: setup
	$(PY) -m pytest -q -n 6 --dist worksteal tests

clean:
	rm -rf $(VENV) ddpm-mnist-5k ddpm-mnist-5k-offline .pytest_cache
