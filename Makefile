# The two README commands: `make run` (whole pipeline on config/config.yaml) and `make test`.
# Each creates .venv on first use with nothing but Python 3.11 on the machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all
SNAKEMAKE_ARGS ?=
# nnU-Net's own env (= config nnunet.venv; docs/nnunet.md)
NNUNET_VENV := .venv-nnunet

# The ground-truth validity study (README "Validity study"); other overlays: VALIDITY_CONFIG="...".
VALIDITY_CONFIG ?= config/validity.yaml
# encode and train_diffusion ask for 4 and 8 threads (cluster sizes) but are mostly single-threaded at
# these sizes: on 2 cores each ran alone; one thread each runs two at a time (50 encodes in 4 min, was
# about 24 in 5). LOCAL_THREADS= gives the rules their configured threads back (a bigger machine).
LOCAL_THREADS ?= --set-threads encode=1 train_diffusion=1
VALIDITY_THREADS ?= $(LOCAL_THREADS)

.PHONY: setup run test lint clean nnunet-env validity

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -r requirements.txt
	$(BIN)/pip install --quiet -c constraints.txt --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores $(CORES) $(LOCAL_THREADS) $(SNAKEMAKE_ARGS)

validity: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake validity --cores $(CORES) $(VALIDITY_THREADS) $(SNAKEMAKE_ARGS) \
		--configfile config/config.yaml $(VALIDITY_CONFIG)

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check hemexp tests scripts
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --lint
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakefmt --check Snakefile rules/

# nnU-Net baselines: a separate venv (its torchvision would break monai/lightning in .venv); the rules
# also build it on first use.
nnunet-env: $(STAMP)
	$(BIN)/hemexp nnunet-env --venv $(NNUNET_VENV) --python $(PYTHON)

clean:
	rm -rf results .snakemake report.html
