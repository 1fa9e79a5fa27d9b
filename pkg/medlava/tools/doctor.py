"""`medlava doctor`: what this environment can run, one line per check (OK / WARN / FAIL, each with its fix).

Checks are tried, not guessed: every required package is imported, bf16 and flash-attn run a small kernel on the
GPU, DeepSpeed's op builders are asked, SLURM is asked through `sinfo`, directories are written to.
`run_checks` and `render` are the API a launcher uses to print the same screen from inside a job.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from medlava.cluster.sinfo import Partition, parse_sinfo
from medlava.cluster.sinfo import query as sinfo_query

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GiB = 1024**3
OUTPUT_FAIL_GIB = 1  # below this not even a LoRA checkpoint and its logs fit
OUTPUT_WARN_GIB = 50  # a full 7B fine-tune checkpoint with optimizer state is ~80 GiB; LoRA ones are MBs
CACHE_WARN_GIB = 20  # LLaVA-Med v1.5 (~15 GB) + CLIP ViT-L/14-336 (~1.7 GB)
DEFAULT_CONSTRAINTS = Path(__file__).resolve().parents[3] / "constraints.txt"  # the repository's, beside pkg/


@dataclass
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str
    fix: str = ""


# ---------------------------------------------------------------- versions


def read_pins(path: Path) -> dict[str, SpecifierSet]:
    """constraints.txt -> {canonical name: specifier}; comments, blank lines and pip options skipped."""
    pins = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):  # --index-url, -r other.txt
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise ValueError(f"{path}:{lineno}: not a requirement ({e})") from None
        pins[canonicalize_name(req.name)] = req.specifier
    return pins


def _pin_text(name: str, pins: Mapping[str, SpecifierSet]) -> str:
    spec = pins.get(canonicalize_name(name))
    return f"{name}{spec}" if spec else name


def _install_fix(name: str, pins: Mapping[str, SpecifierSet]) -> str:
    return f"pip install -c constraints.txt '{_pin_text(name, pins)}'"


def _module_of(dist: str, top_levels: Mapping[str, list[str]]) -> str:
    """The importable name of a distribution (PyYAML -> yaml, scikit-learn -> sklearn, pillow -> PIL)."""
    names = sorted(m for m, dists in top_levels.items() if dist in {canonicalize_name(d) for d in dists})
    exact = [m for m in names if canonicalize_name(m) == dist]
    public = [m for m in names if not m.startswith("_")]
    return (exact or public or [dist.replace("-", "_")])[0]


def check_packages(pins: Mapping[str, SpecifierSet]) -> list[Check]:
    """medlava's own requirements: each imported; its version against setup.cfg (FAIL) and the pin (WARN)."""
    try:
        required = [Requirement(r) for r in metadata.requires("medlava") or []]
    except metadata.PackageNotFoundError:
        return [
            Check(
                "packages",
                FAIL,
                "medlava is not installed in this Python",
                f"pip install -c constraints.txt -e . (with {sys.executable})",
            )
        ]
    top_levels = metadata.packages_distributions()
    problems, n = [], 0
    for req in (r for r in required if r.marker is None):  # extras carry a marker; gpu extras are checked below
        name = canonicalize_name(req.name)
        n += 1
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(Check(f"package {name}", FAIL, "not installed", _install_fix(name, pins)))
            continue
        try:
            importlib.import_module(_module_of(name, top_levels))
        except Exception as e:  # any import-time error is the finding
            problems.append(
                Check(
                    f"package {name}",
                    FAIL,
                    f"{version} installed but the import fails: {type(e).__name__}: {e}",
                    _install_fix(name, pins) + " --force-reinstall",
                )
            )
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(
                Check(
                    f"package {name}", FAIL, f"{version}; medlava needs {name}{req.specifier}", _install_fix(name, pins)
                )
            )
        elif name in pins and not pins[name].contains(version, prereleases=True):
            problems.append(
                Check(f"package {name}", WARN, f"{version}, tested with {name}{pins[name]}", _install_fix(name, pins))
            )
    if problems:
        return problems
    where = "match constraints.txt" if pins else "satisfy setup.cfg (no constraints.txt to compare with)"
    return [Check("packages", OK, f"{n} required packages import and {where}")]


