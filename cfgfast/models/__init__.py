"""Model definitions: the class-conditional U-Net (ADM style) and its presets."""
from .unet import PRESETS, UNet, UNetConfig

__all__ = ["PRESETS", "UNet", "UNetConfig"]
