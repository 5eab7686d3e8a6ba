import re
import tomllib
from pathlib import Path

import pytest

from exporter.config import Config, ConfigError, env_overrides, load_config, load_config_with_sources, with_host_paths
from exporter.durations import format_duration, parse_duration
from sinks import registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("500ms", 0.5), ("2m30s", 150.0), ("1h", 3600.0), ("1.5s", 1.5), ("90", 90.0), (2, 2.0), ("250us", 0.00025)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["abc", "1x", "", "s", "-1s", True, None, "1s2"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration_round_trips():
    for seconds in (1.0, 60.0, 90.0, 3600.0, 0.5, 7200.0):
        assert parse_duration(format_duration(seconds)) == seconds


def test_defaults_without_file():
    config = load_config(None, environ={})
    assert config.housekeeping_interval == 1.0
    assert config.max_housekeeping_interval == 60.0
    assert config.global_housekeeping_interval == 60.0
    assert config.storage_duration == 120.0
    assert config.storage_driver == ["jsonl"]
    assert config.cgroup_root == Path("/sys/fs/cgroup")
    assert config.proc_root == Path("/proc")
    assert config.docker_endpoint == "unix:///var/run/docker.sock"
    assert config.sink_settings("jsonl").path == Path("container-exporter.jsonl")


def test_file_values_and_sources(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'housekeeping_interval = "2s"\nstorage_driver = ["jsonl", "stdout"]\n'
        'disable_metrics = "percpu, cpuLoad"\n[sinks.jsonl]\npath = "/tmp/out.jsonl"\nmax_bytes = 1000\n'
    )
    config, sources = load_config_with_sources(path, environ={})
    assert config.housekeeping_interval == 2.0
    assert config.storage_driver == ["jsonl", "stdout"]
    assert config.disable_metrics == ["percpu", "cpuLoad"]
    assert "percpu" not in config.metrics and "cpu" in config.metrics
    assert config.sink_settings("jsonl").path == Path("/tmp/out.jsonl")
    assert config.sink_settings("jsonl").max_bytes == 1000
    assert sources["housekeeping_interval"] == str(path)
    assert sources["sinks.jsonl.path"] == str(path)


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('housekeeping_interval = "2s"\n')
    env = {
        "CONTAINER_EXPORTER_HOUSEKEEPING_INTERVAL": "5s",
        "CONTAINER_EXPORTER_DOCKER_ONLY": "true",
        "CONTAINER_EXPORTER_STORAGE_DRIVER": "jsonl,stdout",
        "CONTAINER_EXPORTER_SINKS__JSONL__PATH": "/var/tmp/x.jsonl",
        "UNRELATED": "1",
    }
    config, sources = load_config_with_sources(path, environ=env)
    assert config.housekeeping_interval == 5.0
    assert config.docker_only is True
    assert config.storage_driver == ["jsonl", "stdout"]
    assert config.sink_settings("jsonl").path == Path("/var/tmp/x.jsonl")
    assert sources["housekeeping_interval"] == "environment variable CONTAINER_EXPORTER_HOUSEKEEPING_INTERVAL"
    assert env_overrides(env)["sinks.jsonl.path"] == ("CONTAINER_EXPORTER_SINKS__JSONL__PATH", "/var/tmp/x.jsonl")


def _problems(tmp_path, text, env=None):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env or {})
    return str(path), info.value.problems


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path, problems = _problems(tmp_path, 'housekeping_interval = "2s"\n')
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: unknown key 'housekeping_interval'")
    assert "did you mean 'housekeeping_interval'" in problems[0]


def test_bad_value_names_file_key_and_expectation(tmp_path):
    path, problems = _problems(tmp_path, 'storage_duration = "two minutes"\n')
    assert problems == [
        f"{path}: key 'storage_duration': expected a duration such as \"1s\", \"2m30s\" or \"500ms\", got 'two minutes'"
    ]


def test_unknown_sink_key_and_section(tmp_path):
    path, problems = _problems(tmp_path, "[sinks.jsonl]\npaht = 'x'\n[sinks.nosuch]\n")
    assert any(p.startswith(f"{path}: unknown key 'paht' in [sinks.jsonl]") and "'path'" in p for p in problems)
    assert any(f"{path}: unknown key 'nosuch' in [sinks]" in p for p in problems)


