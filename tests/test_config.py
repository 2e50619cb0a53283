"""Config parsing and `berthd check-config`: every wrong key named by its dotted path."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from berth.daemon.config import ConfigError, EndpointSpec, gpu_shortage, load_config, parse_config
from berth.daemon.main import check_config
from helpers import ROOT

GPU_BOX = {"gpu": {"source": "static", "devices": [{"name": "NVIDIA H100", "memory_mib": 80000}]}}


def errors_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return [str(i) for i in info.value.issues]


@pytest.mark.parametrize(("data", "expected"), [
    ({"endpoints": {"a": {"image": "x", "gpuz": 1}}}, "endpoints.a.gpuz: unknown key"),
    ({"endpoints": {"a": {"image": "x", "gpus": "two"}}}, "endpoints.a.gpus: Input should be"),
    ({"endpoints": {"a": {"image": "x", "max_replicas": 0}}},
     "endpoints.a.max_replicas: Input should be greater than or equal to 1"),
    ({"endpoints": {"Bad_Name": {"image": "x"}}}, "endpoints.Bad_Name.name: String should match"),
    ({"endpoints": {"a": {"image": "x", "min_replicas": 3, "max_replicas": 2}}},
     "endpoints.a.min_replicas: min_replicas (3) is greater than max_replicas (2)"),
    ({"endpoints": {"a": {"gpus": 1}}}, "endpoints.a.image: required key is missing"),
    ({"endpoints": {"a": {"image": "x", "volumes": ["relative:/x"]}}},
     "endpoints.a.volumes: Value error, 'relative:/x' is not"),
    ({"endpoints": {"a": {"image": "x", "memory": "lots"}}}, "endpoints.a.memory: Value error"),
    ({"endpoints": {"a": {"image": "x", "readiness": {"path": "/h", "every": 1}}}},
     "endpoints.a.readiness.every: unknown key"),
    ({"daemon": {"listen": 8080}}, "daemon.listen: Input should be a valid string"),
    ({"daemon": {"colour": "blue"}}, "daemon.colour: unknown key"),
    ({"gpu": {"source": "cuda"}}, "gpu.source: Input should be 'nvml', 'static' or 'none'"),
    ({"gpu": {"devices": [{"name": "x"}]}}, "gpu.devices.0.memory_mib: required key is missing"),
    ({"defaults": {"gpuz": 1}}, "defaults.gpuz: unknown key"),
    ({"mystery": {}}, "mystery: unknown key"),
    ({"endpoints": {"a": "image"}}, "endpoints.a: must be a table of endpoint fields"),
])
def test_each_mistake_is_named_by_its_path(data, expected):
    found = errors_of(data)
    assert any(e.startswith(expected) for e in found), found


def test_every_mistake_is_reported_not_just_the_first():
    found = errors_of({"daemon": {"colour": 1},
                       "endpoints": {"a": {"image": "x", "gpus": -1},
                                     "b": {"image": "y", "concurrency": 0}}})
    assert len(found) == 3
    assert {f.split(":")[0] for f in found} == {"daemon.colour", "endpoints.a.gpus",
                                               "endpoints.b.concurrency"}


def test_defaults_apply_and_endpoint_values_win():
    config = parse_config({"defaults": {"image": "base", "idle_timeout_s": 60, "gpus": 1},
                           "endpoints": {"a": {}, "b": {"gpus": 2, "image": "other"}}})
    a, b = config.endpoints["a"], config.endpoints["b"]
    assert (a.image, a.idle_timeout_s, a.gpus) == ("base", 60.0, 1)
    assert (b.image, b.gpus) == ("other", 2)


def test_spec_defaults_follow_the_contract():
    spec = EndpointSpec(name="m", image="x")
    assert (spec.port, spec.gpus, spec.min_replicas, spec.max_replicas, spec.concurrency) == \
        (8080, 0, 0, 1, 1)
    assert (spec.idle_timeout_s, spec.request_timeout_s, spec.async_timeout_s,
            spec.startup_timeout_s, spec.queue_limit) == (300, 600, 3600, 600, 100)
    assert (spec.readiness.path, spec.readiness.period_s, spec.readiness.timeout_s) == \
        ("/health", 1, 2)
    assert spec.liveness_path == "/health" and spec.liveness.failure_threshold == 3
    assert spec.public is False and spec.priority == 0


def test_runtime_view_separates_rolling_changes_from_in_place_ones():
    base = EndpointSpec(name="m", image="x")
    assert base.runtime_view() == base.model_copy(update={"max_replicas": 4}).runtime_view()
    assert base.runtime_view() != base.model_copy(update={"env": {"A": "1"}}).runtime_view()


def test_example_config_is_valid_and_realistic():
    config = load_config(ROOT / "config.example.toml")
    llm, embed = config.endpoints["llm"], config.endpoints["embed"]
    assert llm.gpus == 1 and llm.min_replicas == 0 and llm.volumes and llm.readiness.path
    assert embed.min_replicas >= 1


def test_example_config_documents_every_setting():
    text = (ROOT / "config.example.toml").read_text()
    from berth.daemon.config import DaemonSettings, DockerSettings, EndpointFields, GpuSettings
    for model in (DaemonSettings, DockerSettings, GpuSettings, EndpointFields):
        for field in model.model_fields:
            assert field in text, f"{model.__name__}.{field} is not in config.example.toml"


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "berth.daemon.main", "check-config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_check_config_exit_codes_and_three_mistakes(tmp_path):
    good = tmp_path / "good.toml"
    data = tomllib.loads((ROOT / "config.example.toml").read_text())
    good.write_text((ROOT / "config.example.toml").read_text().replace(
        '\nsource = "nvml"', '\nsource = "static"', 1)
        + '\n[[gpu.devices]]\nname = "NVIDIA H100"\nmemory_mib = 81559\n')
    assert data["gpu"]["source"] == "nvml"
    result = run_check(good)
    assert result.returncode == 0, result.stderr
    assert "ok (2 endpoint(s))" in result.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text()
                   .replace("gpus = 1", "gpus = 4")
                   .replace("concurrency = 8", "concurrency = 8\nreplicas = 3")
                   .replace("[endpoints.embed]", "[endpoints.Embed]")
                   .replace('listen = "127.0.0.1:8080"', "listen = 8080"))
    result = run_check(bad)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert "endpoints.Embed.replicas: unknown key" in lines
    assert any(line.startswith("endpoints.Embed.name: String should match pattern")
               for line in lines)
    assert "daemon.listen: Input should be a valid string (got 8080)" in lines
    assert "endpoints.llm.gpus: asks for 4 but this box has 1 GPU matching gpu_type 'H100'" \
        in lines
    assert lines[-1].endswith("4 error(s)")
    assert "Traceback" not in result.stderr


def test_check_config_on_unreadable_and_non_toml_files(tmp_path, capsys):
    assert check_config(str(tmp_path / "nope.toml")) == 2
    assert "cannot read" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[endpoints.a\nimage=")
    assert check_config(str(broken)) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_gpu_count_checked_against_declared_gpus(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[gpu]\nsource = "static"\n[[gpu.devices]]\nname = "NVIDIA A10"\n'
                    'memory_mib = 24000\n[endpoints.a]\nimage = "x"\ngpus = 1\n'
                    'gpu_type = "H100"\n')
    assert check_config(str(path)) == 2
    assert "endpoints.a.gpus: asks for 1 but this box has 0 GPUs matching gpu_type 'H100'" \
        in capsys.readouterr().err


@pytest.mark.parametrize(("gpus", "gpu_type", "expected"), [
    (0, None, None),
    (2, None, None),
    (3, None, "asks for 3 but this box has 2 GPUs"),
    (1, "h100", None),  # matched case-insensitively
    (2, "H100", "asks for 2 but this box has 1 GPU matching gpu_type 'H100'"),
    (1, "B200", "asks for 1 but this box has 0 GPUs matching gpu_type 'B200'"),
])
def test_gpu_shortage_names_what_the_box_has(gpus, gpu_type, expected):
    class Gpu:
        def __init__(self, name: str) -> None:
            self.name = name

    box = [Gpu("NVIDIA H100 80GB HBM3"), Gpu("NVIDIA A10")]
    spec = EndpointSpec(name="m", image="x", gpus=gpus, gpu_type=gpu_type)
    assert gpu_shortage(spec, box) == expected


def test_nvml_source_without_nvml_names_static(tmp_path, capsys):
    pytest.importorskip("pynvml")
    path = tmp_path / "c.toml"
    path.write_text('[gpu]\nsource = "nvml"\n')
    if _nvml_present():
        pytest.skip("this machine has NVML; the absent-NVML message cannot be shown here")
    assert check_config(str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu.source: NVML cannot be used") and 'gpu.source = "static"' in err


def _nvml_present() -> bool:
    import pynvml
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.parametrize(("text", "where", "says"), [
    (b"# caf\xe9\n[daemon]\n", "", "not UTF-8"),
    (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "", "nests too deeply"),
    (b'[daemon]\nmin_free_disk = "' + b"9" * 400 + b'g"\n', "daemon.min_free_disk", "2^53"),
    (b"[daemon]\nmin_free_disk = " + b"9" * 30 + b"\n", "daemon.min_free_disk", "2^53"),
    (b'[endpoints.a]\nimage = "x"\ngpus = 1\ngpu_memory = "' + b"9" * 400 + b'g"\n',
     "endpoints.a.gpu_memory", "2^53"),
    (b"[daemon]\nprune_interval_s = inf\n", "daemon.prune_interval_s", ""),
    (b"[gpu]\nsample_interval_s = 1e15\n", "gpu.sample_interval_s", ""),
])
def test_a_file_that_once_crashed_berthd_is_a_config_error(tmp_path, text, where, says):
    # Each raised something other than ConfigError: a reload (SIGHUP) stopped the daemon,
    # and systemd restarted it into the same crash.
    path = tmp_path / "berth.toml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    issue = caught.value.issues[0]
    assert issue.path == where and says in issue.message, caught.value.issues
