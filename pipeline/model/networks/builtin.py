"""The built-in network families beyond the ResNets (resnets.py): importing this module registers them."""

from pipeline.model.networks import factory, resnets, vgg, vit  # noqa: F401
