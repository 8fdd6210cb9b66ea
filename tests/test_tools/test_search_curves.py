"""Search curves: what a search logs (scalars.json, per-epoch policies) and
tools/visualization/plot_search_curves.py drawing it.

End to end: a real tiny search (tools/train.py, tiny CIFAR-format data, the
tiny teacher of ``trained_cifar_r18``), its logged expected BitOPs checked
against the model's own ``expected_bitops()`` and against the per-epoch
policies' probabilities, then the tool on its work_dir. Pure: the drawing
and the readers on synthetic files, and every bad input.
"""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_search_configs  # one conftest.py

from gmpq_mm.quantization.policy import make_policy, save_policy
from gmpq_mm.visualization.figure_io import save_figure
from gmpq_mm.visualization.search_curves import (draw_search_curves,
                                                 probability_table,
                                                 search_curves_figure_size,
                                                 select_layers)
from gmpq_mm.visualization.search_history import (load_search_history,
                                                  load_train_scalars,
                                                  read_scalars)

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / 'tools' / 'visualization' / 'plot_search_curves.py'
SEARCH_CONFIG = 'configs/gmpq/search_r18_cifar10.py'
SINGLE_CONFIG = 'configs/gmpq/search_r18_cifar10_single.py'
CANDIDATES = [2, 3, 4, 6]
# 19 searched convs of ResNet-18: 5 columns x 4 rows of layer panels; the
# figure is 15 in wide and 1.1 + 2.9 + 0.8 + 4 * 1.55 + 0.35 = 11.35 in
# tall.
R18_PNG_SIZE = (1500, 1135)


def _tool():
    spec = importlib.util.spec_from_file_location('plot_search_curves', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_search_config(tmp_path,
                        data_root,
                        teacher_ckpt,
                        base=SEARCH_CONFIG,
                        extra=''):
    return write_search_configs(
        tmp_path, ROOT, data_root, teacher_ckpt, base=base, extra_text=extra)


def documented_tensorboard_block(repo_root):
    """The commented-out TensorBoard ``visualizer`` of
    configs/gmpq/_base_/default_runtime.py, uncommented."""
    lines = (
        repo_root /
        'configs/gmpq/_base_/default_runtime.py').read_text().splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith('# visualizer = '))
    block = [lines[start]]
    block += [
        line for line in lines[start + 1:start + 4]
        if line.startswith('#     ')
    ]
    return '\n'.join(line[2:] for line in block)


def expected_gbitops_of(policy):
    """``sum_l MACs_l E[b_w] E[b_a]`` from a policy's probabilities, in
    GBitOPs: the search's expected BitOPs recomputed by hand."""
    total = 0.
    for name, probs in policy['probabilities'].items():
        e_w = float(np.dot(probs['w'], policy['w_candidates']))
        e_a = float(np.dot(probs['a'], policy['a_candidates']))
        total += policy['layer_macs'][name] * e_w * e_a
    return total / 1e9


def train_lines(work_dir):
    """The training lines of the one run's vis_data/scalars.json."""
    found = sorted(Path(work_dir).glob('*/vis_data/scalars.json'))
    assert len(found) == 1, found
    lines = [json.loads(line) for line in found[0].read_text().splitlines()]
    return [r for r in lines if 'expected_gbitops' in r]


@pytest.fixture(scope='module')
def teacher_ckpt(trained_cifar_r18):
    return trained_cifar_r18 / 'epoch_2.pth'


