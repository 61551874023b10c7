"""ray_config.yaml passes the checks `ray up` runs before it touches the cloud.

`ray up` does: yaml.safe_load -> prepare_config (merge the AWS defaults.yaml, merge setup
commands, fill per-type min/max workers) -> provider resource autodetection (boto3; skipped
here, which is why the config declares every node type's resources) -> validate_config
(Ray's ray-schema.json plus cross-field checks) -> provider bootstrap (boto3; skipped).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[1] / "ray_config.yaml"


def _raw() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def _prepared(raw: dict) -> dict:
    """The config as `ray up` would hand it to the AWS provider."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_config_passes_ray_validation():
    config = _prepared(_raw())
    assert config["cluster_name"] == "datalab"
    assert config["provider"]["type"] == "aws"


def test_gpu_workers_declare_gpus_and_head_takes_no_work():
    config = _prepared(_raw())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 8]
    assert gpu, "no worker node type declares 8 GPUs"
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in gpu)


def test_setup_installs_the_synced_project():
    config = _prepared(_raw())
    assert config["file_mounts"]["~/datalab"] == "."  # `ray up` runs from the repo root
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged in
        install = [c for c in config[key] if "pip install" in c and '-e ".[cluster]"' in c]
        assert install and all("cd ~/datalab" in c for c in install), key


# vCPUs of the 8-GPU instance types with 80 GB GPUs (the Montessori 8B preset needs 80 GB)
GPU_80GB = {"p4de.24xlarge": 96, "p5.48xlarge": 192, "p5e.48xlarge": 192, "p5en.48xlarge": 192}


def test_gpu_nodes_have_80gb_gpus_and_declare_their_cpus():
    config = _prepared(_raw())
    gpu = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu
    for t in gpu:
        kind = t["node_config"]["InstanceType"]
        assert kind in GPU_80GB, f"{kind}: not an 8 x 80 GB GPU instance"
        assert t["resources"] == {"CPU": GPU_80GB[kind], "GPU": 8}


def test_every_node_type_has_an_instance_profile():
    """s3:// storage and the secrets fetch use the node's role, never static keys."""
    for name, t in _prepared(_raw())["available_node_types"].items():
        profile = t["node_config"].get("IamInstanceProfile") or {}
        assert profile.get("Name") or profile.get("Arn"), name


def _start_commands(config: dict) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
            for c in config[key] if "ray start" in c]


def test_token_auth_on_every_node_and_the_token_synced():
    config = _prepared(_raw())
    starts = _start_commands(config)
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts), starts
    # Ray reads ~/.ray/auth_token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN=" not in json.dumps(_raw())  # the token itself never in the config


def test_dashboard_listens_on_loopback_only():
    head = [c for c in _prepared(_raw())["head_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1
    words = head[0].replace("=", " ").split()
    assert words[words.index("--dashboard-host") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in head[0]


def test_secrets_come_from_the_secret_store_after_the_install():
    config = _prepared(_raw())
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = config[key]
        install = next(i for i, c in enumerate(cmds) if '-e ".[cluster]"' in c)
        fetch = [i for i, c in enumerate(cmds) if "python -m cluster.secrets fetch" in c]
        assert fetch and all(i > install for i in fetch), key
        assert "boto3" in cmds[install]  # the fetch uses boto3, pinned with the project's libraries


def test_no_secrets_in_the_config():
    raw = _raw()
    text = json.dumps(raw)
    for secret in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "aws_secret_access_key",
                   "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        assert secret not in text
    # keys never go through a runtime env: Ray logs it on every node and serves it from the job API
    assert "runtime-env" not in text and "env_vars" not in text


def _unknown_key(c):
    c["workers"] = 2


def _gpu_as_text(c):
    c["available_node_types"]["gpu_8x"]["resources"]["GPU"] = "eight"


def _head_not_a_type(c):
    c["head_node_type"] = "gpu_16x"


def _no_node_config(c):
    del c["available_node_types"]["gpu_8x"]["node_config"]


def _min_over_global_max(c):
    c["available_node_types"]["gpu_8x"]["min_workers"] = 9


@pytest.mark.parametrize(
    "breaks", [_unknown_key, _gpu_as_text, _head_not_a_type, _no_node_config, _min_over_global_max]
)
def test_broken_config_is_rejected(breaks):
    """Guards against a validation that passes anything."""
    config = _raw()
    breaks(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _prepared(config)
