"""ray_cluster.yaml, infra/k8s/rayjob.yaml, the node image (Dockerfile) and the IAM policies: validated offline.

ray_cluster.yaml goes through Ray's own cluster-config preparation and JSON-schema check (``prepare_config`` +
``validate_config`` of the pinned Ray); on top, the facts the cluster's security and the V100 setup depend on are
asserted. The GPU driver check of the worker node types is executed against fake ``nvidia-smi`` binaries. Docker
cannot run here: the image is checked through its Dockerfile (pins = pyproject.toml's), the reference both cluster
files use (infra/docker/image_ref.py) and ``make -n``. The pip route without the image is documented as a
fallback (docs/operations.md, infra/k8s/README.md); those snippets are parsed and checked like the config itself.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"
RAYJOB_YAML = REPO_ROOT / "infra" / "k8s" / "rayjob.yaml"
AWS_DIR = REPO_ROOT / "infra" / "aws"
DOCKERFILE = REPO_ROOT / "Dockerfile"
OPERATIONS_MD = REPO_ROOT / "docs" / "operations.md"
K8S_README = REPO_ROOT / "infra" / "k8s" / "README.md"
BASE_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
CU126_INDEX = "https://download.pytorch.org/whl/cu126"
V100_TYPES = {"p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8, "p3dn.24xlarge": 8}
VCPUS = {"p3.2xlarge": 8, "p3.8xlarge": 32, "p3.16xlarge": 64, "p3dn.24xlarge": 96}
PROFILE_ARN = re.compile(r"^arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+$")


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def locked_pins() -> dict[str, str]:
    """{package name: "name==version"} of pyproject.toml's direct dependencies, at the versions requirements.lock
    holds (the tested set the node image, make and CI install)."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lock = {name.lower(): version for name, version in
            re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO_ROOT / "requirements.lock").read_text(), re.M)}
    names = [re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower() for d in deps]
    return {name: f"{name}=={lock[name]}" for name in names}


def start_commands(cfg: dict) -> list[str]:
    return [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]


def image_ref_module():
    spec = importlib.util.spec_from_file_location("image_ref", REPO_ROOT / "infra" / "docker" / "image_ref.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_image(cfg: dict) -> str:
    """The ECR reference of the image built from today's Dockerfile and pins (placeholder account)."""
    return image_ref_module().image_ref("123456789012", cfg["provider"]["region"])


def gpu_node_types(cfg: dict) -> dict[str, dict]:
    return {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def fallback_yaml(path: Path, name: str) -> dict:
    """The YAML block after ``<!-- pip-fallback: NAME -->`` in a markdown file."""
    match = re.search(rf"<!-- pip-fallback: {re.escape(name)} -->\s*```yaml\n(.*?)```", path.read_text(), re.S)
    assert match, f"{path.name} lacks the pip fallback block for {name}"
    return yaml.safe_load(match.group(1))


def cluster_with_pip_fallback() -> dict:
    """ray_cluster.yaml with docs/operations.md's "Without the prebuilt image" changes applied."""
    cfg, change = load_cluster(), fallback_yaml(OPERATIONS_MD, "ray_cluster.yaml")
    cfg["docker"].update(change.pop("docker"))
    cfg.update(change)
    for node_type in gpu_node_types(cfg).values():  # the doc says: drop the ECR login from the GPU types
        node_type["initialization_commands"] = [c for c in node_type["initialization_commands"] if "ecr" not in c]
    return cfg


# ---------------------------------------------------------------------------------------- ray_cluster.yaml
def test_ray_schema_check_accepts_the_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load_cluster()))
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad config
    assert prepared["head_node_type"] == "head.cpu"
    assert prepared["available_node_types"]["head.cpu"]["max_workers"] == 0  # filled in by prepare_config


