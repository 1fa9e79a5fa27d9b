"""The Apptainer image definition and the container command lines (Apptainer itself is not installable
here: the .def file is parsed, containers/build.sh runs against a recording `apptainer`)."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, complete_runs
from medlava.cluster.container import Apptainer, apptainer_for, bind_paths
from medlava.config import load_config

DEF = ROOT / "containers" / "medlava.def"


def versions() -> dict[str, str]:
    lines = (ROOT / "containers" / "versions.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def sections(text: str) -> dict[str, str]:
    """Header (before the first %section) and each %section's body."""
    parts = re.split(r"^%(\w+)[^\n]*\n", text, flags=re.M)
    return {"header": parts[0], **{name: body for name, body in zip(parts[1::2], parts[2::2])}}


def constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def test_versions_file_is_the_only_source_of_pins_and_constraints_agree():
    v = versions()
    assert set(v) == {
        "CUDA_IMAGE",
        "TORCH_VERSION",
        "TORCHVISION_VERSION",
        "TORCH_CUDA",
        "FLASH_ATTN_VERSION",
        "LLAVA_MED_COMMIT",
    }
    text = DEF.read_text()
    assert set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text)) == set(v), "every pin used, and only these"
    assert "arguments" not in sections(text), "defaults in %arguments would be a second place for pins"
    assert not re.search(r"==\s*[0-9]", text) and not re.search(r"@[0-9a-f]{7,}", text), "a literal pin in the def"
    assert constraint("torch") == v["TORCH_VERSION"] and constraint("torchvision") == v["TORCHVISION_VERSION"]
    assert constraint("flash-attn") == v["FLASH_ATTN_VERSION"]
    assert re.fullmatch(r"[0-9a-f]{40}", v["LLAVA_MED_COMMIT"])
    cuda = re.search(r":(\d+)\.(\d+)", v["CUDA_IMAGE"])  # nvidia/cuda:12.8.1-... <-> cu128
    assert cuda and v["TORCH_CUDA"] == f"cu{cuda.group(1)}{cuda.group(2)}"


def test_def_builds_from_the_cuda_image_installs_medlava_pinned_and_tests_it():
    s = sections(DEF.read_text())
    assert re.search(r"^Bootstrap:\s*docker$", s["header"], re.M)
    assert re.search(r"^From:\s*\{\{ CUDA_IMAGE \}\}$", s["header"], re.M)
    files = [line.split() for line in s["files"].splitlines() if line.strip()]
    assert ["constraints.txt", "/opt/medlava/src/constraints.txt"] in files and ["pkg", "/opt/medlava/src/pkg"] in files
    post = s["post"]
    joined = post.replace("\\\n", " ")  # continuation lines as the shell reads them
    assert re.search(
        r'"torch==\{\{ TORCH_VERSION \}\}" "torchvision==\{\{ TORCHVISION_VERSION \}\}"\s+'
        r'--index-url "https://download.pytorch.org/whl/\{\{ TORCH_CUDA \}\}"',
        joined,
    )
    extras = re.search(r'"/opt/medlava/src\[([a-z,]+)\]"', post).group(1).split(",")
    assert "-c /opt/medlava/src/constraints.txt" in post and {"gpu", "metrics", "data", "cnn"} <= set(extras)
    assert '"flash-attn=={{ FLASH_ATTN_VERSION }}"' in post
    assert '--no-deps "git+https://github.com/microsoft/LLaVA-Med.git@{{ LLAVA_MED_COMMIT }}"' in post
    test = s["test"]
    for needle in (
        "torch.version.cuda",
        "torch.cuda.is_available()",
        "import flash_attn",
        "{{ TORCHVISION_VERSION }}",
        'version("flash-attn") == "{{ FLASH_ATTN_VERSION }}"',
        "{{ LLAVA_MED_COMMIT }}",
        "import medlava.cli",
        "medlava --help",
    ):
        assert needle in test, needle
    python_test = test.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    compile(python_test, "%test", "exec")  # the embedded check is valid Python
    assert "/opt/medlava/venv/bin" in s["environment"]


def test_build_script_passes_every_pin_as_a_build_arg(tmp_path):
    fake = tmp_path / "apptainer"  # records its arguments: the real one cannot be installed here
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$APPTAINER_ARGS"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "APPTAINER_ARGS": str(tmp_path / "args")}
    subprocess.run(
        [str(ROOT / "containers" / "build.sh"), str(tmp_path / "out dir" / "m.sif")], env=env, check=True, cwd=tmp_path
    )
    args = (tmp_path / "args").read_text().splitlines()
    assert args[0] == "build" and args[-2:] == [str(tmp_path / "out dir" / "m.sif"), "containers/medlava.def"]
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "--build-arg"]
    assert pairs == [f"{k}={v}" for k, v in versions().items()]


