"""Write infra/serve/serve_config.yaml into infra/k8s/rayservice.yaml's ``serveConfigV2`` (one source for the Serve
config: ``serve deploy`` on a VM cluster and the KubeRay RayService run the same application settings).

    python infra/k8s/sync_serve_config.py            # after editing infra/serve/serve_config.yaml
    python infra/k8s/sync_serve_config.py --check    # exit 1 when rayservice.yaml is out of date (tests do this)

The file is embedded verbatim (comments included) as the block scalar; everything else in rayservice.yaml is kept.
Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO_ROOT / "infra" / "serve" / "serve_config.yaml"
RAYSERVICE = REPO_ROOT / "infra" / "k8s" / "rayservice.yaml"
INDENT = " " * 4  # under `spec:` -> `serveConfigV2: |`
BLOCK = re.compile(r"^(  serveConfigV2: \|\n)((?:    .*\n|\n)+?)(?=  \S)", re.M)


def rendered(service_text: str, config_text: str) -> str:
    """``service_text`` with its serveConfigV2 block replaced by ``config_text``."""
    if not BLOCK.search(service_text):
        raise ValueError(f"{RAYSERVICE}: no `  serveConfigV2: |` block under spec")
    body = "".join(INDENT + line if line.strip() else "\n" for line in config_text.splitlines(keepends=True))
    return BLOCK.sub(lambda m: m.group(1) + body, service_text, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when out of date")
    args = parser.parse_args(argv)
    current = RAYSERVICE.read_text()
    wanted = rendered(current, SERVE_CONFIG.read_text())
    if args.check:
        if wanted != current:
            print(f"{RAYSERVICE.relative_to(REPO_ROOT)} is out of date: python infra/k8s/sync_serve_config.py",
                  file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        RAYSERVICE.write_text(wanted)
        print(f"updated {RAYSERVICE.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
