"""PyTorch NCSN++ / DDPM++ checkpoints in and out (docs/checkpoints.md).

  import_checkpoint(path, config, workdir)  an official checkpoint (the QCSBM code's or
      score_sde_pytorch's) into WORKDIR/checkpoints/<step>, for evaluation, sampling and
      training.init_from;
  export_checkpoint(workdir, out)  a workdir's newest checkpoint to a .pth file the
      official code loads.

Command line: python -m qcsbm_jax.convert (see __main__.py). Neither direction needs torch.
"""

from qcsbm_jax.convert.exporting import export_checkpoint
from qcsbm_jax.convert.importing import import_checkpoint
from qcsbm_jax.convert.layout import ConvertError

__all__ = ["ConvertError", "export_checkpoint", "import_checkpoint"]
