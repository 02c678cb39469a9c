# make repro: install, then run the whole pipeline.  make test: install, then the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install repro test lint bench clean
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -r requirements.txt
	touch $@

repro: install
	dvc repro

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/pipeline.py
