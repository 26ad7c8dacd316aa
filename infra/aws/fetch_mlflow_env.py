#!/usr/bin/env python
"""Write the MLflow client settings of the cluster from AWS Secrets Manager to a shell env file.

Run by ``ray_cluster.yaml``'s setup on every node (credentials come from the node's instance profile). The secret is
a JSON object whose keys are MLflow client environment variables, e.g.::

    {"MLFLOW_TRACKING_URI": "https://mlflow.internal.example:5000",
     "MLFLOW_TRACKING_USERNAME": "pconv-cluster", "MLFLOW_TRACKING_PASSWORD": "..."}

The file (mode 600, written atomically) holds ``export KEY='value'`` lines; the Ray start commands source it so
that every Ray worker inherits the settings. Only the keys in ``ALLOWED_KEYS`` are accepted, so the secret cannot
inject arbitrary environment (e.g. ``LD_PRELOAD``) into the Ray processes.

    python infra/aws/fetch_mlflow_env.py --secret-id pconv/mlflow --out ~/.pconv/mlflow.env
    python infra/aws/fetch_mlflow_env.py --secret-id "" --out ~/.pconv/mlflow.env   # no secret: empty file
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("fetch_mlflow_env")

ALLOWED_KEYS = frozenset({
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_INSECURE_TLS",
})
REQUIRED_KEYS = ("MLFLOW_TRACKING_URI",)


class SecretFormatError(ValueError):
    """The secret's content is not a usable set of MLflow settings."""


def render_env(secret_string: str, secret_id: str = "<secret>") -> str:
    """The env-file text for a secret's JSON string; ``SecretFormatError`` naming ``secret_id`` if it is unusable."""
    try:
        values = json.loads(secret_string)
    except json.JSONDecodeError as exc:
        raise SecretFormatError(f"secret {secret_id!r} is not JSON: {exc}") from None
    if not isinstance(values, dict):
        raise SecretFormatError(f"secret {secret_id!r} must be a JSON object of MLflow variables, "
                                f"got {type(values).__name__}")
    unknown = sorted(set(values) - ALLOWED_KEYS)
    if unknown:
        raise SecretFormatError(f"secret {secret_id!r} has keys that are not MLflow client settings: {unknown}; "
                                f"allowed: {sorted(ALLOWED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if not values.get(k)]
    if missing:
        raise SecretFormatError(f"secret {secret_id!r} lacks {missing}")
    bad = sorted(k for k, v in values.items() if not isinstance(v, str) or "\n" in v or "\0" in v)
    if bad:
        raise SecretFormatError(f"secret {secret_id!r}: values of {bad} must be single-line strings")
    lines = [f"# MLflow client settings from AWS Secrets Manager secret {secret_id} (generated; do not edit)"]
    lines += [f"export {key}={shlex.quote(values[key])}" for key in sorted(values)]
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 600, atomically (a reader sees the old or the new file, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_secret_string(secret_id: str, region: str | None = None) -> str:
    """The SecretString of ``secret_id`` (credentials and endpoint from the standard AWS environment)."""
    import boto3

    client = boto3.client("secretsmanager", region_name=region)
    response = client.get_secret_value(SecretId=secret_id)
    if "SecretString" not in response:
        raise SecretFormatError(f"secret {secret_id!r} is binary; store the MLflow settings as a JSON string")
    return response["SecretString"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--secret-id", required=True, help="Secrets Manager secret name or ARN ('' = none)")
    parser.add_argument("--out", required=True, type=Path, help="env file to write (mode 600)")
    parser.add_argument("--region", default=None, help="AWS region (default: from the AWS environment)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.secret_id:
        log.warning("no --secret-id: writing an empty %s; training will log to a local MLflow store on the "
                    "driver node (set the secret for a shared tracking server)", args.out)
        write_private(args.out, "# no MLflow secret configured\n")
        return 0
    try:
        text = render_env(fetch_secret_string(args.secret_id, args.region), args.secret_id)
    except SecretFormatError as exc:
        log.error("%s", exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - AWS errors: say which secret, then fail the node setup
        log.error("cannot read secret %r: %s", args.secret_id, exc)
        return 1
    write_private(args.out, text)
    log.info("wrote MLflow settings (%s) to %s", ", ".join(sorted(
        line.split("=", 1)[0].removeprefix("export ") for line in text.splitlines()[1:])), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
