# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Attribution maps of a classifier's last backbone feature (docs/method.md).

The map of one sample is Grad-CAM with a *sum* over spatial positions:

.. math::

    w_c = \\sum_{h,w} \\frac{\\partial z_{\\hat c}}{\\partial F_{c,h,w}},
    \\qquad A = \\mathrm{ReLU}\\Big(\\sum_c w_c F_c\\Big)

where :math:`\\hat c` is the network's own top-1 class (not the label).
Gradients are taken with :func:`torch.autograd.grad` with respect to the
feature only, so no parameter ``.grad`` is ever written (safe under DDP and
inside an mmengine optimizer step).
"""
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ClassIndex = Optional[Union[int, Sequence[int], Tensor]]


def _last_feature(feat: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """Return the last-stage feature from a tensor or a backbone tuple."""
    if isinstance(feat, (tuple, list)):
        feat = feat[-1]
    if not isinstance(feat, Tensor) or feat.dim() != 4:
        raise TypeError('the feature must be a (N, C, H, W) tensor, got '
                        f'{type(feat).__name__} '
                        f'{tuple(getattr(feat, "shape", ()))}')
    return feat


def _class_index(class_idx: ClassIndex, num_samples: int,
                 device: torch.device) -> Tensor:
    """Turn ``class_idx`` into a detached ``(N,)`` long tensor."""
    idx = torch.as_tensor(class_idx, device=device).detach().long()
    if idx.dim() == 0:
        idx = idx.expand(num_samples)
    if idx.shape != (num_samples, ):
        raise ValueError(f'class_idx must be a scalar or have shape '
                         f'({num_samples},), got {tuple(idx.shape)}')
    return idx


def class_activation_map(feat: Tensor, fc_weight: Tensor,
                         class_idx: ClassIndex) -> Tensor:
    """Attribution map of a global-average-pool + linear head, in closed form.

    For ``z = W @ mean_{h,w}(F) + b`` the derivative of the selected logit is
    ``dz_c^ / dF_{c,h,w} = W[c^, c] / (H * W)`` at every position, and summing
    it over the ``H * W`` positions gives ``w_c = W[c^, c]`` exactly. The map
    is therefore ``ReLU(sum_c W[c^, c] * F[n, c])`` (no ``1 / (H * W)``
    factor), numerically equal to :func:`gradient_attribution_map` on the
    same head, with no autograd pass.

    Args:
        feat (Tensor): Last-stage feature of shape ``(N, C, H, W)``.
        fc_weight (Tensor): Weight of the linear layer, shape ``(K, C)``.
        class_idx (int | Sequence[int] | Tensor): Class of each sample,
            a scalar (same class for all) or shape ``(N,)``. Treated as a
            constant (detached).

    Returns:
        Tensor: The map, shape ``(N, H, W)``. It is differentiable with
        respect to ``feat`` and ``fc_weight``.
    """
    feat = _last_feature(feat)
    idx = _class_index(class_idx, feat.size(0), feat.device)
    weights = fc_weight[idx]  # (N, C): w_c of each sample
    cam = torch.einsum('nc,nchw->nhw', weights.to(feat.dtype), feat)
    return F.relu(cam)


def gradient_attribution_map(
        feat: Tensor,
        logits_fn: Callable[[Tensor], Tensor],
        class_idx: ClassIndex = None,
        create_graph: bool = True) -> Tuple[Tensor, Tensor]:
    """Attribution map by autograd, for any head.

    The selected logits of all samples are summed before differentiating;
    this gives each sample's own gradient as long as ``logits_fn`` does not
    mix samples (true for a head in eval mode or without batch statistics).

    Under :func:`torch.no_grad` (e.g. for a frozen teacher) the gradient is
    still computed, on a detached copy of ``feat``, and the returned tensors
    carry no graph.

    Args:
        feat (Tensor): Last-stage feature of shape ``(N, C, H, W)``.
        logits_fn (Callable): Maps ``feat`` to logits of shape ``(N, K)``.
        class_idx (int | Sequence[int] | Tensor, optional): Class of each
            sample. Defaults to None, i.e. the detached argmax of the logits.
        create_graph (bool): Keep the graph of the gradient so the map can
            be back-propagated (second order through the head). Ignored when
            grad mode is off. Defaults to True.

    Returns:
        tuple[Tensor, Tensor]: The map of shape ``(N, H, W)`` and the logits
        of shape ``(N, K)``.
    """
    feat = _last_feature(feat)
    grad_enabled = torch.is_grad_enabled()
    with torch.enable_grad():
        if grad_enabled and feat.requires_grad:
            inp = feat
        else:
            # A leaf is needed to differentiate at all; keep the caller's
            # graph (to head parameters) only if grad mode is on.
            inp = feat.detach().requires_grad_(True)
        logits = logits_fn(inp)
        if logits.dim() != 2 or logits.size(0) != feat.size(0):
            raise ValueError('logits_fn must return (N, K) logits, got '
                             f'{tuple(logits.shape)}')
        if class_idx is None:
            idx = logits.detach().argmax(dim=1)
        else:
            idx = _class_index(class_idx, feat.size(0), logits.device)
        selected = logits.gather(1, idx[:, None]).sum()
        (grads, ) = torch.autograd.grad(
            selected, inp, create_graph=create_graph and grad_enabled)
        weights = grads.sum(dim=(2, 3))  # w_c: sum, not mean, over (h, w)
        cam = F.relu(torch.einsum('nc,nchw->nhw', weights, inp))
    if not grad_enabled:
        return cam.detach(), logits.detach()
    return cam, logits


def _is_closed_form(neck: Optional[nn.Module], head: nn.Module,
                    feat: Tensor) -> bool:
    """Whether the head reduces to ``fc(GAP(feat))`` exactly."""
    # Imported lazily: this module is plain torch unless mmpretrain heads are
    # actually handed in.
    from mmpretrain.models.heads import LinearClsHead
    from mmpretrain.models.necks import GlobalAveragePooling

    if not isinstance(neck, GlobalAveragePooling) or feat.dim() != 4:
        return False
    if type(neck).forward is not GlobalAveragePooling.forward or \
            not isinstance(neck.gap, nn.AdaptiveAvgPool2d):
        return False
    if not isinstance(head, LinearClsHead):
        return False
    # A subclass that redefines the forward is no longer a plain linear
    # layer on the pooled feature; fall back to autograd for it.
    return (type(head).forward is LinearClsHead.forward
            and type(head).pre_logits is LinearClsHead.pre_logits
            and isinstance(head.fc, nn.Linear))


def attribution_map(feat: Union[Tensor, Sequence[Tensor]],
                    neck: Optional[nn.Module],
                    head: nn.Module,
                    logits: Optional[Tensor] = None,
                    create_graph: bool = True) -> Tensor:
    """Attribution map of a classifier given its last backbone feature.

    Uses :func:`class_activation_map` when ``neck`` is mmpretrain's
    ``GlobalAveragePooling`` and ``head`` is a plain ``LinearClsHead``;
    otherwise :func:`gradient_attribution_map` through ``neck`` and ``head``
    only, with mmpretrain's calling convention
    (``head(neck((feat, )))``, as in ``ImageClassifier``).

    Args:
        feat (Tensor | Sequence[Tensor]): Last-stage feature
            ``(N, C, H, W)``, or the backbone's tuple (its last item is used).
        neck (nn.Module, optional): The classifier's neck, or None.
        head (nn.Module): The classifier's head.
        logits (Tensor, optional): Logits the forward already produced; their
            argmax selects the class. Defaults to None (computed here).
        create_graph (bool): See :func:`gradient_attribution_map`.
            Defaults to True.

    Returns:
        Tensor: The map, shape ``(N, H, W)``.
    """
    feat = _last_feature(feat)
    class_idx = None if logits is None else logits.detach().argmax(dim=1)

    if _is_closed_form(neck, head, feat):
        if class_idx is None:
            # Only the argmax is needed, so no graph.
            with torch.no_grad():
                class_idx = head.fc(feat.mean(dim=(2, 3))).argmax(dim=1)
        return class_activation_map(feat, head.fc.weight, class_idx)

    def logits_fn(x: Tensor) -> Tensor:
        inputs = (x, )
        if neck is not None:
            inputs = neck(inputs)
        return head(inputs)

    cam, _ = gradient_attribution_map(
        feat, logits_fn, class_idx=class_idx, create_graph=create_graph)
    return cam


def stage_attribution_maps(feats: Sequence[Tensor],
                           neck: Optional[nn.Module],
                           head: nn.Module,
                           logits: Tensor,
                           stages: Optional[Sequence[int]] = None,
                           create_graph: bool = True) -> List[Tensor]:
    """Attribution maps at chosen backbone stages, as the GMPQ loss uses.

    The last stage goes through :func:`attribution_map` (closed form where
    the head allows it). An earlier stage is differentiated through the
    later stages, so ``feats[stage]`` must be part of a graph to ``logits``;
    its channel weights are constants (no second-order path through the
    later stages, whose quantized convs are differentiable once only), and
    its map carries a graph through ``feats[stage]``.

    Args:
        feats (Sequence[Tensor]): The backbone's outputs, ``(N, C, H, W)``
            each.
        neck (nn.Module, optional): The classifier's neck, or None.
        head (nn.Module): The classifier's head.
        logits (Tensor): Logits the forward produced from ``feats``; their
            argmax selects the class.
        stages (Sequence[int], optional): Indices into ``feats``. Defaults to
            None, the last one only.
        create_graph (bool): Keep the graph of the maps (the student's, to
            train through them). Defaults to True.

    Returns:
        list[Tensor]: One ``(N, H_s, W_s)`` map per stage, in ``stages``
        order.
    """
    stages = stages or [len(feats) - 1]
    maps = []
    for stage in stages:
        if stage in (-1, len(feats) - 1):
            maps.append(
                attribution_map(
                    feats[-1],
                    neck,
                    head,
                    logits=logits,
                    create_graph=create_graph))
            continue
        # Earlier stages: the gradient runs through the later stages. Their
        # quantized convs are differentiable once only (custom autograd
        # functions with a hand-written backward), so the channel weights
        # ``w_c`` are taken as constants (no graph); the map stays
        # differentiable through ``feat``, i.e. the loss trains every layer
        # up to this stage (and its alphas) to move the map.
        feat = feats[stage]
        cls = logits.detach().argmax(dim=1)
        picked = logits.gather(1, cls[:, None]).sum()
        grad, = torch.autograd.grad(picked, feat, retain_graph=True)
        weights = grad.detach().sum(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feat).sum(dim=1))
        maps.append(cam if create_graph else cam.detach())
    return maps


def classifier_attribution_maps(
        classifier: nn.Module,
        inputs: Tensor,
        stages: Optional[Sequence[int]] = None) -> Tuple[List[Tensor], Tensor]:
    """Maps and logits of a classifier that is not trained through them.

    How the search computes its frozen teacher's maps, and how a tool
    inspects any mmpretrain ``ImageClassifier``-like network (``backbone``,
    ``neck``/``with_neck``, ``head``). ``inputs`` are already preprocessed.

    Args:
        classifier (nn.Module): The network (put it in eval mode first
            unless batch statistics are wanted).
        inputs (Tensor): Preprocessed images, ``(N, C, H, W)``.
        stages (Sequence[int], optional): As in
            :func:`stage_attribution_maps`.

    Returns:
        tuple[list[Tensor], Tensor]: The detached maps (one per stage) and
        the detached logits ``(N, K)``.
    """
    # Maps at earlier stages differentiate through the later stages, so the
    # network needs an activation graph for them.
    need_grad = stages is not None and any(s != -1 for s in stages)
    with torch.set_grad_enabled(need_grad):
        if need_grad:
            inputs = inputs.detach().requires_grad_()
        feats = classifier.backbone(inputs)
        neck = classifier.neck if classifier.with_neck else None
        logits = classifier.head(neck(feats) if neck is not None else feats)
        maps = stage_attribution_maps(
            feats, neck, classifier.head, logits, stages, create_graph=False)
    return [m.detach() for m in maps], logits.detach()


def match_map_size(amap: Tensor, like: Tensor) -> Tensor:
    """``amap`` ``(N, H, W)`` resized bilinearly to ``like``'s ``(H, W)``
    (how the loss compares a teacher map with a student map of another
    stage size)."""
    if amap.shape[-2:] == like.shape[-2:]:
        return amap
    return F.interpolate(
        amap[:, None],
        size=like.shape[-2:],
        mode='bilinear',
        align_corners=False)[:, 0]
