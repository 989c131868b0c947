"""imgcls: train, compare and understand image classifiers."""

__version__ = "0.1.0"


def load_model(path):
    """(nn.Module, preprocessing) from a folder written by `imgcls export` (safetensors + model.json),
    timm style; imported on first use so that `import imgcls` stays light."""
    from imgcls.inference.exported import load_model as _load_model

    return _load_model(path)