def test_binds_cover_data_output_cache_and_recipe_without_nesting(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = load_config(TINY, [f"data.root={tmp_path / 'data' / 'ham'}", f"output_root={tmp_path / 'out'}"])
    binds = bind_paths(
        cfg, str(TINY), {"MEDLAVA_CACHE": str(tmp_path / "out" / "cache"), "HF_HOME": str(tmp_path / "hf")}
    )
    # data.root does not exist yet (prepare generates it): its parent is bound; the cache sits inside out/.
    assert sorted(binds) == sorted(
        [str(tmp_path / "data"), str(tmp_path / "out"), str(TINY.parent), str(tmp_path / "hf")]
    )
    with pytest.raises(ValueError, match="cannot contain ':' or ','"):
        bind_paths(load_config(TINY, [f"output_root={tmp_path / 'a:b'}"]), str(TINY), {})


def test_binds_cover_the_checkpoints_images_and_weights_the_recipe_names(tmp_path):
    for d in ("data", "models/llava-med", "scratch/imgs", "weights"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "weights" / "effnet.safetensors").write_bytes(b"")
    cfg = load_config(
        TINY,
        [
            f"data.root={tmp_path / 'data'}",
            f"output_root={tmp_path / 'out'}",
            f"model.name_or_path={tmp_path / 'models/llava-med'}",
            f"infer.image_root={tmp_path / 'scratch/imgs'}",
            f"cnn.pretrained={tmp_path / 'weights/effnet.safetensors'}",
            "sft.init_from=latest",
            "eval.bertscore_model=roberta-large",
        ],
    )
    binds = set(bind_paths(cfg, str(TINY), {"MEDLAVA_CACHE": str(tmp_path / "out" / "cache")}))
    # a file binds its folder; `latest` and a hub id are not paths here, so nothing is bound for them
    assert {str(tmp_path / "models/llava-med"), str(tmp_path / "scratch/imgs"), str(tmp_path / "weights")} <= binds
    assert not any(b.endswith(("latest", "roberta-large")) for b in binds)


def test_container_command_wraps_the_same_torchrun_line(tmp_path):
    complete_runs(tmp_path / "runs", "prepare", "align")
    image = tmp_path / "img dir" / "medlava.sif"
    image.parent.mkdir()
    image.write_bytes(b"SIF")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "submit.py"),
            "sft",
            "--config",
            str(TINY),
            "--executor",
            "slurm",
            "--dry-run",
            "--nodes",
            "2",
            "--gpus",
            "0",
            "--cpus-per-task",
            "1",
            "--container",
            str(image),
            "--output-root",
            str(tmp_path / "runs"),
            f"data.root={tmp_path / 'ham'}",
            "run_id=c",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    command = out.stdout.rstrip().splitlines()[-1]
    argv = shlex.split(command.replace('"${', "${").replace('}"', "}"))
    assert argv[:3] == ["apptainer", "exec", "--nv"]
    binds = [a.removeprefix("--bind=") for a in argv if a.startswith("--bind=")]
    # data.root is not made yet, so its parent (tmp_path) is bound, and the output root inside it with it
    assert {str(tmp_path), str(TINY.parent)} <= set(binds) and str(tmp_path / "runs") not in binds
    i = argv.index(str(image))
    assert argv[i + 1 : i + 4] == ["python", "-m", "torch.distributed.run"]  # the image's python, not ours
    assert "--nnodes=2" in argv and "--node_rank=${SLURM_NODEID}" in argv
    assert argv[argv.index("medlava") - 1 : argv.index("medlava") + 2] == ["-m", "medlava", "sft"]


def test_missing_image_is_refused():
    cfg = load_config(TINY, ["cluster.container=/nowhere/medlava.sif"])
    with pytest.raises(ValueError, match="container image /nowhere/medlava.sif does not exist"):
        apptainer_for(cfg, str(TINY))
    assert Apptainer("/i.sif", ("/a", "/b c")).wrap(["python", "-m", "medlava"]) == [
        "apptainer",
        "exec",
        "--nv",
        "--bind=/a",
        "--bind=/b c",
        "/i.sif",
        "python",
        "-m",
        "medlava",
    ]
