# The two commands a new user needs: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.wheelcas-installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's metadata changes; the install is editable.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing wheelcas into $(VENV) (log: $(VENV)/install.log)"
	@( $(BIN)/python -m pip install --upgrade pip && \
	   $(BIN)/python -m pip install -e '.[dev,bench]' ) > $(VENV)/install.log 2>&1 \
	   || { tail -30 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

# The main job on the embedded default (no daemon): lock the doubler, fill the store, infer.
# It works on a copy so that the example in the repo stays as committed.
DEMO_DIR := .demo/doubler
demo: $(STAMP)
	rm -rf $(DEMO_DIR) && mkdir -p .demo && cp -R examples/doubler $(DEMO_DIR)
	$(BIN)/wheelcas lock $(DEMO_DIR)
	$(BIN)/wheelcas infer $(DEMO_DIR) --entrypoint carton_entrypoint:get_model \
	    --python '>=3.10' --opt model.an_example_custom_option=true --input 'x=[1, 2, 3]'

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
