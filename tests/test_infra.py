"""Cluster manifests under infra/ against the code they run; fast, offline, no cluster.

- Every YAML under infra/ parses (multi-document); Kubernetes objects carry apiVersion, kind
  and name; the KubeRay objects have the fields the project relies on. No JSON schema of the
  KubeRay CRDs ships in a Python package, so those field checks stand in for one;
  infra/aws/cluster.yaml is validated against the cluster launcher's schema (it ships with
  ray) and serveConfigV2 against Ray Serve's.
- Every entry point, `--config` file and Serve import path that a manifest or the scaling guide
  names exists; configs load through `janus_lab.config` with the dotted overrides given.
- GPUs per worker pod and worker-group sizes fit the `ScalingConfig` the named config produces.
- serveConfigV2 is serve/config.yaml plus exactly the overrides in
  infra/kuberay/serve-overrides.yaml.
- Image tags, versions, environment variables and the MLflow wiring agree across files.
- Secrets and exposure: no file under infra/ holds a literal credential; credentials reach pods
  only from Secrets whose creation is documented; the core objects (and the Ray pod templates)
  pass Kubernetes' schemas (kubernetes-validate); only the Serve endpoint is published, with TLS,
  and it requires API keys.

Entry points and configs written in parallel by other issues (sweeps/) fail here, by name,
until they land.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from janus_lab.config import load_config
from janus_lab.train.config import ExperimentConfig
from shipped_configs import CONFIG_DIRS

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
SERVE_CONFIG = REPO / "serve" / "config.yaml"
SERVE_OVERRIDES = KUBERAY / "serve-overrides.yaml"
PROJECT_DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"
SCALING_GUIDE = REPO / "docs" / "scaling.md"

NAMESPACE = "janus-lab"
SHARED_CONFIGMAP = "janus-lab-env"
GPU = "nvidia.com/gpu"
# GPUs per instance of the EC2 types the manifests use (AWS's published specs).
EC2_GPUS = {"p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8, "p5e.48xlarge": 8,
            "p5en.48xlarge": 8, "g6e.xlarge": 1, "g6e.2xlarge": 1, "g5.xlarge": 1}
# Manifest folders whose YAML files are all Kubernetes objects (serve-overrides.yaml is data).
K8S_FOLDERS = (KUBERAY, INFRA / "mlflow")


# --------------------------------------------------------------------------- loading


def read_documents(path: Path) -> list:
    """Every non-empty document of a (multi-document) YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def infra_yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def k8s_files() -> list[Path]:
    return [p for p in infra_yaml_files()
            if any(p.is_relative_to(folder) for folder in K8S_FOLDERS) and p != SERVE_OVERRIDES]


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in k8s_files() for doc in read_documents(path)]


def objects_of_kind(kind: str) -> list[dict]:
    return [obj for _, obj in k8s_objects() if obj.get("kind") == kind]


