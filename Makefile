# Every target creates (or reuses) the local virtual environment .venv by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= tests/fixtures/tiny_gemma4
OUT ?= out/$(notdir $(MODEL)).tern
PROMPT ?= The quick brown fox
ARGS ?=

.PHONY: demo test convert quality clean

# The bundled model is a tiny Gemma 4 with random weights (no real weights can be bundled): it shows
# the whole path, teacher and ternary student side by side, not sensible text.
demo: $(VENV)/.installed
	@mkdir -p $(dir $(OUT))
	$(BIN)/ferrisres-convert $(MODEL) -o $(OUT) --force
	$(BIN)/ferrisres-convert $(MODEL) -o $(OUT:.tern=-teacher.tern) --quant f32 --force --quiet
	$(BIN)/ferrisres-inspect $(OUT)
	@echo "--- teacher (f32) ---"
	$(BIN)/ferrisres-run $(OUT:.tern=-teacher.tern) --prompt "$(PROMPT)" --max-tokens 24
	@echo "--- ternary student ---"
	$(BIN)/ferrisres-run $(OUT) --prompt "$(PROMPT)" --max-tokens 24

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

convert: $(VENV)/.installed
	@mkdir -p $(dir $(OUT))
	$(BIN)/ferrisres-convert $(MODEL) -o $(OUT) $(ARGS)

# Each ternary scheme against its f32 teacher on the tiny checkpoints: writes QUALITY.md.
quality: $(VENV)/.installed
	$(BIN)/python bench/quality.py

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet -e ".[convert,test]"
	touch $@

clean:
	rm -rf $(VENV) out
