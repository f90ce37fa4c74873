"""deploy/: the manifests parse, hold what the operator / dask-jobqueue need, and are valid.

No Kubernetes cluster runs here: the manifests are validated offline against the real schemas —
the custom resources against the dask-kubernetes operator's CRD schemas (``deploy/kubernetes/
schemas/``, from its wheel), their pod and service specs and the PVC strictly against the
Kubernetes OpenAPI schemas (``kubernetes-validate``: unknown fields are errors). The SLURM
configuration is checked against dask-jobqueue itself (its keys, the job script it makes); the
SLURM runs are in ``tests/test_slurm.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "kubernetes"
MANIFESTS = ["daskcluster.yaml", "daskjob.yaml", "gpu-workergroup.yaml", "pvc.yaml"]


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
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"  # the CRD wants a string
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
    assert set(doc["survey_engine"]) == {"slurm-timeout", "slurm-min-workers"}


def test_jobqueue_yaml_is_valid_for_dask_jobqueue(tmp_path, monkeypatch):
    """Every key is one dask-jobqueue knows (it ignores unknown ones silently), and the job
    script it makes from the file asks for what the file says."""
    if importlib.util.find_spec("dask_jobqueue") is None:
        pytest.skip("dask-jobqueue is not installed")
    import dask.config

    from survey_engine.slurm import _import_slurm_cluster, load_jobqueue_config

    SLURMCluster = _import_slurm_cluster()  # without its SIGINT handler (sys.exit)

    path = DEPLOY / "slurm" / "jobqueue.yaml"
    known = dask.config.get("jobqueue.slurm")
    assert set(_load(path)["jobqueue"]["slurm"]) <= set(known)
    monkeypatch.chdir(tmp_path)  # log-directory is created relative to it
    with dask.config.set(load_jobqueue_config(path)):
        with SLURMCluster(scheduler_options={"dashboard_address": ":0"}) as cluster:
            script = cluster.job_script()
    assert "#SBATCH -J survey-engine" in script
    assert "#SBATCH --cpus-per-task=16" in script and "#SBATCH --mem=64G" in script
    assert "#SBATCH -t 04:00:00" in script
    assert "source $HOME/survey-engine-venv/bin/activate" in script
    assert "--nthreads 1" in script and "--nworkers 16" in script
    assert "--local-directory ${TMPDIR:-/tmp}" in script and "--death-timeout 120" in script
    assert (tmp_path / "slurm-logs").is_dir()


def test_local_slurm_cluster_script_usage():
    import subprocess

    script = DEPLOY / "slurm" / "local_cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "usage:" in out.stderr and "up|down|status" in out.stderr


# -- validation against the real schemas ---------------------------------------------------


def _crd_schema(kind: str) -> dict:
    return json.loads((K8S / "schemas" / f"{kind}.json").read_text())


def _k8s_validate(obj: dict) -> None:
    """Strict validation against the newest Kubernetes OpenAPI schema kubernetes-validate ships."""
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(obj, kv.latest_version(), strict=True)


def _wrapped(kind: str, spec: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def _core_parts(doc: dict) -> list[dict]:
    """The core Kubernetes objects inside a dask-kubernetes custom resource (pods, service)."""
    spec, name = doc["spec"], doc["metadata"]["name"]
    if doc["kind"] == "DaskJob":
        return [_wrapped("Pod", spec["job"]["spec"], f"{name}-runner"),
                *_core_parts({"kind": "DaskCluster", "metadata": {"name": name}, "spec": spec["cluster"]["spec"]})]  # fmt: skip
    parts = [_wrapped("Pod", spec["worker"]["spec"], f"{name}-worker")]
    if doc["kind"] == "DaskCluster":
        parts.append(_wrapped("Pod", spec["scheduler"]["spec"], f"{name}-scheduler"))
        parts.append(_wrapped("Service", spec["scheduler"]["service"], f"{name}-scheduler"))
    return parts


def _validate(doc: dict) -> None:
    import jsonschema

    if doc["apiVersion"] == "kubernetes.dask.org/v1":
        jsonschema.validate(doc, _crd_schema(doc["kind"]))
        for part in _core_parts(doc):
            _k8s_validate(part)
    else:
        _k8s_validate(doc)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid_against_the_real_schemas(name):
    doc = _load(K8S / name)
    if doc["apiVersion"] == "kubernetes.dask.org/v1":  # a schema for every kind used
        assert (K8S / "schemas" / f"{doc['kind']}.json").is_file()
    _validate(doc)


def test_schema_validation_catches_mistakes():
    """The validation is not vacuous: a wrong type in the custom resource, an unknown
    container field, a bad PVC access mode are each refused."""
    import jsonschema

    kv = pytest.importorskip("kubernetes_validate")
    cluster = _load(K8S / "daskcluster.yaml")
    bad = copy.deepcopy(cluster)
    bad["spec"]["worker"]["replicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="'eight' is not of type 'integer'"):
        _validate(bad)
    bad = copy.deepcopy(cluster)
    bad["spec"]["worker"]["spec"]["containers"][0]["volumeMount"] = []  # for volumeMounts
    with pytest.raises(kv.ValidationError, match="'volumeMount' was unexpected"):
        _validate(bad)
    bad = _load(K8S / "pvc.yaml")
    bad["spec"]["resources"] = {"requests": {"storage": "1Ti"}, "limit": {}}
    with pytest.raises(kv.ValidationError, match="'limit' was unexpected"):
        _validate(bad)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles(name):
    text = (DEPLOY / name).read_text()
    assert "survey-engine --help" in text
    if name.endswith(".gpu"):
        assert text.startswith("#") and "FROM nvidia/cuda:" in text
        assert '".[gpu]"' in text and "-c constraints-cpu" not in text
    else:
        assert "-c constraints-cpu.txt" in text
