"""What a person sees first: `medlava` alone lists the stages and tools (without loading torch), and the known
third-party notices are silenced where they arise while every other warning still prints."""

import logging
import subprocess
import sys
import warnings

from medlava.cli import TOOLS, main, summary
from medlava.quiet import silence_known_warnings
from medlava.stages import CHAIN, STAGES


def test_medlava_alone_lists_the_stages_in_chain_order_and_the_tools(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: medlava STAGE --config FILE")
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert rows == [*CHAIN, *(s for s in STAGES if s not in CHAIN), *(t for t in TOOLS if t != "submit"), "eval"]
    assert "\n  prepare   the raw dataset as distributed -> sample JSONL" in out  # the module's own words, cut to fit
    assert max(map(len, out.splitlines()[5:-3])) < 80
    assert summary("medlava.tools.doctor").startswith("what this environment can run, one line per check")
    assert main(["--help"]) == 0 and capsys.readouterr().out == out
    code = "import sys; from medlava.cli import main; main([]); assert 'torch' not in sys.modules, 'torch loaded'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # a help screen in a fraction of a second


def test_peft_reading_a_deprecated_property_is_silent_and_other_warnings_are_not():
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    def caught(quiet: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if quiet:
                silence_known_warnings()
            model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
            peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
            warnings.warn("a warning of our own", FutureWarning, stacklevel=1)
        return [str(w.message) for w in seen]

    assert any("is_gradient_checkpointing" in m for m in caught(quiet=False))  # the source is real
    quiet = caught(quiet=True)
    assert not any("is_gradient_checkpointing" in m for m in quiet) and "a warning of our own" in quiet


def test_deepspeed_and_torch_notices_are_dropped_from_their_loggers_only(caplog):
    silence_known_warnings()
    silence_known_warnings()  # twice: still one filter each
    assert len(logging.getLogger("DeepSpeed").filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("DeepSpeed").warning(
            "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
        )
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/x")
        logging.getLogger("DeepSpeed").warning("a real DeepSpeed warning")
        logging.getLogger("medlava.test").warning("No CUDA runtime is found (said by someone else)")
    assert [r.getMessage() for r in caplog.records] == [
        "a real DeepSpeed warning",
        "No CUDA runtime is found (said by someone else)",
    ]
