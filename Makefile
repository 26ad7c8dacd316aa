# Two commands a newcomer needs: `make demo` and `make test` (both create .venv on first use).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean lock gpu-check

setup: $(STAMP)

# The exact, tested versions of everything (requirements.lock); pyproject.toml keeps ranges for library users.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

# Re-resolve requirements.lock after a change of pyproject.toml's dependencies (keeps the locked versions that still
# fit; `make lock UPGRADE=--upgrade` moves everything to the newest that fits).
lock:
	$(PY) -m pip install --quiet uv
	$(PY) -m uv pip compile pyproject.toml --extra test --extra export --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
		--annotation-style line $(UPGRADE) -o requirements.lock

# --durations: CI's log names the slowest tests, so the suite's 14-minute budget has a visible owner.
# -n: pytest-xdist workers; with several, one runs every Ray test in order (one Ray cluster at a time) and the others
# the rest beside it (tests/conftest.py, RayGroupScheduling). The full suite runs in one process by default: on
# 2 cores its Ray tests are the critical path and CPU-bound, and two workers measured slower (1479 s against
# 1383 s). On a machine with more cores, PYTEST_WORKERS=2 overlaps the rest with them.
PYTEST_WORKERS ?= 0
test: setup
	$(PY) -m pytest tests -n $(PYTEST_WORKERS) --durations=25 $(PYTEST_ARGS)

# The fast tier: every test that starts no Ray, no MLflow server and no S3 server (tests/conftest.py marks the
# others `server` from their fixtures, and fails a fast-tier test that starts one anyway). Two workers: 113 s
# against 175 s in one process on 2 cores.
FAST_WORKERS ?= 2
test-fast: setup
	$(PY) -m pytest tests -n $(FAST_WORKERS) -m "not server" $(PYTEST_ARGS)

demo: setup
	$(PY) pipelines/demo.py $(DEMO_ARGS)

# The one-shot check for a lent GPU machine (issue 25): one table, non-zero exit on any failure, < 8 min.
# On a CPU: make gpu-check GPU_CHECK_ARGS=--dry-run (CI runs that).
gpu-check: setup
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

bench: setup
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache

# Prebuilt node image (Dockerfile) for ray_cluster.yaml and infra/k8s/rayjob.yaml, in ECR:
#   make image AWS_ACCOUNT=123456789012 [AWS_REGION=us-east-1]     # docker build
#   make push-image AWS_ACCOUNT=123456789012                        # build, ECR login, push
# IMAGE_TAG defaults to infra/docker/image_ref.py's tag (version + hash of the pins and the Dockerfile), the tag the
# cluster files name; the repository pconv-ray is created once (infra/aws/README.md).
AWS_REGION ?= us-east-1
IMAGE_TAG  ?= $(shell $(PYTHON) infra/docker/image_ref.py --tag)
REGISTRY    = $(AWS_ACCOUNT).dkr.ecr.$(AWS_REGION).amazonaws.com
IMAGE       = $(REGISTRY)/pconv-ray:$(IMAGE_TAG)

.PHONY: image push-image

image:
	@test -n "$(AWS_ACCOUNT)" || { echo "set AWS_ACCOUNT=<12-digit AWS account id>" >&2; exit 2; }
	docker build --platform linux/amd64 -t $(IMAGE) .

push-image: image
	aws ecr get-login-password --region $(AWS_REGION) | docker login --username AWS --password-stdin $(REGISTRY)
	docker push $(IMAGE)
