import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY, complete_runs
from medlava.config import ConfigError, apply_overrides, dump_config, load_config


def test_tiny_preset_loads_and_round_trips(tmp_path):
    cfg = load_config(TINY)
    assert cfg.model.tiny is not None and cfg.model.template == "mistral_instruct"
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_overrides_are_typed_yaml():
    cfg = load_config(
        TINY, ["sft.lr=2e-4", "sft.lora.target_modules=[q_proj, v_proj]", "infer.chunks=4", "sft.max_steps=null"]
    )
    assert cfg.sft.lr == pytest.approx(2e-4)
    assert cfg.sft.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.infer.chunks == 4 and cfg.sft.max_steps is None


def test_override_into_absent_section_keeps_class_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\nmodel: {tiny: {}}\ndata: {root: d}\n")
    assert load_config(tmp_path / "c.yaml", ["align.epochs=2"]).align == load_config(
        tmp_path / "c.yaml"
    ).align.model_copy(update={"epochs": 2.0})


@pytest.mark.parametrize(
    "override, needle",
    [
        ("sft.lr=abc", "sft.lr: Input should be a valid number"),
        ("sft.lrr=1", "sft.lrr: unknown key. Did you mean sft.lr?"),
        ("model.template=llama9", "model.template: Input should be 'mistral_instruct', 'vicuna_v1' or 'plain'"),
        ("infer.chunks=0", "infer.chunks: Input should be greater than or equal to 1"),
        ("sft.train_llm=true", "lora and train_llm are exclusive"),
        ("data.split_ratios=[0.5,0.5,0.5]", "data.split_ratios must be >= 0 and sum to 1"),
        ("align.train_llm=true", "align trains the projector only"),
        ("sft.lr", "is not key=value"),
        ("sft=3", "sft: Input should be a valid dictionary"),
    ],
)
def test_bad_config_is_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert needle in str(e.value)


def test_override_through_a_value_is_refused():
    with pytest.raises(ConfigError, match="sft.lr is a value"):
        apply_overrides({"sft": {"lr": 1}}, ["sft.lr.x=1"])


def test_the_old_train_section_is_refused_naming_sft(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"override 'train.lr=1e-4': the `train:` section is now `sft:`.*"
        r"write sft.lr=1e-4",
    ):
        load_config(TINY, ["train.lr=1e-4"])
    old = tmp_path / "old.yaml"
    old.write_text(TINY.read_text().replace("\nsft:", "\ntrain:"))
    with pytest.raises(ConfigError, match=r"old.yaml: the `train:` section is now `sft:`"):
        load_config(old)


@pytest.mark.parametrize("override", ["sft.lr=abc", "sft.bogus=1"])
def test_submit_dry_run_fails_at_once_naming_the_key(override):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "submit.py"),
            "sft",
            "--config",
            str(TINY),
            "--dry-run",
            "--executor",
            "local",
            override,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert override.split("=")[0] in out.stderr and "invalid config" in out.stderr
    assert out.stdout == ""


def test_submit_dry_run_prints_config_and_commands(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "submit.py"),
            "demo",
            "--config",
            str(TINY),
            "--dry-run",
            "--executor",
            "local",
            "--gpus",
            "2",
            "--output-root",
            str(tmp_path),
            "run_id=r1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    lines = out.stdout.splitlines()
    assert "gpus_per_node: 2" in out.stdout and f"output_root: {tmp_path}" in out.stdout
    cmds = [line for line in lines if " -m medlava " in line]
    assert [c.split(" -m medlava ")[1].split()[0] for c in cmds] == [
        "prepare",
        "align",
        "sft",
        "infer",
        "infer",
        "eval",
    ]
    assert "--nproc_per_node=2" in cmds[1] and "--nproc_per_node=2" in cmds[2]
    assert "--chunk-idx 0" in cmds[3] and "--merge-only" in cmds[4]
    assert all("run_id=r1" in c for c in cmds)
    assert not (tmp_path / "tiny").exists()  # nothing ran


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.name


def test_a_cnn_recipe_needs_no_model_but_vlm_stages_say_what_is_missing(tmp_path):
    recipe = ROOT / "jobs" / "configs" / "tiny_cnn.yaml"
    assert load_config(recipe).model is None
    for argv in (
        [sys.executable, str(ROOT / "launch" / "submit.py"), "pipeline", "--executor", "local", "--dry-run"],
        [sys.executable, "-m", "medlava", "infer"],
    ):
        out = subprocess.run(
            [*argv, "--config", str(recipe), f"output_root={tmp_path}"], capture_output=True, text=True, cwd=tmp_path
        )
        assert out.returncode == 2 and "has no `model:` section" in out.stderr and "Traceback" not in out.stderr
    assert not list(tmp_path.iterdir())  # refused before any run directory
    complete_runs(tmp_path, "prepare")
    cnn = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "submit.py"),
            "cnn",
            "--config",
            str(recipe),
            "--executor",
            "local",
            "--dry-run",
            f"output_root={tmp_path}",
        ],
        capture_output=True,
        text=True,
    )
    assert cnn.returncode == 0, cnn.stderr