def check_pins_file(path: Path | None) -> tuple[Check | None, dict[str, SpecifierSet]]:
    path = path or DEFAULT_CONSTRAINTS
    if not path.exists():
        return Check(
            "constraints",
            WARN,
            f"{path} not found: versions are checked against setup.cfg only",
            "pass --constraints PATH/constraints.txt (the repository's pin file)",
        ), {}
    try:
        return None, read_pins(path)
    except ValueError as e:
        return Check("constraints", FAIL, str(e), f"fix that line of {path}"), {}


# ---------------------------------------------------------------- torch, GPUs, kernels


def check_torch(pins: Mapping[str, SpecifierSet]) -> Check:
    """The build and its CUDA/NCCL (its version against the pin is the packages check's)."""
    import torch
    import torch.distributed as dist

    backends = [b for b, ok in (("nccl", dist.is_nccl_available()), ("gloo", dist.is_gloo_available())) if ok]
    if torch.version.cuda is None:
        return Check(
            "torch",
            WARN,
            f"{torch.__version__}: CPU-only build; distributed: {', '.join(backends)}",
            f"for GPUs install the CUDA build: pip install -c constraints.txt '{_pin_text('torch', pins)}'",
        )
    raw = torch.cuda.nccl.version() if "nccl" in backends else "none"  # a tuple in current torch, an int before
    nccl = ".".join(map(str, raw)) if isinstance(raw, tuple) else str(raw)
    return Check(
        "torch", OK, f"{torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}; distributed: {', '.join(backends)}"
    )


def gpu_fix(partitions: list[Partition] | None) -> str:
    """Where GPUs are to be had, as the slurm check found them (None: no SLURM answered here)."""
    if partitions is None:
        return "run it on a machine with a CUDA GPU (and torch's CUDA build)"
    with_gpus = [p for p in partitions if p.gpus and p.available == "up"]
    if not with_gpus:
        return (
            "no partition of this cluster offers GPUs (the slurm line): GPU stages cannot run here; "
            "CPU runs use cluster.gpus_per_node=0 (the tiny preset)"
        )
    return (
        f"run it on a GPU node: srun -p {with_gpus[0].name} --gres=gpu:1 medlava doctor "
        "(or launch/submit.py STAGE --check)"
    )


