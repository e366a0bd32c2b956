"""cifar10, U-DDPM++ with the VP SDE (the VP/sub-VP network of Song et al. 2021).

Set --config.sde.name=subvp for the sub-VP SDE. Append ':small' or ':smoke' to the path for
the CPU variants.
"""

from qcsbm_jax.config import image_config


def get_config(variant=None):
    return image_config("cifar10", "usbm", variant, model="ddpmpp")
