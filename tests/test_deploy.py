"""deploy/: the manifests parse and hold what the operator / dask-jobqueue need (no cluster runs)."""

from __future__ import annotations

import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "kubernetes"


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, path
    return docs[0]


def _containers(pod_spec: dict) -> list[dict]:
    containers = pod_spec["containers"]
    assert containers and all(c["image"] and c["args"] for c in containers)
    return containers


def _check_worker_spec(worker: dict) -> dict:
    assert int(worker["replicas"]) >= 1
    (c,) = _containers(worker["spec"])
    assert c["args"][:2] == ["dask", "worker"]
    assert "--nthreads" in c["args"] and c["args"][c["args"].index("--nthreads") + 1] == "1"
    assert any(m["mountPath"] == "/data" for m in c["volumeMounts"])
    return c


def _check_cluster_spec(spec: dict, name: str) -> None:
    _check_worker_spec(spec["worker"])
    (sched,) = _containers(spec["scheduler"]["spec"])
    assert sched["args"][:2] == ["dask", "scheduler"]
    ports = {p["name"]: p["containerPort"] for p in sched["ports"]}
    assert ports["tcp-comm"] == 8786
    service = spec["scheduler"]["service"]
    assert service["selector"]["dask.org/cluster-name"] == name
    assert {p["port"] for p in service["ports"]} >= {8786}


def test_daskcluster_manifest():
    doc = _load(K8S / "daskcluster.yaml")
    assert doc["apiVersion"] == "kubernetes.dask.org/v1"
    assert doc["kind"] == "DaskCluster"
    _check_cluster_spec(doc["spec"], doc["metadata"]["name"])
    c = _check_worker_spec(doc["spec"]["worker"])
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_gpu_worker_group_manifest():
    doc = _load(K8S / "gpu-workergroup.yaml")
    cluster = _load(K8S / "daskcluster.yaml")
    assert doc["apiVersion"] == "kubernetes.dask.org/v1"
    assert doc["kind"] == "DaskWorkerGroup"
    assert doc["spec"]["cluster"] == cluster["metadata"]["name"]
    c = _check_worker_spec(doc["spec"]["worker"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "gpu" in c["image"]


def test_daskjob_manifest():
    doc = _load(K8S / "daskjob.yaml")
    assert doc["apiVersion"] == "kubernetes.dask.org/v1"
    assert doc["kind"] == "DaskJob"
    (job,) = _containers(doc["spec"]["job"]["spec"])
    args = job["args"]
    assert args[0] == "survey-engine" and "run" in args
    assert args[args.index("--scheduler") + 1] == "$(DASK_SCHEDULER_ADDRESS)"
    assert "--resume" in args
    _check_cluster_spec(doc["spec"]["cluster"]["spec"], doc["metadata"]["name"])


def test_pvc_is_shared():
    doc = _load(K8S / "pvc.yaml")
    assert doc["kind"] == "PersistentVolumeClaim"
    assert doc["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for f in ("daskcluster.yaml", "gpu-workergroup.yaml")
        for v in _load(K8S / f)["spec"]["worker"]["spec"]["volumes"]
    }
    assert claims == {doc["metadata"]["name"]}


def test_jobqueue_yaml():
    doc = _load(DEPLOY / "slurm" / "jobqueue.yaml")
    slurm = doc["jobqueue"]["slurm"]
    for key in ("cores", "processes", "memory", "walltime", "job-script-prologue"):
        assert key in slurm, key
    assert slurm["cores"] % slurm["processes"] == 0  # one thread per worker process
    assert set(doc["survey_engine"]) <= {"tile", "halo", "thresh", "minarea", "deblender"}


def test_slurm_driver_compiles_and_parses_its_arguments(tmp_path):
    script = DEPLOY / "slurm" / "run_slurm.py"
    py_compile.compile(str(script), cfile=str(tmp_path / "x.pyc"), doraise=True)
    out = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "--jobs" in out.stdout and "--resume" in out.stdout


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles(name):
    text = (DEPLOY / name).read_text()
    assert "survey-engine --help" in text
    if name.endswith(".gpu"):
        assert text.startswith("#") and "FROM nvidia/cuda:" in text
        assert '".[gpu]"' in text and "-c constraints-cpu" not in text
    else:
        assert "-c constraints-cpu.txt" in text
