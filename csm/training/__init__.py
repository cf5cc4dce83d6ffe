"""Training: the typed config, the run and its loop, the objectives and their losses (SFT and DPO, with the
preference rounds that make DPO's pairs), optimizers, DDP/FSDP2, checkpoints, tracking, and the Optuna sweep.

May import: every other part, and dataloaders.py for its batches.
"""
