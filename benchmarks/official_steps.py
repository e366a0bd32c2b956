"""The official PyTorch train steps (chen-hao-chao/qcsbm, real_world/) for
benchmarks/versus_official.py: DSM and QC on one model, optimiser and EMA, with their
floating-point operations counted, and torch's rate on a reference convolution.

Runs in a Python with torch, numpy, scipy and ml_collections; torch is imported only
when a side is built, so benchmarks.versus_official stays importable without it.
"""

import argparse
import importlib.util
import os
import sys
import time

from benchmarks import conv_kernels

THEIRS = {"dsm": "DSM", "qc": "QC (double backward)"}


def _import_official(path: str):
    """The official modules, with the CUDA-extension compiler stubbed before `op` loads."""
    if not os.path.isfile(os.path.join(path, "losses.py")):
        raise SystemExit(f"--official {path}: not the real_world/ folder of a checkout of "
                         "chen-hao-chao/qcsbm (no losses.py there).")
    import torch.utils.cpp_extension
    torch.utils.cpp_extension.load = lambda *a, **k: None  # op/ then runs its CPU path.
    sys.path.insert(0, path)
    import losses as official_losses
    import sde_lib
    from models import ncsnpp  # noqa: F401  (registers 'ncsnpp')
    from models import utils as model_utils
    from models.ema import ExponentialMovingAverage
    spec = importlib.util.spec_from_file_location(
        "official_config", os.path.join(path, "configs/qc_ncsn/training/"
                                              "cifar10_ncsnpp_deep_continuous.py"))
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    return official_losses, sde_lib, model_utils, ExponentialMovingAverage, config_module


def _official_config(config_module, ours: dict):
    """The official CIFAR-10 QC config with our network's settings (ours: our config.model
    as a dict)."""
    import torch
    config = config_module.get_config()
    for key in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                "resamp_with_conv", "fir", "fir_kernel", "skip_rescale", "resblock_type",
                "progressive", "progressive_input", "progressive_combine",
                "embedding_type", "fourier_scale", "init_scale"):
        value, official = ours[key], getattr(config.model, key)
        if isinstance(official, (list, tuple)):
            value = type(official)(value)
        elif type(official) is int and float(value).is_integer():  # 16.0 -> 16
            value = int(value)
        setattr(config.model, key, value)
    config.device = torch.device("cpu")
    return config


class TheirSide:
    """The official train steps (DSM and QC) on one model, optimiser and EMA."""

    def __init__(self, args: argparse.Namespace, our_model: dict, qc_weight: float):
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        losses, sde_lib, model_utils, ema_cls, config_module = _import_official(args.official)
        config = _official_config(config_module, our_model)
        torch.manual_seed(0)
        model = model_utils.create_model(config)
        model.train()
        optimizer = losses.get_optimizer(config, model.parameters())
        self.state = dict(optimizer=optimizer, model=model, step=0,
                          ema=ema_cls(model.parameters(), decay=config.model.ema_rate))
        sde = sde_lib.VESDE(sigma_min=config.model.sigma_min,
                            sigma_max=config.model.sigma_max, N=config.model.num_scales)
        self.steps = {
            name: losses.get_step_fn(
                sde, train=True, optimize_fn=losses.optimization_manager(config),
                reduce_mean=False, continuous=True, likelihood_weighting=False,
                balancing_fac=qc_weight if name == "qc" else 0.0, slices=1)
            for name in THEIRS}
        self.batch = torch.rand(args.batch, config.data.num_channels, config.data.image_size,
                                config.data.image_size)
        # All parameters: their Fourier frequencies are a frozen nn.Parameter, ours an
        # nnx.Param read through stop_gradient.
        self.num_params = sum(p.numel() for p in model.parameters())
        self.gflop = {}
        for name in THEIRS:
            self.run(name, 1)  # Warm-up.
            self.gflop[name] = _torch_gflop(lambda: self.run(name, 1))
        self.conv_gflop_per_s = conv_kernels.rate("torch", args.batch, 32, our_model["nf"],
                                                  repeats=100)

    def run(self, name: str, count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            self.steps[name](self.state, self.batch)
        return time.perf_counter() - start


def _torch_gflop(fn) -> float:
    """GFLOP of the torch operations fn() runs: torch's formulas (flop_counter) for
    convolutions and matrix products, including their backward passes; others count 0.
    (FlopCounterMode itself cannot follow torch.autograd.grad, which their QC step calls.)"""
    from torch.utils import _python_dispatch, flop_counter

    class Count(_python_dispatch.TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = flop_counter.flop_registry.get(func._overloadpacket)
            if formula:
                self.total += formula(*args, **(kwargs or {}), out_val=out)
            return out

    with Count() as count:
        fn()
    return count.total / 1e9
