"""Attribution maps of a quantized network and its FP teacher on image files.

Floor 2 glue for ``tools/visualization/vis_attribution.py`` (and notebooks).
The maps come from the code the GMPQ loss trains with:
:meth:`GMPQSearchClassifier.attribution_maps` for a search checkpoint,
:func:`gmpq_mm.models.utils.classifier_attribution_maps` otherwise.

    from gmpq_mm.apis.attribution import (explain_images,
                                          load_attribution_models)
    models = load_attribution_models(
        'configs/gmpq/demo/finetune_r18_fashion_mnist.py', 'epoch_2.pth',
        teacher_config='configs/gmpq/demo/pretrain_r18_fashion_mnist.py',
        teacher_checkpoint='epoch_3.pth')
    for result in explain_images(models, ['shoe.png']):
        print(result.path, result.spearman)

Where the teacher comes from:

- a search config (``GMPQSearchClassifier``): the teacher is part of the
  model and of the checkpoint's state dict; the config's
  ``teacher_checkpoint`` is only read when the checkpoint lacks it. A
  ``teacher_checkpoint`` (and ``teacher_config``) given here replaces it.
- any other classifier (e.g. a finetuned ``QuantizedBackbone`` network):
  ``teacher_config`` + ``teacher_checkpoint``.
"""
import copy
import os.path as osp
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from mmcv.transforms import Compose
from mmengine.config import Config
from mmengine.registry import init_default_scope
from torch import nn

from gmpq_mm.engine.checkpoint_load import load_checkpoint_file
from gmpq_mm.models.backbones.mixed_precision_backbone import stem_in_channels
from gmpq_mm.models.utils import classifier_attribution_maps, match_map_size
from gmpq_mm.quantization.layers import is_quantized_layer
from gmpq_mm.registry import MODELS, TRANSFORMS
from gmpq_mm.utils import register_all_modules
from gmpq_mm.utils.bit_record import check_bit_widths, policy_source
from .deploy import as_config, model_config

__all__ = [
    'AttributionModels', 'ExplainedImage', 'load_attribution_models',
    'load_images', 'explain_images', 'rank_correlation'
]

SEARCH_CLASSIFIER = 'GMPQSearchClassifier'
TEACHER_PREFIX = 'teacher.'


@dataclass
class AttributionModels:
    """A network to inspect and its FP teacher, in eval mode.

    Attributes:
        student (nn.Module): The quantized / mixed-precision network.
        teacher (nn.Module, optional): The FP teacher; None when the student
            is a ``GMPQSearchClassifier`` holding its own.
        cfg (Config): The student's merged config (its test pipeline).
        classes (list[str], optional): Class names stored in the checkpoint.
        student_name (str): What to call the student in titles.
    """

    student: nn.Module
    teacher: Optional[nn.Module]
    cfg: Config
    classes: Optional[List[str]]
    student_name: str


@dataclass
class ExplainedImage:
    """One image's maps (at the resolution the loss compares them) and the
    two networks' top-1 predictions."""

    path: str
    image: np.ndarray  # what the networks saw: (H, W) grey or (H, W, 3) RGB
    teacher_map: np.ndarray
    student_map: np.ndarray
    teacher_pred: dict  # label, score, name
    student_pred: dict
    spearman: float  # NaN when a map is constant (e.g. all zero)


# ------------------------------------------------------------------ models --
def _state_and_meta(checkpoint: str):
    """The checkpoint's state dict (``module.`` stripped) and its meta."""
    loaded = load_checkpoint_file(checkpoint, map_location='cpu')
    state = loaded.get('state_dict', loaded)
    state = {
        k[7:] if k.startswith('module.') else k: v
        for k, v in state.items()
    }
    return state, loaded.get('meta') or {}


def _split(state: dict, prefix: str):
    """``(entries under prefix, the others)`` of a state dict."""
    inside = {k: v for k, v in state.items() if k.startswith(prefix)}
    return inside, {k: v for k, v in state.items() if k not in inside}


def _load_strict(model: nn.Module,
                 state: dict,
                 checkpoint: str,
                 config: str,
                 keep_prefix: Optional[str] = None) -> None:
    """``load_state_dict(strict=True)``; entries under ``keep_prefix`` keep
    the model's values (they came from another file)."""
    if keep_prefix is not None:
        _, state = _split(state, keep_prefix)
        state.update(_split(model.state_dict(), keep_prefix)[0])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f'{checkpoint}: does not fit the model of {config}: '
                         f'{err}') from None


def _build(cfg: Config) -> nn.Module:
    register_all_modules()
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    return MODELS.build(model_config(cfg))


