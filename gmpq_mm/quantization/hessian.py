"""Hessian traces of a loss by Hutchinson's estimator (pure PyTorch).

For a loss ``L`` and a block of variables ``x`` (a layer's weight, or the
input a layer receives), ``Tr(d^2 L / dx^2) = E_v[v^T H v]`` for Rademacher
vectors ``v`` (entries +-1 with equal chance). Each sample costs one
Hessian-vector product, i.e. one more backward pass through the graph of
the gradient; no Hessian is ever formed. Several blocks are estimated from
the same products: with one ``v_i`` per block, ``v_i^T (H v)_i`` is an
unbiased estimate of block ``i``'s own trace (the cross-block terms have
mean zero), which is how HAWQ-V2 estimates every layer at once.

The input of a layer enters as a zero perturbation ``delta`` added by a
forward pre-hook: ``L(x + delta)`` has, at ``delta = 0``, the Hessian of the
loss with respect to that input (the whole batch tensor).

Pure PyTorch: nothing from mmengine / mmpretrain is imported.
"""
import contextlib
import math
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ['hutchinson_traces', 'input_perturbations', 'train_flags_kept']

LossFn = Callable[[nn.Module, object], Tensor]


@contextlib.contextmanager
def train_flags_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block (gradients stay on); every submodule's
    training flag restored one by one after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def input_perturbations(model: nn.Module,
                        names: Sequence[str]) -> Iterator[Dict[str, Tensor]]:
    """Add a zero tensor that requires grad to the input of each named
    module, so the loss can be differentiated with respect to it.

    Yields a dict that each forward fills with ``name -> delta``; a module
    called twice in one forward is refused (its input is not one tensor).
    """
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f'unknown module name(s) {unknown} in '
                         f'{type(model).__name__}')
    deltas: Dict[str, Tensor] = {}

    def make_hook(name):

        def hook(module, args):
            if name in deltas:
                raise RuntimeError(
                    f'{name!r} is called more than once per forward; its '
                    'input Hessian is not defined here')
            delta = torch.zeros_like(args[0], requires_grad=True)
            deltas[name] = delta
            return (args[0] + delta, ) + tuple(args[1:])

        return hook

    handles = [
        modules[n].register_forward_pre_hook(make_hook(n)) for n in names
    ]
    try:
        yield deltas
    finally:
        for handle in handles:
            handle.remove()


def _rademacher(like: Tensor, generator: torch.Generator) -> Tensor:
    signs = torch.randint(0, 2, like.shape, generator=generator)
    return (signs * 2 - 1).to(device=like.device, dtype=like.dtype)


def _one_sample(grads, blocks, group, gen, values) -> None:
    """Append ``v_i^T (H v)_i`` for the blocks ``group`` (one Rademacher
    vector over them, zero elsewhere) to ``values[i]``."""
    # A gradient that does not depend on any block (e.g. a block the loss
    # is linear in) adds nothing to H v: leave it out.
    live = [
        i for i in group if grads[i] is not None and grads[i].requires_grad
    ]
    if not live:
        for i in group:
            values[i].append(0.0)
        return
    vs = {i: _rademacher(blocks[i], gen) for i in group}
    hvs = torch.autograd.grad([grads[i] for i in live],
                              [blocks[i] for i in group],
                              grad_outputs=[vs[i] for i in live],
                              retain_graph=True,
                              allow_unused=True)
    for i, hv in zip(group, hvs):
        values[i].append(0.0 if hv is None else float((vs[i] * hv).sum()))


def hutchinson_traces(model: nn.Module,
                      loss_fn: LossFn,
                      batches: Iterable,
                      weights: Mapping[str, Tensor],
                      inputs_of: Sequence[str] = (),
                      num_samples: int = 16,
                      seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Hessian traces of ``loss_fn`` for weight and input blocks.

    The loss is averaged over ``batches``; its Hessian is the mean of the
    per-batch ones, and so is the estimate. The model runs in eval mode
    (BatchNorm on its running statistics, no dropout): the network whose
    quantization is judged.

    Args:
        model: The network (its parameters are not changed).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: Whatever ``loss_fn`` takes; iterated once.
        weights: ``key -> tensor`` whose trace is wanted (parameters of
            ``model``, e.g. ``{'conv1': conv1.weight}``).
        inputs_of: Module names whose input's trace is wanted.
        num_samples: Rademacher vectors per batch.
        seed: Seed of the vectors (same seed, same estimate).

    Returns:
        dict: ``'weight'``: ``key -> trace``; ``'input'``: ``name -> trace``
        (the trace over the whole batch tensor, averaged over batches);
        ``'weight_se'`` / ``'input_se'``: their standard errors (sample
        standard deviation of the ``batches x num_samples`` estimates over
        the square root of their number; NaN from a single one);
        ``'input_numel'``: ``name -> elements of that tensor`` (averaged
        over batches); ``'batches'``: how many were used.

    Example:
        >>> lin = nn.Linear(3, 1, bias=False)
        >>> c = torch.tensor([[1., 2., 3.]])
        >>> # L = sum c_i w_i^2: H = diag(2c), v^T H v = 12 for every v
        >>> loss = lambda m, b: (b * m.weight ** 2).sum()
        >>> hutchinson_traces(lin, loss, [c], {'w': lin.weight},
        ...                   num_samples=3)['weight']['w']
        12.0
    """
    if num_samples < 1:
        raise ValueError(f'num_samples must be >= 1, got {num_samples}')
    keys = list(weights)
    names = list(inputs_of)
    gen = torch.Generator().manual_seed(int(seed))
    # One list of per-sample estimates per block: weights, then inputs.
    values: List[List[float]] = [[] for _ in keys + names]
    x_numel = dict.fromkeys(names, 0.0)
    count = 0
    with train_flags_kept(model), torch.enable_grad():
        for batch in batches:
            with input_perturbations(model, names) as deltas:
                loss = loss_fn(model, batch)
            missed = [n for n in names if n not in deltas]
            if missed:
                raise ValueError(f'modules {missed} were not called by the '
                                 'forward pass')
            blocks = [weights[k] for k in keys] + [deltas[n] for n in names]
            grads = torch.autograd.grad(
                loss, blocks, create_graph=True, allow_unused=True)
            # Weights and inputs get separate products: the weight-input
            # cross terms of a layer are large, and would add their spread
            # to both estimates.
            groups = [range(len(keys)), range(len(keys), len(blocks))]
            for _ in range(num_samples):
                for group in groups:
                    _one_sample(grads, blocks, list(group), gen, values)
            for name in names:
                x_numel[name] += deltas[name].numel()
            count += 1
            del grads, loss
    if count == 0:
        raise ValueError('hutchinson_traces needs at least one batch')
    means = [sum(v) / len(v) for v in values]
    errors = [
        math.sqrt(sum(
            (x - m)**2
            for x in v) / (len(v) - 1) / len(v)) if len(v) > 1 else math.nan
        for v, m in zip(values, means)
    ]
    k = len(keys)
    return dict(
        weight=dict(zip(keys, means[:k])),
        input=dict(zip(names, means[k:])),
        weight_se=dict(zip(keys, errors[:k])),
        input_se=dict(zip(names, errors[k:])),
        input_numel={
            n: v / count
            for n, v in x_numel.items()
        },
        batches=count)