def check_gpus(expected: int = 0, partitions: list[Partition] | None = None) -> Check:
    """What GPUs this process sees; FAIL when fewer than `expected` (what the job asked for per node). The fix
    names a GPU partition of `partitions` (the slurm check's), or says there is none."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"
    if count < expected:
        return Check(
            "gpus",
            FAIL,
            f"{count} CUDA GPU(s) visible{why}, the job asked for {expected} per node",
            "check the partition's GPUs (sinfo -o '%P %G') and --gpus; in a container pass --nv",
        )
    if not count:
        return Check("gpus", WARN, f"no CUDA GPU visible{why}: only the tiny preset is practical", gpu_fix(partitions))
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    kinds: dict[str, int] = {}
    for p in props:
        key = f"{p.name} ({p.total_memory / GiB:.0f} GiB, sm_{p.major}{p.minor})"
        kinds[key] = kinds.get(key, 0) + 1
    return Check("gpus", OK, ", ".join(f"{n} × {k}" for k, n in kinds.items()))


def check_bf16() -> Check:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    try:
        got = (a.to(device, torch.bfloat16) @ b.to(device, torch.bfloat16)).double().cpu()
    except Exception as e:  # an unsupported dtype surfaces as any of several error types
        return Check(
            "bf16",
            WARN,
            f"bf16 matmul on {device} failed: {type(e).__name__}: {e}",
            "sft.precision=fp16 (V100/T4 have no bf16)",
        )
    ref = a.double() @ b.double()
    err = ((got - ref).norm() / ref.norm()).item()
    where = "cuda:0" if device == "cuda" else "CPU (no GPU to try)"
    if not math.isfinite(err) or err > 2e-2:
        return Check(
            "bf16", WARN, f"bf16 matmul on {where} is wrong (relative error {err:.1e})", "sft.precision=fp16 or fp32"
        )
    return Check("bf16", OK, f"bf16 matmul on {where}: relative error {err:.1e}")


def check_flash_attn(pins: Mapping[str, SpecifierSet]) -> Check:
    import torch

    fix_install = (
        f"pip install -c constraints.txt '{_pin_text('flash-attn', pins)}' --no-build-isolation; "
        "or leave it: attention falls back to PyTorch SDPA"
    )
    if importlib.util.find_spec("flash_attn") is None:
        return Check("flash-attn", WARN, "not installed: attention runs on PyTorch SDPA", fix_install)
    # medlava picks flash-attn whenever it is installed on a GPU, so a broken install is a failure, not a warning.
    broken_fix = (
        f"pip install --force-reinstall --no-build-isolation '{_pin_text('flash-attn', pins)}' against "
        f"torch {torch.__version__}, or pip uninstall flash-attn (or model.attn_implementation=sdpa)"
    )
    try:
        import flash_attn
        from flash_attn import flash_attn_func
    except Exception as e:  # typically "undefined symbol": built against another torch
        return Check("flash-attn", FAIL, f"installed but the import fails: {type(e).__name__}: {e}", broken_fix)
    version = getattr(flash_attn, "__version__", "?")
    if not torch.cuda.is_available():
        return Check(
            "flash-attn", WARN, f"{version} imports; not tried (no GPU visible)", "run doctor on a GPU node to try it"
        )
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 64, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        out = flash_attn_func(q, k, v, causal=True)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True
        ).transpose(1, 2)
        err = (out.float() - ref.float()).abs().max().item()
    except Exception as e:  # e.g. "FlashAttention only supports Ampere GPUs or newer"
        return Check(
            "flash-attn", FAIL, f"{version}: a causal attention call fails: {type(e).__name__}: {e}", broken_fix
        )
    if err > 2e-2:
        return Check("flash-attn", FAIL, f"{version}: result differs from SDPA by {err:.1e}", broken_fix)
    return Check("flash-attn", OK, f"{version}: causal attention on cuda:0 matches SDPA (max error {err:.1e})")


def check_deepspeed(pins: Mapping[str, SpecifierSet]) -> Check:
    if importlib.util.find_spec("deepspeed") is None:
        return Check(
            "deepspeed",
            WARN,
            "not installed: sft.deepspeed=zero2/zero3 unavailable (plain DDP works)",
            _install_fix("deepspeed", pins),
        )
    try:
        import deepspeed
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS  # what `ds_report` reads
    except Exception as e:
        return Check(
            "deepspeed",
            FAIL,
            f"installed but the import fails: {type(e).__name__}: {e}",
            _install_fix("deepspeed", pins) + " --force-reinstall",
        )
    from torch.utils.cpp_extension import is_ninja_available

    version = deepspeed.__version__
    pin = pins.get("deepspeed")
    off_pin = pin is not None and not pin.contains(version, prereleases=True)
    # ZeRO-2/3 use torch's AdamW; only zero3_offload needs an op, DeepSpeed's CPU Adam.
    builder = ALL_OPS.get("cpu_adam")
    try:
        compatible = builder is not None and builder.is_compatible(False)
    except Exception:  # a builder probing a missing toolchain may raise instead of answering
        compatible = False
    if installed_ops.get("cpu_adam"):
        cpu_adam, ok = "prebuilt", True
    elif compatible and is_ninja_available():
        cpu_adam, ok = "compiles on first use (JIT, ninja found)", True
    else:
        cpu_adam = "not prebuilt and cannot be JIT-compiled here" + ("" if is_ninja_available() else " (no ninja)")
        ok = False
    detail = (
        f"{version}{f', tested with deepspeed{pin}' if off_pin else ''}; ZeRO-2/3 ready; "
        f"cpu_adam (zero3_offload): {cpu_adam}"
    )
    if not ok:
        return Check(
            "deepspeed",
            WARN,
            detail,
            "zero3_offload needs it: pip install ninja (and a CUDA toolkit), or "
            "DS_BUILD_CPU_ADAM=1 pip install deepspeed; zero2/zero3 work without it",
        )
    return Check("deepspeed", WARN if off_pin else OK, detail, _install_fix("deepspeed", pins) if off_pin else "")


# ---------------------------------------------------------------- SLURM, containers


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check_slurm() -> Check:
    return slurm_state()[0]


def slurm_state() -> tuple[Check, list[Partition] | None]:
    """The slurm check and the partitions sinfo listed (None when no SLURM answered)."""
    sbatch, sinfo = shutil.which("sbatch"), shutil.which("sinfo")
    if sbatch is None:
        return Check(
            "slurm",
            WARN,
            "sbatch not on PATH: not a SLURM submit host; only --executor local runs here",
            "on a cluster: run this on a login node (or `module load slurm`)",
        ), None
    if sinfo is None:
        return Check("slurm", FAIL, f"sbatch at {sbatch} but no sinfo on PATH", "fix the SLURM client install"), None
    try:
        out = sinfo_query(sinfo)
    except subprocess.TimeoutExpired:
        out = None
    if out is None or out.returncode != 0:
        why = (
            "timed out after 30 s"
            if out is None
            else (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[0]
        )
        return Check(
            "slurm",
            FAIL,
            f"sinfo does not answer: {why}",
            "check `scontrol ping` and SLURM_CONF; jobs cannot be submitted until the controller answers",
        ), None
    partitions = parse_sinfo(out.stdout)
    version = _run([sinfo, "--version"]).stdout.strip() or "slurm"
    detail = f"{version}; " + ("; ".join(p.describe() for p in partitions) or "no partitions")
    if not partitions:
        return Check("slurm", FAIL, detail, "this account sees no partitions: ask the cluster admins"), partitions
    if not any(p.gpus and p.available == "up" for p in partitions):
        return Check(
            "slurm",
            WARN,
            detail + " — no partition that is up offers GPUs",
            "GPU training needs a GPU partition (cluster.partition); cluster.gpus_per_node=0 runs on CPUs",
        ), partitions
    return Check("slurm", OK, detail), partitions


def check_apptainer() -> Check:
    for tool in ("apptainer", "singularity"):
        if path := shutil.which(tool):
            out = _run([path, "--version"])
            return Check("apptainer", OK, (out.stdout.strip() or tool) + f" ({path})")
    return Check(
        "apptainer",
        WARN,
        "neither apptainer nor singularity on PATH: --container img.sif unavailable",
        "module load apptainer (only needed to run jobs in a container)",
    )


# ---------------------------------------------------------------- directories


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _space(path: Path) -> tuple[Check | None, float]:
    """(FAIL check if `path` cannot be written, free GiB where it would go)."""
    base = _nearest_existing(path)
    if not base.is_dir():
        return Check("", FAIL, f"{path}: {base} is not a directory", "choose a directory path"), 0.0
    if base == path:
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".medlava-doctor-"):
                pass
        except OSError as e:
            return Check(
                "", FAIL, f"{path} is not writable ({e.strerror})", "fix its permissions or choose another"
            ), 0.0
    elif not os.access(base, os.W_OK | os.X_OK):
        return Check("", FAIL, f"{path} cannot be created: {base} is not writable", "create it or choose another"), 0.0
    return None, shutil.disk_usage(base).free / GiB


def check_output_root(root: Path) -> Check:
    root = Path(root).expanduser().absolute()
    bad, free = _space(root)
    if bad:
        return Check("output root", bad.status, bad.detail, bad.fix + " (--output-root)")
    detail = f"{root}{'' if root.exists() else ' (will be created)'}: writable, {free:.0f} GiB free"
    if free < OUTPUT_FAIL_GIB:
        return Check("output root", FAIL, detail, "free space or choose another --output-root")
    if free < OUTPUT_WARN_GIB:
        return Check(
            "output root",
            WARN,
            detail + f" (< {OUTPUT_WARN_GIB} GiB: enough for LoRA, not for full fine-tune checkpoints)",
            "point --output-root at larger (shared) storage",
        )
    return Check("output root", OK, detail)


def cache_dirs(env: Mapping[str, str]) -> list[tuple[str, Path, bool]]:
    """(variable, directory, set explicitly?) as huggingface_hub, torch.hub and medlava resolve them."""
    xdg = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [
        ("HF_HOME", Path(env.get("HF_HOME") or xdg / "huggingface"), "HF_HOME" in env),
        ("TORCH_HOME", Path(env.get("TORCH_HOME") or xdg / "torch"), "TORCH_HOME" in env),
        ("MEDLAVA_CACHE", Path(env.get("MEDLAVA_CACHE") or xdg / "medlava"), "MEDLAVA_CACHE" in env),
    ]


def check_caches(env: Mapping[str, str], on_cluster: bool) -> list[Check]:
    checks = []
    if "TRANSFORMERS_CACHE" in env:
        checks.append(
            Check(
                "TRANSFORMERS_CACHE",
                WARN,
                f"set ({env['TRANSFORMERS_CACHE']}) but transformers 5 ignores it: models download to HF_HOME",
                "export HF_HOME=<that directory's parent> (or HF_HUB_CACHE) and unset TRANSFORMERS_CACHE",
            )
        )
    for var, path, explicit in cache_dirs(env):
        path = path.expanduser().absolute()
        bad, free = _space(path)
        if bad:
            checks.append(Check(var, FAIL, bad.detail, f"{bad.fix}, then export {var}=..."))
            continue
        detail = f"{path} ({'set' if explicit else 'default'}): writable, {free:.0f} GiB free"
        if var == "HF_HOME" and free < CACHE_WARN_GIB:
            checks.append(
                Check(
                    var,
                    WARN,
                    detail + f" (LLaVA-Med needs ~{CACHE_WARN_GIB} GiB)",
                    f"export {var}=<a directory with more space>",
                )
            )
        elif on_cluster and not explicit and var != "MEDLAVA_CACHE":
            checks.append(
                Check(
                    var,
                    WARN,
                    detail + "; not set on a cluster: every job reads the default",
                    f"export {var}=<shared storage> in your shell profile so all nodes share one copy",
                )
            )
        else:
            checks.append(Check(var, OK, detail))
    return checks


def check_metric_weights(cache: Path, metrics: list[str] | None) -> list[Check]:
    """The report metrics' staged weights in `cache`. With `metrics` (what a job will run): each one is imported
    and every file it loads is checked against the size and sha256 recorded when it was fetched; any problem is
    a FAIL. Without: which metrics are staged, a WARN when none is."""
    from medlava.eval.weights import MANIFEST, NEEDS, fetch_command

    if metrics is None:
        manifest = cache / MANIFEST
        staged = sorted(json.loads(manifest.read_text())["metrics"]) if manifest.exists() else []
        if staged:
            return [Check("report metrics", OK, f"weights staged in {cache}: {', '.join(staged)}")]
        return [
            Check(
                "report metrics",
                WARN,
                f"no report-metric weights staged in {cache}: reports get BLEU, ROUGE and chexpert_rules only",
                f"where there is internet: "
                f"{fetch_command([m for m in NEEDS if m not in ('bleu', 'rouge', 'green')], cache)}",
            )
        ]
    from medlava.eval.radeval_scorers import importable
    from medlava.eval.weights import verify_staged

    checks = []
    for metric in metrics:
        problems = [why] if (why := importable(metric)) else verify_staged(cache, [metric])
        checks.append(
            Check(
                f"metric {metric}",
                FAIL if problems else OK,
                "; ".join(problems) if problems else f"imports; weights in {cache} verified",
            )
        )
    return checks


# ---------------------------------------------------------------- the screen


def _crashed(name: str, e: Exception) -> Check:
    return Check(name, FAIL, f"the check itself failed: {type(e).__name__}: {e}", "report this with the output")


def _guard(name: str, fn: Callable[[], Check | list[Check]]) -> list[Check]:
    try:
        result = fn()
    except Exception as e:  # a crashing check is itself the finding; the rest of the screen still prints
        return [_crashed(name, e)]
    return result if isinstance(result, list) else [result]


def run_checks(
    output_root: Path | str = "runs",
    constraints: Path | None = None,
    env: Mapping[str, str] | None = None,
    expected_gpus: int = 0,
    metric_cache: Path | None = None,
    report_metrics: list[str] | None = None,
) -> list[Check]:
    """All checks, in screen order. `env` defaults to os.environ (cache variables are read from it)."""
    env = os.environ if env is None else env
    pins_problem, pins = check_pins_file(constraints)
    checks = [
        Check(
            "python",
            OK if sys.version_info >= (3, 10) else FAIL,
            f"{platform.python_version()} ({sys.executable}) on {platform.node()}",
            "" if sys.version_info >= (3, 10) else "medlava needs Python 3.10+",
        )
    ]
    checks += [pins_problem] if pins_problem else []
    checks += _guard("packages", lambda: check_packages(pins))
    checks += _guard("torch", lambda: check_torch(pins))
    try:  # before the gpus line, whose fix names what it found
        slurm, partitions = slurm_state()
    except Exception as e:
        slurm, partitions = _crashed("slurm", e), None
    checks += _guard("gpus", lambda: check_gpus(expected_gpus, partitions))
    checks += _guard("bf16", check_bf16)
    checks += _guard("flash-attn", lambda: check_flash_attn(pins))
    checks += _guard("deepspeed", lambda: check_deepspeed(pins))
    checks.append(slurm)
    checks += _guard("apptainer", check_apptainer)
    checks += _guard("caches", lambda: check_caches(env, on_cluster=shutil.which("sbatch") is not None))
    checks += _guard("output root", lambda: check_output_root(Path(output_root)))
    if metric_cache is None:
        from medlava.eval.weights import default_cache

        metric_cache = default_cache()
    checks += _guard("report metrics", lambda: check_metric_weights(Path(metric_cache), report_metrics))
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<5} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != OK:
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    lines.append(f"{counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="medlava doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-root", default="runs", help="where run directories will go (default: runs)")
    p.add_argument(
        "--constraints", type=Path, help=f"pin file to compare versions with (default {DEFAULT_CONSTRAINTS})"
    )
    p.add_argument("--gpus", type=int, default=0, help="GPUs the job will use here: fewer visible is a FAIL")
    p.add_argument("--json", action="store_true", help="print the checks as JSON (for scripts and launchers)")
    p.add_argument(
        "--metric-cache", type=Path, help="staged report-metric weights (default $MEDLAVA_CACHE/metric-weights)"
    )
    p.add_argument(
        "--report-metrics",
        help="comma-separated: import these report metrics and verify every weight "
        "file they load (size and sha256); a problem fails",
    )
    args = p.parse_args(argv)
    # Libraries that print while imported (DeepSpeed's accelerator notice) must not corrupt the screen or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        checks = run_checks(
            args.output_root,
            args.constraints,
            expected_gpus=args.gpus,
            metric_cache=args.metric_cache,
            report_metrics=args.report_metrics.split(",") if args.report_metrics else None,
        )
    if args.json:
        print(
            json.dumps({"ok": all(c.status != FAIL for c in checks), "checks": [asdict(c) for c in checks]}, indent=2)
        )
    else:
        print(render(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
