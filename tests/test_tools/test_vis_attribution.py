"""tools/visualization/vis_attribution.py and the pieces it is made of.

Tiny networks are built from the repository's configs and saved as
checkpoints here (no training): an RGB CIFAR-stem teacher and a W4A4 copy of
it (a finetune-style pair), and a grey Fashion-MNIST search supernet whose
checkpoint carries its teacher.
"""
import importlib.util
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gmpq_mm.visualization.attribution_grid import (AttributionRow,
                                                    draw_attribution_grid,
                                                    grid_size_px,
                                                    normalize_map,
                                                    upsample_map)
from gmpq_mm.visualization.figure_io import save_figure

TOOL = 'tools/visualization/vis_attribution.py'
DEMO_TEACHER = 'configs/gmpq/demo/pretrain_r18_fashion_mnist.py'
DEMO_SEARCH = 'configs/gmpq/demo/search_r18_fashion_mnist.py'
CLASSES = [f'class{i}' for i in range(10)]


# ------------------------------------------------------------ the drawing --
@pytest.mark.parametrize('src, dst', [((4, 4), (28, 28)), ((3, 5), (7, 4)),
                                      ((1, 1), (5, 6))])
def test_upsample_map_is_torch_bilinear(src, dst):
    amap = np.random.RandomState(0).rand(*src)
    ref = F.interpolate(
        torch.from_numpy(amap)[None, None],
        size=dst,
        mode='bilinear',
        align_corners=False)[0, 0]
    np.testing.assert_allclose(
        upsample_map(amap, dst), ref.numpy(), atol=1e-12)


def test_normalize_map():
    np.testing.assert_allclose(
        normalize_map([[0., 2.], [1., 4.]]), [[0., .5], [.25, 1.]])
    assert not normalize_map(np.zeros((3, 3))).any()  # no 0 / 0


def _panel_pixel(pixels, row, column, fy, fx):
    """RGB of a point of a panel, ``fy, fx`` its fractions from the top
    left (the layout of attribution_grid)."""
    from gmpq_mm.visualization import attribution_grid as grid
    top = grid.HEADER_PX + row * grid.CELL_H_PX + grid.TITLE_PX
    left = column * grid.CELL_W_PX + grid.MARGIN_PX
    return pixels[int(top + fy * grid.PANEL_PX),
                  int(left + fx * grid.PANEL_PX)].astype(int)


def test_grid_layout_and_orientation(tmp_path, png_check):
    hot_top_right = np.zeros((4, 4))
    hot_top_right[0, -1] = 1.0
    black = np.zeros((28, 28), np.uint8)  # the overlay alone gives colour
    rgb = np.random.RandomState(1).rand(32, 32, 3)
    rows = [
        AttributionRow(black, hot_top_right, hot_top_right[::-1], 'grey',
                       'teacher', 'student\nsecond line'),
        AttributionRow(rgb, np.ones((2, 2)), np.zeros((7, 7)), 'rgb', 't', 's')
    ]
    assert grid_size_px(2) == (744, 684)
    out = save_figure(
        draw_attribution_grid(rows, title='maps'), tmp_path / 'grid.png')
    png_check(out, grid_size_px(2))
    with Image.open(out) as image:
        pixels = np.asarray(image.convert('RGB'))
    # jet: red where the map peaks, blue where it is zero; not transposed
    # or flipped on the way to the picture.
    # (column, (y, x) of the hot corner, (y, x) of the opposite one)
    corners = [(1, (.05, .95), (.95, .05)), (2, (.95, .95), (.05, .05))]
    for column, hot, cold in corners:
        red = _panel_pixel(pixels, 0, column, *hot)
        blue = _panel_pixel(pixels, 0, column, *cold)
        assert red[0] > red[2] + 40 and blue[2] > blue[0] + 40, (red, blue)


def test_grid_needs_rows():
    with pytest.raises(ValueError, match='at least one row'):
        draw_attribution_grid([])


