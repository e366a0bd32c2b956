"""PyTorch checkpoint files read and written without torch, never executing their code.

`load` (reading.py) rebuilds tensors as NumPy arrays through a restricted unpickler;
`save` (writing.py) writes torch.save's zip format, which torch.load reads.
"""

from qcsbm_jax.torch_io.reading import ScriptObject, TorchFileError, flatten_arrays, load
from qcsbm_jax.torch_io.writing import ZIP_ALIGNMENT, save

__all__ = ["ScriptObject", "TorchFileError", "ZIP_ALIGNMENT", "flatten_arrays", "load", "save"]
