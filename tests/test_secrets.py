"""The job's keys come from a file only its owner can read, never through Ray's runtime env, and
their values are never printed or logged (cluster.secrets). Fast: no Ray is started."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from cluster import secrets
from cluster.config import Options, UserError

KEY = "wandb-SECRET-value-0123456789"
TOKEN = "hf_SECRETtokenABCDEF"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No key in the environment, the default secrets file inside tmp_path, an empty cache; all
    undone afterwards (setenv first, so that undo removes what load_secrets sets)."""
    for name in (*secrets.ALLOWED, "FOO", "AWS_SECRET_ACCESS_KEY", secrets.PATH_ENV):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(secrets, "_loaded", {})


def _file(path, text: str, mode: int = 0o600):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def _no_values(*texts: str) -> None:
    for text in texts:
        for value in (KEY, TOKEN, "SECRET"):
            assert value not in text, text


def test_sets_allowed_names_and_never_shows_a_value(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    p = _file(tmp_path / "s.env", f"# keys\n\nWANDB_API_KEY={KEY}\nexport HF_TOKEN=\"{TOKEN}\"\n")
    assert secrets.load_secrets(p) == ["WANDB_API_KEY", "HF_TOKEN"]
    assert os.environ["WANDB_API_KEY"] == KEY and os.environ["HF_TOKEN"] == TOKEN  # quotes removed
    out = capsys.readouterr()
    _no_values(out.out, out.err, caplog.text)


def test_default_path_and_env_override(tmp_path, monkeypatch):
    _file(tmp_path / "home" / ".datalab" / "secrets.env", f"HF_TOKEN={TOKEN}\n")
    assert secrets.secrets_path() == tmp_path / "home" / ".datalab" / "secrets.env"
    assert secrets.load_secrets() == ["HF_TOKEN"]
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv(secrets.PATH_ENV, str(_file(tmp_path / "other.env", f"WANDB_API_KEY={KEY}\n")))
    assert secrets.load_secrets() == ["WANDB_API_KEY"] and "HF_TOKEN" not in os.environ


def test_missing_file_is_nothing_to_do(tmp_path):
    assert secrets.load_secrets(tmp_path / "absent.env") == []
    assert secrets.load_secrets() == []  # default path, absent too
    assert not any(os.environ.get(n) for n in secrets.ALLOWED)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602])
