# alexpipe: `make demo` and `make test` are the two commands of the quick start.
# Each installs what it needs into .venv first (idempotent: a stamp file
# remembers the install until setup.cfg or the install scripts change).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alexpipe-installed

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py tools/install_pillow_simd.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	bash tools/install_pillow_simd.sh $(BIN)/python
	touch $(STAMP)

demo: install
	$(BIN)/alexpipe demo --workdir demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# pytest exits 5 when it collects nothing; that is a broken suite, not a pass,
# so it is reported as a failure with a message of its own.
test: install lint
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: install
	$(BIN)/python tools/bench_build.py
	$(BIN)/python tools/bench_loader.py
	$(BIN)/python tools/bench_verify.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
