"""ray_cluster.yaml, infra/k8s/rayjob.yaml and the IAM policies: validated offline so they cannot rot.

ray_cluster.yaml goes through Ray's own cluster-config preparation and JSON-schema check (``prepare_config`` +
``validate_config`` of the pinned Ray); on top, the facts the cluster's security and the V100 setup depend on are
asserted. The GPU driver check of the worker node types is executed against fake ``nvidia-smi`` binaries.
"""

from __future__ import annotations

import copy
import json
import re
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
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
CU126_INDEX = "https://download.pytorch.org/whl/cu126"
V100_TYPES = {"p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8}
VCPUS = {"p3.2xlarge": 8, "p3.8xlarge": 32, "p3.16xlarge": 64}
PROFILE_ARN = re.compile(r"^arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+$")


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def pyproject_pins() -> dict[str, str]:
    """{package name: full requirement} of pyproject.toml's dependencies (extras stripped from the name)."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower(): d for d in deps}


def start_commands(cfg: dict) -> list[str]:
    return [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]


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
    assert cfg["docker"]["image"] == IMAGE
    for node_type in cfg["available_node_types"].values():
        assert "docker" not in node_type, "no per-node-type image override"
    assert IMAGE.split(":")[1].startswith(ray.__version__ + "-py311"), "image tag must match the pinned Ray"
    assert "ray-ml" not in CLUSTER_YAML.read_text()


def test_node_types_head_cpu_and_v100_workers_with_autoscaling():
    cfg = load_cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m5.")
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] >= 1
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    by_instance = {t["node_config"]["InstanceType"]: t for t in workers.values()}
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
    cfg = load_cluster()
    setup = cfg["setup_commands"]
    torch_cmd = next(i for i, c in enumerate(setup) if "torch==" in c)
    project_cmd = next(i for i, c in enumerate(setup) if "-e ~/pconv" in c)
    assert torch_cmd < project_cmd
    assert f"--index-url {CU126_INDEX}" in setup[torch_cmd]
    pins = pyproject_pins()
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
    commands = {tuple(t["initialization_commands"]) for name, t in cfg["available_node_types"].items()
                if name != cfg["head_node_type"]}
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
        assert container["image"] == IMAGE
    assert spec["rayClusterSpec"]["rayVersion"] == IMAGE.split(":")[1].split("-")[0]


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
    job, _ = load_rayjob()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    packages = runtime_env["pip"]["packages"]
    options = runtime_env["pip"]["pip_install_options"]
    assert CU126_INDEX in options
    pins = pyproject_pins()
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