def one_object(kind: str, name: str) -> dict:
    found = [obj for obj in objects_of_kind(kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r} under infra/, found {len(found)}"
    return found[0]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of every RayCluster, RayJob-owned cluster and RayService cluster."""
    specs = []
    for obj in objects_of_kind("RayCluster"):
        specs.append((f"RayCluster {obj['metadata']['name']}", obj["spec"]))
    for obj in objects_of_kind("RayJob"):
        if "rayClusterSpec" in obj["spec"]:
            specs.append((f"RayJob {obj['metadata']['name']}", obj["spec"]["rayClusterSpec"]))
    for obj in objects_of_kind("RayService"):
        specs.append((f"RayService {obj['metadata']['name']}", obj["spec"]["rayClusterConfig"]))
    return specs


def cluster_spec_of(job: dict) -> dict:
    """The cluster a RayJob runs on: its own spec, or the RayCluster its clusterSelector names."""
    if "rayClusterSpec" in job["spec"]:
        return job["spec"]["rayClusterSpec"]
    # KubeRay reads the cluster's name from this one selector key.
    return one_object("RayCluster", job["spec"]["clusterSelector"]["ray.io/cluster"])["spec"]


def pod_groups(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    # KubeRay treats the first container of a Ray pod as the Ray container.
    return group["template"]["spec"]["containers"][0]


def gpus_per_pod(group: dict) -> int:
    """GPUs Ray advertises on a pod: `num-gpus` when set, else the container's GPU limit."""
    limit = int(ray_container(group).get("resources", {}).get("limits", {}).get(GPU, 0))
    return int(group["rayStartParams"].get("num-gpus", limit))


def cpus_per_pod(group: dict) -> float:
    limits = ray_container(group).get("resources", {}).get("limits", {})
    return float(group["rayStartParams"].get("num-cpus", limits.get("cpu", 0)))


def max_pods(cluster: dict, group: dict) -> int:
    """Pods a worker group can reach: maxReplicas with the autoscaler, else replicas."""
    return int(group["maxReplicas"] if cluster.get("enableInTreeAutoscaling") else group["replicas"])


def shared_env() -> dict[str, str]:
    return one_object("ConfigMap", SHARED_CONFIGMAP)["data"]


def serve_config_v2() -> dict:
    (service,) = objects_of_kind("RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(requirement_name: str) -> str:
    """The `==` version pyproject.toml pins for a dependency (e.g. "2.13.0", "2.60.*")."""
    for requirement in pyproject()["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(requirement_name)}(\[[^\]]*\])?==(\S+)", requirement)
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no {requirement_name}==...")


def version_matches(version: str, pin: str) -> bool:
    """`2.60.0` matches the pin `2.60.*` or `2.60.0`."""
    return fnmatch.fnmatch(version, pin)


@dataclasses.dataclass
class BaseImage:
    """What `FROM rayproject/ray:<ray>-py<python>-cu<cuda>` says."""

    ray: str
    python: str
    cuda: str

    @property
    def tag(self) -> str:
        return f"{self.ray}-py{self.python}-cu{self.cuda}"


def project_base_image() -> BaseImage:
    text = PROJECT_DOCKERFILE.read_text()
    match = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)-cu(\d+)\s*$", text, re.M)
    assert match, f"{PROJECT_DOCKERFILE} must build FROM rayproject/ray:<ray>-py<python>-cu<cuda>"
    return BaseImage(*match.groups())


# --------------------------------------------------------------------------- commands


@dataclasses.dataclass
class Command:
    """`python SCRIPT [--config PATH] [KEY=VALUE ...] [--flag ...]`, as a job runs it."""

    script: str
    config: str | None
    overrides: list[str]
    flags: list[str]


def parse_command(text: str) -> Command:
    words = shlex.split(text)
    assert words[0] in ("python", "python3"), f"expected `python SCRIPT ...`, got {text!r}"
    script, rest = words[1], words[2:]
    config, overrides, flags = None, [], []
    index = 0
    while index < len(rest):
        word = rest[index]
        if word == "--config":
            config, index = rest[index + 1], index + 2
            continue
        if word.startswith("--config="):
            config = word.partition("=")[2]
        elif word.startswith("--"):
            flags.append(word)
        else:
            overrides.append(word)
        index += 1
    return Command(script, config, overrides, flags)


def config_class(config_path: str) -> type:
    relative = Path(config_path)
    for folder, cls in CONFIG_DIRS.items():
        if relative.is_relative_to(folder):
            return cls
    raise AssertionError(f"{config_path} is in no folder of tests/shipped_configs.py's CONFIG_DIRS; "
                         f"register its folder there with the config class it loads as")


def load_command_config(command: Command):
    assert command.config, f"{command.script} is run without --config"
    assert (REPO / command.config).is_file(), f"{command.config} does not exist in the repo"
    return load_config(config_class(command.config), REPO / command.config, command.overrides)


def experiment_of(cfg) -> ExperimentConfig:
    """The fine-tuning experiment a job runs: the config itself, or the one a sweep config holds
    (as a section, or as the path of an experiment YAML plus an `overrides` mapping)."""
    if isinstance(cfg, ExperimentConfig):
        return cfg
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, ExperimentConfig):
            return value
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and (REPO / value).is_file():
            overrides = getattr(cfg, "overrides", None) or {}
            # JSON is YAML, so each value reads back as the type it was written with.
            return load_config(ExperimentConfig, REPO / value,
                               [f"{key}={json.dumps(v)}" for key, v in overrides.items()])
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            try:
                return experiment_of(value)
            except LookupError:
                pass
    raise LookupError(f"no fine-tuning experiment found in {type(cfg).__name__}")


def rayjobs() -> list:
    return [pytest.param(job, id=job["metadata"]["name"]) for job in objects_of_kind("RayJob")]


# Paths that prose and comments name: `python X.py`, `--config X.yaml`, `-f infra/...`, links.
_NAMED_PATH_PATTERNS = (
    re.compile(r"\bpython3? ([\w./-]+\.py)\b"),
    re.compile(r"--config[ =]([\w./-]+\.ya?ml)\b"),
    re.compile(r"(?:-f|--file) ((?:infra|jobs|sweeps|serve)/[\w./-]+)"),
    re.compile(r"\]\(([^)#:\s]+)\)"),  # relative markdown links
)


