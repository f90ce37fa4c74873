"""Refresh the dask-kubernetes operator's CRD schemas kept here (run from anywhere, needs pip).

    python deploy/kubernetes/schemas/update.py [VERSION]

Downloads the dask-kubernetes wheel (``pip download --no-deps``; nothing is installed), takes the
``openAPIV3Schema`` of its DaskCluster, DaskJob and DaskWorkerGroup CRDs (the helm chart's
``crds/`` — what ``helm install dask-kubernetes-operator`` puts in a cluster) without the
``description`` texts, and writes them as ``<kind>.json`` beside this script, with the version in
``VERSION``. ``tests/test_deploy.py`` validates the manifests of ``deploy/kubernetes/`` against them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = "dask_kubernetes/operator/deployment/helm/dask-kubernetes-operator/crds/"
KINDS = ("DaskCluster", "DaskJob", "DaskWorkerGroup")


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(argv: list[str]) -> int:
    spec = f"dask-kubernetes=={argv[0]}" if argv else "dask-kubernetes"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, spec],
                       check=True)  # fmt: skip
        (wheel,) = Path(tmp).glob("dask_kubernetes-*.whl")
        version = wheel.name.split("-")[1]
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if not (name.startswith(CRDS) and name.endswith(".yaml")):
                    continue
                crd = yaml.safe_load(z.read(name))
                kind = crd["spec"]["names"]["kind"]
                if kind not in KINDS:
                    continue
                (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
                schema = _strip(v1["schema"]["openAPIV3Schema"])
                out = HERE / f"{kind}.json"
                out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
                print(f"{out}: {kind} v1 from dask-kubernetes {version}")
    (HERE / "VERSION").write_text(f"dask-kubernetes {version}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
