"""svhn, QC-NCSN++: fine-tunes svhn_usbm_ncsnpp for 100k steps with the QC penalty
(docs/method.md, experiment 3).

Append ':small' to the path for a small network (a CPU run; docs/usage.md),
':smoke' for a short test run; ':table2' and ':tables3_4' for the authors' fine-tunes
behind the paper's Table 2 (16 probes, batch 8) and Tables 3-4 (1 probe, batch 128).
"""

from qcsbm_jax.config import image_config


def get_config(variant=None):
    return image_config("svhn", "qcsbm", variant)
