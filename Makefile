# Quick start: `make demo` (set up, then prune on the embedded data) and
# `make test` (set up, then the test suite). Either may come first; the
# virtual environment is made once and reinstalled only when
# requirements.txt changes.
# The first of python3, python3.12, python3.11 that runs and is 3.11 or 3.12
# (the pinned numpy and scipy have no wheels for older Pythons).
PYTHON ?= $(shell for p in python3 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' \
	2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
# Touched after a whole install: newer than requirements.txt means up to date.
INSTALLED := $(VENV)/.installed

.PHONY: demo test setup
demo: $(INSTALLED)
	$(VENV)/bin/python main.py --recipe=prune

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -q tests

setup: $(INSTALLED)

$(INSTALLED): requirements.txt
	@test -n "$(PYTHON)" || { echo "error: no Python 3.11 or 3.12 found (python3, python3.12, python3.11); install one or run make PYTHON=/path/to/python3.12" >&2; exit 2; }
	@# --clear: a .venv left without pip (an interrupted or failed creation) is made again.
	@$(VENV)/bin/python -m pip --version >/dev/null 2>&1 || { \
		echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv --clear $(VENV); }
	@echo "installing requirements.txt into $(VENV) (the first install takes a few minutes)"
	$(VENV)/bin/python -m pip install --disable-pip-version-check --progress-bar on -r requirements.txt
	@touch $@