# -------------------------------------------------------- tiny networks --
def _save(model, path):
    torch.save(
        dict(
            state_dict=model.state_dict(),
            meta=dict(dataset_meta=dict(classes=CLASSES))), path)
    return path


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, repo_root):
    """Configs, checkpoints and images of the tool runs."""
    from gmpq_mm.apis import load_model
    from gmpq_mm.utils import register_all_modules
    register_all_modules()

    root = tmp_path_factory.mktemp('vis_attribution')
    files = dict(repo_root=repo_root)
    # RGB: a CIFAR-stem teacher and the same network at W4A4.
    files['teacher_cfg'] = root / 'teacher.py'
    files['teacher_cfg'].write_text(
        textwrap.dedent(f'''
        _base_ = ['{repo_root}/configs/gmpq/pretrain_r18_cifar10.py']
        model = dict(backbone=dict(stem_channels=8, base_channels=8),
                     head=dict(in_channels=64))
    '''))
    files['quant_cfg'] = root / 'w4a4.py'
    files['quant_cfg'].write_text(
        textwrap.dedent('''
        _base_ = ['./teacher.py']
        model = dict(backbone=dict(
            _delete_=True, type='QuantizedBackbone', w_bits=4, a_bits=4,
            backbone=dict(type='ResNet_CIFAR', depth=18, stem_channels=8,
                          base_channels=8, out_indices=(3, ),
                          style='pytorch')))
    '''))
    torch.manual_seed(0)
    teacher, _ = load_model(str(files['teacher_cfg']))
    files['teacher_ckpt'] = _save(teacher, root / 'teacher.pth')
    quant, _ = load_model(str(files['quant_cfg']))
    # Finetuned from the teacher, as stage 3 is (quantizer ranges new).
    quant.load_state_dict(teacher.state_dict(), strict=False)
    files['quant_ckpt'] = _save(quant, root / 'w4a4.pth')
    # Grey: the demo search supernet; its state dict holds the teacher.
    grey_teacher, _ = load_model(str(repo_root / DEMO_TEACHER))
    grey_teacher_ckpt = _save(grey_teacher, root / 'grey_teacher.pth')
    search, _ = load_model(
        str(repo_root / DEMO_SEARCH),
        cfg_options={
            'model.teacher': str(repo_root / DEMO_TEACHER),
            'model.teacher_checkpoint': str(grey_teacher_ckpt)
        })
    files['search_ckpt'] = _save(search, root / 'search.pth')
    bare = {
        k: v
        for k, v in search.state_dict().items() if not k.startswith('teacher.')
    }
    files['bare_search_ckpt'] = root / 'search_no_teacher.pth'
    torch.save(dict(state_dict=bare), files['bare_search_ckpt'])
    grey_teacher_ckpt.unlink()  # only the search checkpoint has it now

    rng = np.random.RandomState(0)
    files['rgb'] = []
    for i, colour in enumerate([(230, 25, 75), (0, 130, 200)]):
        noise = rng.randint(-20, 21, (32, 32, 3))
        pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
        files['rgb'].append(root / f'rgb_{i}.png')
        Image.fromarray(pixels).save(files['rgb'][-1])
    yy, xx = np.mgrid[:28, :28]
    files['grey'] = root / 'grey.png'
    blob = 255 * np.exp(-((yy - 10)**2 + (xx - 16)**2) / 30.)
    Image.fromarray(blob.astype(np.uint8)).save(files['grey'])
    files['bad'] = root / 'not_an_image.png'
    files['bad'].write_text('this is text, not a PNG\n')
    return files