# ------------------------------------------------------------ end to end --
def test_search_logs_curves_and_tool_plots_them(tmp_path, tiny_search,
                                                run_in_process, png_check):
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from gmpq_mm.registry import MODELS
    from gmpq_mm.utils import register_all_modules
    register_all_modules()

    # The session's tiny search: write_search_config's defaults, 2 epochs.
    cfg, work = tiny_search.config, tiny_search.work_dir

    # Bilevel split of 40 images: 20 for the weights, batch 4 -> 5
    # iterations an epoch, each logged (interval 1).
    lines = train_lines(work)
    assert [r['step'] for r in lines] == list(range(1, 11))
    assert [r['epoch'] for r in lines] == [1] * 5 + [2] * 5
    for key in ('mean_w_bits', 'mean_a_bits'):
        assert all(2 <= r[key] <= 6 for r in lines), key

    # Per-epoch policies: probabilities of every layer and kind sum to 1.
    policies = {
        e: json.loads((work / f'policy_epoch_{e}.json').read_text())
        for e in (1, 2)
    }
    for epoch, policy in policies.items():
        probs = policy['probabilities']
        assert list(probs) == list(policy['layers'])
        for name, entry in probs.items():
            for kind in ('w', 'a'):
                assert len(entry[kind]) == len(CANDIDATES)
                assert sum(entry[kind]) == pytest.approx(
                    1, abs=1e-5), (epoch, name, kind)
        # Bilevel: each line is logged by the weight step, after that
        # iteration's alpha step, so the last line of an epoch holds the
        # alphas the epoch's policy file was written from.
        last = [r for r in lines if r['epoch'] == epoch][-1]
        assert last['expected_gbitops'] == pytest.approx(
            expected_gbitops_of(policy), rel=1e-4), epoch
    assert policies[1]['probabilities'] != policies[2]['probabilities']

    # ... and the model's own expected BitOPs at the end, from the
    # checkpoint.
    init_default_scope('mmpretrain')
    model = MODELS.build(Config.fromfile(cfg).model)
    state = torch.load(
        work / 'epoch_2.pth', map_location='cpu',
        weights_only=False)['state_dict']
    model.load_state_dict(state)
    with torch.no_grad():
        end = float(model.expected_bitops()) / 1e9
    assert lines[-1]['expected_gbitops'] == pytest.approx(end, rel=1e-6)

    png = tmp_path / 'curves.png'
    out = run_in_process([TOOL, work, '--out', png]).output
    assert 'policies: 2 epoch files (epochs 1..2)' in out
    assert 'scalars: 10 training lines, iterations 1..10, from 1 run(s)' \
        in out
    assert 'no probabilities' not in out
    png_check(png, R18_PNG_SIZE)
    assert [p.name for p in tmp_path.iterdir()
            if p.suffix == '.png'] == ['curves.png']


def test_single_level_logs_the_bitops_before_its_step(tmp_path, cifar10_root,
                                                      teacher_ckpt,
                                                      run_in_process):
    cfg = write_search_config(
        tmp_path, cifar10_root, teacher_ckpt, base=SINGLE_CONFIG)
    work = tmp_path / 'work'
    run_in_process([
        'tools/train.py', cfg, '--work-dir', work, '--cfg-options',
        'train_cfg.max_epochs=1'
    ])
    lines = train_lines(work)
    # Single level: the whole 40 images, batch 4 -> 10 iterations.
    assert [r['step'] for r in lines] == list(range(1, 11))
    policy = json.loads((work / 'policy_epoch_1.json').read_text())
    # The first forward precedes every step: the alphas are all equal, so
    # each layer expects the plain mean of its candidates.
    uniform = sum(policy['layer_macs'].values()) * np.mean(CANDIDATES)**2
    assert lines[0]['expected_gbitops'] == pytest.approx(
        uniform / 1e9, rel=1e-6)
    assert lines[0]['mean_w_bits'] == pytest.approx(np.mean(CANDIDATES))
    assert lines[-1]['expected_gbitops'] != lines[0]['expected_gbitops']


def test_tensorboard_recipe_gets_the_search_scalars(tmp_path, cifar10_root,
                                                    teacher_ckpt,
                                                    run_in_process, repo_root):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import \
        EventAccumulator

    block = documented_tensorboard_block(repo_root)
    assert 'TensorboardVisBackend' in block and 'LocalVisBackend' in block
    cfg = write_search_config(
        tmp_path, cifar10_root, teacher_ckpt, extra=block)
    work = tmp_path / 'work'
    run_in_process([
        'tools/train.py', cfg, '--work-dir', work, '--cfg-options',
        'train_cfg.max_epochs=1'
    ])
    lines = train_lines(work)  # LocalVisBackend still writes
    events = EventAccumulator(str(next(work.glob('*/vis_data')))).Reload()
    for key in ('expected_gbitops', 'mean_w_bits', 'mean_a_bits'):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [r['step'] for r in lines], key
        assert [e.value
                for e in logged] == pytest.approx([r[key] for r in lines],
                                                  rel=1e-6), key


