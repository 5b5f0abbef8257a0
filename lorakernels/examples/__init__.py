"""Runnable examples: `python -m lorakernels.examples.finetune`."""
