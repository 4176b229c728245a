# Everything installs into .venv/ at the repo root. Only torch is pinned here: 2.13.0 is the CPU
# wheel these machines carry; pyproject keeps a range so GPU clusters bring their own CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  ?= torch==2.13.0
CONFIG ?= conf/default.yaml

.PHONY: install test demo prepare zip bench results clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,bench]"
	touch $@

test: install
	$(PY) -m pytest -q tests

prepare: install
	$(PY) -m spark_jobs.prepare --config $(CONFIG)

# The whole pipeline on the built-in synthetic data: local Spark, then local Ray trains the
# baseline and CFM on the same prepared folder, then both runs' metrics side by side.
DEMO_RUNS := runs/synthetic
demo: install
	$(PY) -m spark_jobs.prepare --config $(CONFIG)
	rm -rf $(DEMO_RUNS)/demo-none $(DEMO_RUNS)/demo-cfm
	$(PY) -m ray_train.train --config $(CONFIG) --run-name demo-none --set ssl.method=none
	$(PY) -m ray_train.train --config $(CONFIG) --run-name demo-cfm --set ssl.method=cfm
	$(PY) -m ray_train.compare $(DEMO_RUNS)/demo-none $(DEMO_RUNS)/demo-cfm

# The paper's comparison on both MovieLens datasets (docs/results.md): each dataset is prepared
# twice (eval split; validation split carved from train for choosing hyper-parameters), then its
# experiment grid runs on Ray Tune (finished trials are skipped on a rerun), then one report.
RESULTS_DATASETS := ml-100k ml-latest-small
results: install
	for d in $(RESULTS_DATASETS); do \
	  $(PY) -m spark_jobs.prepare --config conf/$$d.yaml || exit 1; \
	  $(PY) -m spark_jobs.prepare --config conf/$$d.yaml --set paths.prepared=data/$$d/prepared-validation \
	    prepare.split.holdout=validation || exit 1; \
	  $(PY) -m ray_train.experiment --config conf/experiments/$$d.yaml || exit 1; \
	done
	$(PY) -m ray_train.report $(foreach d,$(RESULTS_DATASETS),--experiment runs/experiments/$(d)) \
	  --out docs/results.md --produced-by "make results"

# common/ (and spark_jobs/) zipped for `spark-submit --py-files` on a cluster.
zip: dist/common.zip

dist/common.zip: $(shell find common spark_jobs -name '*.py')
	mkdir -p dist
	$(PYTHON) -c "import pathlib, zipfile; z = zipfile.ZipFile('$@', 'w', zipfile.ZIP_DEFLATED); [z.write(p) for d in ('common', 'spark_jobs') for p in sorted(pathlib.Path(d).rglob('*.py'))]; z.close()"

# Benchmarks print side-by-side figures; ingest and ssl_overhead read the prepared default data.
# ingest runs on a larger synthetic log (BENCH_INTERACTIONS events) than the demo's: with the demo's
# 0.6-second epochs, Ray Data's per-epoch start-up dominates what the benchmark measures.
BENCH_INTERACTIONS ?= 500000
BENCH_PREPARED := data/synthetic-$(BENCH_INTERACTIONS)/prepared
bench: install
	$(PY) bench/mutual_info.py
	$(PY) -m spark_jobs.prepare --config $(CONFIG)
	$(PY) -m spark_jobs.prepare --config $(CONFIG) --set dataset.synthetic.num_interactions=$(BENCH_INTERACTIONS) \
	  paths.raw=data/synthetic-$(BENCH_INTERACTIONS)/raw paths.prepared=$(BENCH_PREPARED)
	$(PY) bench/ingest.py --config $(CONFIG) --prepared $(BENCH_PREPARED) --epochs 3 --repeats 2
	$(PY) bench/ssl_overhead.py --config $(CONFIG)

clean:
	rm -rf $(VENV) dist data runs .pytest_cache