# ------------------------------------------------------- synthetic data --
LAYERS = ['layer1.0.conv1', 'layer1.0.conv2', 'layer2.0.downsample.0']
MACS = {
    'layer1.0.conv1': 1000,
    'layer1.0.conv2': 1000,
    'layer2.0.downsample.0': 250
}


def synthetic_policy(epoch,
                     n_epochs=3,
                     probabilities=True,
                     layers=LAYERS,
                     budget=None):
    """A policy whose layers drift from uniform towards 2 (w) / 4 (a)
    bits as ``epoch`` goes from 0 to ``n_epochs``."""
    probs = {}
    for i, name in enumerate(layers):
        # Later layers of a triple drift faster.
        t = min(1.0, epoch / n_epochs * (1 + 0.25 * (i % 3)))
        w = np.array(
            [0.25 + 0.45 * t, 0.25 - 0.05 * t, 0.25 - 0.2 * t, 0.25 - 0.2 * t])
        a = np.array(
            [0.25 - 0.2 * t, 0.25 - 0.2 * t, 0.25 + 0.5 * t, 0.25 - 0.1 * t])
        probs[name] = {
            'w': [round(float(p), 6) for p in w],
            'a': [round(float(p), 6) for p in a]
        }
    chosen = {
        n: (CANDIDATES[int(np.argmax(p['w']))],
            CANDIDATES[int(np.argmax(p['a']))])
        for n, p in probs.items()
    }
    macs = {n: MACS.get(n, 500) for n in layers}
    # Files written before the probabilities were exported lack the key.
    extra = dict(probabilities=probs) if probabilities else {}
    return make_policy(
        chosen,
        w_candidates=CANDIDATES,
        a_candidates=CANDIDATES,
        input_shape=[3, 32, 32],
        bitops=sum(macs[n] * w * a for n, (w, a) in chosen.items()),
        budget=budget,
        layer_macs=macs,
        layer_params={n: 100
                      for n in layers},
        epoch=epoch,
        **extra)


def scalar_line(step, epoch, gbitops):
    return {
        'loss': 1.0,
        'expected_gbitops': gbitops,
        'mean_w_bits': 3.5,
        'mean_a_bits': 3.6,
        'epoch': epoch,
        'iter': step,
        'step': step
    }


