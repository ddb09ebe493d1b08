# The two commands of the README: `make demo` (the main job) and `make test` (what CI runs).
# Both create .venv on first use. torch is installed first, pinned, so CPU machines get the
# local CPU build instead of a multi-GB CUDA download.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo
# open_clip's own environment for bench.stage1's side-by-side run (it needs torchvision, hence torch 2.14.1)
OPENCLIP_VENV ?= .venv-openclip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench bench-gpu install clean openclip-env

demo: $(STAMP)
	$(VENV)/bin/vlm demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	VLM_OPENCLIP_PYTHON=$$(test -x $(OPENCLIP_VENV)/bin/python && echo $(abspath $(OPENCLIP_VENV))/bin/python) $(PY) -m bench

openclip-env:
	test -x $(OPENCLIP_VENV)/bin/python || python3 -m venv $(OPENCLIP_VENV)
	$(OPENCLIP_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 open-clip-torch==3.3.0

# One CUDA GPU, a few minutes: the real recipes' step time, MFU and memory (bench/gpu.py).
bench-gpu: $(STAMP)
	$(PY) -m bench.gpu

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v java >/dev/null || { echo "Java is needed by pycocoevalcap (tokenizer, METEOR); installing default-jre-headless"; \
		(apt-get install -y -q default-jre-headless || sudo apt-get install -y -q default-jre-headless) >/dev/null; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "open-clip-torch==3.3.0"
	touch $(STAMP)

clean:
	rm -rf $(VENV) $(OPENCLIP_VENV) runs