def test_unknown_driver_and_metric(tmp_path):
    path, problems = _problems(tmp_path, 'storage_driver = ["jsonl", "carrier-pigeon"]\ndisable_metrics = ["cpu", "gpu"]\n')
    text = "\n".join(problems)
    assert f"{path}: key 'storage_driver': unknown storage driver(s) carrier-pigeon" in text
    assert f"{path}: key 'disable_metrics': unknown metric group(s) gpu" in text


def test_bad_env_value_names_the_variable(tmp_path):
    _, problems = _problems(tmp_path, "", env={"CONTAINER_EXPORTER_DOCKER_ONLY": "maybe"})
    assert problems[0].startswith("environment variable CONTAINER_EXPORTER_DOCKER_ONLY: key 'docker_only'")


def test_invalid_toml_and_missing_file(tmp_path):
    path, problems = _problems(tmp_path, "housekeeping_interval = \n")
    assert problems[0].startswith(f"{path}: invalid TOML")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml", environ={})


def test_interval_order_is_checked(tmp_path):
    _, problems = _problems(tmp_path, 'housekeeping_interval = "2m"\nmax_housekeeping_interval = "1m"\n')
    assert "max_housekeeping_interval must not be smaller than housekeeping_interval" in problems[0]


def test_example_documents_every_key_and_matches_defaults():
    example = ROOT / "config.example.toml"
    text = example.read_text()
    data = tomllib.loads(text)
    for key in Config.model_fields:
        # keys without a default value (files) appear commented out
        assert key in data or re.search(rf"^# {key} = ", text, re.M), f"config.example.toml lacks top-level key {key}"
    for name in registry.DRIVERS:
        for key in registry.settings_model(name).model_fields:
            assert re.search(rf"^\s*#?\s*{key}\b", text, re.M), f"config.example.toml does not document sinks.{name}.{key}"
    loaded = load_config(example, environ={})
    defaults = Config()
    for key in Config.model_fields:
        if key == "sinks" or key not in data:
            continue
        assert getattr(loaded, key) == getattr(defaults, key), key
    assert loaded.sink_settings("jsonl") == defaults.sink_settings("jsonl")


def test_host_paths_through_rootfs_when_the_host_is_mounted(tmp_path):
    host = tmp_path / "rootfs"
    (host / "proc").mkdir(parents=True)
    config, sources = load_config_with_sources(None, environ={})
    moved = with_host_paths(config, sources, host_rootfs=host)
    assert (moved.rootfs, moved.proc_root, moved.sys_root) == (host, host / "proc", host / "sys")
    assert moved.cgroup_root == Path("/sys/fs/cgroup")  # mounted at its own place
    # what the user set stays
    path = tmp_path / "c.toml"
    path.write_text('proc_root = "/elsewhere/proc"\n')
    config, sources = load_config_with_sources(path, environ={})
    assert with_host_paths(config, sources, host_rootfs=host).proc_root == Path("/elsewhere/proc")
    # no /rootfs/proc: nothing changes
    assert with_host_paths(config, sources, host_rootfs=tmp_path / "none") is config


def test_configuration_reference_is_generated_from_the_models():
    from exporter.reference import render

    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == render(), "regenerate: python -m exporter.reference > docs/configuration.md"
    for key in Config.model_fields:
        if key != "sinks":
            assert f"| `{key}` |" in committed
    for name in registry.DRIVERS:
        assert f"## `[sinks.{name}]`" in committed
        for key in registry.settings_model(name).model_fields:
            assert f"| `{key}` |" in committed


def test_bad_event_policy_names_the_key(tmp_path):
    path, problems = _problems(tmp_path, 'event_storage_age_limit = "default=forever"\nevent_storage_event_limit = "oom=lots"\n')
    text = "\n".join(problems)
    assert f"{path}: key 'event_storage_age_limit'" in text and "forever" in text
    assert f"{path}: key 'event_storage_event_limit'" in text and "lots" in text
