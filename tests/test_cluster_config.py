"""cluster/aws.yaml against Ray's own cluster-config schema (offline), the choices cluster/README.md documents,
and the KubeRay manifest's groups."""

from __future__ import annotations

import copy
import json
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
CLUSTER_README = ROOT / "cluster" / "README.md"
DNS_CACHE = "/usr/local/bin/clip-dns-cache"
DLAMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/"

# The overrides cluster/README.md gives for running the jobs on the cluster.
CRAWL_ON_CLUSTER = ["crawl.worker_resources={crawl: 1}"]
TRAIN_ON_CLUSTER = ["use_gpu=true", "num_workers=8", "cpus_per_worker=0"]


def aws_config(text: str | None = None) -> dict:
    return yaml.safe_load(text if text is not None else AWS.read_text())


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


def readme_policies() -> dict[str, dict]:
    """The IAM policy JSON blocks of cluster/README.md, by the file name announced before each."""
    text = CLUSTER_README.read_text()
    pattern = r"^`(clip-wit-ray-[\w-]+)\.json` —[^\n]*\n(?:[^`\n][^\n]*\n)*?```json\n(.*?)```"
    blocks = re.findall(pattern, text, re.DOTALL | re.MULTILINE)
    return {name: json.loads(body) for name, body in blocks}


def worker_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def test_aws_yaml_passes_rays_schema():
    cfg = validated(aws_config())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "ray.head.default"
    assert set(types) == {"ray.head.default", "cpu_crawl", "gpu_train"}
    assert cfg["provider"]["type"] == "aws"
    assert cfg["idle_timeout_minutes"] > 0 and cfg["upscaling_speed"] > 0


