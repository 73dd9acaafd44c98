# Two commands: `make book` builds the course, `make test` checks it. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

# PyTorch's default Linux wheel bundles CUDA (2.7 GB of downloads for torch 2.13). On a Linux
# machine without an NVIDIA GPU, take the CPU-only build (0.2 GB) from PyTorch's own index, and
# fall back to the default index where that one cannot be reached.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)
HAS_NVIDIA := $(shell [ -e /proc/driver/nvidia ] || command -v nvidia-smi >/dev/null 2>&1 && echo yes)
# $(call install_torch,VENV_BIN,REQUIREMENT)
define install_torch
	if [ "$$(uname -s)" = Linux ] && [ -z "$(HAS_NVIDIA)" ]; then \
	  $(1)/python -m pip install --quiet --timeout 30 --retries 1 \
	    --index-url $(TORCH_CPU_INDEX) "$(2)" || { \
	  echo "PyTorch's CPU index could not be reached: installing $(2) from the default index"; \
	  $(1)/python -m pip install --quiet "$(2)"; }; \
	fi
endef

.PHONY: book lab test test-min test-wheel lint unit notebooks book-check browser-check clean

# MathJax is served from the book's own files, so that a page typesets its mathematics without
# a network: the npm registry's tarball (checked against its published hash by npm), unpacked.
MATHJAX_VERSION := 3.2.2
MATHJAX := _build/static/mathjax/tex-mml-chtml.js
$(MATHJAX):
	@command -v npm >/dev/null || { echo "npm is needed to fetch MathJax $(MATHJAX_VERSION)" \
	  "for offline reading (Debian/Ubuntu: apt-get install npm)"; exit 1; }
	rm -rf _build/npm _build/static/mathjax
	mkdir -p _build/npm _build/static
	cd _build/npm && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null && \
	  tar xzf mathjax-$(MATHJAX_VERSION).tgz package/es5
	mv _build/npm/package/es5 _build/static/mathjax
	rm -rf _build/npm

$(STAMP): requirements.txt requirements-gpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(call install_torch,$(BIN),$(TORCH_PIN))
	$(BIN)/python -m pip install --quiet -r requirements.txt
	if [ -n "$(HAS_NVIDIA)" ]; then $(BIN)/python -m pip install --quiet -r requirements-gpu.txt; fi
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Executes every notebook at the default profile (LABS_PROFILE, else gpu with CUDA, else cpu)
# with Jupyter Book's execution cache. The cache is keyed on notebook contents only, so it is
# dropped when the profile changes.
book: $(STAMP) $(MATHJAX)
	@prof=$$($(BIN)/python -c 'from labsupport.runtime import profile; print(profile())'); \
	mkdir -p _build; \
	if [ "$$(cat _build/.profile 2>/dev/null)" != "$$prof" ]; then rm -rf _build/.jupyter_cache; fi; \
	echo "$$prof" > _build/.profile; \
	echo "Building the book at profile '$$prof'"; \
	$(BIN)/jupyter-book build . --path-output . && \
	echo "The book is at $(abspath _build/html/index.html)"

# JupyterLab on the notebooks, from the course's environment (on this machine only: 127.0.0.1)
lab: $(STAMP)
	$(BIN)/jupyter lab --ip=127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

test: lint unit notebooks book-check browser-check

lint: $(STAMP)
	$(BIN)/ruff check labsupport tests notebooks tools book/_ext

unit: $(STAMP)
	$(BIN)/pytest tests

# nbval and the book build share one fresh cache folder, so the smoke zoo is trained from scratch
# once per run and the training path is exercised every time.
notebooks book-check: export LABS_PROFILE := smoke
notebooks book-check: export LABS_CACHE := $(abspath _build/test/labs-cache)

# nbval runs every notebook once and tools/nbval_outputs.py keeps what each produced; the strict
# book build then renders those outputs from its execution cache instead of running every
# notebook again (a notebook nbval did not pass, or one changed since, the build runs itself).
notebooks: $(STAMP)
	rm -rf _build/test
	mkdir -p $(LABS_CACHE)
	NBVAL_OUTPUTS_DIR=_build/test/executed $(BIN)/python -m pytest -p tools.nbval_outputs \
	  --nbval-lax --nbval-cell-timeout=900 -p no:cacheprovider notebooks/

