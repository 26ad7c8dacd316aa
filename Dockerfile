# Node image for ray_cluster.yaml and infra/k8s/rayjob.yaml: Ray 2.60 + PyTorch's CUDA 12.6 build (V100 / sm_70)
# + the project and its pinned dependencies, so that nodes install nothing at boot.
#
#   make image AWS_ACCOUNT=123456789012             # docker build, tagged with infra/docker/image_ref.py
#   make push-image AWS_ACCOUNT=123456789012        # + ECR login and push (AWS_REGION defaults to us-east-1)
#
# The pins below must equal requirements.lock's (tests/test_cluster_config.py checks it); the image tag changes with
# every change to this file, to the lock, to pyproject.toml's dependencies or to the pconv package's files. Jobs still ship their code with
# `ray job submit --working-dir .` / runtimeEnvYAML.working_dir, which takes precedence over the copy installed here.
FROM rayproject/ray:2.60.0-py311-gpu

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# The default (CUDA 13) wheels ship no sm_70 kernels: "no kernel image is available for execution" on V100.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        --index-url "${TORCH_INDEX_URL}"

# The project (the pconv package, with the `pconv` command), every dependency at its version in requirements.lock;
# torch==2.14.1 / torchvision==0.29.1 are already satisfied by the +cu126 builds.
COPY --chown=1000:100 pyproject.toml README.md LICENSE requirements.lock /tmp/pconv-src/
COPY --chown=1000:100 pconv /tmp/pconv-src/pconv
RUN pip install --no-cache-dir -c /tmp/pconv-src/requirements.lock /tmp/pconv-src \
    && rm -rf /tmp/pconv-src \
    && pconv --help > /dev/null \
    && python -c "import ray, torch, torchvision, mlflow, pconv; \
assert ray.__version__ == '2.60.0', ray.__version__; \
assert torch.version.cuda.startswith('12.6'), torch.version.cuda; \
print('ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
