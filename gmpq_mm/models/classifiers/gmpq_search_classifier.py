"""The GMPQ search model: a mixed-precision supernet and its frozen teacher."""
import copy
import math
import os.path as osp
import warnings
from typing import List, Optional, Sequence

import torch
from mmengine.config import Config
from mmpretrain.models import ImageClassifier

from gmpq_mm.compat import load_trusted_checkpoint
from gmpq_mm.quantization.budget import (bitops_constraint, check_budget,
                                         check_tolerance, log_probs_from_model,
                                         policy_cost, policy_size_mb,
                                         size_constraint, solve_policy)
from gmpq_mm.quantization.complexity import (MB, count_macs, expected_bitops,
                                             size_terms)
from gmpq_mm.quantization.layers import is_mixed_layer
from gmpq_mm.quantization.policy import make_policy
from gmpq_mm.quantization.probe import eval_mode
from gmpq_mm.quantization.targets import get_target, with_target_candidates
from gmpq_mm.registry import MODELS
from gmpq_mm.utils.model import state_dict_mismatch
from ..utils.attribution import (classifier_attribution_maps, match_map_size,
                                 stage_attribution_maps)


def _teacher_model_cfg(teacher):
    """The teacher's model dict, from a dict or a config file path.

    A relative path is relative to the working directory; the shipped
    configs write ``'{{ fileDirname }}/pretrain_....py'``, which mmengine
    expands to the folder of the config file, so they work from anywhere.
    """
    if isinstance(teacher, str):
        path = osp.normpath(osp.expanduser(teacher))
        if not osp.isfile(path):
            raise FileNotFoundError(
                f'teacher config not found: {path} (a relative path is '
                f'taken from the working directory {osp.abspath(".")}; '
                "write '{{ fileDirname }}/NAME.py' in a config to name a "
                'file next to it)')
        return copy.deepcopy(Config.fromfile(path)['model'].to_dict())
    if isinstance(teacher, dict) and 'config' in teacher:
        return _teacher_model_cfg(teacher['config'])
    return copy.deepcopy(dict(teacher))


def _strip_init_cfg(cfg):
    """Drop pretrained-weight init from a model dict (the teacher checkpoint
    replaces it, and it must not trigger a download)."""
    if isinstance(cfg, dict):
        cfg.pop('init_cfg', None)
        for value in cfg.values():
            _strip_init_cfg(value)
    return cfg


