"""The one training loop, its optimizer and schedule, checkpoints, distribution and metrics.

Knows nothing of the CLI. A task (pretraining, SFT, classification, ...) supplies
batches and a loss; `Trainer` does the rest.
"""