def test_gpu_market_switch_gives_on_demand_or_spot():
    """The documented one-word switch: `<<: *gpu_on_demand` (default) or `<<: *gpu_spot`."""
    text = AWS.read_text()
    assert text.count("<<: *gpu_on_demand") == 1 and "*gpu_spot" in CLUSTER_README.read_text()
    on_demand = validated(aws_config(text))["available_node_types"]["gpu_train"]["node_config"]
    spot_cfg = validated(aws_config(text.replace("<<: *gpu_on_demand", "<<: *gpu_spot")))
    spot = spot_cfg["available_node_types"]["gpu_train"]["node_config"]
    assert "InstanceMarketOptions" not in on_demand
    assert spot["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert {k: v for k, v in spot.items() if k != "InstanceMarketOptions"} == on_demand
    crawl = aws_config()["available_node_types"]["cpu_crawl"]["node_config"]
    assert crawl["InstanceMarketOptions"]["MarketType"] == "spot"  # crawl nodes are always spot


def test_every_node_type_has_an_instance_profile_and_the_head_passes_only_the_worker_role():
    types = aws_config()["available_node_types"]
    arns = {name: t["node_config"]["IamInstanceProfile"]["Arn"] for name, t in types.items()}
    head_arn = arns.pop("ray.head.default")
    assert len(set(arns.values())) == 1 and head_arn not in arns.values()
    worker_role = next(iter(arns.values())).replace(":instance-profile/", ":role/")
    policies = readme_policies()
    assert set(policies) == {"clip-wit-ray-head", "clip-wit-ray-worker"}
    assert head_arn.endswith("/clip-wit-ray-head")
    head = {s["Sid"]: s for s in policies["clip-wit-ray-head"]["Statement"]}
    assert head["PassOnlyTheWorkerRole"]["Action"] == "iam:PassRole"
    assert head["PassOnlyTheWorkerRole"]["Resource"] == worker_role
    assert "ec2:RunInstances" in head["LaunchAndEndWorkers"]["Action"]
    # Workers: S3 on one bucket only (no wildcard bucket), and no EC2 or IAM at all.
    worker = policies["clip-wit-ray-worker"]["Statement"]
    s3 = [s for s in worker if any(a.startswith("s3:") for a in actions_of(s))]
    assert {s["Resource"] for s in s3} == {"arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"}
    assert not [a for s in worker for a in actions_of(s) if a.startswith(("ec2:", "iam:"))]


def actions_of(statement: dict) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def test_every_node_runs_the_project_image_on_an_explicit_gpu_driver_ami():
    cfg = aws_config()
    image = cfg["docker"]["image"]
    assert re.fullmatch(r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/clip-wit-ray:[\w.]+", image), image
    for name, t in cfg["available_node_types"].items():
        assert "docker" not in t, f"{name} overrides the image"
        assert t["node_config"]["ImageId"].startswith(DLAMI), name
    # Nothing is installed at boot: no pip anywhere in the commands nodes run.
    commands = [
        c
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        for c in cfg.get(key, [])
    ]
    commands += [c for t in cfg["available_node_types"].values() for c in t.get("worker_setup_commands", [])]
    assert not [c for c in commands if "pip" in c], commands
    # The image: Ray's base for the pinned Ray/Python, the pinned torch, checked against the driver's CUDA major.
    pins, docker = pyproject_pins(), DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)", docker, re.MULTILINE)
    assert base.startswith(f"rayproject/ray:{pins['ray']}-py311-"), base
    assert f'"torch=={pins["torch"]}"' in docker and f'"ray[default,data,train]=={pins["ray"]}"' in docker
    assert re.search(r"ARG TORCH_CUDA_MAJOR=\d+", docker) and "torch.version.cuda" in docker
    assert "/opt/img2dataset" in docker and "import img2dataset" in docker


def test_crawl_nodes_run_a_caching_dns_resolver():
    cfg, docker = aws_config(), DOCKERFILE.read_text()
    types = cfg["available_node_types"]
    assert types["cpu_crawl"]["worker_setup_commands"] == [f"sudo {DNS_CACHE}"]
    assert re.search(r"apt-get install[^\n]*\bdnsmasq\b", docker)
    assert f"COPY cluster/dns_cache.sh {DNS_CACHE}" in docker
    script = (ROOT / "cluster" / "dns_cache.sh").read_text()
    assert "dnsmasq --listen-address=127.0.0.1" in script and "nameserver 127.0.0.1" in script


def test_gpu_nodes_advertise_ingest_cpu_and_no_cpu_and_every_node_autoscales_pools():
    cfg = aws_config()
    for name, t in worker_types(cfg).items():
        r = t["resources"]
        if r.get("GPU"):
            assert r["CPU"] == 0 and r["ingest_cpu"] >= 1, name
        else:
            assert "ingest_cpu" not in r, name  # CPU-only work never asks for it, CPU nodes never offer it
    assert "--env CLIP_RAY_AUTOSCALING=1" in cfg["docker"]["run_options"]
    assert "CLIP_RAY_AUTOSCALING=1" in DOCKERFILE.read_text()


def test_node_types_are_shaped_as_the_jobs_need():
    types = aws_config()["available_node_types"]
    head, crawl, gpu = types["ray.head.default"], types["cpu_crawl"], types["gpu_train"]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    assert crawl["min_workers"] == 0 and crawl["max_workers"] > 0
    assert crawl["resources"]["crawl"] >= 1 and crawl["resources"].get("GPU", 0) == 0
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] >= 1 and "crawl" not in gpu["resources"]


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
    # Training ingest asking for `ingest_cpu` can only land on GPU nodes; plain CPU only on crawl nodes.
    assert [t for t, spec in types.items() if fits({"ingest_cpu": 1}, spec["resources"])] == ["gpu_train"]
    assert [t for t, spec in types.items() if fits({"CPU": train.decode_cpus}, spec["resources"])] == [
        "cpu_crawl"
    ]
    # The shipped GPU config decodes next to the GPUs, through `ingest_cpu`.
    gpu_cfg = load_config(TrainConfig, ROOT / "configs/train_vit_b32.yaml", ["data_uri=s3://b/wit"])
    decode_request = {gpu_cfg.decode_resource: gpu_cfg.decode_cpus}
    assert [t for t, spec in types.items() if fits(decode_request, spec["resources"])] == ["gpu_train"]


