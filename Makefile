# Two commands: `make book` builds the course, `make test` checks it. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: book test lint unit notebooks book-check clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Executes every notebook at the default profile (LABS_PROFILE, else gpu with CUDA, else cpu)
# with Jupyter Book's execution cache. The cache is keyed on notebook contents only, so it is
# dropped when the profile changes.
book: $(STAMP)
	@prof=$$($(BIN)/python -c 'from labsupport.runtime import profile; print(profile())'); \
	mkdir -p _build; \
	if [ "$$(cat _build/.profile 2>/dev/null)" != "$$prof" ]; then rm -rf _build/.jupyter_cache; fi; \
	echo "$$prof" > _build/.profile; \
	echo "Building the book at profile '$$prof'"; \
	$(BIN)/jupyter-book build . --path-output . && \
	echo "The book is at $(abspath _build/html/index.html)"

test: lint unit notebooks book-check

lint: $(STAMP)
	$(BIN)/ruff check labsupport tests notebooks

unit: $(STAMP)
	$(BIN)/pytest tests

# nbval and the book build share one fresh cache folder, so the smoke zoo is trained from scratch
# once per run and the training path is exercised every time.
notebooks book-check: export LABS_PROFILE := smoke
notebooks book-check: export LABS_CACHE := $(abspath _build/test/labs-cache)

notebooks: $(STAMP)
	rm -rf _build/test
	mkdir -p $(LABS_CACHE)
	$(BIN)/pytest --nbval-lax --nbval-cell-timeout=900 -p no:cacheprovider notebooks/

book-check: $(STAMP)
	mkdir -p $(LABS_CACHE)
	rm -rf _build/test/_build
	$(BIN)/jupyter-book build . --path-output _build/test -W -n --keep-going

clean:
	rm -rf _build
