# HandCLIP: `make help` lists the targets.
#
# Python environment: an active virtual environment ($VIRTUAL_ENV) or conda env ($CONDA_PREFIX) is used
# as it is. Otherwise make creates .venv with `$(PYTHON) -m venv` and installs into it, so a system Python
# that refuses pip installs (PEP 668, Debian/Ubuntu) is never touched. `make PYTHON=python3.12 ...` picks
# the interpreter that creates .venv.
PYTHON ?= python3
ifneq ($(strip $(VIRTUAL_ENV)$(CONDA_PREFIX)),)
VENV :=
PY := python
else
VENV := .venv
PY := $(VENV)/bin/python
endif
# What `install` needs first: .venv's interpreter, or nothing in an active environment.
PY_PREREQ := $(if $(VENV),$(PY))
# The torch build this project is tested with (x86_64; on this machine pip takes both from local disk).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# Tests, the demo and the benchmark use random weights: never wait on the Hugging Face hub for them.
OFFLINE := HF_HUB_OFFLINE=1
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))
# pytest with the plugins the suite uses and no others: plugins that other packages install beside it
# (Hydra's, hypothesis, anyio...) would load in every test process, seconds each time.
PYTEST := PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(PY) -m pytest -p xdist.plugin -p pytest_timeout
# Test processes (pytest-xdist): one per core, at most 4.
TEST_WORKERS ?= $(shell n=$$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

# What `install` looks for (found, not imported: importing them all takes ~12 s) and HandCLIP's own metadata.
# An install older than pyproject.toml (another version, no console scripts) is installed again.
NEEDED := torch torchvision open_clip pytorch_lightning hydra omegaconf torchmetrics PIL matplotlib pytest xdist \
	pytest_timeout tqdm onnx onnxscript onnxruntime submitit optuna safetensors lightning_utilities platformdirs \
	ruff mlflow wandb gradio playwright
define INSTALLED_CHECK
import importlib.metadata as m, importlib.util as u, re, sys
wanted = re.search(r'^version = "([^"]+)"', open("pyproject.toml").read(), re.M).group(1)
stale = m.version("handclip") != wanted or not m.entry_points(group="console_scripts", name="handclip-app")
sys.exit(stale or any(u.find_spec(name) is None for name in "$(NEEDED)".split()))
endef
export INSTALLED_CHECK

DEMO_DIR := data/demo
HANDS := dorsal_right,dorsal_left,palmar_right,palmar_left

.PHONY: help install browser lint test test-fast mutate demo demo-data train eval bench clean-demo app screenshot

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

ifneq ($(VENV),)
$(PY):
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu install python3-venv (apt-get install python3-venv)" >&2; \
		exit 1; }
endif

install: $(PY_PREREQ) ## Install HandCLIP (editable) and its test tools into the environment; quick when already there
	@$(PY) -c "$$INSTALLED_CHECK" 2>/dev/null || $(PY) -m pip install -e ".[test]" $(TORCH_PIN)

# The browser tests (tests/test_app_browser.py) drive Debian's chromium through Playwright (never Playwright's own
# browser download). CHROMIUM=/path/to/chrome picks another Chromium-based browser.
CHROMIUM ?= $(shell command -v chromium 2>/dev/null)
export CHROMIUM
browser: ## Chromium for the browser tests: installed from Debian's packages when missing (as root with apt-get)
	@if [ -n "$(CHROMIUM)" ] && [ -x "$(CHROMIUM)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests (apt-get, log: /tmp/handclip-chromium-apt.log)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation; } \
			>/tmp/handclip-chromium-apt.log 2>&1 || { tail -n 5 /tmp/handclip-chromium-apt.log >&2; \
			echo "error: apt-get could not install chromium (log: /tmp/handclip-chromium-apt.log)" >&2; exit 1; }; \
	else \
		echo "error: the browser tests need Chromium: sudo apt-get install chromium (Debian/Ubuntu), or make test CHROMIUM=/path/to/chrome" >&2; \
		exit 1; \
	fi

lint: install ## ruff over src/ and tests/ (settings in pyproject.toml); CI runs it before the tests
	$(PY) -m ruff check src tests

test: install browser ## Run the whole test suite (CPU, offline, a few minutes; installs chromium when missing, as root)
	$(OFFLINE) $(PYTEST) -q -n $(TEST_WORKERS)

test-fast: install ## The test suite without the slow end-to-end tests (the browser and load tests among them)
	$(OFFLINE) $(PYTEST) -q -n $(TEST_WORKERS) -m "not slow"

# mutmut puts mutants/src first on sys.path itself (PYTHONPATH emptied); one torch thread per test process.
mutate: install ## Mutation testing (mutmut) of the core modules against their fast tests: kill rate per module, survivors
	@$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -e ".[test,mutate]" $(TORCH_PIN)
	rm -rf mutants
	PYTHONPATH= OMP_NUM_THREADS=1 $(OFFLINE) $(PY) -m mutmut run --max-children $(TEST_WORKERS)
	$(PY) tests/mutation_summary.py

demo-data: install ## Synthetic hands (data/demo/raw) split by the 11k protocol (data/demo/splits)
	$(PY) -m handclip.synth --out $(DEMO_DIR)/raw --subjects 40 --images-per-aspect 10 --overwrite
	$(PY) -m handclip.prepare --raw $(DEMO_DIR)/raw --out $(DEMO_DIR)/splits --overwrite

clean-demo: ## Remove the demo's outputs (outputs/demo)
	rm -rf outputs/demo

DEMO_HAND_DIR := $(DEMO_DIR)/splits/train_val_test_split_dorsal_r

demo: install clean-demo demo-data ## End to end on synthetic hands: data, train the tiny model on all 4 hand types, evaluate (tables, plots), identify
	$(OFFLINE) $(PY) -m handclip.train -m experiment=demo hand=$(HANDS)
	$(OFFLINE) $(PY) -m handclip.eval experiment=demo all=true cross_hand=true
	$(OFFLINE) $(PY) -m handclip.identify experiment=demo ckpt_path=outputs/demo/train/dorsal_right/checkpoints/best.ckpt \
		gallery=$(DEMO_HAND_DIR)/gallery0 query=$(DEMO_HAND_DIR)/query0 print_limit=5

train: install ## Train all four hand types with the default recipe (ViT-B/32, data/11k); run again to finish
	$(PY) -m handclip.train -m hand=$(HANDS) ckpt_path=auto $(ARGS)

eval: install ## Zero-shot CLIP vs fine-tuned HandCLIP for every hand type -> outputs/eval/comparison.{md,csv,json}
	$(PY) -m handclip.eval all=true $(ARGS)

# On the demo's model and galleries when `make demo` has run and no model of your own has been trained.
APP_ARGS := $(if $(and $(wildcard outputs/demo/train),$(if $(wildcard outputs/train),,1)),experiment=demo)
app: install ## HandCLIP Studio, the web app, on http://127.0.0.1:7860 (after make demo: the demo's model and data)
	$(OFFLINE) $(PY) -m handclip.app $(APP_ARGS) $(ARGS)

screenshot: install browser ## docs/studio.png: HandCLIP Studio on the demo (after make demo), in headless Chromium
	$(OFFLINE) $(PY) tests/screenshot.py

bench: install ## Speed/memory benchmark -> benchmarks/results/<device>.json
	$(OFFLINE) $(PY) -m handclip.bench $(ARGS)
