"""Models: the registry, `create_model`, and the architectures written here."""

from imgcls.models import convnext, efficientnet, fastnet, resnet, vit  # noqa: F401  (importing registers the models)
from imgcls.models.registry import check_forward, count_parameters, create_model, list_models, model_spec

__all__ = ["check_forward", "count_parameters", "create_model", "list_models", "model_spec"]
