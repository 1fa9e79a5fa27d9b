"""`medlava doctor`: SLURM with and without a cluster (fake `sinfo`/`sbatch` on a PATH the test makes), version
pins, directories, and a whole run in an environment the test builds with a package missing and broken extras."""

import importlib.metadata as metadata
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from medlava.cluster.sinfo import SINFO_FORMAT, parse_sinfo
from medlava.tools import doctor
from medlava.tools.doctor import (
    FAIL,
    OK,
    WARN,
    check_apptainer,
    check_caches,
    check_gpus,
    check_output_root,
    check_packages,
    check_slurm,
    read_pins,
)
from packaging.requirements import Requirement

# What `sinfo -h -o '%P|%a|%D|%c|%m|%G'` prints on a mixed cluster: one line per partition and node kind.
SINFO = """gpu*|up|4|64|512000|gpu:a100:8(S:0-1)
gpu*|up|2|96|1024000|gpu:h100:4
cpu|up|16|128+|256000|(null)
debug|down|1|8|32000|gpu:1
"""


def fake_tools(
    bin_dir: Path, sinfo_out: str = SINFO, sinfo_rc: int = 0, sinfo_err: str = "", apptainer: bool = False
) -> Path:
    """A PATH directory holding sbatch, a sinfo that answers only the query doctor must make, and apptainer."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {
        "sbatch": "#!/bin/sh\necho 'sbatch: error: no script given' >&2\nexit 1\n",
        "sinfo": (
            "#!/bin/sh\n"
            'if [ "$1" = "--version" ]; then echo "slurm 23.11.4"; exit 0; fi\n'
            f'if [ "$*" != "-h -o {SINFO_FORMAT}" ]; then echo "unexpected: $*" >&2; exit 9; fi\n'
            f"printf '%s' '{sinfo_err}' >&2\nprintf '%s' '{sinfo_out}'\nexit {sinfo_rc}\n"
        ),  # builtins only
    }
    if apptainer:
        scripts["apptainer"] = "#!/bin/sh\necho 'apptainer version 1.3.4'\n"
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_sinfo_lines_become_partitions_with_their_gpus():
    parts = {p.name: p for p in parse_sinfo(SINFO)}
    assert list(parts) == ["gpu", "cpu", "debug"]
    gpu = parts["gpu"]
    assert gpu.default and gpu.available == "up" and gpu.nodes == [(4, 8, "a100"), (2, 4, "h100")]
    assert gpu.gpus == 4 * 8 + 2 * 4
    assert parts["cpu"].gpus == 0 and not parts["cpu"].default
    assert parts["debug"].available == "down" and parts["debug"].gpus == 1
    assert parse_sinfo("mixed|up|3|32|128000|gpu:a100:4,gpu:v100:2\n")[0].nodes == [(3, 6, "a100+v100")]


def test_slurm_cluster_reachable(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "bin")))
    c = check_slurm()
    assert c.status == OK
    assert c.detail == ("slurm 23.11.4; gpu* (up: 4×8 a100, 2×4 h100); cpu (up: 16 without GPUs); debug (down: 1×1)")


def test_no_slurm_on_this_machine(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    c = check_slurm()
    assert c.status == WARN and "sbatch not on PATH" in c.detail and "login node" in c.fix


def test_slurm_controller_down_fails_with_its_message(tmp_path, monkeypatch):
    msg = "slurm_load_partitions: Unable to contact slurm controller (connect failure)"
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "bin", sinfo_out="", sinfo_rc=1, sinfo_err=msg)))
    c = check_slurm()
    assert c.status == FAIL and c.detail == f"sinfo does not answer: {msg}" and "scontrol ping" in c.fix


def test_slurm_without_gpu_partitions_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "bin", sinfo_out="debug*|up|2|1|2000|(null)\n")))
    c = check_slurm()
    assert c.status == WARN and "no partition that is up offers GPUs" in c.detail and "cluster.partition" in c.fix


def test_apptainer_present_or_not(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "bin", apptainer=True)))
    c = check_apptainer()
    assert c.status == OK and c.detail.startswith("apptainer version 1.3.4")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert check_apptainer().status == WARN


def required_names() -> list[str]:
    return [Requirement(r).name for r in metadata.requires("medlava") if "extra ==" not in r]


def pins_of_this_env(path: Path, **override: str) -> Path:
    """A constraints file pinning every required package at its installed version (plus comments, an
    option line and extras, as the real file has), so the verdicts do not depend on this machine."""
    lines = ["# pins", "--extra-index-url https://example.invalid/simple"]
    lines += [f"{n}=={override.get(n, metadata.version(n))}" for n in required_names()]
    return _write(path, "\n".join(lines + ["flash-attn==2.8.3.post2", "deepspeed==0.19.8  # gpu extra"]) + "\n")


def test_versions_are_compared_with_the_pins(tmp_path):
    real = read_pins(ROOT / "constraints.txt")  # the repository's file parses
    assert {"torch", "transformers", "peft", "deepspeed", "flash-attn"} <= set(real)
    pins = read_pins(pins_of_this_env(tmp_path / "c.txt"))
    assert str(pins["flash-attn"]) == "==2.8.3.post2" and len(pins) == len(required_names()) + 2
    assert (
        check_packages(pins)[0].detail == f"{len(required_names())} required packages import and match constraints.txt"
    )
    (c,) = check_packages(read_pins(pins_of_this_env(tmp_path / "c1.txt", transformers="0.0.1")))
    assert (c.name, c.status) == ("package transformers", WARN)
    assert c.detail == f"{metadata.version('transformers')}, tested with transformers==0.0.1"
    assert c.fix == "pip install -c constraints.txt 'transformers==0.0.1'"
    with pytest.raises(ValueError, match=r"c2.txt:2: not a requirement"):
        read_pins(_write(tmp_path / "c2.txt", "# pins\ntorch=2.1\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_output_root_and_cache_directories(tmp_path):
    ok = check_output_root(tmp_path)
    free = shutil.disk_usage(tmp_path).free / 1024**3
    assert ok.status in (OK, WARN) and f"writable, {free:.0f} GiB free" in ok.detail
    (tmp_path / "file").write_text("x")
    bad = check_output_root(tmp_path / "file" / "runs")
    assert bad.status == FAIL and "is not a directory" in bad.detail and "--output-root" in bad.fix
    env = {"HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_CACHE": "/old/cache", "XDG_CACHE_HOME": str(tmp_path)}
    checks = {c.name: c for c in check_caches(env, on_cluster=True)}
    assert checks["TRANSFORMERS_CACHE"].status == WARN and "ignores it" in checks["TRANSFORMERS_CACHE"].detail
    assert checks["HF_HOME"].detail.startswith(f"{tmp_path / 'hf'} (set)")
    # Not set on a cluster: every node would use its own default.
    torch_home = checks["TORCH_HOME"]
    assert torch_home.status == WARN and torch_home.detail.startswith(f"{tmp_path / 'torch'} (default)")
    env["TORCH_HOME"] = str(tmp_path / "file" / "torch")
    assert {c.name: c for c in check_caches(env, on_cluster=False)}["TORCH_HOME"].status == FAIL


def test_main_without_slurm_exits_by_the_screen(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for var in ("HF_HOME", "TORCH_HOME", "MEDLAVA_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    rc = doctor.main(
        ["--output-root", str(tmp_path / "runs"), "--json", "--constraints", str(pins_of_this_env(tmp_path / "c.txt"))]
    )
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    assert rc == (0 if report["ok"] else 1) and report["ok"] == all(c["status"] != FAIL for c in checks.values())
    assert checks["slurm"]["status"] == WARN and checks["packages"]["status"] == OK
    assert checks["gpus"]["status"] == OK or "srun" not in checks["gpus"]["fix"]  # no SLURM: no srun advice
    assert checks["output root"]["detail"].startswith(f"{tmp_path / 'runs'} (will be created)")
    assert not (tmp_path / "runs").exists()  # doctor looks, it does not create


def broken_site(tmp_path: Path) -> Path:
    """This venv's packages without peft (nor its metadata), with a DeepSpeed whose CPU Adam cannot be built
    and a flash-attn built against another torch."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    for folder in map(Path, site.getsitepackages()):  # first one wins, as on sys.path
        for entry in folder.iterdir() if folder.is_dir() else ():
            top = entry.name.split("-")[0].lower()
            if (
                top not in ("peft", "deepspeed", "flash_attn")
                and not entry.name.endswith(".pth")
                and not (site_dir / entry.name).exists()
            ):
                (site_dir / entry.name).symlink_to(entry)
    ds = site_dir / "deepspeed"
    (ds / "ops" / "op_builder").mkdir(parents=True)
    (ds / "__init__.py").write_text("__version__ = '0.19.8'\n")
    (ds / "git_version_info.py").write_text("installed_ops = {'cpu_adam': False}\n")
    (ds / "ops" / "__init__.py").write_text("")
    (ds / "ops" / "op_builder" / "__init__.py").write_text("")
    (ds / "ops" / "op_builder" / "all_ops.py").write_text(
        "class CPUAdamBuilder:\n    def is_compatible(self, verbose=False):\n        return False\n"
        "ALL_OPS = {'cpu_adam': CPUAdamBuilder()}\n"
    )
    (site_dir / "flash_attn").mkdir()
    (site_dir / "flash_attn" / "__init__.py").write_text(  # as a wheel built against another torch fails
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
    )
    return site_dir


