"""medlava: medical LLaVA-family vision-language models and their CNN baselines, as SLURM jobs."""

__version__ = "0.1.0"