def named_paths() -> list:
    texts = [p for p in INFRA.rglob("*")
             if p.is_file() and (p.suffix in (".yaml", ".yml", ".md") or p.name == "Dockerfile")
             and not p.is_relative_to(INFRA / "local")]
    texts.append(SCALING_GUIDE)
    found: dict[tuple[str, str], None] = {}
    for source in sorted(texts):
        if not source.is_file():
            continue
        for pattern in _NAMED_PATH_PATTERNS:
            for match in pattern.finditer(source.read_text()):
                named = match.group(1)
                if pattern.pattern.startswith(r"\]\("):
                    # Links are relative to the file that holds them.
                    resolved = (source.parent / named).resolve()
                    named = str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else named
                if named.startswith(("/", "~")) or "<" in named or "$" in named:
                    continue  # a path on a node, or a placeholder
                if (REPO / named).resolve() == source.resolve():
                    continue  # a usage line naming its own file
                found[(str(source.relative_to(REPO)), named.rstrip("/."))] = None
    return [pytest.param(source, named, id=f"{source}:{named}") for source, named in found]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", infra_yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_infra_yaml_parses(path: Path):
    documents = read_documents(path)
    assert documents, f"{path} holds no YAML document"
    if path not in k8s_files():
        return
    for doc in documents:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: an object lacks apiVersion/kind"
        assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} has no name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, (
                f"{path}: {doc['kind']} {doc['metadata']['name']} is not in namespace {NAMESPACE}")
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert doc["apiVersion"] == "ray.io/v1", f"{path}: {doc['kind']} must use ray.io/v1"


def test_object_names_are_unique():
    seen: dict[tuple[str, str], Path] = {}
    for path, obj in k8s_objects():
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in seen, f"{key[0]} {key[1]} is defined in {seen[key]} and {path}"
        seen[key] = path


@pytest.mark.parametrize("where,cluster", ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()])
def test_ray_clusters_have_what_kuberay_and_the_jobs_need(where: str, cluster: dict):
    base = project_base_image()
    assert cluster.get("rayVersion") == base.ray, (
        f"{where}: rayVersion must be the image's Ray, {base.ray} (KubeRay picks commands by it)")
    # Token auth: without it anyone who reaches the dashboard port can run code on the cluster.
    assert cluster.get("authOptions", {}).get("mode") == "token", f"{where}: authOptions.mode: token"
    groups = pod_groups(cluster)
    names = [g["groupName"] for g in groups[1:]]
    assert len(names) == len(set(names)), f"{where}: worker group names repeat: {names}"
    for group in groups:
        label = group.get("groupName", "head")
        params = group["rayStartParams"]
        # The CRD types rayStartParams as map[string]string; a YAML number is rejected.
        assert all(isinstance(v, str) for v in params.values()), (
            f"{where} {label}: rayStartParams values must be strings, got {params}")
        container = ray_container(group)
        assert container.get("image"), f"{where} {label}: the Ray container has no image"
        resources = container.get("resources", {})
        if GPU in resources.get("requests", {}) or GPU in resources.get("limits", {}):
            assert resources["requests"].get(GPU) == resources["limits"].get(GPU), (
                f"{where} {label}: Kubernetes needs GPU requests equal to limits")
        sources = container.get("envFrom", [])
        assert {"configMapRef": {"name": SHARED_CONFIGMAP}} in sources, (
            f"{where} {label}: the Ray container must read ConfigMap {SHARED_CONFIGMAP} (envFrom)")
    assert gpus_per_pod(cluster["headGroupSpec"]) == 0, f"{where}: the head should have no GPUs"
    for group in groups[1:]:
        low, high = int(group["minReplicas"]), int(group["maxReplicas"])
        assert 0 <= low <= int(group.get("replicas", low)) <= high, (
            f"{where} {group['groupName']}: need minReplicas <= replicas <= maxReplicas")


@pytest.mark.parametrize("job", rayjobs())
def test_rayjobs_name_their_cluster_and_working_dir(job: dict):
    spec, name = job["spec"], job["metadata"]["name"]
    assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip(), f"{name}: no entrypoint"
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
        f"{name}: give either rayClusterSpec (a cluster of its own) or clusterSelector")
    cluster_spec_of(job)  # a clusterSelector must name a RayCluster defined here
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
    workdir = re.findall(r"^WORKDIR (\S+)", PROJECT_DOCKERFILE.read_text(), re.M)[-1]
    # Relative paths in the entrypoint resolve against the image's checkout.
    assert runtime_env.get("working_dir") == workdir, (
        f"{name}: runtime_env.working_dir must be the image's checkout {workdir}")


# --------------------------------------------------------------------------- entry points


@pytest.mark.parametrize("job", rayjobs())
def test_rayjob_entrypoint_runs_a_shipped_script_and_config(job: dict):
    command = parse_command(job["spec"]["entrypoint"])
    script = REPO / command.script
    assert script.is_file(), f"{command.script} (RayJob {job['metadata']['name']}) does not exist"
    load_command_config(command)  # unknown keys or bad values in the overrides raise here
    source = script.read_text()
    for flag in command.flags:
        assert flag.split("=")[0] in source, f"{command.script} does not know the flag {flag}"