def test_no_keys_dashboard_on_loopback():
    text = AWS.read_text() + KUBERAY.read_text() + CLUSTER_README.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET", text, re.IGNORECASE)
    head_start = " ".join(aws_config()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


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


def test_kuberay_manifest_makes_the_same_choices():
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
    image = aws_config()["docker"]["image"]
    for group, aws_name in (("cpu-crawl", "cpu_crawl"), ("gpu-train", "gpu_train")):
        g, aws_type = groups[group], aws_types[aws_name]
        assert g["minReplicas"] == 0 and g["maxReplicas"] == aws_type["max_workers"]
        params = g["rayStartParams"]
        resources = {"CPU": int(params["num-cpus"]), "GPU": int(params.get("num-gpus", 0))}
        if "resources" in params:
            resources.update(yaml.safe_load(yaml.safe_load(params["resources"])))
        assert {k: v for k, v in resources.items() if v} == {
            k: v for k, v in aws_type["resources"].items() if v
        }
        (container,) = g["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert int(limits["cpu"]) >= resources["CPU"] + resources.get("ingest_cpu", 0)
        assert int(limits.get("nvidia.com/gpu", 0)) == resources["GPU"]
    assert groups["cpu-crawl"]["template"]["spec"]["nodeSelector"]["eks.amazonaws.com/capacityType"] == "SPOT"
    crawl_container = groups["cpu-crawl"]["template"]["spec"]["containers"][0]
    assert crawl_container["lifecycle"]["postStart"]["exec"]["command"] == ["sudo", DNS_CACHE]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] in accounts
        for container in pod["spec"]["containers"]:
            assert container["image"] == image
            assert {"name": "CLIP_RAY_AUTOSCALING", "value": "1"} in container["env"]


# ---------------------------------------------------------------- the paper-scale profile
PAPER = ROOT / "cluster" / "aws_paper_scale.yaml"
KUBERAY_PAPER = ROOT / "cluster" / "kuberay_paper_scale.yaml"
# Network cards per instance type (all of them EFA-capable): what the profile must attach as EFA interfaces.
EFA_CARDS = {"p5.48xlarge": 32, "p4d.24xlarge": 4}
# AWS's environment for NCCL over EFA, which both paper-scale manifests must set the same way.
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"}


def paper_config() -> dict:
    return yaml.safe_load(PAPER.read_text())


def docker_env(cfg: dict) -> dict[str, str]:
    pairs = [o.split(" ", 1)[1] for o in cfg["docker"]["run_options"] if o.startswith("--env ")]
    return dict(p.split("=", 1) for p in pairs)


def paper_readme_command() -> list[str]:
    """The train_clip.py overrides of cluster/README.md's paper-scale command."""
    text = CLUSTER_README.read_text()
    (command,) = re.findall(
        r"`python jobs/submit.py -- python jobs/train_clip.py (--config \S+ [^`]*model=ViT-L/14[^`]*)`", text
    )
    return command.split()


def test_paper_scale_profile_passes_rays_schema_and_reaches_512_gpus():
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    cfg = validated(paper_config())
    (name,) = worker_types(cfg)
    gpu = cfg["available_node_types"][name]
    node = gpu["node_config"]
    assert node["InstanceType"] in EFA_CARDS and gpu["resources"]["GPU"] == 8
    assert gpu["min_workers"] == 0 and 32 <= gpu["max_workers"] <= 64 <= cfg["max_workers"]
    assert gpu["resources"]["CPU"] == 0 and gpu["resources"]["ingest_cpu"] >= 8
    # Close together: one cluster placement group, one subnet, one security group.
    assert node["Placement"]["GroupName"]
    interfaces = node["NetworkInterfaces"]
    assert len(interfaces) == EFA_CARDS[node["InstanceType"]]
    assert {i["InterfaceType"] for i in interfaces} == {"efa"}
    assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(len(interfaces)))
    assert [i["DeviceIndex"] for i in interfaces] == [0] + [1] * (len(interfaces) - 1)
    # Ray's own check of interfaces (each names its subnet and group) passes, and the head shares both.
    merged = _configure_subnets_and_groups_from_network_interfaces(node)
    head = cfg["available_node_types"]["ray.head.default"]["node_config"]
    assert set(merged["SubnetIds"]) == set(head["SubnetIds"]) and len(set(head["SubnetIds"])) == 1
    assert set(merged["SecurityGroupIds"]) == set(head["SecurityGroupIds"])
    # The same image, AMI and profiles as cluster/aws.yaml; nothing installed at boot; dashboard on loopback.
    assert cfg["docker"]["image"] == aws_config()["docker"]["image"] and cfg["setup_commands"] == []
    assert all(t["node_config"]["ImageId"].startswith(DLAMI) for t in cfg["available_node_types"].values())
    assert (
        node["IamInstanceProfile"]
        == aws_config()["available_node_types"]["gpu_train"]["node_config"]["IamInstanceProfile"]
    )
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])


def test_paper_scale_profile_sets_the_nccl_efa_environment_and_the_image_carries_efa():
    cfg = paper_config()
    env, options = docker_env(cfg), cfg["docker"]["run_options"]
    assert {k: env.get(k) for k in EFA_ENV} == EFA_ENV
    assert env["NCCL_SOCKET_IFNAME"].startswith("^") and "docker" in env["NCCL_SOCKET_IFNAME"]
    assert (
        "/opt/amazon/ofi-nccl/lib" in env["LD_LIBRARY_PATH"]
        and "/opt/amazon/efa/lib" in env["LD_LIBRARY_PATH"]
    )
    assert "--device=/dev/infiniband" in options and "--ulimit memlock=-1:-1" in options
    assert env["CLIP_RAY_AUTOSCALING"] == "1"
    docker = DOCKERFILE.read_text()
    assert re.search(r"efa_installer\.sh -y --skip-kmod --skip-limit-conf --no-verify", docker)
    assert "libnccl-net" in docker and "libfabric.so" in docker  # the build fails without them
    # The plain profile does not load the plugin: NCCL on nodes without EFA keeps its own transports.
    assert "FI_PROVIDER" not in docker_env(aws_config()) and "ENV LD_LIBRARY_PATH" not in docker


