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

# The build benchmark compares against a bare Pillow-SIMD pool (made sure of
# here: a later pip install can put plain Pillow back) and FFCV's writer, which
# lives in its own venv; if FFCV cannot be installed (no root for its apt
# headers, no network), bench_build.py says why and skips that row.
bench: install
	bash tools/install_pillow_simd.sh $(BIN)/python
	mkdir -p bench-out
	bash tools/install_ffcv.sh > bench-out/install_ffcv.log 2>&1 || \
		echo "FFCV not installed (bench-out/install_ffcv.log); its row is skipped" >&2
	$(BIN)/python tools/bench_build.py
	$(BIN)/python tools/bench_loader.py
	$(BIN)/python tools/bench_verify.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
