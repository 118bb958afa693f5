"""The built-in network families: importing this module registers them."""

from pipeline.model.networks import factory, resnets, vgg, vit  # noqa: F401