# -- recipes a tired user (or a hostile file) may write: refused at once, with a short message ------------------


def submit_dry_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "submit.py"), "sft", "--dry-run", "--executor", "local", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    # 9 levels of 10 aliases: 10**9 strings once expanded, from a file of a few hundred bytes
    levels = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] + [
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)
    ]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(
        TINY.read_text() + "bombs:\n" + "".join(f"  {line}\n" for line in levels) + "cluster: {sbatch_extra: *l8}\n"
    )
    assert len(recipe.read_bytes()) - len(TINY.read_bytes()) < 700
    tic = time.monotonic()
    out = submit_dry_run("--config", str(recipe))
    assert out.returncode == 2 and time.monotonic() - tic < 15, out.stderr[-500:]
    assert "bomb.yaml: its YAML aliases add more than 100,000 values (an alias bomb?" in out.stderr
    assert len(out.stderr) < 1000 and out.stdout == ""
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text(TINY.read_text() + "cluster: {sbatch_extra: &x [a, *x]}\n")
    out = submit_dry_run("--config", str(recursive))
    assert out.returncode == 2 and "an alias refers to the value that holds it" in out.stderr, out.stderr[-500:]


def test_anchors_and_merges_within_bounds_still_load(tmp_path):
    recipe = tmp_path / "anchors.yaml"
    recipe.write_text(
        "name: t\nmodel: {tiny: {}}\ndata: {root: d}\nalign: &common {epochs: 3, batch_size: 2}\n"
        "sft: {<<: *common, epochs: 5, lora: {r: 4}}\n"
    )
    cfg = load_config(recipe)
    assert cfg.align.epochs == 3 and cfg.sft.epochs == 5 and cfg.align.batch_size == cfg.sft.batch_size == 2


def test_a_long_wrong_input_is_echoed_cut_short(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(TINY.read_text() + "cluster: {partition: [" + ", ".join(["gpu-partition"] * 20_000) + "]}\n")
    out = submit_dry_run("--config", str(recipe))
    assert out.returncode == 2, out.stderr[-500:]
    assert "cluster.partition: Input should be a valid string (got [" in out.stderr
    assert len(out.stderr) < 1500


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(TINY.read_text() + "sft:\n  lr: 0.05\n")
    second = len(TINY.read_text().splitlines()) + 1
    first = (
        TINY.read_text()
        .splitlines()
        .index("sft:              # LoRA on the LM, projector trainable with its own lr (LLaVA-1.5 LoRA recipe)")
        + 1
    )
    out = submit_dry_run("--config", str(recipe))
    assert out.returncode == 2 and out.stdout == ""
    assert (
        f"twice.yaml: key 'sft' is given twice, on lines {first} and {second}: the second would silently "
        "replace the first; merge them into one" in out.stderr
    ), out.stderr
    out = submit_dry_run("--config", str(TINY), "sft.lora={r: 4, r: 8}")
    assert out.returncode == 2 and "key 'r' is given twice" in out.stderr, out.stderr


@pytest.mark.parametrize(
    "override, needle",
    [
        ("sft.lr=.inf", "sft.lr: Input should be a finite number (got inf)"),
        ("sft.epochs=.inf", "sft.epochs: Input should be a finite number (got inf)"),
        ("sft.epochs=1e400", "sft.epochs: Input should be a finite number"),
        ("data.split_ratios=[.nan,0.5,0.5]", "data.split_ratios.0: Input should be a finite number (got nan)"),
        (
            "sft.batch_size=99999999999999999999999999",
            "sft.batch_size: Value error, 99999999999999999999999999 is out "
            "of range: integers in a recipe are at most 2,147,483,647",
        ),
        ("cnn.head_hidden=[-5]", "cnn.head_hidden.0: Input should be greater than or equal to 1 (got -5)"),
        ("sft.lora.target_modules=[]", "sft.lora.target_modules: List should have at least 1 item"),
        ("model.tiny.vision_heads=3", "model.tiny: Value error, vision_hidden 32 must be a multiple of vision_heads 3"),
        ("model.tiny.text_heads=3", "model.tiny: Value error, text_hidden 64 must be a multiple of 2 x text_heads 3"),
        ("sft.seed=-1", "sft.seed: Input should be greater than or equal to 0"),
    ],
)
def test_non_finite_and_out_of_bounds_values_are_refused_before_anything_runs(override, needle):
    out = submit_dry_run("--config", str(TINY), override)
    assert out.returncode == 2 and needle in out.stderr and out.stdout == "", out.stderr
