# The two commands of the README: `make demo` and `make test`. Both set up the venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
# Test processes (pytest-xdist); a file's tests share one worker so module fixtures are built once. 0 = in-process.
TEST_WORKERS ?= 2

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: setup
	$(BIN)/python run.py --config=configs/demo.py --workdir=$(WORKDIR)

clean:
	rm -rf $(VENV) .cache