@pytest.mark.parametrize("job", rayjobs())
def test_rayjob_s3_overrides_use_the_shared_bucket(job: dict):
    bucket = shared_env()["JANUS_BUCKET"]
    command = parse_command(job["spec"]["entrypoint"])
    for override in command.overrides:
        value = override.partition("=")[2]
        if value.startswith("s3://"):
            assert urlparse(value).netloc == bucket, (
                f"{override}: RayJob {job['metadata']['name']} writes outside JANUS_BUCKET={bucket}")


def test_finetune_rayjob_reads_and_writes_s3():
    jobs = [job for job in objects_of_kind("RayJob")
            if parse_command(job["spec"]["entrypoint"]).script == "jobs/finetune.py"]
    assert jobs, "no RayJob runs jobs/finetune.py"
    for job in jobs:
        cfg = load_command_config(parse_command(job["spec"]["entrypoint"]))
        # Pods are ephemeral: a local path would be lost with the cluster.
        for key, value in (("data.uri", cfg.data.uri), ("train.storage_path", cfg.train.storage_path),
                           ("model.weights", cfg.model.weights)):
            assert value and value.startswith("s3://"), f"{job['metadata']['name']}: {key}={value!r}"


def test_serve_import_paths_exist():
    for where, config in (("serveConfigV2", serve_config_v2()),
                          ("serve/config.yaml", yaml.safe_load(SERVE_CONFIG.read_text()))):
        for app in config["applications"]:
            module, _, attribute = app["import_path"].partition(":")
            path = REPO / (module.replace(".", "/") + ".py")
            assert path.is_file(), f"{where}: import_path {app['import_path']}: no {path.relative_to(REPO)}"
            tree = ast.parse(path.read_text())
            defined = set()
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    defined.add(node.name)
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    defined.update(t.id for t in targets if isinstance(t, ast.Name))
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    defined.update((a.asname or a.name).split(".")[0] for a in node.names)
            assert attribute in defined, f"{where}: {path.relative_to(REPO)} defines no {attribute!r}"


@pytest.mark.parametrize("source,named", named_paths())
def test_paths_named_in_infra_and_the_scaling_guide_exist(source: str, named: str):
    assert (REPO / named).exists(), f"{source} names {named}, which does not exist"


# --------------------------------------------------------------------------- resources


@pytest.mark.parametrize("job", rayjobs())
def test_rayjob_cluster_has_the_gpus_its_config_asks_for(job: dict):
    from janus_lab.train.launch import scaling_config

    name = job["metadata"]["name"]
    experiment = experiment_of(load_command_config(parse_command(job["spec"]["entrypoint"])))
    scaling = scaling_config(experiment)
    cluster = cluster_spec_of(job)
    per_worker = scaling.num_gpus_per_worker
    workers_reachable, workers_per_pod = 0, []
    for group in cluster.get("workerGroupSpecs", []):
        gpus = gpus_per_pod(group)
        if not scaling.use_gpu or gpus == 0:
            continue
        assert gpus % per_worker == 0, (
            f"{name} {group['groupName']}: {gpus} GPUs per pod do not split into workers of {per_worker}")
        workers_per_pod.append(gpus // per_worker)
        workers_reachable += max_pods(cluster, group) * (gpus // per_worker)
    assert workers_reachable >= scaling.num_workers, (
        f"{name}: the config needs {scaling.num_workers} workers x {per_worker} GPU, the cluster "
        f"reaches {workers_reachable}")
    if "rayClusterSpec" in job["spec"] and not cluster.get("enableInTreeAutoscaling"):
        # A cluster of the job's own, sized by hand: not a whole idle pod of GPUs beyond the need.
        assert workers_reachable - scaling.num_workers < max(workers_per_pod), (
            f"{name}: {workers_reachable} worker slots for {scaling.num_workers} workers")


def test_serve_replicas_fit_the_gpu_group():
    (service,) = objects_of_kind("RayService")
    cluster = service["spec"]["rayClusterConfig"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if gpus_per_pod(g) > 0]
    reachable_gpus = sum(max_pods(cluster, g) * gpus_per_pod(g) for g in gpu_groups)
    for app in serve_config_v2()["applications"]:
        for deployment in app["deployments"]:
            options = deployment.get("ray_actor_options", {})
            gpus = options.get("num_gpus", 0)
            if not gpus:
                continue
            replicas = deployment.get("autoscaling_config", {}).get("max_replicas",
                                                                     deployment.get("num_replicas", 1))
            assert replicas * gpus <= reachable_gpus, (
                f"{deployment['name']}: up to {replicas} replicas x {gpus} GPU, the cluster reaches "
                f"{reachable_gpus} GPUs")
            assert any(gpus <= gpus_per_pod(g) and options.get("num_cpus", 1) <= cpus_per_pod(g)
                       for g in gpu_groups), f"{deployment['name']}: one replica fits no worker pod"


# --------------------------------------------------------------------------- serve config


def apply_override(config: dict, path: str, value) -> tuple[bool, object]:
    """Sets `value` at a dotted `path` (`applications[name=X]` picks a list entry by name).

    Returns:
        (whether the key existed, its previous value).
    """
    parts = path.split(".")
    node = config
    for depth, part in enumerate(parts):
        match = re.fullmatch(r"(\w+)(?:\[(\w+)=([^\]]+)\])?", part)
        assert match, f"override path {path!r}: cannot read {part!r}"
        key, select_key, select_value = match.groups()
        last = depth == len(parts) - 1
        if select_key:
            entries = [e for e in node[key] if e.get(select_key) == select_value]
            assert len(entries) == 1, f"override path {path!r}: {part} matches {len(entries)} entries"
            assert not last, f"override path {path!r} must end in a key"
            node = entries[0]
        elif last:
            existed, previous = key in node, node.get(key)
            node[key] = value
            return existed, previous
        else:
            assert isinstance(node.get(key), dict), f"override path {path!r}: {key} is not a mapping"
            node = node[key]
    raise AssertionError("unreachable")


def test_rayservice_serve_config_is_serve_config_yaml_plus_the_listed_overrides():
    expected = copy.deepcopy(yaml.safe_load(SERVE_CONFIG.read_text()))
    overrides = yaml.safe_load(SERVE_OVERRIDES.read_text())["overrides"]
    for override in overrides:
        assert override.get("why"), f"override {override['path']} gives no reason"
        existed, previous = apply_override(expected, override["path"], override["value"])
        assert not existed or previous != override["value"], (
            f"override {override['path']}={override['value']!r} is what serve/config.yaml already has")
    actual = serve_config_v2()
    assert actual == expected, (
        "serveConfigV2 in infra/kuberay/rayservice.yaml differs from serve/config.yaml beyond "
        "infra/kuberay/serve-overrides.yaml; differing keys: " + ", ".join(_differences(expected, actual)))


def _differences(expected, actual, prefix: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        keys = sorted(set(expected) | set(actual), key=str)
        return [d for k in keys for d in _differences(expected.get(k), actual.get(k), f"{prefix}.{k}".lstrip("."))]
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in _differences(e, a, f"{prefix}[{i}]")]
    return [] if expected == actual else [f"{prefix} ({expected!r} -> {actual!r})"]


def test_serve_configs_pass_ray_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config_v2())
    ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))