def _search_model(cfg: Config, config: str, checkpoint: str, state: dict,
                  teacher_config: Optional[str],
                  teacher_checkpoint: Optional[str]) -> nn.Module:
    """The search classifier with the teacher the search used."""
    if teacher_config is not None:
        cfg.model.teacher = teacher_config
    if teacher_checkpoint is not None:
        cfg.model.teacher_checkpoint = teacher_checkpoint
        model = _build(cfg)
        _load_strict(model, state, checkpoint, config, TEACHER_PREFIX)
        return model
    teacher_state = {
        k[len(TEACHER_PREFIX):]: v
        for k, v in _split(state, TEACHER_PREFIX)[0].items()
    }
    config_teacher = cfg.model.get('teacher_checkpoint')
    has_config_teacher = bool(config_teacher) and osp.isfile(config_teacher)
    if not teacher_state:
        if not has_config_teacher:
            raise ValueError(
                f'{checkpoint}: holds no teacher weights, and the teacher '
                f'checkpoint of the config ({config_teacher}) is not found; '
                'give --teacher-checkpoint')
        model = _build(cfg)
        _load_strict(model, state, checkpoint, config, TEACHER_PREFIX)
        return model
    if has_config_teacher:
        model = _build(cfg)
    else:
        # The classifier loads its teacher from a file when it is built;
        # hand it the teacher inside the search checkpoint.
        with tempfile.TemporaryDirectory() as folder:
            cfg.model.teacher_checkpoint = osp.join(folder, 'teacher.pth')
            torch.save(
                dict(state_dict=teacher_state), cfg.model.teacher_checkpoint)
            model = _build(cfg)
        cfg.model.teacher_checkpoint = config_teacher
    # The checkpoint's teacher wins: it is the one the search matched.
    _load_strict(model, state, checkpoint, config)
    return model


def _network_name(model: nn.Module) -> str:
    """``'mixed W3.4/A3.9'``-style name of the inspected network."""
    if hasattr(model, 'mean_bits'):  # a search supernet: expected bits
        w_bits, a_bits = (float(b) for b in model.mean_bits())
        return f'supernet E[bits] W{w_bits:.1f}/A{a_bits:.1f}'
    layers = [m for m in model.modules() if is_quantized_layer(m)]
    if not layers:
        return 'full precision'
    if all(m.bits == layers[0].bits for m in layers):
        return f'quantized W{layers[0].w_bits}/A{layers[0].a_bits}'
    w_bits = np.mean([m.w_bits for m in layers])
    a_bits = np.mean([m.a_bits for m in layers])
    return f'mixed W{w_bits:.1f}/A{a_bits:.1f}'


def load_attribution_models(config,
                            checkpoint: str,
                            teacher_config: Optional[str] = None,
                            teacher_checkpoint: Optional[str] = None,
                            cfg_options: Optional[dict] = None,
                            device: str = 'cpu') -> AttributionModels:
    """Build the network of ``config`` + ``checkpoint`` and its FP teacher.

    Raises:
        FileNotFoundError: A checkpoint that does not exist.
        ValueError: Naming the checkpoint: it has no teacher and none is
            given, or weights and configs do not fit.
    """
    for path in (checkpoint, teacher_checkpoint):
        if path is not None and not osp.isfile(path):
            raise FileNotFoundError(f'checkpoint not found: {path}')
    cfg = as_config(config, cfg_options)
    config_name = getattr(cfg, 'filename', None) or str(config)
    model_type = str(cfg.model.get('type', 'ImageClassifier'))
    state, meta = _state_and_meta(checkpoint)
    if model_type.split('.')[-1] == SEARCH_CLASSIFIER:
        student = _search_model(cfg, config_name, checkpoint, state,
                                teacher_config, teacher_checkpoint)
        teacher = None
    else:
        if teacher_checkpoint is None or teacher_config is None:
            raise ValueError(
                f'{checkpoint}: holds no FP teacher (its model is '
                f'{model_type}, not {SEARCH_CLASSIFIER}); give '
                '--teacher-config and --teacher-checkpoint')
        student = _build(cfg)
        _load_strict(student, state, checkpoint, config_name)
        teacher = _build(as_config(teacher_config))
        t_state, _ = _state_and_meta(teacher_checkpoint)
        _load_strict(teacher, t_state, teacher_checkpoint, teacher_config)
        s_classes = getattr(student.head, 'num_classes', None)
        t_classes = getattr(teacher.head, 'num_classes', None)
        if s_classes != t_classes:
            raise ValueError(
                f'{teacher_checkpoint}: the teacher has {t_classes} classes, '
                f'the network of {checkpoint} has {s_classes}')
        teacher = teacher.to(device).eval()
    check_bit_widths(student, dict(meta=meta), checkpoint,
                     policy_source(cfg, config_name))
    classes = (meta.get('dataset_meta') or {}).get('classes')
    return AttributionModels(
        student=student.to(device).eval(),
        teacher=teacher,
        cfg=cfg,
        classes=list(classes) if classes else None,
        student_name=_network_name(student))


# ------------------------------------------------------------------ images --
def _test_pipeline(cfg: Config) -> list:
    for key in ('test_dataloader', 'val_dataloader'):
        dataset = (cfg.get(key) or {}).get('dataset') or {}
        if dataset.get('pipeline') is not None:
            return [copy.deepcopy(step) for step in dataset['pipeline']]
    raise ValueError(f'{cfg.filename}: no test_dataloader.dataset.pipeline '
                     'to preprocess images with')


