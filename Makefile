# Two entry points (see README Quickstart): `make demo` and `make test`.
# Each creates .venv if missing and installs the pinned dependencies first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   := data/shakespeare
CORPUS := data/corpus/shakespeare
VOCAB  ?= 2048
SEQ    ?= 64
NPROC  ?= 2

.PHONY: setup data demo test clean-runs

setup: $(STAMP)

# torch first, pinned: on a machine without CUDA pip takes the local 2.13.0 CPU wheel; the
# package then declares a range 2.13 satisfies, so nothing pulls a CUDA build behind our back.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,parallel,eval,sweep]'
	$(PY) -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('2.13.0') else 'torch was replaced: ' + v)"
	$(PY) -m lflm_dist.models.cpu_kernels  # compile the fused CPU kernels now (~30 s), not in the first run
	touch $(STAMP)

data: $(DATA)/valid/manifest.json

$(DATA)/valid/manifest.json: $(STAMP)
	$(PY) data_tools/fetch_corpus.py --out $(CORPUS)
	$(PY) data_tools/train_tokenizer.py --input $(CORPUS)/train --out $(DATA)/tokenizer.json --vocab-size $(VOCAB)
	$(PY) data_tools/make_shards.py --input $(CORPUS)/train --tokenizer $(DATA)/tokenizer.json --out $(DATA)/train --seq-len $(SEQ)
	$(PY) data_tools/make_shards.py --input $(CORPUS)/valid --tokenizer $(DATA)/tokenizer.json --out $(DATA)/valid --seq-len $(SEQ)

# Stage 1 (Text VAE), then stage 2 (VAE + DiT prior) from its weights; 2 processes, gloo.
demo: data
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launchers/pretrain.py --config configs/cola_tiny_vae.yaml
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launchers/pretrain.py --config configs/cola_tiny.yaml

test: $(STAMP)
	$(PY) data_tools/fetch_reference_lm.py
	$(PY) -m pytest -q tests

clean-runs:
	rm -rf runs/cola_tiny_vae runs/cola_tiny runs/ar_tiny
