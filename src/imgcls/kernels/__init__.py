"""Kernels chosen by measurement, applied when a model is built.

choice.py   what was chosen: attention kernel, depthwise precision, layout, compile, inference batch size
apply.py    a model configured with a choice, once (no switch is flipped while it runs)
measure.py  the choice timed on the model's real shapes, or taken from flags
cache.py    measurements kept per machine and model in $IMGCLS_CACHE_DIR/kernels.json
"""
