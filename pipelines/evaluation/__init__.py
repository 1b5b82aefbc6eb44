"""Evaluation of CLIP checkpoints: zero-shot classification, linear probes, image-text retrieval, reports.

Wired together by jobs/eval_clip.py. The metrics (zero_shot_eval, linear_probe, retrieval) work on feature
tensors and know nothing about images or Ray; data.py reads the inputs and embed.py turns them into
features (in-process or with Ray Data).
"""
