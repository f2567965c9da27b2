"""Launchers: Cloud TPU (tpu.py), SLURM (slurm.py) and sweeps (sweep.py); run them as scripts."""