def write_work_dir(root, epochs=(1, 2, 3), runs=None, **policy_kwargs):
    """Per-epoch policy files and, per run ``(timestamp, lines)``, a
    ``<timestamp>/vis_data/scalars.json``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
        save_policy(
            synthetic_policy(epoch, len(epochs), **policy_kwargs),
            root / f'policy_epoch_{epoch}.json')
    for stamp, lines in runs or []:
        folder = root / stamp / 'vis_data'
        folder.mkdir(parents=True)
        (folder / 'scalars.json').write_text(''.join(
            json.dumps(line) + '\n' for line in lines))
    return root


def test_probability_table_and_one_hot_fallback():
    policies = [synthetic_policy(e) for e in (1, 2, 3)]
    table = probability_table(policies, 'layer1.0.conv1', 'w')
    assert table.shape == (3, 4)
    assert table[:, 0] == pytest.approx([0.4, 0.55, 0.7])
    old = [synthetic_policy(e, probabilities=False) for e in (1, 2)]
    assert 'probabilities' not in old[0]
    one_hot = probability_table(old, 'layer1.0.conv1', 'a')
    chosen = CANDIDATES.index(old[0]['layers']['layer1.0.conv1']['a_bits'])
    assert one_hot[0].tolist() == [float(i == chosen) for i in range(4)]


def test_select_layers_by_name_and_pattern():
    assert select_layers(LAYERS, None) == LAYERS
    assert select_layers(LAYERS, ['layer2.*', 'layer1.0.conv1']) == [
        'layer1.0.conv1', 'layer2.0.downsample.0'
    ]
    with pytest.raises(ValueError, match=r"\['layer9\*'\].*layer1.0.conv1"):
        select_layers(LAYERS, ['layer9*'])


@pytest.mark.parametrize('n_epochs, with_scalars, n_layers', [
    (3, True, 3),
    (1, True, 1),
    (1, False, 3),
    (25, False, 20),
])
def test_draw_search_curves(tmp_path, png_check, n_epochs, with_scalars,
                            n_layers):
    layers = [f'layer{i // 4 + 1}.{i % 4}.conv' for i in range(n_layers)]
    epochs = list(range(1, n_epochs + 1))
    policies = [
        synthetic_policy(e, n_epochs, layers=layers, budget=6000)
        for e in epochs
    ]
    scalars = [
        scalar_line(s, (s - 1) // 4 + 1, 1e-5 - 1e-7 * s)
        for s in range(1, 4 * n_epochs + 1)
    ] if with_scalars else []
    fig = draw_search_curves(epochs, policies, scalars, title='synthetic')
    width, height = search_curves_figure_size(n_layers)
    path = save_figure(fig, tmp_path / 'c.png')
    png_check(path, (round(width * 100), round(height * 100)))


def test_figure_size_grows_with_the_layers():
    assert search_curves_figure_size(19) == pytest.approx((15, 11.35))
    assert search_curves_figure_size(1)[1] < search_curves_figure_size(19)[1]
    # ResNet-50's 53 searched convs: 6 columns, 9 rows.
    assert search_curves_figure_size(53)[1] == pytest.approx(1.1 + 2.9 + 0.8 +
                                                             9 * 1.55 + 0.35)


def test_tool_on_a_work_dir_without_scalars(tmp_path, png_check, capsys):
    work = write_work_dir(tmp_path / 'work', epochs=(1, ))
    assert _tool().main([str(work), '--layers', 'layer1.*']) == 0
    assert 'scalars: none under' in capsys.readouterr().out
    png_check(work / 'search_curves.png',
              (round(100 * search_curves_figure_size(2)[0]),
               round(100 * search_curves_figure_size(2)[1])))


def test_resumed_runs_replace_the_steps_they_repeat(tmp_path):
    first = [scalar_line(s, (s - 1) // 4 + 1, 1.0) for s in range(1, 8)]
    # Resumed from the epoch-1 checkpoint: steps 5.. again.
    resumed = [scalar_line(s, (s - 1) // 4 + 1, 2.0) for s in range(5, 13)]
    val = {'accuracy/top1': 10.0, 'step': 3}
    work = write_work_dir(
        tmp_path / 'w',
        runs=[('20250102_000000', resumed), ('20250101_000000', first + [val]),
              ('20250103_000000', [val])])  # a test run: no training lines
    records, files = load_train_scalars(str(work))
    assert [r['step'] for r in records] == list(range(1, 13))
    assert [r['expected_gbitops'] for r in records] == [1.0] * 4 + [2.0] * 8
    assert [Path(f).parts[-3]
            for f in files] == ['20250101_000000', '20250102_000000']
    history = load_search_history(work)
    assert history.epochs == [1, 2, 3] and len(history.scalars) == 12


def test_policy_files_sort_by_epoch_number(tmp_path):
    work = write_work_dir(tmp_path / 'w', epochs=(1, 2, 10))
    (work / 'policy.json').write_text('not even JSON')  # not per-epoch
    history = load_search_history(work)
    assert history.epochs == [1, 2, 10]
    assert [p['epoch'] for p in history.policies] == [1, 2, 10]


def test_cut_short_last_scalars_line_is_skipped(tmp_path):
    path = tmp_path / 'scalars.json'
    path.write_text(json.dumps(scalar_line(1, 1, 1.0)) + '\n{"loss": 1.')
    with pytest.warns(UserWarning, match='line 2 is cut short'):
        assert len(read_scalars(str(path))) == 1
    path.write_text('{"loss": 1.\n' + json.dumps(scalar_line(1, 1, 1.0)))
    with pytest.raises(ValueError, match=f'{path}: line 1 is not JSON'):
        read_scalars(str(path))


# ---------------------------------------------------------- bad input --
def _bad_input(tool, work, capsys, out):
    assert tool.main([str(work), '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.suffix == '.png']
    return err


def test_work_dir_without_epoch_policies(tmp_path, capsys):
    work = tmp_path / 'empty'
    work.mkdir()
    err = _bad_input(_tool(), work, capsys, tmp_path / 'out' / 'c.png')
    assert str(work) in err and 'policy_epoch_<N>.json' in err
    assert 'PolicyExportHook' in err
    err = _bad_input(_tool(), tmp_path / 'nowhere', capsys, tmp_path / 'c.png')
    assert f'work_dir not found: {tmp_path / "nowhere"}' in err


@pytest.mark.parametrize('damage, message', [
    ('{"format": "gmpq-policy", "version": 1, "layers": {', 'malformed JSON'),
    ('[]', 'must be a JSON object'),
])
def test_malformed_epoch_policy_is_named(tmp_path, capsys, damage, message):
    work = write_work_dir(tmp_path / 'w')
    bad = work / 'policy_epoch_2.json'
    bad.write_text(damage)
    err = _bad_input(_tool(), work, capsys, tmp_path / 'w' / 'c.png')
    assert f'{bad}: ' in err and message in err


def test_probabilities_that_do_not_sum_to_one(tmp_path, capsys):
    work = write_work_dir(tmp_path / 'w')
    bad = work / 'policy_epoch_3.json'
    policy = json.loads(bad.read_text())
    policy['probabilities']['layer1.0.conv2']['a'] = [0.5, 0.5, 0.5, 0.0]
    bad.write_text(json.dumps(policy))
    err = _bad_input(_tool(), work, capsys, tmp_path / 'c.png')
    assert f"{bad}: probabilities[layer1.0.conv2]['a'] sum to 1.5" in err


@pytest.mark.parametrize('change, what', [
    (dict(layers=LAYERS[:2]), 'other layers'),
    (dict(layers=LAYERS[::-1]), 'another order'),
])
def test_policies_of_different_networks_are_refused(tmp_path, capsys, change,
                                                    what):
    work = write_work_dir(tmp_path / 'w', epochs=(1, 2))
    other = work / 'policy_epoch_3.json'
    save_policy(synthetic_policy(3, **change), other)
    err = _bad_input(_tool(), work, capsys, tmp_path / 'c.png')
    assert f'{other}: not the network of {work / "policy_epoch_1.json"}' \
        in err and what in err


def test_other_macs_or_input_shape_are_refused(tmp_path, capsys):
    work = write_work_dir(tmp_path / 'w', epochs=(1, 2))
    for key, value in (('layer_macs', None), ('input_shape', [3, 64, 64])):
        other = work / 'policy_epoch_2.json'
        policy = synthetic_policy(2)
        if key == 'layer_macs':
            value = {n: 2 * m for n, m in policy['layer_macs'].items()}
        policy[key] = value
        save_policy(policy, other)
        err = _bad_input(_tool(), work, capsys, tmp_path / 'c.png')
        assert f'{other}: not the network of' in err and key in err


def test_unknown_layer_pattern_writes_nothing(tmp_path, capsys):
    work = write_work_dir(tmp_path / 'w')
    out = tmp_path / 'c.png'
    assert _tool().main([str(work), '--out',
                         str(out), '--layers', 'stem*']) == 1
    assert "['stem*']" in capsys.readouterr().err and not out.exists()


def test_tool_leaves_only_the_png(tmp_path):
    # save_figure's temporary file does not outlive the save.
    work = write_work_dir(tmp_path / 'w', epochs=(1, ))
    assert _tool().main([str(work)]) == 0
    assert sorted(
        os.listdir(work)) == ['policy_epoch_1.json', 'search_curves.png']


def test_figure_sizes_are_whole_pixels():
    """Inch sizes that sum to a fractional pixel (669.999...) would be cut
    to 669 by matplotlib 3.8 and rounded to 670 by newer releases."""
    from gmpq_mm.visualization.figure_io import whole_pixels
    from gmpq_mm.visualization.policy_plot import policy_figure_size
    inches = 1.1 + 2.9 + 0.8 + 1.55 + 0.35
    assert int(inches * 100) == 669  # the trap itself
    assert int(whole_pixels(inches) * 100) == 670
    assert round(whole_pixels(inches) * 100) == 670
    assert whole_pixels(6.5) == 6.5
    for n in range(1, 120):
        for size in (search_curves_figure_size(n)[1],
                     policy_figure_size(n)[0]):
            assert int(size * 100) == round(size * 100), (n, size)
