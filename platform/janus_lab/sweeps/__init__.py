"""Ray Tune sweeps: the masking-ratio ablation (training trials) and the CFG sweep (generation
trials), each with one MLflow parent run, a child run per trial, and a results table and
heatmaps on the parent. Entry points: sweeps/masking_ablation.py, sweeps/cfg_sweep.py."""