# --------------------------------------------------------------------------- images and versions


def test_images_and_versions_agree_with_pyproject():
    base = project_base_image()
    assert version_matches(base.ray, pinned("ray")), f"image Ray {base.ray} vs pyproject ray=={pinned('ray')}"
    from packaging.specifiers import SpecifierSet

    python = f"{base.python[0]}.{base.python[1:]}"
    supported = SpecifierSet(pyproject()["project"]["requires-python"])
    assert supported.contains(python), f"image Python {python} vs requires-python {supported}"
    dockerfile = PROJECT_DOCKERFILE.read_text()
    torch_version = re.search(r"TORCH_VERSION=(\S+)", dockerfile).group(1)
    assert torch_version == pinned("torch"), "the image's torch must be the version pyproject pins"
    assert f"download.pytorch.org/whl/cu{base.cuda}" in dockerfile, "torch's CUDA build must match the image"
    images = {ray_container(g)["image"] for _, cluster in ray_cluster_specs() for g in pod_groups(cluster)}
    assert len(images) == 1, f"every Ray container must run the same image, found {sorted(images)}"
    (image,) = images
    assert image.endswith(f"ray{base.tag}"), f"{image}: the tag must name its base, ray{base.tag}"


# --------------------------------------------------------------------------- cluster launcher


def aws_cluster() -> dict:
    return yaml.safe_load(AWS_CLUSTER.read_text())


def aws_env() -> dict[str, str]:
    env = {}
    for option in aws_cluster()["docker"]["run_options"]:
        words = shlex.split(option)
        if words[0] in ("--env", "-e"):
            key, _, value = words[1].partition("=")
            env[key] = value
    return env


def test_aws_cluster_passes_the_cluster_launcher_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(aws_cluster(), schema)


def test_aws_cluster_runs_the_images_ray_and_installs_cuda_torch_then_the_project():
    cluster, base = aws_cluster(), project_base_image()
    assert cluster["docker"]["image"] == f"rayproject/ray:{base.tag}"
    commands = cluster["setup_commands"]
    torch_index = next(i for i, c in enumerate(commands) if f'torch=={pinned("torch")}' in c)
    assert f"download.pytorch.org/whl/cu{base.cuda}" in commands[torch_index]
    project_index = next(i for i, c in enumerate(commands) if "pip install -e" in c)
    # torch first: otherwise pip resolves the CPU wheel from PyPI for the project.
    assert torch_index < project_index
    installed = shlex.split(commands[project_index])[-1]
    assert cluster["file_mounts"].get(installed) == ".", f"{installed} must be the synced checkout"