@MODELS.register_module()
class GMPQSearchClassifier(ImageClassifier):
    """Classifier for the GMPQ search (docs/method.md).

    Loss = CE + ``attribution_loss`` (``aw * L_attr``) + ``complexity_loss``
    (``cd * C``). The teacher is built from its own config, loaded from
    ``teacher_checkpoint`` at construction (so a wrong file fails before
    training), kept in eval mode with ``requires_grad=False`` and excluded
    from every optimizer; it stays in the state dict so a resumed search
    holds the identical teacher.

    Args:
        backbone (dict): A ``MixedPrecisionBackbone`` config.
        neck, head (dict): As for :class:`ImageClassifier`.
        teacher (str | dict): The FP teacher: a config file whose ``model``
            is used, ``dict(config=PATH)``, or a model dict.
        teacher_checkpoint (str): The teacher's trained weights.
        attribution_loss (dict): ``AttributionRankLoss`` config.
        complexity_loss (dict): ``ComplexityLoss`` config.
        input_shape (Sequence[int]): ``(C, H, W)`` of the search images; the
            layers' MACs are measured at it.
        target_bitops (float, optional): BitOPs budget of the searched
            layers; the exported policy is the most likely one within it.
        target_bitops_tolerance (float, optional): If set, the exported
            policy must also spend at least ``(1 - tolerance) *
            target_bitops`` (without it a search whose argmax is cheap
            exports a policy well below the budget). Defaults to None.
        target_size_mb (float, optional): Model-size budget in MB (1e6
            bytes) of the searched network (backbone, neck, head): searched
            weights packed at their bits, every other parameter at 32 bits
            (``docs/user_guides/budgets_and_targets.md``). May be set with
            ``target_bitops``: the policy then meets both.
        target_size_mb_tolerance (float, optional): As
            ``target_bitops_tolerance``, for the size.
        target (str | dict, optional): A deployment target
            (:data:`gmpq_mm.quantization.targets.TARGETS`, e.g.
            ``'int8_runtime'``, or a dict): its native widths replace the
            backbone's ``w_bits`` / ``a_bits`` candidates, and the policy
            records it, so that the export can name emulated layers.
        attribution_stages (Sequence[int], optional): Indices into the
            backbone outputs to match maps at (default: the last one).
        init_from_teacher (bool): Start the supernet's weights (backbone,
            neck, head; not the alphas or quantizer ranges) from the
            teacher's, in ``init_weights``. Every teacher weight must find a
            supernet weight of the same name and shape. Defaults to False
            (the released code trains the supernet from its own init).
    """

    def __init__(self,
                 backbone: dict,
                 neck: Optional[dict],
                 head: dict,
                 teacher,
                 teacher_checkpoint: str,
                 attribution_loss: dict = dict(type='AttributionRankLoss'),
                 complexity_loss: dict = dict(type='ComplexityLoss'),
                 input_shape: Sequence[int] = (3, 32, 32),
                 target_bitops: Optional[float] = None,
                 target_bitops_tolerance: Optional[float] = None,
                 target_size_mb: Optional[float] = None,
                 target_size_mb_tolerance: Optional[float] = None,
                 target=None,
                 attribution_stages: Optional[Sequence[int]] = None,
                 init_from_teacher: bool = False,
                 **kwargs):
        # Budgets and target first: a bad value fails before any building.
        self._check_budgets(target_bitops, target_bitops_tolerance,
                            target_size_mb, target_size_mb_tolerance)
        target = None if target is None else get_target(
            target, where='model.target')
        if target is not None:
            backbone, note = with_target_candidates(backbone, target)
            if note:
                warnings.warn(f'GMPQSearchClassifier: {note}')
        super().__init__(backbone=backbone, neck=neck, head=head, **kwargs)
        self.target = target
        self.mixed_layers = [(name, m)
                             for name, m in self.backbone.named_modules()
                             if is_mixed_layer(m)]
        if not self.mixed_layers:
            raise ValueError('GMPQSearchClassifier: the backbone has no '
                             'mixed-precision layer; use '
                             "dict(type='MixedPrecisionBackbone', ...)")
        self.input_shape = tuple(int(s) for s in input_shape)
        all_macs = count_macs(self.backbone, self.input_shape)
        self.layer_macs = {
            name: int(all_macs[name].macs)
            for name, _ in self.mixed_layers
        }
        self.reference_macs = self.layer_macs[self.mixed_layers[0][0]]
        self.attribution_stages = attribution_stages
        self._warn_if_one_pixel_maps()
        self.attribution_loss = MODELS.build(attribution_loss)
        self.complexity_loss = MODELS.build(complexity_loss)
        self.teacher = self._build_teacher(teacher, teacher_checkpoint)
        self.init_from_teacher = bool(init_from_teacher)
        first = self.mixed_layers[0][1]
        self.w_candidates = tuple(first.w_candidates)
        self.a_candidates = tuple(first.a_candidates)
        self.target_bitops = target_bitops
        self.target_bitops_tolerance = target_bitops_tolerance
        self.target_size_mb = target_size_mb
        self.target_size_mb_tolerance = target_size_mb_tolerance
        if getattr(self.complexity_loss, 'mode', None) == 'budget' and \
                target_bitops is None and target_size_mb is None:
            raise ValueError(
                "GMPQSearchClassifier: complexity_loss mode='budget' needs "
                'target_bitops or target_size_mb (the budget it is measured '
                'against)')
        # Size = fixed part (stem, BatchNorm, classifier, biases, ranges at
        # 32 bits) + the searched weights at their bits.
        names = [name for name, _ in self.mixed_layers]
        fixed, self.layer_numels = size_terms(self.backbone, names)
        for part in (self.neck, self.head):
            if part is not None:
                fixed += size_terms(part, [])[0]
        self.size_fixed_bits = fixed
        if target_bitops is not None or target_size_mb is not None:
            self.current_policy()  # an unreachable budget fails here

    @staticmethod
    def _check_budgets(bitops, bitops_tol, size_mb, size_tol) -> None:
        check_budget(bitops, 'model.target_bitops', '8.9e9')
        check_tolerance(bitops_tol, 'model.target_bitops_tolerance',
                        'model.target_bitops', bitops)
        check_budget(size_mb, 'model.target_size_mb', '5.5')
        check_tolerance(size_tol, 'model.target_size_mb_tolerance',
                        'model.target_size_mb', size_mb)

    # ------------------------------------------------------------------
    # teacher
    def _build_teacher(self, teacher, checkpoint):
        cfg = _strip_init_cfg(_teacher_model_cfg(teacher))
        cfg.pop('data_preprocessor', None)
        model = MODELS.build(cfg)
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(
                f'teacher_checkpoint not found: {checkpoint}')
        state = load_trusted_checkpoint(checkpoint, map_location='cpu')
        state = state.get('state_dict', state)
        state = {
            k[7:] if k.startswith('module.') else k: v
            for k, v in state.items()
        }
        problems = []
        t_head = state.get('head.fc.weight')
        s_classes = getattr(self.head, 'num_classes', None)
        if t_head is not None and s_classes is not None and \
                t_head.shape[0] != s_classes:
            problems.append(f'classes: the checkpoint has {t_head.shape[0]}, '
                            f'the search model {s_classes}')
        problems += state_dict_mismatch(state, model.state_dict())
        if problems:
            raise ValueError(
                f'teacher checkpoint {checkpoint} does not match the teacher '
                f'config ({type(model.backbone).__name__}): ' +
                '; '.join(problems))
        model.load_state_dict(state)
        model.requires_grad_(False)
        model.eval()
        model._is_init = True  # init_weights must not overwrite it
        return model

    def init_weights(self):
        super().init_weights()
        if self.init_from_teacher:
            self.copy_teacher_weights()

    def copy_teacher_weights(self) -> None:
        """Copy every teacher parameter and buffer into the supernet's
        same-named one (the supernet keeps the FP layers' names)."""
        own = {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith('teacher.')
        }
        unmatched = []
        with torch.no_grad():
            for key, value in self.teacher.state_dict().items():
                if key in own and own[key].shape == value.shape:
                    own[key].copy_(value)
                else:
                    unmatched.append(key)
        if unmatched:
            raise ValueError(
                'GMPQSearchClassifier(init_from_teacher=True): teacher '
                f'weights without a same-named, same-shaped supernet weight: '
                f'{unmatched[:5]}' + (' ...' if len(unmatched) > 5 else ''))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    # ------------------------------------------------------------------
    # parameters
    def arch_parameters(self) -> List[torch.nn.Parameter]:
        """The alphas of every mixed layer (the ``arch`` optimizer's)."""
        return [p for _, m in self.mixed_layers for p in m.arch_parameters()]

    def weight_parameters(self) -> List[torch.nn.Parameter]:
        """Everything trainable except the alphas (and the frozen teacher):
        network weights and quantizer ranges (the ``weights`` optimizer's)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [
            p for name, p in self.named_parameters() if p.requires_grad
            and id(p) not in arch and not name.startswith('teacher.')
        ]

    # ------------------------------------------------------------------
    # complexity
    def expected_bitops(self) -> torch.Tensor:
        return expected_bitops(self.backbone, self.layer_macs)

    def expected_size_mb(self) -> torch.Tensor:
        """Expected model size (MB), ``E[b_w]`` per searched layer
        (differentiable in the weight alphas; unpacked bits)."""
        total = sum(module.expected_bits()[0] * self.layer_numels[name]
                    for name, module in self.mixed_layers)
        return (total + self.size_fixed_bits) / 8 / MB

    def mean_bits(self):
        with torch.no_grad():
            bits = [m.expected_bits() for _, m in self.mixed_layers]
            return (torch.stack([b[0] for b in bits]).mean(),
                    torch.stack([b[1] for b in bits]).mean())

    def probability_stats(self):
        """How far the search is from uniform: the mean over layers and
        over w / a of ``H(p) / log K`` (1 = uniform, 0 = one-hot) and of the
        gap between the two largest probabilities (0 = a tie)."""
        with torch.no_grad():
            ents, gaps = [], []
            for _, m in self.mixed_layers:
                for p in m.probs():
                    if len(p) < 2:
                        continue
                    logp = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
                    ents.append(-(p * logp).sum() / math.log(len(p)))
                    top = torch.topk(p, 2).values
                    gaps.append(top[0] - top[1])
            if not ents:
                zero = self.mixed_layers[0][1].alpha_w.new_zeros(())
                return zero, zero
            return torch.stack(ents).mean(), torch.stack(gaps).mean()

    def capacity(self) -> torch.Tensor:
        """``mean_l 1 / (E[b_w,l] E[b_a,l])`` for the capacity-aware p."""
        with torch.no_grad():
            terms = [
                1.0 / (w * a)
                for w, a in (m.expected_bits() for _, m in self.mixed_layers)
            ]
            return torch.stack(terms).mean()

    def _warn_if_one_pixel_maps(self) -> None:
        """A 1x1 feature map gives a one-pixel attribution map, whose rank
        carries nothing for AttributionRankLoss; say so at build time."""
        with torch.no_grad(), eval_mode(self.backbone):
            feats = self.backbone(torch.zeros(1, *self.input_shape))
        feats = (feats, ) if torch.is_tensor(feats) else feats
        stages = self.attribution_stages or [len(feats) - 1]
        flat = [stage for stage in stages if feats[stage].shape[-2:] == (1, 1)]
        if flat:
            warnings.warn(
                f'GMPQSearchClassifier: at input_shape {self.input_shape} '
                f'the backbone output(s) {flat} used for attribution are 1x1 '
                'feature maps, so the attribution loss carries no signal; '
                'search at a larger input (e.g. MobileNetV2 downsamples 32x: '
                'use 128 px).')

    def current_policy(self, **meta) -> dict:
        """The policy the search has found so far (argmax, or the most
        likely one within ``target_bitops``)."""
        if self.target_bitops is None and self.target_size_mb is None:
            layers = {name: m.choice() for name, m in self.mixed_layers}
        else:
            layers = solve_policy(self._policy_scores(),
                                  self._budget_constraints())
        bitops = policy_cost(self.layer_macs, layers)
        size = policy_size_mb(self.size_fixed_bits, self.layer_numels, layers)
        # Per-layer MACs, weight counts and candidate probabilities travel
        # with the policy so that it can be plotted without the network.
        modules = dict(self.mixed_layers)
        probabilities = {}
        with torch.no_grad():
            for name, module in self.mixed_layers:
                p_w, p_a = module.probs()
                probabilities[name] = {
                    'w': [round(float(p), 6) for p in p_w],
                    'a': [round(float(p), 6) for p in p_a]
                }
        return make_policy(
            layers,
            w_candidates=list(self.w_candidates),
            a_candidates=list(self.a_candidates),
            input_shape=list(self.input_shape),
            bitops=int(bitops),
            budget=self.target_bitops,
            size_mb=size,
            size_budget_mb=self.target_size_mb,
            **({} if self.target is None else dict(
                target=self._target_meta())),
            layer_macs={name: int(self.layer_macs[name])
                        for name in layers},
            layer_params={
                name: int(modules[name].weight.numel())
                for name in layers
            },
            probabilities=probabilities,
            **meta)

    def _policy_scores(self):
        """``layer -> {(w, a): log p_w + log p_a}``, the search's belief."""
        scores = {}
        for name, (logp_w,
                   logp_a) in log_probs_from_model(self.backbone).items():
            scores[name] = {
                (w, a): lw + la
                for w, lw in zip(self.w_candidates, logp_w)
                for a, la in zip(self.a_candidates, logp_a)
            }
        return scores

    def _budget_constraints(self):
        constraints = []
        if self.target_bitops is not None:
            constraints.append(
                bitops_constraint(
                    self.layer_macs,
                    self.layer_macs,
                    self.target_bitops,
                    tolerance=self.target_bitops_tolerance))
        if self.target_size_mb is not None:
            constraints.append(
                size_constraint(
                    self.size_fixed_bits,
                    self.layer_numels,
                    self.target_size_mb,
                    tolerance=self.target_size_mb_tolerance))
        return constraints

    def _target_meta(self):
        """The target as the policy records it: a preset's name, or the
        whole dict of a custom one."""
        from gmpq_mm.quantization.targets import TARGETS
        if TARGETS.get(self.target.name) == self.target:
            return self.target.name
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in self.target._asdict().items()
        }

    # ------------------------------------------------------------------
    # loss
    def _teacher_maps(self, inputs):
        maps, _ = classifier_attribution_maps(self.teacher, inputs,
                                              self.attribution_stages)
        return maps

    def attribution_maps(self, inputs: torch.Tensor) -> dict:
        """The student's and the teacher's maps as the loss compares them.

        For inspection (no graph is kept; call ``eval()`` first for the
        running BatchNorm statistics). ``inputs`` are preprocessed images.

        Returns:
            dict: ``student`` and ``teacher``: lists of ``(N, H, W)`` maps,
            one per attribution stage, each teacher map resized to its
            student map; ``student_logits`` and ``teacher_logits``:
            ``(N, K)``.
        """
        student, s_logits = classifier_attribution_maps(
            self, inputs, self.attribution_stages)
        teacher, t_logits = classifier_attribution_maps(
            self.teacher, inputs, self.attribution_stages)
        teacher = [match_map_size(t, s) for s, t in zip(student, teacher)]
        return dict(
            student=student,
            teacher=teacher,
            student_logits=s_logits,
            teacher_logits=t_logits)

    def loss(self, inputs: torch.Tensor, data_samples) -> dict:
        feats = self.backbone(inputs)
        neck_out = self.neck(feats) if self.with_neck else feats
        logits = self.head(neck_out)
        losses = dict()
        ce = self.head._get_loss(logits, data_samples)
        losses['loss_cls'] = ce.pop('loss')
        losses.update(ce)
        student = stage_attribution_maps(
            feats,
            self.neck if self.with_neck else None,
            self.head,
            logits,
            self.attribution_stages,
            create_graph=True)
        teacher = self._teacher_maps(inputs)
        capacity = self.capacity()
        attr = 0.
        for s_map, t_map in zip(student, teacher):
            attr = attr + self.attribution_loss(
                s_map, match_map_size(t_map, s_map), capacity=capacity)
        losses['loss_attr'] = attr / len(student)
        exp_bitops = self.expected_bitops()
        size_kwargs = {}
        if self.target_size_mb is not None:
            exp_size = self.expected_size_mb()
            size_kwargs = dict(size=exp_size, size_budget=self.target_size_mb)
            losses['expected_size_mb'] = exp_size.detach()
        losses['loss_complexity'] = self.complexity_loss(
            exp_bitops,
            self.reference_macs,
            budget=self.target_bitops,
            **size_kwargs)
        mean_w, mean_a = self.mean_bits()
        losses['expected_gbitops'] = exp_bitops.detach() / 1e9
        losses['mean_w_bits'] = mean_w
        losses['mean_a_bits'] = mean_a
        entropy, gap = self.probability_stats()
        losses['prob_entropy'] = entropy
        losses['prob_top2_gap'] = gap
        return losses
