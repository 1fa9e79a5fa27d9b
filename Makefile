# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both install medlava and its pinned dependencies (constraints.txt) into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medlava-installed

.PHONY: demo test lint install clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,metrics,cnn,serve,data]'
	# DeepSpeed builds against the installed torch, so it comes second and without build isolation.
	$(PY) -m pip install --quiet --no-build-isolation -c constraints.txt deepspeed
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch/submit.py demo --config jobs/configs/tiny.yaml --executor local

# Import layers and cycles (setup.cfg [importlinter]); ruff's rules and format (pyproject.toml [tool.ruff]).
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check pkg tests bench launch
	$(VENV)/bin/ruff format --check pkg tests bench launch

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs data/ham10000-synthetic