def aws_commands() -> list:
    text = AWS_CLUSTER.read_text()
    commands = re.findall(r"\bpython (\S+\.py --config \S+\.ya?ml)", text)
    return [pytest.param(c, id=c.split()[0]) for c in commands]


@pytest.mark.parametrize("command_text", aws_commands())
def test_aws_gpu_workers_fit_the_configs_it_runs(command_text: str):
    from janus_lab.train.launch import scaling_config

    cluster = aws_cluster()
    scaling = scaling_config(experiment_of(load_command_config(parse_command(f"python {command_text}"))))
    reachable = 0
    for name, node_type in cluster["available_node_types"].items():
        gpus = int(node_type.get("resources", {}).get("GPU", 0))
        instance = node_type["node_config"]["InstanceType"]
        if instance in EC2_GPUS:
            assert gpus == EC2_GPUS[instance], f"{name}: a {instance} has {EC2_GPUS[instance]} GPUs, not {gpus}"
        if gpus:
            nodes = min(int(node_type["max_workers"]), int(cluster["max_workers"]))
            reachable += nodes * (gpus // scaling.num_gpus_per_worker)
    assert reachable >= scaling.num_workers, (
        f"{command_text}: needs {scaling.num_workers} GPU workers, the cluster reaches {reachable}")


# --------------------------------------------------------------------------- environment


def test_kuberay_and_aws_set_the_same_environment():
    from janus_lab.stack import LocalStack
    from janus_lab.cluster import FORWARDED_ENV

    kuberay, aws = shared_env(), aws_env()
    assert set(kuberay) == set(aws), (
        f"only in infra/kuberay/env.yaml: {sorted(set(kuberay) - set(aws))}; "
        f"only in infra/aws/cluster.yaml: {sorted(set(aws) - set(kuberay))}")
    # The tracking URI names a different host on each; everything else is the same value.
    for key in set(kuberay) - {"MLFLOW_TRACKING_URI"}:
        assert kuberay[key] == aws[key], f"{key}: {kuberay[key]!r} on KubeRay, {aws[key]!r} on AWS"
    # A misspelt variable would be silently ignored: every name must be one the project reads.
    known = set(LocalStack(run_dir=REPO / "run" / "unused", with_ray=False).env()) | set(FORWARDED_ENV)
    unknown = [k for k in kuberay if k not in known and not k.startswith("NCCL_")]
    assert not unknown, f"variables no part of janus-lab reads: {unknown}"


def test_tracking_uri_reaches_the_mlflow_service():
    uri = urlparse(shared_env()["MLFLOW_TRACKING_URI"])
    service_name, namespace = uri.hostname.split(".")[:2]
    service = one_object("Service", service_name)
    assert service["metadata"]["namespace"] == namespace
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == uri.port]
    deployment = one_object("Deployment", service_name)
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert port["targetPort"] in [p["containerPort"] for p in container["ports"]]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    # MLflow 3 refuses a Host header it does not allow (fnmatch patterns, port included).
    assert any(fnmatch.fnmatch(uri.netloc, p) if "*" in p else uri.netloc == p for p in allowed), (
        f"MLFLOW_SERVER_ALLOWED_HOSTS does not admit {uri.netloc}")


