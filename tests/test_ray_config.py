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


def test_no_secrets_in_the_config():
    text = json.dumps(_raw())
    for secret in ("WANDB_API_KEY", "HF_TOKEN", "aws_secret_access_key"):
        assert secret not in text


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
