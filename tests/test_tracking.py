"""cluster.tracking: real wandb 0.31 offline runs, read back from their `.wandb` logs.

Only the edge of the machine is faked: a fake API key in the environment, and a socket guard
that fails the test if anything in this process tries to reach a non-loopback address.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import transformers
from PIL import Image

from cluster import tracking
from cluster.tracking import (
    OfflineRunError,
    TrackingOptions,
    WandbTrainerCallback,
    code_version,
    find_offline_runs,
    finish_run,
    log_image,
    log_table,
    read_offline_run,
    start_run,
)

FAKE_KEY = "fakekey" + "7" * 40  # a well-formed key, so wandb would accept it if it tried
CONFIG_SECRET = "abc-config-secret-4711"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """wandb confined to tmp_path, a fake key set, and every outbound socket recorded and refused.

    WANDB_MODE is deliberately unset: jobs run offline through `start_run`'s own settings, and
    that path must not phone home either (wandb 0.31 sends usage analytics unless told not to).
    """
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / sub))

    attempts: list = []

    def local(host) -> bool:
        return str(host) in ("localhost", "127.0.0.1", "::1", "") or str(host).startswith("127.")

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            attempts.append(("getaddrinfo", host))
            raise OSError(f"test: no network ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if sock.family != socket.AF_UNIX and not local(address[0]):
            attempts.append(("connect", address))
            raise OSError(f"test: no network ({address})")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield tmp_path
    # wandb's analytics export on a timer or at exit: flush them now, while the guard is up.
    from wandb.analytics.opentelemetry import opentelemetry_proxy

    if (proxy := opentelemetry_proxy.get_open_telemetry_proxy()) is not None:
        proxy.shutdown(timeout_millis=5_000)
    assert attempts == [], f"wandb tried to reach the network: {attempts}"


def _png(path: Path) -> Path:
    Image.new("RGB", (4, 3), (255, 0, 0)).save(path)
    return path


def test_two_sequential_runs_read_back(env):
    opts = TrackingOptions()
    for i, trial in enumerate(("trial-a", "trial-b")):
        run = start_run(
            opts, run_id=f"exp1-{trial}", name=trial, group="exp1", job_type="sft",
            config={"lr": 0.1 * (i + 1), "model": {"layers": 2, "tokenizer": "bpe"}}, dir=env / "run",
        )
        assert run is not None
        for step in range(3):
            run.log({"loss": 1.0 / (step + 1) + i, "acc": step * 10 + i}, step=step)
        log_table(run, "answers", [{"q": "a?", "ok": True}, {"q": "b?", "ok": False, "extra": 1}])
        log_image(run, "plot", _png(env / "plot.png"))
        finish_run(run)

    dirs = find_offline_runs(env)
    assert len(dirs) == 2
    runs = {r["id"]: r for r in map(read_offline_run, dirs)}
    assert sorted(runs) == ["exp1-trial-a", "exp1-trial-b"]
    for i, trial in enumerate(("trial-a", "trial-b")):
        r, run_dir = runs[f"exp1-{trial}"], next(d for d in dirs if d.name.endswith(trial))
        assert (r["name"], r["group"], r["complete"]) == (trial, "exp1", True)
        assert r["config"] == {"lr": pytest.approx(0.1 * (i + 1)), "model": {"layers": 2, "tokenizer": "bpe"},
                               "commit": code_version()}  # the code that ran, recorded by start_run
        steps = [row for row in r["history"] if "loss" in row]
        assert [row["_step"] for row in steps] == [0, 1, 2]
        assert [row["loss"] for row in steps] == pytest.approx([1.0 + i, 0.5 + i, 1 / 3 + i])
        assert [row["acc"] for row in steps] == [i, 10 + i, 20 + i]
        assert r["summary"]["loss"] == pytest.approx(1 / 3 + i)
        assert r["summary"]["acc"] == 20 + i
        table = r["summary"]["answers"]
        assert table["_type"] == "table-file"
        content = json.loads((run_dir / "files" / table["path"]).read_text())
        assert content["columns"] == ["q", "ok", "extra"]
        assert content["data"] == [["a?", True, None], ["b?", False, 1]]
        assert r["summary"]["plot"]["_type"] == "image-file"
        assert (run_dir / "files" / r["summary"]["plot"]["path"]).is_file()


def test_no_secret_is_written(env):
    config = {
        "wandb": {"api_key": CONFIG_SECRET, "project": "p"},
        "hub": {"hf_token": CONFIG_SECRET, "tokenizer": "bpe", "max_new_tokens": 8},
        "items": [{"db_password": CONFIG_SECRET, "apiKey": CONFIG_SECRET, "n": 1}],
    }
    run = start_run(TrackingOptions(), run_id="s1", name="s1", group="g", job_type="t", config=config, dir=env)
    run.log({"loss": 1.0})
    finish_run(run)

    (run_dir,) = find_offline_runs(env)
    assert read_offline_run(run_dir)["config"] == {
        "wandb": {"project": "p"}, "hub": {"tokenizer": "bpe", "max_new_tokens": 8}, "items": [{"n": 1}],
        "commit": code_version(),
    }
    files = [p for p in env.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "debug.log" for p in files)
    for path in files:
        data = path.read_bytes()
        assert FAKE_KEY.encode() not in data, path
        assert CONFIG_SECRET.encode() not in data, path
    # The grep can see a leak: wandb writes the config it is given into debug.log in clear text.
    assert any(b"max_new_tokens" in p.read_bytes() for p in files if p.name == "debug.log")


def test_trainer_callback_logs_at_global_step(env):
    run = start_run(TrackingOptions(), run_id="cb", name="cb", group="g", job_type="sft", config={}, dir=env)
    callback = WandbTrainerCallback(run)
    for step, loss in ((5, 2.0), (10, 1.5)):
        state = transformers.TrainerState(global_step=step)
        callback.on_log(None, state, transformers.TrainerControl(), logs={"loss": loss, "note": "x"})
    finish_run(run)
    WandbTrainerCallback(None).on_log(None, transformers.TrainerState(global_step=1), None, logs={"loss": 1.0})

    rows = [row for row in read_offline_run(find_offline_runs(env)[0])["history"] if "loss" in row]
    assert [(row["_step"], row["loss"]) for row in rows] == [(5, 2.0), (10, 1.5)]
    assert all("note" not in row for row in rows)


def test_finish_run_returns_a_complete_log(env):
    # wandb 0.31 flushes the log just after finish() returns, about half the time: try a few.
    for i in range(6):
        run = start_run(TrackingOptions(), run_id=f"f{i}", name="f", group="g", job_type="t", config={}, dir=env / str(i))
        run.log({"loss": float(i)})
        finish_run(run)
        (run_dir,) = find_offline_runs(env / str(i))
        r = read_offline_run(run_dir)
        assert r["complete"] and r["summary"]["loss"] == i


def test_disabled_or_non_zero_rank_returns_none(env, monkeypatch):
    kwargs = dict(run_id="x", name="x", group="g", job_type="t", config={"a": 1}, dir=env / "off")
    assert start_run(TrackingOptions(mode="disabled"), **kwargs) is None

    import ray.train

    class Rank1:
        def get_world_rank(self) -> int:
            return 1

    monkeypatch.setattr(ray.train, "get_context", lambda: Rank1())
    assert start_run(TrackingOptions(), **kwargs) is None
    assert not (env / "off").exists()
    finish_run(None)
    log_table(None, "t", [{"a": 1}])
    log_image(None, "p", env / "missing.png")


def test_online_needs_a_key(env, monkeypatch):
    online = TrackingOptions(mode="online")
    assert tracking.resolve_mode(online) == "online"  # WANDB_API_KEY is set by the fixture
    monkeypatch.delenv("WANDB_API_KEY")
    assert tracking.resolve_mode(online) == "offline"
    (env / "netrc").write_text(f"machine api.forge.coreweave.com\n  login user\n  password {FAKE_KEY}\n")
    monkeypatch.setenv("NETRC", str(env / "netrc"))
    assert tracking.resolve_mode(online) == "online"
    assert tracking.resolve_mode(TrackingOptions()) == "offline"


def test_reader_rejects_what_it_does_not_understand(env):
    bad = env / "offline-run-1-bad"
    bad.mkdir()
    with pytest.raises(OfflineRunError, match="expected one run-"):
        read_offline_run(bad)
    (bad / "run-bad.wandb").write_bytes(b"PK\x03\x04 not a wandb log")
    with pytest.raises(OfflineRunError, match="not a W&B log"):
        read_offline_run(bad)

    # A record larger than a 32 KiB block (split into FIRST/MIDDLE/LAST chunks) and many small
    # ones (block tails padded): the log spans several blocks.
    blob = "0123456789" * 7000
    run = start_run(TrackingOptions(), run_id="c", name="c", group="g", job_type="t",
                    config={"blob": blob}, dir=env / "ok")
    for step in range(300):
        run.log({"x": step}, step=step)
    run.log({"loss": 1.0})
    finish_run(run)
    (good,) = find_offline_runs(env / "ok")
    data = next(good.glob("run-*.wandb")).read_bytes()
    assert len(data) > 3 * 32768
    r = read_offline_run(good)
    assert r["complete"] and r["config"]["blob"] == blob
    assert [row["x"] for row in r["history"] if "x" in row] == list(range(300))

    # A crashed run (log cut inside its last record) reads back as incomplete, with its data.
    (bad / "run-bad.wandb").write_bytes(data[:-3])
    r = read_offline_run(bad)
    assert (r["complete"], r["id"], r["summary"]["loss"]) == (False, "c", 1.0)
    assert not tracking._log_complete(bad / "run-bad.wandb")
    # What a bare run.finish() can leave behind for a moment: the file header alone.
    (bad / "run-bad.wandb").write_bytes(data[:7])
    with pytest.raises(OfflineRunError, match="still being written"):
        read_offline_run(bad)

    flipped = bytearray(data)
    flipped[40] ^= 0xFF  # inside the first record's payload
    (bad / "run-bad.wandb").write_bytes(bytes(flipped))
    with pytest.raises(OfflineRunError, match="corrupt"):
        read_offline_run(bad)


def test_scrub_names():
    drop = ["api_key", "WANDB_API_KEY", "apiKey", "hf_token", "accessToken", "token", "key",
            "db_password", "client_secret", "aws_secret_access_key", "credentials", "token_file"]
    keep = ["tokenizer", "max_new_tokens", "keyword", "sort_keys", "lr", "model", "num_tokens"]
    assert [n for n in drop if not tracking.is_secret_name(n)] == []
    assert [n for n in keep if tracking.is_secret_name(n)] == []
