"""Inference: one engine (engine.py) that every command scoring images goes through, and the sources it
is built from: a run folder (run.py), an export folder or an ONNX file (exported.py)."""