@pytest.mark.parametrize("mutation, error", [
    (lambda c: c.update(dashboard_port=8265), jsonschema.ValidationError),                 # unknown top-level key
    (lambda c: c["available_node_types"]["gpu.p3.2xlarge"].pop("resources"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu.p3.8xlarge"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="gpu.p3.99xlarge"), ValueError),
    (lambda c: c["available_node_types"]["gpu.p3.16xlarge"].update(min_workers=99), ValueError),
])
def test_ray_schema_check_is_not_vacuous(mutation, error):
    """The same check rejects broken variants of the file, so passing it means something."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_cluster()
    mutation(cfg)
    with pytest.raises(error):
        validate_config(prepare_config(cfg))


def test_image_and_pinned_ray_match():
    import ray

    cfg = load_cluster()
    assert cfg["docker"]["image"] == expected_image(cfg), "pins or code changed: python infra/docker/image_ref.py --update, then make push-image"
    for node_type in cfg["available_node_types"].values():
        assert "docker" not in node_type, "no per-node-type image override"
    (base,) = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M)
    assert base == BASE_IMAGE
    assert base.split(":")[1].startswith(ray.__version__ + "-py311"), "image tag must match the pinned Ray"
    assert "ray-ml" not in CLUSTER_YAML.read_text()


def test_node_types_head_cpu_and_v100_workers_with_autoscaling():
    cfg = load_cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m5.")
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] >= 1
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu_workers = gpu_node_types(cfg)
    by_instance = {t["node_config"]["InstanceType"]: t for t in gpu_workers.values()}
    assert set(by_instance) == set(V100_TYPES)
    for instance, gpus in V100_TYPES.items():
        node = by_instance[instance]
        assert node["resources"]["GPU"] == gpus
        assert 1 <= node["resources"]["CPU"] <= VCPUS[instance]
        assert 0 <= node.get("min_workers", 0) < node["max_workers"] <= cfg["max_workers"], instance
    assert cfg["idle_timeout_minutes"] > 0
    assert sum(t.get("min_workers", 0) for t in workers.values()) == 0, "GPU nodes only on demand (autoscaling)"
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert cfg["provider"]["cache_stopped_nodes"] is False


def test_every_node_has_an_instance_profile_and_no_static_keys_exist():
    cfg = load_cluster()
    for name, node in cfg["available_node_types"].items():
        arn = node["node_config"]["IamInstanceProfile"]["Arn"]
        assert PROFILE_ARN.match(arn), (name, arn)
        expected = "pconv-ray-head" if name == cfg["head_node_type"] else "pconv-ray-worker"
        assert arn.endswith("/" + expected), (name, arn)
        assert node["node_config"]["MetadataOptions"]["HttpTokens"] == "required", "IMDSv2 only"
    text = CLUSTER_YAML.read_text()
    for forbidden in (r"aws_access_key", r"aws_secret", r"AKIA[0-9A-Z]{16}", r"aws_session_token"):
        assert not re.search(forbidden, text, re.IGNORECASE), forbidden


def test_token_auth_everywhere():
    cfg = load_cluster()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    commands = start_commands(cfg)
    assert len(commands) == 2
    for command in commands:
        assert "RAY_AUTH_MODE=token ray start" in " ".join(command.split()), command
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert not re.search(r"RAY_AUTH_MODE=(?!token)", CLUSTER_YAML.read_text())


def test_torch_comes_from_the_cuda126_index_before_the_project():
    """The pip route (docs/operations.md's fallback without the image), applied to the config."""
    cfg = cluster_with_pip_fallback()
    setup = cfg["setup_commands"]
    torch_cmd = next(i for i, c in enumerate(setup) if "torch==" in c)
    project_cmd = next(i for i, c in enumerate(setup) if "-e ~/pconv" in c)
    assert torch_cmd < project_cmd
    assert f"--index-url {CU126_INDEX}" in setup[torch_cmd]
    pins = locked_pins()
    for pkg in ("torch", "torchvision"):
        assert pins[pkg].replace(" ", "") in setup[torch_cmd].split(), (pkg, pins[pkg])
    assert not any("whl/cu13" in c for c in setup), "CUDA 13 wheels have no V100 (sm_70) kernels"


def test_no_public_dashboard_and_a_preset_security_group():
    cfg = load_cluster()
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in json.dumps(cfg), "nothing in the config binds or opens to all addresses"
    # Ray creates a group that opens SSH to 0.0.0.0/0 unless every node type names its own.
    for name, node in cfg["available_node_types"].items():
        groups = node["node_config"]["SecurityGroupIds"]
        assert groups and all(g.startswith("sg-") for g in groups), name
    assert "security_group" not in cfg["provider"]
    for option in cfg["docker"]["run_options"]:
        assert not re.match(r"(-p|--publish)\b", option), option


def test_region_is_consistent_and_mlflow_settings_come_from_the_secret():
    cfg = load_cluster()
    region = cfg["provider"]["region"]
    assert f"--env AWS_DEFAULT_REGION={region}" in cfg["docker"]["run_options"]
    for arn_text in (AWS_DIR / "iam-policy.json").read_text(), (AWS_DIR / "head-autoscaler-policy.json").read_text():
        for arn_region in re.findall(r"arn:aws:(?:ec2|secretsmanager):([a-z0-9-]*):", arn_text):
            assert arn_region == region
    assert any("fetch_mlflow_env.py --secret-id pconv/mlflow --out ~/.pconv/mlflow.env" in c
               for c in cfg["setup_commands"])
    for command in start_commands(cfg):
        assert ". ~/.pconv/mlflow.env" in command, "Ray workers must inherit the MLflow settings"
    assert not re.search(r"MLFLOW_TRACKING_(PASSWORD|TOKEN)\s*[=:]", CLUSTER_YAML.read_text())


def test_file_mounts_exist_in_the_repository():
    for remote, local in load_cluster()["file_mounts"].items():
        if local.startswith("~"):
            continue  # the auth token lives on the machine that runs `ray up`
        assert (REPO_ROOT / local).exists(), f"file_mounts[{remote!r}] -> {local} is missing"
    assert (REPO_ROOT / "infra" / "aws" / "fetch_mlflow_env.py").is_file()


@pytest.mark.parametrize("driver, ok", [("580.105.08", True), ("570.195.03", True), ("560.28.03", True),
                                        ("550.54.15", False), ("595.58.03", False), ("", False)])
def test_gpu_driver_check_accepts_only_the_560_to_580_branches(tmp_path, driver, ok):
    cfg = load_cluster()
    commands = {tuple(c for c in t["initialization_commands"] if "nvidia-smi" in c)
                for t in gpu_node_types(cfg).values()}
    assert len(commands) == 1, "every GPU node type runs the same check"
    (check,) = commands.pop()
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho '{driver}'\n" if driver else "#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    res = subprocess.run(["bash", "-c", check], env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=30)
    assert (res.returncode == 0) is ok, (driver, res.stderr)
    if not ok:
        assert "560-580" in res.stderr


# ---------------------------------------------------------------------------------------- fetch_mlflow_env.py
@pytest.fixture(scope="module")
def fetch_module():
    sys.path.insert(0, str(AWS_DIR))
    try:
        import fetch_mlflow_env
        yield fetch_mlflow_env
    finally:
        sys.path.remove(str(AWS_DIR))


def test_mlflow_env_rendering_quotes_values_and_rejects_foreign_keys(fetch_module, tmp_path):
    text = fetch_module.render_env(json.dumps({"MLFLOW_TRACKING_URI": "https://mlflow.internal:5000",
                                               "MLFLOW_TRACKING_PASSWORD": "p'a$s w;rd"}), "pconv/mlflow")
    out = tmp_path / "mlflow.env"
    fetch_module.write_private(out, text)
    assert out.stat().st_mode & 0o077 == 0
    shown = subprocess.run(["bash", "-c", f'set -a; . "{out}"; set +a; printf "%s|%s" "$MLFLOW_TRACKING_URI" '
                            '"$MLFLOW_TRACKING_PASSWORD"'], capture_output=True, text=True, check=True)
    assert shown.stdout == "https://mlflow.internal:5000|p'a$s w;rd"
    for bad, message in [('{"LD_PRELOAD": "x", "MLFLOW_TRACKING_URI": "u"}', "not MLflow client settings"),
                         ('{"MLFLOW_TRACKING_USERNAME": "u"}', "lacks"),
                         ('["MLFLOW_TRACKING_URI"]', "JSON object"),
                         ("not json", "not JSON"),
                         ('{"MLFLOW_TRACKING_URI": "a\\nexport X=1"}', "single-line")]:
        with pytest.raises(fetch_module.SecretFormatError, match=message) as info:
            fetch_module.render_env(bad, "pconv/mlflow")
        assert "pconv/mlflow" in str(info.value)


@pytest.mark.integration
def test_fetch_mlflow_env_reads_a_real_secrets_manager_endpoint(s3_server, tmp_path, monkeypatch):
    """Against the moto server process (it serves Secrets Manager too), through the standard AWS env."""
    import boto3

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("secretsmanager")
    client.create_secret(Name="pconv/mlflow-test", SecretString=json.dumps(
        {"MLFLOW_TRACKING_URI": "http://10.0.0.5:5000", "MLFLOW_TRACKING_USERNAME": "cluster"}))
    script = AWS_DIR / "fetch_mlflow_env.py"
    out = tmp_path / "env"
    res = subprocess.run([sys.executable, str(script), "--secret-id", "pconv/mlflow-test", "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "export MLFLOW_TRACKING_URI=http://10.0.0.5:5000" in out.read_text()
    missing = subprocess.run([sys.executable, str(script), "--secret-id", "pconv/absent", "--out",
                              str(tmp_path / "other")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "pconv/absent" in missing.stderr
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------- infra/k8s/rayjob.yaml
def load_rayjob() -> tuple[dict, list[dict]]:
    docs = [d for d in yaml.safe_load_all(RAYJOB_YAML.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0], docs


def ray_containers(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_rayjob_has_the_required_fields():
    job, docs = load_rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["python", "pipelines/train.py"]
    args = [a for a in entry[2:] if a != "--use-gpu"]
    flags = dict(zip(args[::2], args[1::2]))
    for required in ("--images", "--masks", "--run-name", "--storage", "--workers", "--image-size",
                     "--batch-size", "--phase1-steps", "--phase2-steps", "--checkpoint-every", "--vgg-weights"):
        assert required in flags, required
    assert flags["--storage"].startswith("s3://"), "checkpoints must outlive the cluster"
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = 0
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            gpus += int(limits["nvidia.com/gpu"]) * group["replicas"]
    assert int(flags["--workers"]) == gpus, "one training worker per requested GPU"
    assert int(flags["--batch-size"]) % int(flags["--workers"]) == 0
    for container in ray_containers(job):
        assert container["image"] == expected_image(load_cluster()), "same image as ray_cluster.yaml"
    assert spec["rayClusterSpec"]["rayVersion"] == BASE_IMAGE.split(":")[1].split("-")[0]


def test_rayjob_token_auth_secrets_and_irsa():
    job, docs = load_rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["authOptions"]["secretName"]
    for container in ray_containers(job):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token"
        assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
        assert {"secretRef": {"name": "pconv-mlflow"}} in container["envFrom"], "MLflow settings from a Secret"
    accounts = [d for d in docs if d.get("kind") == "ServiceAccount"]
    assert len(accounts) == 1
    role = accounts[0]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.match(r"^arn:aws:iam::\d{12}:role/", role)
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert all(p["spec"]["serviceAccountName"] == accounts[0]["metadata"]["name"] for p in pods)
    text = RAYJOB_YAML.read_text()
    assert not re.search(r"aws_access_key|aws_secret|AKIA[0-9A-Z]{16}", text, re.IGNORECASE)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "RayJob"}, "no Service/Ingress exposing the cluster"
    assert "LoadBalancer" not in json.dumps(docs) and "NodePort" not in json.dumps(docs)


def test_rayjob_installs_cuda126_torch_and_the_project_pins():
    """The pip route (infra/k8s/README.md's fallback without the image)."""
    runtime_env = yaml.safe_load(fallback_yaml(K8S_README, "rayjob.yaml")["runtimeEnvYAML"])
    packages = runtime_env["pip"]["packages"]
    options = runtime_env["pip"]["pip_install_options"]
    assert CU126_INDEX in options
    pins = locked_pins()
    version = {p: pins[p].split("==")[1] for p in ("torch", "torchvision")}
    assert f"torch=={version['torch']}+cu126" in packages
    assert f"torchvision=={version['torchvision']}+cu126" in packages
    for name, requirement in pins.items():
        if name in ("torch", "torchvision", "ray"):
            continue  # cu126 builds above; Ray comes with the image
        assert requirement.replace(" ", "") in [p.replace(" ", "") for p in packages], requirement


# ---------------------------------------------------------------------------------------- IAM policies
def statements(name: str) -> list[dict]:
    doc = json.loads((AWS_DIR / name).read_text())
    assert doc["Version"] == "2012-10-17"
    return doc["Statement"]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_bucket_policy_is_least_privilege():
    stmts = statements("iam-policy.json")
    bucket_arns = set()
    for st in stmts:
        assert st["Effect"] == "Allow"
        resources, actions = as_list(st["Resource"]), as_list(st["Action"])
        assert "*" not in resources and all("*" not in a for a in actions), st
        if any(a.startswith("s3:") for a in actions):
            for resource in resources:
                assert re.match(r"^arn:aws:s3:::[a-z0-9.-]+(/\*)?$", resource), resource
                bucket_arns.add(resource.removesuffix("/*"))
            object_level = any(a in ("s3:GetObject", "s3:PutObject") for a in actions)
            assert all(r.endswith("/*") == object_level for r in resources), st
        else:
            assert actions == ["secretsmanager:GetSecretValue"]
            assert all(r.startswith("arn:aws:secretsmanager:") and ":secret:pconv/mlflow" in r for r in resources)
    assert len(bucket_arns) == 1, "one bucket for data, checkpoints and models"
    actions = {a for st in stmts for a in as_list(st["Action"])}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    assert not any(a.startswith(("iam:", "ec2:", "s3:PutBucket", "s3:DeleteBucket")) for a in actions)


def test_head_and_mlflow_server_policies_are_scoped():
    stmts = statements("head-autoscaler-policy.json")
    for st in stmts:
        actions = as_list(st["Action"])
        if as_list(st["Resource"]) == ["*"]:
            assert all(a.startswith("ec2:Describe") for a in actions), "only Describe* lacks resource scoping"
        if any(a in ("ec2:TerminateInstances", "ec2:StopInstances") for a in actions):
            assert st["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == load_cluster()["cluster_name"]
        if "iam:PassRole" in actions:
            assert as_list(st["Resource"]) == ["arn:aws:iam::123456789012:role/pconv-ray-worker"]
        assert not any(a.startswith("s3:") for a in actions)
    server = statements("mlflow-server-policy.json")
    for st in server:
        for resource in as_list(st["Resource"]):
            assert resource == "arn:aws:s3:::pconv-data" or resource.startswith("arn:aws:s3:::pconv-data/mlflow/")
    assert json.loads((AWS_DIR / "ec2-trust-policy.json").read_text())["Statement"][0]["Principal"] == {
        "Service": "ec2.amazonaws.com"}


# ---------------------------------------------------------------------------------------- node image, packaging
def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def test_dockerfile_pins_equal_the_lock():
    pins, args = locked_pins(), dockerfile_args()
    assert pins["torch"].replace(" ", "") == f"torch=={args['TORCH_VERSION']}"
    assert pins["torchvision"].replace(" ", "") == f"torchvision=={args['TORCHVISION_VERSION']}"
    assert args["TORCH_INDEX_URL"] == CU126_INDEX, "V100 needs the CUDA 12.x builds"
    ray_version = pins["ray"].split("==")[1]
    assert BASE_IMAGE == f"rayproject/ray:{ray_version}-py311-gpu"
    text = DOCKERFILE.read_text()
    install = next(line for line in text.splitlines() if line.startswith("RUN pip install") and "torch" in line)
    assert '"torch==${TORCH_VERSION}"' in install and '"torchvision==${TORCHVISION_VERSION}"' in install
    # the project is installed after torch, every dependency at its locked version
    assert text.index("${TORCH_INDEX_URL}") < text.index("pip install --no-cache-dir -c /tmp/pconv-src/requirements.lock /tmp/pconv-src")
    assert f"ray.__version__ == '{ray_version}'" in text and "startswith('12.6')" in text
    assert "whl/cu13" not in text


def test_docker_build_context_holds_what_the_dockerfile_copies():
    rules = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "allow-list: nothing enters the context unless named"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for line in re.findall(r"^COPY\s+(.+)$", DOCKERFILE.read_text(), re.M):
        sources = [s for s in line.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert source in allowed and (REPO_ROOT / source).exists(), source
    assert not {".venv", ".git", "runs", "data"} & allowed


def test_image_tag_follows_the_pins_the_code_and_the_dockerfile(tmp_path):
    module = image_ref_module()
    for name in ("pyproject.toml", "Dockerfile", "requirements.lock"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    shutil.copytree(REPO_ROOT / "pconv", tmp_path / "pconv", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    tag = module.image_tag(tmp_path)
    assert tag == module.image_tag(REPO_ROOT)
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tag.startswith(version + "-")
    (tmp_path / "requirements.lock").write_text((REPO_ROOT / "requirements.lock").read_text().replace(
        "\nmlflow==3.17.2", "\nmlflow==3.17.1"))
    assert module.image_tag(tmp_path) != tag, "a changed pin must give a new tag"
    shutil.copy(REPO_ROOT / "requirements.lock", tmp_path / "requirements.lock")
    served = tmp_path / "pconv" / "inference" / "serve.py"
    served.write_text(served.read_text() + "\n# changed\n")
    assert module.image_tag(tmp_path) != tag, "changed code must give a new tag (serving runs the image's code)"
    shutil.copy(REPO_ROOT / "pconv" / "inference" / "serve.py", served)
    (tmp_path / "Dockerfile").write_text(DOCKERFILE.read_text() + "\nRUN true\n")
    assert module.image_tag(tmp_path) != tag, "a changed Dockerfile must give a new tag"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_targets_build_and_push_the_image_the_cluster_files_name():
    cfg = load_cluster()
    image = cfg["docker"]["image"]
    region = cfg["provider"]["region"]
    res = subprocess.run(["make", "-n", "push-image", "AWS_ACCOUNT=123456789012", f"AWS_REGION={region}",
                          f"PYTHON={sys.executable}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("docker build") and line.endswith(f"-t {image} .") for line in lines), res.stdout
    login = next(line for line in lines if "get-login-password" in line)
    assert f"aws ecr get-login-password --region {region} | docker login --username AWS --password-stdin " \
           f"123456789012.dkr.ecr.{region}.amazonaws.com" == login
    assert f"docker push {image}" in lines
    assert lines.index(login) < lines.index(f"docker push {image}")
    missing = subprocess.run(["make", "image", f"PYTHON={sys.executable}"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode != 0 and "AWS_ACCOUNT" in missing.stderr


def test_nodes_log_in_to_ecr_before_the_pull_and_check_the_image(tmp_path):
    cfg = load_cluster()
    registry = cfg["docker"]["image"].split("/")[0]
    login = f"docker login --username AWS --password-stdin {registry}"
    region = cfg["provider"]["region"]
    for name, node_type in cfg["available_node_types"].items():
        init = node_type.get("initialization_commands", cfg["initialization_commands"])
        assert any(login in c and f"get-login-password --region {region}" in c for c in init), name
    # The setup check passes on an image with the cu126 torch and the project, and fails on anything else.
    (check,) = [c for c in cfg["setup_commands"] if "import pconv, torch" in c]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)

    def run_check(cuda: str | None, with_pconv: bool = True) -> subprocess.CompletedProcess:
        site = tmp_path / f"site-{cuda}-{with_pconv}"
        (site / "torch").mkdir(parents=True)
        (site / "torch" / "__init__.py").write_text(
            f"__version__ = '2.14.1'\nclass version:\n    cuda = {cuda!r}\n")
        if with_pconv:
            (site / "pconv.py").write_text("")
        return subprocess.run(["bash", "-c", check], capture_output=True, text=True, timeout=60,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(site)}, cwd=tmp_path)

    assert run_check("12.6").returncode == 0
    assert run_check(None).returncode != 0          # CPU build
    assert "cu126" in run_check("13.0").stderr      # default CUDA 13 wheel: no sm_70 kernels
    assert run_check("12.6", with_pconv=False).returncode != 0


def test_pip_fallback_is_a_valid_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = cluster_with_pip_fallback()
    validate_config(prepare_config(copy.deepcopy(cfg)))
    assert cfg["docker"]["image"] == BASE_IMAGE
    for remote, local in cfg["file_mounts"].items():
        if not local.startswith("~"):
            assert (REPO_ROOT / local).exists(), remote
    assert cfg["file_mounts"]["~/pconv/pconv"] == "./pconv"
    assert not any("ecr" in c for c in cfg["initialization_commands"])


def test_ecr_pull_policy_is_scoped_to_the_image_repository():
    stmts = statements("ecr-pull-policy.json")
    cfg = load_cluster()
    repo = cfg["docker"]["image"].split("/", 1)[1].split(":")[0]
    region = cfg["provider"]["region"]
    for st in stmts:
        actions, resources = as_list(st["Action"]), as_list(st["Resource"])
        assert all(a.startswith("ecr:") for a in actions)
        if resources == ["*"]:
            assert actions == ["ecr:GetAuthorizationToken"], "only the login lacks resource scoping"
        else:
            assert resources == [f"arn:aws:ecr:{region}:123456789012:repository/{repo}"]
            assert not any(a.startswith(("ecr:Put", "ecr:Delete", "ecr:Upload", "ecr:Complete", "ecr:Initiate"))
                           for a in actions), "nodes pull, never push"
    actions = {a for st in stmts for a in as_list(st["Action"])}
    assert {"ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"} <= actions


def test_build_backend_supports_the_spdx_license_field():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert isinstance(pyproject["project"]["license"], str), "PEP 639 SPDX expression"
    (setuptools_req,) = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", setuptools_req.replace(" ", ""))
    assert minimum and int(minimum.group(1)) >= 77, "license = \"...\" needs setuptools >= 77.0.0 (PEP 639)"


# ---------------------------------------------------------------------------------------- node types, autoscaling
def test_p3dn_and_cpu_data_workers_are_on_demand_types():
    from conftest import load_benchmark

    cfg = load_cluster()
    types = cfg["available_node_types"]
    p3dn = types["gpu.p3dn.24xlarge"]
    assert p3dn["node_config"]["InstanceType"] == "p3dn.24xlarge"
    assert p3dn["resources"] == {"CPU": 96, "GPU": 8}
    cpu = [t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) == 0]
    assert len(cpu) == 1, "one CPU worker type for data work"
    (cpu_type,) = cpu
    assert cpu_type["resources"]["CPU"] >= 16 and "initialization_commands" not in cpu_type, "no GPU driver check"
    assert not cpu_type["node_config"]["InstanceType"].startswith(("p", "g"))
    assert cpu_type["node_config"]["IamInstanceProfile"]["Arn"].endswith("/pconv-ray-worker")
    for node_type in (p3dn, cpu_type):
        assert node_type["min_workers"] == 0 < node_type["max_workers"] <= cfg["max_workers"]
    # every GPU type offered is one the scaling model (docs/scaling.md) has numbers for
    model = load_benchmark("scaling_model")
    for node_type in gpu_node_types(cfg).values():
        spec = model.NODE_TYPES[node_type["node_config"]["InstanceType"]]
        assert node_type["resources"]["GPU"] == spec.gpus and node_type["resources"]["CPU"] <= spec.vcpus


def test_job_start_timeout_covers_a_cold_gpu_node():
    head_start = " ".join(" ".join(load_cluster()["head_start_ray_commands"]).split())
    match = re.search(r"RAY_JOB_START_TIMEOUT_SECONDS=(\d+) RAY_AUTH_MODE=token ray start --head", head_start)
    assert match and 900 < int(match.group(1)) <= 3600, "above Ray's 900 s default, bounded"


# ---------------------------------------------------------------------------------------- KubeRay cost guards
def test_rayjob_cost_guards_are_present_and_sane():
    job, _ = load_rayjob()
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 300, "GPU pods bill until the TTL deletes the cluster"
    assert spec["backoffLimit"] == 0, "KubeRay retries every failure on a fresh cluster, config errors included"
    pre_running, active = spec["preRunningDeadlineSeconds"], spec["activeDeadlineSeconds"]
    assert isinstance(pre_running, int) and 600 <= pre_running <= 7200, "longer than a cold start, bounded"
    entry = spec["entrypoint"].split()
    steps = sum(int(entry[entry.index(f) + 1]) for f in ("--phase1-steps", "--phase2-steps"))
    # 0.187 s/step: the scaling model's 16-V100 step (docs/scaling.md, section 4); 2x for its uncertainty.
    assert isinstance(active, int) and pre_running + 2 * 0.187 * steps <= active <= 7 * 86400


def test_docs_state_the_kuberay_release_that_has_auth_options_secret_name():
    for path in (RAYJOB_YAML, K8S_README, OPERATIONS_MD):
        text = path.read_text()
        assert "1.6.0" in text, path.name
        assert not re.search(r"(>=|≥)\s*1\.5\.1", text), f"{path.name}: secretName is not in KubeRay 1.5.x"
    readme = K8S_README.read_text()
    for field in ("ttlSecondsAfterFinished", "backoffLimit", "preRunningDeadlineSeconds", "activeDeadlineSeconds"):
        assert field in readme, field


def test_the_spot_v100_types_mirror_the_on_demand_ones_and_ray_launches_them_first():
    """Issue 26 item 4: gpu.p3.2xlarge.spot is gpu.p3.2xlarge on spot capacity (same resources, image, metadata
    settings; InstanceMarketOptions spot, terminated when reclaimed), and so is gpu.p3.16xlarge.spot. Ray 2.60's own
    scheduler (the function the autoscaler calls, with its default scorer) launches the spot type for a 1-GPU
    worker and the 8-GPU spot type for 8 workers, and between the two 1-GPU types the spot one up to its max_workers
    and the on-demand one beyond: what the file's comments say."""
    from functools import partial

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    cluster_config = load_cluster()
    types = cluster_config["available_node_types"]
    assert {t for t in types if t.endswith(".spot")} == {"gpu.p3.2xlarge.spot", "gpu.p3.16xlarge.spot"}
    for name in ("gpu.p3.2xlarge", "gpu.p3.16xlarge"):
        spot, on_demand = types[f"{name}.spot"], types[name]
        assert spot["resources"] == on_demand["resources"] and spot["min_workers"] == 0
        assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        assert "InstanceMarketOptions" not in on_demand["node_config"]
        assert {k: v for k, v in spot["node_config"].items() if k != "InstanceMarketOptions"} == on_demand["node_config"]
    spot = types["gpu.p3.2xlarge.spot"]
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    head = cluster_config["head_node_type"]
    worker = {"CPU": 1, "GPU": 1}
    added, left = get_nodes_for(types, {}, head, 100, [worker], scorer)
    assert not left and dict(added) == {"gpu.p3.2xlarge.spot": 1}, added  # the whole file: spot first
    # between the two 1-GPU types (they fill alike): spot up to its max_workers, then on demand
    pair = {k: types[k] for k in (head, "gpu.p3.2xlarge", "gpu.p3.2xlarge.spot")}
    added, left = get_nodes_for(pair, {}, head, 100, [worker] * (spot["max_workers"] + 2), scorer)
    assert not left and dict(added) == {"gpu.p3.2xlarge.spot": spot["max_workers"], "gpu.p3.2xlarge": 2}, added
    added, left = get_nodes_for(types, {}, head, 100, [worker] * 8, scorer)  # 8 workers fill an 8-GPU node best
    assert not left and dict(added) == {"gpu.p3.16xlarge.spot": 1}, added
