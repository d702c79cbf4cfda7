# HandCLIP: make help
PYTHON ?= python3
# The torch build this project is tested with (x86_64; on this machine pip takes both from local disk).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# Tests, the demo and the benchmark use random weights: never wait on the Hugging Face hub for them.
OFFLINE := HF_HUB_OFFLINE=1
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))

DEMO_DIR := data/demo
HANDS := dorsal_right,dorsal_left,palmar_right,palmar_left

.PHONY: help install test demo demo-data train eval bench clean-demo

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

install: ## Install HandCLIP (editable) and its test tools; quick when already installed
	@$(PYTHON) -c "import torch, torchvision, open_clip, pytorch_lightning, hydra, omegaconf, torchmetrics, PIL, pytest, tqdm" 2>/dev/null \
		&& $(PYTHON) -m pip show -q handclip >/dev/null 2>&1 \
		|| $(PYTHON) -m pip install -e ".[test]" $(TORCH_PIN)

test: install ## Run the test suite (CPU, offline, a few minutes)
	$(OFFLINE) $(PYTHON) -m pytest -q

demo-data: install ## Synthetic hands (data/demo/raw) split by the 11k protocol (data/demo/splits)
	$(PYTHON) -m handclip.synth --out $(DEMO_DIR)/raw --subjects 40 --images-per-aspect 10 --force
	$(PYTHON) -m handclip.prepare --raw $(DEMO_DIR)/raw --out $(DEMO_DIR)/splits --force

clean-demo: ## Remove the demo's outputs (outputs/demo)
	rm -rf outputs/demo

demo: install clean-demo demo-data ## End to end on synthetic hands: data, train the tiny model on all 4 hand types, evaluate
	$(OFFLINE) $(PYTHON) -m handclip.train -m experiment=demo hand=$(HANDS)
	$(OFFLINE) $(PYTHON) -m handclip.eval experiment=demo all=true

train: install ## Train all four hand types with the default recipe (ViT-B/32, data/11k)
	$(PYTHON) -m handclip.train -m hand=$(HANDS) $(ARGS)

eval: install ## Zero-shot CLIP vs fine-tuned HandCLIP for every hand type -> outputs/eval/comparison.{md,csv,json}
	$(PYTHON) -m handclip.eval all=true $(ARGS)

bench: install ## Speed/memory benchmark -> benchmarks/results/<device>.json
	$(OFFLINE) $(PYTHON) -m handclip.bench $(ARGS)
