"""Known third-party warnings that say nothing to a medlava user, silenced one by one where they are raised (by
message and module or logger), never by category: every other warning still prints.

- transformers 5 deprecates `PreTrainedModel.is_gradient_checkpointing`, which peft reads whenever it wraps or
  loads an adapter (sft, infer, predict, check-model): a note for peft's authors.
- DeepSpeed, imported on a machine without GPUs, announces "Setting accelerator to CPU", and torch's
  cpp_extension "No CUDA runtime is found" while DeepSpeed's op builders load: doctor's own gpus line says so.
"""

from __future__ import annotations

import logging
import warnings

LOG_NOTICES = {"DeepSpeed": "Setting accelerator to CPU", "torch.utils.cpp_extension": "No CUDA runtime is found"}
"""logger name -> the start of the message dropped from it."""


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_known_warnings() -> None:
    """Install the filters; calling it again adds nothing."""
    warnings.filterwarnings(
        "ignore",
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )
    for name, prefix in LOG_NOTICES.items():
        logger = logging.getLogger(name)  # DeepSpeed configures this logger later; its filters stay
        if not any(isinstance(f, _DropNotice) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))