def test_mlflow_server_stores_runs_in_postgres_and_artifacts_in_the_shared_bucket():
    deployment = one_object("Deployment", "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    backend = urlparse(args["--backend-store-uri"])
    assert backend.scheme == "postgresql"
    database = one_object("Service", backend.hostname)
    assert backend.port in [p["port"] for p in database["spec"]["ports"]]
    artifacts = urlparse(args["--artifacts-destination"])
    assert artifacts.scheme == "s3" and artifacts.netloc == shared_env()["JANUS_BUCKET"]
    dockerfile = MLFLOW_DOCKERFILE.read_text()
    mlflow_version = re.search(r'"mlflow==([\d.]+)"', dockerfile).group(1)
    assert container["image"].endswith(f":{mlflow_version}"), "the image tag must be its MLflow version"
    from packaging.requirements import Requirement

    (mlflow_requirement,) = [Requirement(r) for r in pyproject()["project"]["dependencies"]
                             if Requirement(r).name == "mlflow"]
    assert mlflow_requirement.specifier.contains(mlflow_version), (
        f"server MLflow {mlflow_version} is outside the clients' {mlflow_requirement.specifier}")
    assert f'"boto3=={pinned("boto3")}"' in dockerfile


# --------------------------------------------------------------------------- docs


def test_scaling_guide_is_linked_from_the_readme():
    assert SCALING_GUIDE.is_file()
    assert "(docs/scaling.md)" in (REPO / "README.md").read_text()


# --------------------------------------------------------------------------- secrets and exposure

K8S_VERSION = "1.33"
"""The Kubernetes release whose schemas the core objects are checked against (EKS's oldest in
standard support when this was written); kubernetes-validate ships them."""

SECRETISH = r"[\w.-]*(?:password|passwd|secret|token|api[_-]?keys?|access[_-]?key(?:[_-]id)?|private[_-]?key)"
_CREDENTIAL_PATTERNS = (
    ("an AWS access key id", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("a password in a URI", re.compile(r"\b[a-z][\w+.-]*://[^/\s:@]+:(?P<value>[^@\s/]+)@")),
    ("a credential assigned a value",
     re.compile(rf"(?i)(?<![\w.-]){SECRETISH}\s*[=:]\s*[\"']?(?P<value>[^\s\"',}}\]]+)")),
)


def _is_placeholder(value: str) -> bool:
    """`<key>`, `$(VAR)`, `${VAR}`, `$VAR`, `{...}`, YAML null or a reference to another key."""
    return (value.startswith(("<", "$", "{", "[")) or value.lower() in ("null", "~", "true", "false", "")
            or value.endswith((":", "=")))


def find_credentials(text: str) -> list[str]:
    """Literal credentials in `text`: what each is and where (line numbers, never the value)."""
    found = []
    for line_number, line in enumerate(text.splitlines(), 1):
        for what, pattern in _CREDENTIAL_PATTERNS:
            for match in pattern.finditer(line):
                value = match.groupdict().get("value")
                if value is not None and _is_placeholder(value):
                    continue
                found.append(f"line {line_number}: {what}")
    return found


def infra_text_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", infra_text_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_file_under_infra_holds_a_literal_credential(path: Path):
    found = find_credentials(path.read_text(errors="replace"))
    assert not found, (f"{path.relative_to(REPO)}: {'; '.join(found)}. Credentials come from a Kubernetes "
                       f"Secret (secretKeyRef, secretRef, a secret volume) or the cloud's instance roles")


@pytest.mark.parametrize("text", [
    "AWS_ACCESS_KEY_ID=AKIA" + "Q7ZPXW2LMN4RTV6B",
    "  --env AWS_SECRET_ACCESS_KEY=" + "x7Rz/Qp2Lm9Kw4Tn8Vb3Hs6Jd1Fg5Yc0",
    "  password: " + "correct-horse-battery",
    "  - --backend-store-uri=postgresql://mlflow:" + "s3cretpass@mlflow-postgres:5432/mlflow",
    "api_keys: " + "sk-0123456789abcdef0123",
    "-----BEGIN RSA PRIVATE " + "KEY-----",
])
def test_the_credential_scan_finds_planted_credentials(text: str):
    assert find_credentials(text), text


@pytest.mark.parametrize("text", [
    "--from-literal=AWS_SECRET_ACCESS_KEY=<secret>",
    "--from-literal=POSTGRES_PASSWORD=$(openssl rand -hex 24)",
    "- --backend-store-uri=postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@mlflow-postgres:5432/mlflow",
    "valueFrom: {secretKeyRef: {name: mlflow-postgres, key: POSTGRES_PASSWORD}}",
    "secretName: janus-images-tls",
    "api_keys_env: null",
    "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<auth_token of the Secret KubeRay made for the cluster>",
])
def test_the_credential_scan_lets_references_and_placeholders_pass(text: str):
    assert not find_credentials(text), text


def pod_specs() -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every pod the manifests make: core workloads and Ray groups."""
    templates = [(f"{obj['kind']} {obj['metadata']['name']}", obj["spec"]["template"])
                 for _, obj in k8s_objects() if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]
    for where, cluster in ray_cluster_specs():
        for group in pod_groups(cluster):
            templates.append((f"{where} {group.get('groupName', 'head')}", group["template"]))
    return templates


def core_objects() -> list:
    return [pytest.param(obj, id=f"{path.relative_to(REPO)}:{obj['kind']}/{obj['metadata']['name']}")
            for path, obj in k8s_objects() if not obj["apiVersion"].startswith("ray.io/")]


@pytest.mark.parametrize("obj", core_objects())
def test_core_objects_pass_the_kubernetes_schemas(obj: dict):
    import kubernetes_validate

    # strict: a field the schema does not know (a typo) is an error, as `kubectl apply` says.
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("where,template", pod_specs(), ids=[w for w, _ in pod_specs()])
def test_ray_pod_templates_pass_the_kubernetes_pod_schema(where: str, template: dict):
    """The KubeRay CRDs have no schema here, but each group's `template` is a core PodTemplateSpec."""
    import kubernetes_validate

    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check", "namespace": NAMESPACE},
               "template": template}
    kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


def test_the_schema_check_refuses_a_misspelt_field():
    import kubernetes_validate

    service = copy.deepcopy(one_object("Service", "mlflow"))
    service["spec"]["selectr"] = service["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


def secret_references() -> dict[str, str]:
    """Secret name -> where a manifest reads it (env, envFrom, volume, Ingress TLS)."""
    found: dict[str, str] = {}
    for where, template in pod_specs():
        spec = template["spec"]
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    found.setdefault(source["secretRef"]["name"], where)
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    found.setdefault(ref["name"], where)
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                found.setdefault(volume["secret"]["secretName"], where)
    for ingress in objects_of_kind("Ingress"):
        for tls in ingress["spec"].get("tls", []):
            found.setdefault(tls["secretName"], f"Ingress {ingress['metadata']['name']}")
    return found


def test_credentials_reach_pods_only_from_secrets_that_are_created_by_hand():
    assert not objects_of_kind("Secret"), "a Secret under infra/ would put its values in the repository"
    for where, template in pod_specs():
        for container in template["spec"]["containers"]:
            for entry in container.get("env", []):
                if re.fullmatch(f"(?i){SECRETISH}", entry["name"]):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), (
                        f"{where}: {entry['name']} must come from a Secret (valueFrom.secretKeyRef)")
    documented = INFRA.rglob("*")
    commands = "\n".join(p.read_text() for p in documented if p.is_file()) + SCALING_GUIDE.read_text()
    for name, where in secret_references().items():
        assert re.search(rf"create secret (?:generic|tls) {re.escape(name)}\b", commands), (
            f"{where} reads the Secret {name}, but no `kubectl create secret` for it is documented")


def test_only_the_serve_endpoint_is_published_and_with_tls():
    for service in objects_of_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", (
            f"Service {service['metadata']['name']}: {service['spec']['type']} publishes it outside the cluster")
    for where, cluster in ray_cluster_specs():
        head = cluster["headGroupSpec"]
        # KubeRay makes the head Service (GCS 6379, dashboard 8265, client 10001) from these.
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head Service must stay ClusterIP"
        assert not head.get("enableIngress"), f"{where}: enableIngress publishes the dashboard"
    for (service,) in [objects_of_kind("RayService")]:
        serve_service = service["spec"].get("serveService", {}).get("spec", {})
        assert serve_service.get("type", "ClusterIP") == "ClusterIP"
    for where, template in pod_specs():
        spec = template["spec"]
        assert not spec.get("hostNetwork"), f"{where}: hostNetwork puts every Ray port on the node"
        for container in spec["containers"]:
            for port in container.get("ports", []):
                assert "hostPort" not in port, f"{where}: hostPort {port['hostPort']} publishes a port on the node"
    (service,) = objects_of_kind("RayService")
    serve_service_name = f"{service['metadata']['name']}-serve-svc"  # KubeRay's name for it
    serve_port = serve_config_v2()["http_options"]["port"]
    ingresses = objects_of_kind("Ingress")
    assert ingresses, "no Ingress publishes the Serve endpoint"
    for ingress in ingresses:
        spec, name = ingress["spec"], ingress["metadata"]["name"]
        backends = [path["backend"]["service"] for rule in spec["rules"] for path in rule["http"]["paths"]]
        assert backends and all(b == {"name": serve_service_name, "port": {"number": serve_port}} for b in backends), (
            f"Ingress {name} must route only to {serve_service_name}:{serve_port}, not {backends}")
        hosts = {rule["host"] for rule in spec["rules"]}
        covered = {host for tls in spec.get("tls", []) for host in tls["hosts"]}
        assert hosts <= covered, f"Ingress {name}: hosts without TLS: {sorted(hosts - covered)}"
    guide = SCALING_GUIDE.read_text()
    assert serve_service_name in guide and "infra/kuberay/ingress.yaml" in guide


def test_the_cluster_endpoint_takes_api_keys_from_a_mounted_secret():
    from janus_lab.serving import ServeArgs

    (service,) = objects_of_kind("RayService")
    for app in serve_config_v2()["applications"]:
        access = ServeArgs.parse(app["args"]).access
        assert not access.open, f"serveConfigV2 {app['name']}: the cluster's endpoint must require API keys"
        assert access.api_keys_file, "keys come from a file, so the Secret can rotate them without a restart"
        assert access.requests_per_minute and access.images_per_minute, "per-key limits must be set"
        folder = str(Path(access.api_keys_file).parent)
        cluster = service["spec"]["rayClusterConfig"]
        for group in pod_groups(cluster):
            spec = group["template"]["spec"]
            secret_volumes = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
            mounts = [m for m in ray_container(group).get("volumeMounts", []) if m["mountPath"] == folder]
            assert len(mounts) == 1 and mounts[0]["name"] in secret_volumes, (
                f"{group.get('groupName', 'head')}: {folder} must be a Secret volume (ImageApi may run on any pod)")