def _tool_main(repo_root):
    spec = importlib.util.spec_from_file_location('vis_attribution',
                                                  repo_root / TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _pair_args(tiny, images, out, with_teacher=True):
    """Arguments of a finetune-style run (a W4A4 network, its teacher)."""
    args = [str(tiny['quant_cfg']), str(tiny['quant_ckpt']), '--images']
    args += [str(image) for image in images] + ['--out', str(out)]
    if with_teacher:
        args += ['--teacher-config', str(tiny['teacher_cfg'])]
        args += ['--teacher-checkpoint', str(tiny['teacher_ckpt'])]
    return args


# -------------------------------------------------------------- the tool --
def test_quantized_network_and_its_teacher(tiny, tmp_path, run_in_process,
                                           png_check):
    out = tmp_path / 'pair.png'
    result = run_in_process(
        [TOOL] + _pair_args(tiny, tiny['rgb'], out), timeout=120)
    assert str(out) in result.output
    png_check(out, grid_size_px(2))


def test_search_checkpoint_carries_its_teacher(tiny, tmp_path, capsys,
                                               png_check):
    """Grey images; the config's teacher file is gone, the checkpoint's
    teacher is used. (In-process: the run above covers the command line.)"""
    out = tmp_path / 'search.png'
    _tool_main(tiny['repo_root'])([
        str(tiny['repo_root'] / DEMO_SEARCH),
        str(tiny['search_ckpt']), '--images',
        str(tiny['grey']), '--out',
        str(out), '--cfg-options',
        f'model.teacher_checkpoint={tmp_path}/gone.pth'
    ])
    assert str(out) in capsys.readouterr().out
    png_check(out, grid_size_px(1))


@pytest.mark.parametrize('case', [
    'finetune_no_teacher', 'search_no_teacher', 'undecodable_image',
    'missing_image'
])
def test_bad_input_names_the_file_and_writes_nothing(tiny, tmp_path, case):
    out = tmp_path / 'out' / 'grid.png'
    if case == 'finetune_no_teacher':
        args = _pair_args(tiny, tiny['rgb'], out, with_teacher=False)
        culprit = tiny['quant_ckpt']
    elif case == 'search_no_teacher':
        args = [
            str(tiny['repo_root'] / DEMO_SEARCH),
            str(tiny['bare_search_ckpt']), '--images',
            str(tiny['grey']), '--out',
            str(out), '--cfg-options',
            f'model.teacher_checkpoint={tmp_path}/gone.pth'
        ]
        culprit = tiny['bare_search_ckpt']
    elif case == 'undecodable_image':
        args = _pair_args(tiny, [tiny['rgb'][0], tiny['bad']], out)
        culprit = tiny['bad']
    else:
        culprit = tmp_path / 'missing.png'
        args = _pair_args(tiny, [culprit], out)
    with pytest.raises(SystemExit) as err:
        _tool_main(tiny['repo_root'])(args)
    assert str(culprit) in str(err.value)
    assert str(err.value).startswith('error: ')
    # No picture and no half-written temporary file.
    assert not out.parent.exists() or not any(out.parent.iterdir())


# -------------------------------------------------------------- the glue --
def test_maps_are_the_loss_maps_and_rank_correlate(tiny):
    """The teacher against itself: identical maps, Spearman 1."""
    from gmpq_mm.apis.attribution import (explain_images,
                                          load_attribution_models)
    models = load_attribution_models(
        str(tiny['teacher_cfg']),
        str(tiny['teacher_ckpt']),
        teacher_config=str(tiny['teacher_cfg']),
        teacher_checkpoint=str(tiny['teacher_ckpt']))
    assert models.student_name == 'full precision'
    results = explain_images(models, [str(p) for p in tiny['rgb']])
    for res in results:
        assert res.student_map.shape == (4, 4)
        np.testing.assert_allclose(res.student_map, res.teacher_map)
        assert res.student_pred == res.teacher_pred
        assert res.student_pred['name'] in CLASSES
        if np.ptp(res.student_map) > 0:
            assert res.spearman == pytest.approx(1.0)
        assert res.image.shape == (32, 32, 3)


def test_images_go_through_the_test_pipeline_in_rgb(tiny):
    """A file-loading pipeline (mmcv reads BGR) and an array-dataset one
    show the same RGB picture; a one-channel network gets grey pixels."""
    from mmengine.config import Config

    from gmpq_mm.apis.attribution import load_images

    def cfg(pipeline):
        return Config(
            dict(test_dataloader=dict(dataset=dict(pipeline=pipeline))))

    path = str(tiny['rgb'][0])  # reddish
    with Image.open(path) as image:
        expected = np.asarray(image.convert('RGB'))
    from_file = load_images(
        cfg([dict(type='LoadImageFromFile'),
             dict(type='PackInputs')]), [path])[0]
    from_array = load_images(cfg([dict(type='PackInputs')]), [path])[0]
    np.testing.assert_array_equal(from_file['display'], expected)
    np.testing.assert_array_equal(from_array['display'], expected)
    assert from_file['inputs'][2].float().mean() > \
        from_file['inputs'][0].float().mean()  # BGR to the network
    grey = load_images(cfg([dict(type='PackInputs')]), [path], 1)[0]
    assert tuple(grey['inputs'].shape) == (1, 32, 32)
    assert grey['display'].shape == (32, 32)
