"""The node image's reference in ECR, derived from what goes into the image.

Tag = ``<project version>-<first 12 hex of sha256(dependencies + requirements.lock + Dockerfile + pconv/)>``: any
change to a pin, to the Dockerfile or to the code the image installs (every file of the ``pconv`` package) gives a new
tag, so ray_cluster.yaml and infra/k8s/rayjob.yaml / rayservice.yaml (which tests/test_cluster_config.py compares
with this function) cannot keep naming an image built from other pins or older code. Training jobs override the
image's code with their working_dir; a RayService runs the image's code, so a new tag is what makes nodes pull it.
``make image`` / ``make push-image`` print and use the same reference. Standard library only.

    python infra/docker/image_ref.py --tag
    python infra/docker/image_ref.py --account 123456789012 --region us-east-1
    python infra/docker/image_ref.py --update     # after changing a pin or the code: rewrite the tag in the cluster files
"""

from __future__ import annotations

import argparse
import hashlib
import re
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = "pconv-ray"  # the ECR repository (infra/aws/README.md creates it)
CLUSTER_FILES = ("ray_cluster.yaml", "infra/k8s/rayjob.yaml", "infra/k8s/rayservice.yaml")


def image_tag(root: Path = REPO_ROOT) -> str:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    digest = hashlib.sha256()
    for line in [project["requires-python"], *project["dependencies"]]:
        digest.update(line.replace(" ", "").encode() + b"\n")
    digest.update((root / "requirements.lock").read_bytes())
    digest.update((root / "Dockerfile").read_bytes())
    for path in sorted((root / "pconv").rglob("*")):  # what `pip install` puts in the image
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(path.relative_to(root).as_posix().encode() + b"\n" + path.read_bytes())
    return f"{project['version']}-{digest.hexdigest()[:12]}"


def image_ref(account: str, region: str, root: Path = REPO_ROOT) -> str:
    return f"{account}.dkr.ecr.{region}.amazonaws.com/{REPOSITORY}:{image_tag(root)}"


def update_cluster_files(root: Path = REPO_ROOT) -> list[str]:
    """Rewrite ``pconv-ray:<tag>`` in :data:`CLUSTER_FILES` to the current tag; returns the files changed."""
    changed = []
    for name in CLUSTER_FILES:
        path = root / name
        if not path.exists():
            continue
        text = path.read_text()
        new = re.sub(rf"({REPOSITORY}):[0-9A-Za-z.\-]+", rf"\g<1>:{image_tag(root)}", text)
        if new != text:
            path.write_text(new)
            changed.append(name)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", action="store_true", help="print only the tag")
    parser.add_argument("--account", default="123456789012", help="12-digit AWS account id")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--update", action="store_true", help="rewrite the tag in " + ", ".join(CLUSTER_FILES))
    args = parser.parse_args()
    if args.update:
        print("updated:", ", ".join(update_cluster_files()) or "nothing (tags already current)")
    else:
        print(image_tag() if args.tag else image_ref(args.account, args.region))


if __name__ == "__main__":
    main()
