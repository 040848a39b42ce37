"""Models: the shared ResNet encoder/backbone, SimCLR parts, detectors."""

from detkit.models.backbones import Backbone, EncoderLoadError, ResNetEncoder, load_encoder, save_encoder

__all__ = ["Backbone", "EncoderLoadError", "ResNetEncoder", "load_encoder", "save_encoder"]
