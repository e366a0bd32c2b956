"""Which network an official NCSN++ / DDPM++ state dict holds: the settings it shows.

When a checkpoint does not fit the config, the user needs the config keys that would make
it fit. `infer_model` reads them from the tensors' names and shapes, walking the flat
module list (layout.py) the way the official constructor builds it: the embedding, nf,
the image channels, per resolution the residual blocks and attention layers until the
downsampling module (a BigGAN block that resamples, or a Downsample), the progressive
input module after it, the middle blocks, and whether the top of the upsampling path has
a progressive output head. Some settings leave no trace in the tensors (dropout,
fourier_scale, skip_rescale, init_scale, fir for BigGAN blocks without progressive
paths); those are not reported. The caller checks a suggestion by building the layout it
implies, so a wrong inference is never shown as a fix.
"""

import collections
import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class _Module:
    """One entry of all_modules: its kind, input and output channels, and for residual
    blocks whether they have a 1x1 shortcut."""
    kind: str
    in_ch: int = 0
    out_ch: int = 0
    shortcut: bool = False


def _classify(tensors: Mapping[str, tuple]) -> _Module:
    names = set(tensors)
    if not names:
        return _Module("none")  # a parameter-free resampler
    if names == {"W"}:
        return _Module("fourier", out_ch=tensors["W"][0])
    if "Dense_0.weight" in names:
        return _Module("resblock", tensors["GroupNorm_0.weight"][0], tensors["Conv_0.weight"][0],
                       shortcut=bool(names & {"Conv_2.weight", "NIN_0.W"}))
    if "NIN_3.W" in names:
        return _Module("attention", tensors["NIN_3.W"][0], tensors["NIN_3.W"][1])
    for layer, kind in (("Conv2d_0", "fir_conv"), ("Conv_0", "plain_conv")):
        if names == {f"{layer}.weight", f"{layer}.bias"}:
            out_ch, in_ch, size = tensors[f"{layer}.weight"][:3]
            return _Module("combine" if size == 1 else kind, in_ch, out_ch)
    if names == {"weight", "bias"}:
        shape = tensors["weight"]
        kind = {1: "norm", 2: "linear", 4: "conv"}.get(len(shape), "unknown")
        return _Module(kind, shape[1] if len(shape) > 1 else shape[0], shape[0])
    return _Module("unknown")


def _modules(shapes: Mapping[str, tuple]) -> list[_Module]:
    """The all_modules list of 'all_modules.<i>.<rest>' shapes (other names ignored)."""
    grouped = collections.defaultdict(dict)
    for name, shape in shapes.items():
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "all_modules" and parts[1].isdigit():
            grouped[int(parts[1])][parts[2]] = tuple(shape)
    return [_classify(grouped.get(i, {})) for i in range(max(grouped, default=-1) + 1)]


class _Cursor:
    def __init__(self, modules: list[_Module]):
        self.modules, self.position = modules, 0

    def peek(self, ahead: int = 0) -> _Module:
        index = self.position + ahead
        return self.modules[index] if index < len(self.modules) else _Module("end")

    def take(self, *kinds: str) -> _Module:
        module = self.peek()
        if module.kind not in kinds:
            raise ValueError(f"all_modules.{self.position} is a {module.kind}, not {kinds}")
        self.position += 1
        return module


def _resamples(module: _Module) -> bool:
    """A BigGAN block that up- or downsamples: same channels, yet a shortcut."""
    return module.kind == "resblock" and module.shortcut and module.in_ch == module.out_ch


def infer_model(shapes: Mapping[str, tuple]) -> tuple[dict, int, list[int]]:
    """(model.* settings shown by the tensors, image channels, levels with attention) of
    an official state dict {name: shape} (no 'module.' prefix). Raises ValueError where
    the modules do not follow the NCSN++ layout."""
    cursor = _Cursor(_modules(shapes))
    found = {"embedding_type": "fourier" if cursor.peek().kind == "fourier" else "positional",
             "progressive_input": "none"}
    if found["embedding_type"] == "fourier":
        cursor.take("fourier")
    nf = found["nf"] = cursor.take("linear").out_ch // 4
    cursor.take("linear")
    channels = cursor.take("conv").in_ch
    ch, pyramid_ch, blocks, multipliers, attention = nf, channels, None, [], []
    while True:
        count = 0
        while (cursor.peek().kind == "resblock" and not _resamples(cursor.peek())
               and count != blocks):
            ch, count = cursor.take("resblock").out_ch, count + 1
            if cursor.peek().kind == "attention":
                cursor.take("attention")
                attention += [] if len(multipliers) in attention else [len(multipliers)]
        blocks = blocks or count
        multipliers.append(ch // nf)
        resampler = cursor.peek()
        if _resamples(resampler):
            found["resblock_type"] = "biggan"
        elif resampler.kind == "none" or (resampler.kind in ("plain_conv", "fir_conv")
                                          and resampler.in_ch == resampler.out_ch == ch):
            found.update(resblock_type="ddpm", resamp_with_conv=resampler.kind != "none")
            if resampler.kind != "none":
                found["fir"] = resampler.kind == "fir_conv"
        else:
            break
        cursor.take(resampler.kind)
        pyramid = cursor.peek()
        if pyramid.kind == "combine":
            cursor.take("combine")
            cat = cursor.peek().in_ch == 2 * ch
            found.update(progressive_input="input_skip",
                         progressive_combine="cat" if cat else "sum")
            ch *= 2 if cat else 1
        elif pyramid.kind in ("plain_conv", "fir_conv") and pyramid.in_ch == pyramid_ch:
            cursor.take(pyramid.kind)
            found.update(progressive_input="residual", fir=pyramid.kind == "fir_conv")
            pyramid_ch = ch
    found.update(ch_mult=tuple(multipliers), num_res_blocks=blocks)
    cursor.take("resblock")
    cursor.take("attention")
    cursor.take("resblock")
    for _ in range(blocks + 1):
        cursor.take("resblock")
    if cursor.peek().kind == "attention":
        cursor.take("attention")
    found["progressive"] = "none"
    if cursor.peek().kind == "norm" and cursor.peek(1).kind == "conv":
        head = cursor.peek(1)
        found["progressive"] = "output_skip" if head.out_ch == channels else "residual"
    return found, channels, sorted(attention)
