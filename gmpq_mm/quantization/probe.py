"""Run a network once on a probe batch: the two helpers every measurement
of this package (MACs, signed inputs, calibration) shares.

Pure PyTorch: nothing from mmengine / mmpretrain is imported.
"""
import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ['eval_mode', 'probe_input']


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode under ``no_grad``; restore it after.

    The training flag of every submodule is restored one by one (not with a
    blanket ``model.train()``) because some submodules may be in eval mode on
    purpose, e.g. frozen BatchNorm layers of a backbone.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()  # frozen on purpose
        >>> with eval_mode(net):
        ...     _ = net(torch.zeros(1, 2))
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, flag in flags:
            module.training = flag


def probe_input(model: nn.Module,
                input_shape: Sequence[int],
                batch_size: int = 1,
                random: bool = False) -> torch.Tensor:
    """A probe batch on the device and in the float dtype of ``model``.

    Args:
        model: Its first parameter gives the device and dtype (CPU float32
            for a model without parameters).
        input_shape: ``(C, H, W)`` of one sample.
        batch_size: Leading dimension.
        random: Standard normal values from a fixed seed (the caller's global
            RNG state is untouched) instead of zeros.

    Example:
        >>> probe_input(nn.Conv2d(3, 8, 3).double(), (3, 4, 4)).dtype
        torch.float64
        >>> batch = probe_input(nn.Conv2d(3, 8, 3), (3, 4, 4), batch_size=2)
        >>> tuple(batch.shape), float(batch.abs().sum())
        ((2, 3, 4, 4), 0.0)
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if (param is not None
                            and param.is_floating_point()) else torch.float32
    shape = (batch_size, *tuple(int(s) for s in input_shape))
    if random:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return torch.zeros(shape, device=device, dtype=dtype)