def test_a_file_others_may_read_or_write_is_refused(tmp_path, mode, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    p = _file(tmp_path / "s.env", f"WANDB_API_KEY={KEY}\n", mode)
    with pytest.raises(UserError) as err:
        secrets.load_secrets(p)
    msg = str(err.value)
    assert "\n" not in msg and str(p) in msg and f"{mode:04o}" in msg and "chmod 600" in msg
    assert "WANDB_API_KEY" not in os.environ
    out = capsys.readouterr()
    _no_values(msg, out.out, out.err, caplog.text)


def test_someone_elses_file_is_refused(tmp_path, monkeypatch):
    p = _file(tmp_path / "s.env", f"WANDB_API_KEY={KEY}\n")
    monkeypatch.setattr(os, "getuid", lambda: p.stat().st_uid + 1)  # as if another user owned it
    with pytest.raises(UserError, match="not by this user"):
        secrets.load_secrets(p)
    assert "WANDB_API_KEY" not in os.environ


def test_a_directory_is_refused(tmp_path):
    (tmp_path / "dir.env").mkdir()
    with pytest.raises(UserError, match="not a regular file"):
        secrets.load_secrets(tmp_path / "dir.env")


@pytest.mark.parametrize("line, why", [
    (TOKEN, "expected NAME=value"),                    # a token pasted without its name
    (f"1HF_TOKEN={TOKEN}", "expected NAME=value"),
    (f"HF TOKEN={TOKEN}", "expected NAME=value"),
    (f"={TOKEN}", "expected NAME=value"),
    ("HF_TOKEN=", "HF_TOKEN has an empty value"),
    ('HF_TOKEN=""', "HF_TOKEN has an empty value"),
])
def test_a_malformed_line_is_refused_without_its_text(tmp_path, line, why, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    p = _file(tmp_path / "s.env", f"WANDB_API_KEY={KEY}\n# comment\n{line}\n")
    with pytest.raises(UserError) as err:
        secrets.load_secrets(p)
    msg = str(err.value)
    assert msg == f"{p}: line 3: {why}" + ("" if "empty" in why else " (NAME of letters, digits and _)")
    assert not any(os.environ.get(n) for n in secrets.ALLOWED)  # nothing set from a bad file
    out = capsys.readouterr()
    _no_values(msg, out.out, out.err, caplog.text)


def test_a_name_given_twice_is_refused(tmp_path):
    p = _file(tmp_path / "s.env", f"HF_TOKEN={TOKEN}\nHF_TOKEN={TOKEN}x\n")
    with pytest.raises(UserError, match=r"line 2: HF_TOKEN is given twice"):
        secrets.load_secrets(p)


def test_unknown_names_are_ignored_by_name(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    p = _file(tmp_path / "s.env", f"FOO={KEY}\nAWS_SECRET_ACCESS_KEY={TOKEN}\nHF_TOKEN={TOKEN}\n")
    assert secrets.load_secrets(p) == ["HF_TOKEN"]
    assert "FOO" not in os.environ and "AWS_SECRET_ACCESS_KEY" not in os.environ
    assert "FOO" in caplog.text and "AWS_SECRET_ACCESS_KEY" in caplog.text  # named, to catch typos
    out = capsys.readouterr()
    _no_values(out.out, out.err, caplog.text.replace("AWS_SECRET_ACCESS_KEY", ""))


def test_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "mine")
    p = _file(tmp_path / "s.env", f"HF_TOKEN={TOKEN}\nWANDB_API_KEY={KEY}\n")
    assert secrets.load_secrets(p) == ["WANDB_API_KEY"]
    assert os.environ["HF_TOKEN"] == "mine"


def test_ensure_secrets_reads_once_per_process(tmp_path, monkeypatch):
    p = _file(tmp_path / "s.env", f"HF_TOKEN={TOKEN}\n")
    monkeypatch.setenv(secrets.PATH_ENV, str(p))
    assert secrets.ensure_secrets() == ["HF_TOKEN"]
    p.chmod(0o644)  # would be refused if it were read again
    assert secrets.ensure_secrets() == ["HF_TOKEN"]
    assert os.environ["HF_TOKEN"] == TOKEN


def test_ensure_secrets_keeps_refusing_a_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv(secrets.PATH_ENV, str(_file(tmp_path / "s.env", f"HF_TOKEN={TOKEN}\n", 0o640)))
    for _ in range(2):  # a failure is not cached as "nothing to do"
        with pytest.raises(UserError, match="too open"):
            secrets.ensure_secrets()


def test_write_secrets_writes_a_private_file_the_loader_reads(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    p = tmp_path / "home" / ".datalab" / "secrets.env"
    names = secrets.write_secrets(json.dumps({"HF_TOKEN": TOKEN, "WANDB_API_KEY": KEY, "OTHER": KEY}), p)
    assert names == ["WANDB_API_KEY", "HF_TOKEN"]
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    assert p.read_text() == f"WANDB_API_KEY={KEY}\nHF_TOKEN={TOKEN}\n"  # OTHER left out
    assert list(p.parent.iterdir()) == [p]  # no temporary file left behind
    assert secrets.load_secrets(p) == ["WANDB_API_KEY", "HF_TOKEN"]
    out = capsys.readouterr()
    _no_values(out.out, out.err, caplog.text)


@pytest.mark.parametrize("secret", [
    "not json " + TOKEN, json.dumps([TOKEN]), json.dumps({"HF_TOKEN": TOKEN + "\nWANDB_API_KEY=x"}),
    json.dumps({"HF_TOKEN": 12345}), json.dumps({"HF_TOKEN": " "}), json.dumps({"FOO": TOKEN}),
])
def test_write_secrets_refuses_what_it_cannot_write_as_lines(tmp_path, secret):
    with pytest.raises(UserError) as err:
        secrets.write_secrets(secret, tmp_path / "s.env")
    _no_values(str(err.value))
    assert not (tmp_path / "s.env").exists()


def test_fetch_from_secrets_manager(tmp_path, monkeypatch, capsys):
    """The setup command's path, against moto's in-process Secrets Manager."""
    import boto3
    from moto import mock_aws

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the test S3 server's, if a test set it
    p = tmp_path / "home" / ".datalab" / "secrets.env"
    with mock_aws():
        boto3.client("secretsmanager", region_name="us-west-2").create_secret(
            Name="datalab/job-keys", SecretString=json.dumps({"WANDB_API_KEY": KEY, "HF_TOKEN": TOKEN}))
        assert secrets.main(["--file", str(p), "fetch", "--secret-id", "datalab/job-keys", "--region", "us-west-2"]) == 0
        assert secrets.main(["fetch", "--secret-id", "datalab/absent", "--region", "us-west-2"]) == 2
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert secrets.main(["--file", str(p), "check"]) == 0
    out = capsys.readouterr()
    assert "wrote WANDB_API_KEY, HF_TOKEN" in out.out and "WANDB_API_KEY, HF_TOKEN" in out.out.splitlines()[-1]
    assert out.err.startswith("error: secret datalab/absent in us-west-2: ResourceNotFoundException")
    _no_values(out.out, out.err)


class _Opts(Options):
    x: int = 1


def _job(tmp_path, seen: list):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("x: 2\n")

    def run(opts):
        seen.append({n: os.environ.get(n) for n in secrets.ALLOWED})

    return str(cfg), run


def test_the_job_driver_loads_keys_before_it_runs(tmp_path, monkeypatch, capsys, caplog):
    from cluster import cli

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(secrets.PATH_ENV, str(_file(tmp_path / "s.env", f"WANDB_API_KEY={KEY}\nHF_TOKEN={TOKEN}\n")))
    seen: list = []
    cfg, run = _job(tmp_path, seen)
    assert cli.main("jobs.t", "", _Opts, lambda c: "plan", run, ["--config", cfg]) == 0
    assert seen == [{"WANDB_API_KEY": KEY, "HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": None}]
    out = capsys.readouterr()
    assert "WANDB_API_KEY, HF_TOKEN" in out.out  # names are shown
    _no_values(out.out, out.err, caplog.text)


def test_the_job_driver_refuses_an_open_file_with_exit_2(tmp_path, monkeypatch, capsys):
    from cluster import cli

    p = _file(tmp_path / "s.env", f"WANDB_API_KEY={KEY}\n", 0o644)
    monkeypatch.setenv(secrets.PATH_ENV, str(p))
    seen: list = []
    cfg, run = _job(tmp_path, seen)
    assert cli.main("jobs.t", "", _Opts, lambda c: "plan", run, ["--config", cfg]) == 2
    assert seen == []  # the job never started
    out = capsys.readouterr()
    assert out.err.startswith(f"error: {p}: permissions 0644 are too open") and out.err.count("\n") == 1
    _no_values(out.out, out.err)


def test_init_ray_puts_no_key_in_the_runtime_env(monkeypatch):
    """The runtime env carries settings and the setup hook's name, never a key: Ray logs it on
    every node. (ray.init is replaced: nothing starts.)"""
    import ray

    from cluster import runtime

    saved = dict(os.environ)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    try:
        os.environ.update(WANDB_API_KEY=KEY, HF_TOKEN=TOKEN, AWS_SECRET_ACCESS_KEY=TOKEN, DATALAB_STORAGE="/tmp/x")
        runtime.init_ray(runtime.RayOptions(address="auto"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    (kw,) = calls
    env = kw["runtime_env"]["env_vars"]
    assert env["DATALAB_STORAGE"] == "/tmp/x"
    _no_values(json.dumps(kw["runtime_env"]))
    assert not set(env) & {*secrets.ALLOWED, "AWS_SECRET_ACCESS_KEY"}
    hook = kw["runtime_env"]["worker_process_setup_hook"]
    module, _, name = hook.rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name) is runtime.setup_worker  # which calls ensure_secrets