book-check: $(STAMP) $(MATHJAX)
	mkdir -p $(LABS_CACHE)
	rm -rf _build/test/_build
	if [ -d _build/test/executed ]; then $(BIN)/python tools/cache_executed.py \
	  _build/test/_build/.jupyter_cache _build/test/executed notebooks; fi
	$(BIN)/jupyter-book build . --path-output _build/test -W -n --keep-going

# Every page of the strict build opened in headless Chromium (tools/browser_check.py: console
# errors, images, links and anchors, MathJax, launch buttons, search); screenshots of every page
# in _build/test/screenshots. Without Chromium it says loudly that it was skipped, and passes.
browser-check: $(STAMP)
	@$(BIN)/python tools/browser_check.py _build/test/_build/html _build/test/screenshots; \
	rc=$$?; if [ $$rc -eq 2 ]; then echo "*** THE BROWSER CHECK WAS SKIPPED (see above) ***"; \
	exit 0; fi; exit $$rc

# The unit tests against the oldest releases pyproject.toml admits: every `>=` floor installed
# exactly (tools/floors.py), in a second venv, so that the floors are tested, not guessed.
# Wheels only, so that a floor without a wheel for this Python fails clearly (all have one for
# Python 3.11; some old floors have none for 3.12 and newer).
MIN_VENV := _build/venv-min
test-min:
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	mkdir -p _build
	$(MIN_VENV)/bin/python tools/floors.py pyproject.toml > _build/floors.txt
	$(call install_torch,$(MIN_VENV)/bin,$$(grep -E '^torch==' _build/floors.txt))
	$(MIN_VENV)/bin/python -m pip install --quiet --only-binary=:all: -r _build/floors.txt \
	  $$(grep -E '^pytest==' requirements.txt)
	$(MIN_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(MIN_VENV)/bin/python -m pip check
	$(MIN_VENV)/bin/python -m pip list --format=freeze | \
	  grep -iE '^(torch|transformers|tokenizers|safetensors|pandas|numpy)=='
	$(MIN_VENV)/bin/pytest tests -p no:cacheprovider -q

# What Colab does: labsupport installed from a built wheel (no editable install, no clone on
# sys.path) into a fresh venv, then a notebook run at `smoke` in a folder outside the repository.
WHEEL_VENV := _build/venv-wheel
WHEEL_NOTEBOOK := notebooks/42_on_prem_vs_api.ipynb
test-wheel: $(STAMP)
	rm -rf $(WHEEL_VENV) _build/wheel
	$(BIN)/python -m pip wheel --quiet --no-deps -w _build/wheel .
	rm -rf build  # setuptools' scratch folder, left in the clone
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(call install_torch,$(WHEEL_VENV)/bin,$(TORCH_PIN))
	$(WHEEL_VENV)/bin/python -m pip install --quiet _build/wheel/labsupport-*.whl \
	  $$(grep -E '^(nbclient|ipykernel)==' requirements.txt) nbclient
	run=$$(mktemp -d) && cp $(WHEEL_NOTEBOOK) $$run/ && cd $$run && \
	  $(abspath $(WHEEL_VENV))/bin/python -c "import labsupport, sys; \
	    assert '$(abspath $(WHEEL_VENV))' in labsupport.__file__, labsupport.__file__; \
	    print('labsupport from', labsupport.__file__)" && \
	  LABS_PROFILE=smoke LABS_CACHE=$$run/cache $(abspath $(WHEEL_VENV))/bin/python -c \
	    "import nbformat, nbclient; nb = nbformat.read('$(notdir $(WHEEL_NOTEBOOK))', 4); \
	    nbclient.NotebookClient(nb, timeout=600, kernel_name='python3').execute(); \
	    print('ran $(notdir $(WHEEL_NOTEBOOK)) from the wheel')" && \
	  cd / && rm -rf $$run

clean:
	rm -rf _build
