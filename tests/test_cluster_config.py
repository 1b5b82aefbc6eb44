"""cluster/aws.yaml against Ray's own cluster-config schema (offline), and the KubeRay manifest's groups."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.build_wit import BuildWITConfig
from pipelines.config import load_config
from pipelines.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster" / "aws.yaml"
KUBERAY = ROOT / "cluster" / "kuberay.yaml"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"

# The overrides cluster/README.md gives for running the jobs on the cluster.
CRAWL_ON_CLUSTER = ["crawl.worker_resources={crawl: 1}"]
TRAIN_ON_CLUSTER = ["use_gpu=true", "num_workers=8", "cpus_per_worker=0"]


def aws_config() -> dict:
    return yaml.safe_load(AWS.read_text())


def validated(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def fits(request: dict[str, float], node_resources: dict[str, float]) -> bool:
    return all(node_resources.get(k, 0) >= v for k, v in request.items() if v)


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([\w.]+)", dep.strip())
        if m:
            pins[m.group(1)] = m.group(3)
    return pins


def test_aws_yaml_passes_rays_schema():
    cfg = validated(aws_config())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "ray.head.default"
    assert set(types) == {"ray.head.default", "cpu_crawl", "gpu_train"}
    assert cfg["provider"]["type"] == "aws"
    assert cfg["idle_timeout_minutes"] > 0 and cfg["upscaling_speed"] > 0


def test_node_types_are_shaped_as_the_jobs_need():
    types = aws_config()["available_node_types"]
    head, crawl, gpu = types["ray.head.default"], types["cpu_crawl"], types["gpu_train"]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    assert crawl["min_workers"] == 0 and crawl["max_workers"] > 0
    assert crawl["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert crawl["resources"]["crawl"] >= 1 and crawl["resources"].get("GPU", 0) == 0
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] >= 1 and "crawl" not in gpu["resources"]
    # No CPU on GPU nodes: CPU-only demand (a crawl overflowing the crawl nodes) can never start one.
    assert gpu["resources"]["CPU"] == 0


def test_job_resource_requests_land_on_the_right_node_type():
    types = aws_config()["available_node_types"]
    wit = load_config(BuildWITConfig, None, CRAWL_ON_CLUSTER)
    crawl_request = {"CPU": wit.crawl.num_cpus_per_worker, **wit.crawl.worker_resources}
    assert [t for t, spec in types.items() if fits(crawl_request, spec["resources"])] == ["cpu_crawl"]

    train = load_config(TrainConfig, None, TRAIN_ON_CLUSTER)
    worker_request = {"CPU": train.cpus_per_worker, "GPU": train.gpus_per_worker if train.use_gpu else 0}
    assert [t for t, spec in types.items() if fits(worker_request, spec["resources"])] == ["gpu_train"]
    gpu = types["gpu_train"]
    per_node = int(gpu["resources"]["GPU"] // train.gpus_per_worker)
    assert per_node * gpu["max_workers"] >= train.num_workers
    decode_request = {"CPU": train.decode_cpus}  # the ingest's decode + augment + tokenize actors
    assert [t for t, spec in types.items() if fits(decode_request, spec["resources"])] == ["cpu_crawl"]


def test_no_keys_s3_through_instance_profiles_dashboard_on_loopback():
    text = AWS.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET", text, re.IGNORECASE)
    types = aws_config()["available_node_types"]
    for name in ("cpu_crawl", "gpu_train"):
        assert types[name]["node_config"]["IamInstanceProfile"]["Name"]
    head_start = " ".join(aws_config()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_nodes_install_the_projects_pinned_versions():
    cfg, pins = aws_config(), pyproject_pins()
    assert {"torch", "ray"} <= set(pins)
    setup = " ".join(cfg["setup_commands"])
    assert f"torch=={pins['torch']}" in setup and f"ray[default,data,train]=={pins['ray']}" in setup
    assert "-e ~/clip-wit-ray" in setup and cfg["file_mounts"]["~/clip-wit-ray"] == "."
    images = [cfg["docker"]["image"], cfg["available_node_types"]["gpu_train"]["docker"]["worker_image"]]
    images += re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    for image in images:
        assert image.startswith(f"rayproject/ray:{pins['ray']}-py311-"), image
    assert f'"torch=={pins["torch"]}"' in DOCKERFILE.read_text()


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("available_node_types", "cpu_crawl", "min_worker"), 0, "min_worker"),  # typo of min_workers
        (("available_node_types", "cpu_crawl", "resources", "crawl"), "16", "16"),  # a string count
        (("available_node_types", "gpu_train", "max_worker"), 8, "max_worker"),
        (("idle_timeout_minute",), 5, "idle_timeout_minute"),
    ],
)
def test_a_typo_in_the_config_is_rejected(path, value, message):
    bad = aws_config()
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValidationError, match=message):
        validated(bad)


def test_a_misspelt_head_node_type_is_rejected():
    bad = aws_config()
    bad["head_node_type"] = "ray.head.defualt"
    with pytest.raises(ValueError, match="head_node_type"):
        validated(bad)


def test_kuberay_manifest_has_the_same_groups():
    docs = [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d]
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == pyproject_pins()["ray"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-crawl", "gpu-train"}
    aws_types = aws_config()["available_node_types"]
    for group, aws_name in (("cpu-crawl", "cpu_crawl"), ("gpu-train", "gpu_train")):
        g, aws_type = groups[group], aws_types[aws_name]
        assert g["minReplicas"] == 0 and g["maxReplicas"] == aws_type["max_workers"]
        params = g["rayStartParams"]
        resources = {"CPU": int(params["num-cpus"]), "GPU": int(params.get("num-gpus", 0))}
        if "resources" in params:
            resources.update(yaml.safe_load(yaml.safe_load(params["resources"])))
        assert {k: v for k, v in resources.items() if v} == {k: v for k, v in aws_type["resources"].items() if v}
        (container,) = g["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert int(limits["cpu"]) >= resources["CPU"]
        assert int(limits.get("nvidia.com/gpu", 0)) == resources["GPU"]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]:
        assert pod["spec"]["serviceAccountName"] in accounts