def test_doctor_in_a_broken_environment_fails_with_fixes(tmp_path):
    site_dir = broken_site(tmp_path)
    bin_dir = fake_tools(tmp_path / "bin", apptainer=True)
    env = {
        "PATH": str(bin_dir),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "TORCH_HOME": str(tmp_path / "torch"),
        "PYTHONPATH": os.pathsep.join([str(site_dir), str(ROOT / "pkg")]),
    }
    # -S: no site-packages, so the environment is exactly what the test built.
    cmd = [
        sys.executable,
        "-S",
        "-m",
        "medlava",
        "doctor",
        "--json",
        "--output-root",
        str(tmp_path / "runs"),
        "--constraints",
        str(pins_of_this_env(tmp_path / "c.txt", peft="0.21.2")),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["package peft"] == {
        "name": "package peft",
        "status": FAIL,
        "detail": "not installed",
        "fix": "pip install -c constraints.txt 'peft==0.21.2'",
    }
    assert "packages" not in checks  # no blanket OK when one is missing
    fa = checks["flash-attn"]
    assert fa["status"] == FAIL and "undefined symbol" in fa["detail"] and "flash-attn==2.8.3.post2" in fa["fix"]
    dsp = checks["deepspeed"]
    assert dsp["status"] == WARN and "zero2/zero3 work without it" in dsp["fix"]
    assert "cpu_adam (zero3_offload): not prebuilt and cannot be JIT-compiled here (no ninja)" in dsp["detail"]
    assert checks["slurm"]["status"] == OK and "gpu* (up: 4×8 a100, 2×4 h100)" in checks["slurm"]["detail"]
    assert checks["gpus"]["status"] == OK or "srun -p gpu --gres=gpu:1" in checks["gpus"]["fix"]
    assert checks["apptainer"]["status"] == OK and checks["python"]["status"] == OK
    assert checks["HF_HOME"]["detail"].startswith(f"{tmp_path / 'hf'} (set)")
    # The text screen carries the same verdicts with the fix under each problem.
    screen = doctor.render([doctor.Check(**c) for c in checks.values()])
    assert "FAIL  package peft" in screen and "fix: pip install -c constraints.txt 'peft==0.21.2'" in screen
    assert screen.splitlines()[-1].endswith("2 FAIL")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_are_tried_on_the_gpu():
    bf16 = doctor.check_bf16()
    assert bf16.status == (OK if torch.cuda.is_bf16_supported() else WARN) and "cuda:0" in bf16.detail
    fa = doctor.check_flash_attn({})
    assert (fa.status, "matches SDPA" in fa.detail) == (OK, True) or fa.detail.startswith("not installed")


def test_the_default_pin_file_is_the_repositorys():
    assert doctor.DEFAULT_CONSTRAINTS == ROOT / "constraints.txt" and doctor.DEFAULT_CONSTRAINTS.exists()


def test_the_gpu_fix_agrees_with_what_sinfo_found(monkeypatch):
    """No GPU here: the fix names a GPU partition with its srun line only when sinfo listed one that is up."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with_gpus = check_gpus(0, parse_sinfo(SINFO))
    assert with_gpus.status == WARN and with_gpus.fix.startswith("run it on a GPU node: srun -p gpu --gres=gpu:1 ")
    without = check_gpus(0, parse_sinfo("debug*|up|2|1|2000|(null)\ngpu|down|1|8|32000|gpu:8\n"))
    assert "no partition of this cluster offers GPUs" in without.fix and "srun" not in without.fix
    assert check_gpus(0, None).fix == "run it on a machine with a CUDA GPU (and torch's CUDA build)"


def test_fewer_gpus_than_the_job_asked_for_is_a_failure(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert check_gpus(0).status == WARN
    failed = check_gpus(2)
    assert failed.status == FAIL and "0 CUDA GPU(s) visible (CUDA_VISIBLE_DEVICES='')" in failed.detail
    assert "asked for 2 per node" in failed.detail and "--nv" in failed.fix