def _loads_files(step) -> bool:
    return str(step.get('type', '')).split('.')[-1] == 'LoadImageFromFile'


def _decode(path: str, in_channels: int) -> np.ndarray:
    """Pixels as array datasets hold them: grey ``(H, W)`` for a one-channel
    network (MNIST), RGB ``(H, W, 3)`` otherwise (CIFAR)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert('L' if in_channels == 1 else 'RGB'))


def _display_image(inputs: torch.Tensor, bgr: bool) -> np.ndarray:
    """The packed ``(C, H, W)`` input as an ``(H, W[, 3])`` RGB picture."""
    image = inputs.detach().cpu().permute(1, 2, 0).numpy()
    if image.dtype != np.uint8:
        peak = float(image.max()) if image.size else 0.0
        image = np.clip(image / (255.0 if peak > 1.0 else 1.0), 0.0, 1.0)
    if image.shape[2] == 1:
        return image[..., 0]
    return image[..., ::-1] if bgr else image


def load_images(cfg: Config,
                paths: Sequence[str],
                in_channels: int = 3) -> List[dict]:
    """Each image through the config's test pipeline, as the test set's go.

    A pipeline that loads files (``LoadImageFromFile``) gets the path; one
    of an array dataset (no loading step: CIFAR, MNIST) gets the pixels as
    that dataset holds them (see :func:`_decode`).

    Returns:
        list[dict]: The packed samples (``inputs``, ``data_samples``) with
        ``display``, the picture the network sees, in RGB or grey.

    Raises:
        FileNotFoundError / ValueError: naming the image that is missing or
            does not decode.
    """
    steps = _test_pipeline(cfg)
    from_file = any(_loads_files(step) for step in steps)
    register_all_modules()
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    pipeline = Compose([TRANSFORMS.build(step) for step in steps])
    samples = []
    for path in paths:
        if not osp.isfile(path):
            raise FileNotFoundError(f'image not found: {path}')
        try:
            if from_file:
                results = dict(img_path=path)
            else:
                img = _decode(path, in_channels)
                results = dict(
                    img=img, img_shape=img.shape[:2], ori_shape=img.shape[:2])
            packed = pipeline(results)
            if packed is None:
                raise ValueError('the pipeline dropped it')
        except Exception as err:  # any decoder's or transform's failure
            raise ValueError(f'{path}: cannot be read as an image '
                             f'({type(err).__name__}: {err})') from None
        # mmcv decodes colour files as BGR.
        packed['display'] = _display_image(packed['inputs'], bgr=from_file)
        samples.append(packed)
    return samples


# ------------------------------------------------------------------- maps --
def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps' pixels (ties averaged);
    NaN when either map is constant, e.g. switched off by the ReLU."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float('nan')
    return float(spearmanr(a, b).statistic)


def _prediction(logits: torch.Tensor, classes) -> dict:
    probs = logits.float().softmax(dim=-1)
    score, label = probs.max(dim=-1)
    label = int(label)
    name = classes[label] if classes and label < len(classes) else str(label)
    return dict(label=label, score=float(score), name=name)


def _maps_of(models: AttributionModels, data: dict):
    """``(student_map, teacher_map, student_logits, teacher_logits)`` of a
    one-image batch, the maps of the last attribution stage."""
    student, teacher = models.student, models.teacher
    inputs = student.data_preprocessor(data, False)['inputs']
    if teacher is None:
        out = student.attribution_maps(inputs)
        return (out['student'][-1], out['teacher'][-1], out['student_logits'],
                out['teacher_logits'])
    s_maps, s_logits = classifier_attribution_maps(student, inputs)
    # Each network with its own preprocessing (its config's).
    t_inputs = teacher.data_preprocessor(data, False)['inputs']
    t_maps, t_logits = classifier_attribution_maps(teacher, t_inputs)
    t_map = match_map_size(t_maps[-1], s_maps[-1])
    return s_maps[-1], t_map, s_logits, t_logits


def explain_images(models: AttributionModels,
                   paths: Sequence[str]) -> List[ExplainedImage]:
    """Maps, predictions and the maps' rank correlation for each image."""
    in_channels = stem_in_channels(models.student.backbone)
    samples = load_images(models.cfg, paths, in_channels)
    results = []
    for path, sample in zip(paths, samples):
        data = dict(
            inputs=[sample['inputs']], data_samples=[sample['data_samples']])
        s_map, t_map, s_logits, t_logits = _maps_of(models, data)
        s_map = s_map[0].float().cpu().numpy()
        t_map = t_map[0].float().cpu().numpy()
        results.append(
            ExplainedImage(
                path=path,
                image=sample['display'],
                teacher_map=t_map,
                student_map=s_map,
                teacher_pred=_prediction(t_logits[0], models.classes),
                student_pred=_prediction(s_logits[0], models.classes),
                spearman=rank_correlation(t_map, s_map)))
    return results
