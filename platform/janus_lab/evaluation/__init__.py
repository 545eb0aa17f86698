"""Evaluation of checkpoints: held-out NLL/accuracy per task, CLIP-T / CLIP-I generation scores,
and benchmark image exports (GenEval, DPG-Bench, ImgEdit). Entry point: jobs/evaluate.py."""