def test_the_readme_paper_scale_training_command_fits_the_profile():
    types = paper_config()["available_node_types"]
    train = load_config(TrainConfig, ROOT / paper_readme_command()[1], paper_readme_command()[2:])
    assert train.model == "ViT-L/14" and train.batch_size * train.num_workers == 32768
    request = {"CPU": train.cpus_per_worker, "GPU": train.gpus_per_worker}
    (gpu,) = [t for t, spec in types.items() if fits(request, spec["resources"])]
    assert (
        int(types[gpu]["resources"]["GPU"] // train.gpus_per_worker) * types[gpu]["max_workers"]
        >= train.num_workers
    )
    assert fits({train.decode_resource: train.decode_cpus}, types[gpu]["resources"])
    assert train.storage_path.startswith("s3://") and train.checkpoint_upload == "async"


def test_readme_arithmetic_matches_the_model_summary():
    """Each row of the README's table recomputed: FLOPs from clip_model.summary, 12.8B samples, 40% MFU."""
    from clip_model.summary import summarize

    peaks = {"H100": 989.4e12, "A100": 312e12}
    rows = re.findall(r"^\| (ViT-\S+) \| ([\d.]+) \| ([\d.]+) \| ([\d.e]+) \| (\w+) \| ([\d,]+) \| ([\d.]+) h \| ([\d.]+) h \| ([\d,]+) \|$",
                      CLUSTER_README.read_text(), re.MULTILINE)  # fmt: skip
    assert {(r[0], r[4]) for r in rows} == {(m, g) for m in ("ViT-B/32", "ViT-L/14") for g in peaks}
    for model, fwd, train, total, gpu, gpu_hours, wall512, wall256, per_gpu in rows:
        flops = 3 * summarize(model).gflops * 1e9
        assert float(fwd) == round(summarize(model).gflops, 2) and float(train) == round(flops / 1e9, 1)
        assert float(total) == pytest.approx(flops * 400e6 * 32, rel=1e-2)
        hours = flops * 400e6 * 32 / (0.4 * peaks[gpu]) / 3600
        assert int(gpu_hours.replace(",", "")) == round(hours)
        assert (float(wall512), float(wall256)) == (round(hours / 512, 2), round(hours / 256, 2))
        assert int(per_gpu.replace(",", "")) == round(0.4 * peaks[gpu] / flops)


def test_kuberay_paper_scale_keeps_the_same_choices():
    docs = [d for d in yaml.safe_load_all(KUBERAY_PAPER.read_text()) if d]
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == pyproject_pins()["ray"] and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    cfg = paper_config()
    (aws_name,) = worker_types(cfg)
    aws_type = cfg["available_node_types"][aws_name]
    node = aws_type["node_config"]
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] == aws_type["max_workers"]
    params = group["rayStartParams"]
    resources = {"CPU": int(params["num-cpus"]), "GPU": int(params["num-gpus"])}
    resources.update(yaml.safe_load(yaml.safe_load(params["resources"])))
    assert resources == aws_type["resources"]
    pod = group["template"]["spec"]
    assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == node["InstanceType"]
    (container,) = pod["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) == resources["GPU"]
    assert int(limits["vpc.amazonaws.com/efa"]) == len(node["NetworkInterfaces"])  # every card as EFA
    assert limits["hugepages-2Mi"] == requests["hugepages-2Mi"]  # libfabric's buffers; requests == limits
    assert int(limits["cpu"]) >= resources["ingest_cpu"] + resources["GPU"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert {k: v for k, v in docker_env(cfg).items()} == env  # the same environment as on EC2
    assert container["image"] == cfg["docker"]["image"]
    labels = group["template"]["metadata"]["labels"]
    (zone,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (host,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert (
        zone["topologyKey"] == "topology.kubernetes.io/zone"
        and host["topologyKey"] == "kubernetes.io/hostname"
    )
    assert zone["labelSelector"]["matchLabels"] == labels == host["labelSelector"]["matchLabels"]
    assert {v["name"] for v in pod["volumes"]} >= {"dshm"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert pod["serviceAccountName"] in accounts
