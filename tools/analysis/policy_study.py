"""Does the GMPQ search beat chance? A seeded study at equal BitOPs.

On the Fashion-MNIST subset shipped in ``data_demo/`` this runs, in one
process (or a few worker processes), every run of the comparison:

1. FP teachers of the slim ResNet-18: all 10 classes, classes 0-4 ("A") and
   classes 5-9 ("B"), each trained from scratch and tested.
2. At each BitOPs budget (midway between uniform WkAk and W(k+1)A(k+1)),
   met exactly through ``target_bitops``: the GMPQ search (attribution on)
   and the same search with ``aw = 0`` (EdMIPS-style), in-domain (search on
   all classes) and for transfer (search on A against the A teacher). With
   the complexity loss against the budget (``cd_mode='budget'``, the
   ``full`` preset) each budget has its own search; with the released,
   budget-blind loss one search per method is exported at every budget.
3. Every policy -- the two searched ones, uniform W2A2/W3A3/W4A4, and
   ``n_random`` random policies drawn over the whole candidate space with
   BitOPs in ``[0.98, 1] x budget`` -- finetuned from the same FP weights
   with each seed and tested: in-domain on all classes, transfer on B from
   the B teacher.

Each finished run writes ``WORK_DIR/runs/<name>/result.json``; a rerun skips
it (resume). Seeds fix every run, and on CPU each worker runs one thread, so
the figures do not depend on ``--workers``. At the end (and with
``--report-only`` from whatever has finished) it writes ``study.md`` (mean,
std and min-max of top-1 per policy; the entropy of each search's final
candidate probabilities) and ``study.png`` (top-1 vs BitOPs, error bars).

Usage::

    python tools/analysis/policy_study.py full --work-dir work_dirs/study
    python tools/analysis/policy_study.py tiny --work-dir /tmp/s --workers 1
"""
import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import os.path as osp
import time

import numpy as np

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = osp.join(REPO, 'configs', 'gmpq', 'demo')
DATA = osp.join(REPO, 'data_demo', 'fashion_mnist_subset')
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
           'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
SPLITS = {'all': tuple(range(10)), 'a': (0, 1, 2, 3, 4), 'b': (5, 6, 7, 8, 9)}
# setting -> (search data/teacher, finetune data/teacher)
SETTINGS = {'in_domain': ('all', 'all'), 'transfer': ('a', 'b')}

# The CPU-sized study (see docs/user_guides/policy_study.md for why).
FULL = dict(
    resolution=16,
    train_limit=None,
    test_limit=None,
    batch_size=64,
    seeds=[0, 1, 2, 3, 4],
    n_random=5,
    budgets=[2, 3],  # k: midway between WkAk and W(k+1)A(k+1)
    uniform=[2, 3],
    teacher=dict(epochs=8, lr=0.1),
    search=dict(
        epochs=3,
        arch_warmup_epochs=1,
        mode='bilevel',
        arch_optimizer=dict(
            type='Adam', lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3),
        weights_lr=0.05,
        aw=40.0,
        # the complexity loss against the budget: relu(C / B - 1) ** 2
        cd_mode='budget',
        cd=1.0,
        # softmax temperature 1 -> 0.1 over the alpha steps
        temperature=dict(start=1.0, end=0.1),
        # the supernet starts from the FP teacher's weights
        init_from_teacher=True,
        attribution_stages=[2, 3]),
    # every finetune: three epochs over (at most) 2,500 training images,
    # ranges calibrated on 16 batches. One epoch from one batch (the first
    # two studies' finetune, preset `full_1epoch_finetune`) left a seed std
    # of 0.7-3.7 points per policy in a 5-seed check, this one 0.3-0.7
    # (docs: policy_study.md, "Seed noise").
    finetune=dict(
        epochs=dict(in_domain=3, transfer=3), lr=0.01, train_images=2500),
    calibration_batches=16,
    calibration_bins=256)
# The search settings of the first study (the released code's search with
# Adam on the alphas): probabilities stay near uniform at this size.
RELEASED_SEARCH = dict(
    epochs=3,
    arch_warmup_epochs=1,
    mode='bilevel',
    arch_optimizer=dict(
        type='Adam', lr=0.01, betas=(0.5, 0.999), weight_decay=1e-3),
    weights_lr=0.05,
    aw=40.0,
    cd=3e-4,
    attribution_stages=[2, 3])
# The finetune of the first two studies: one epoch, ranges from one batch.
SHORT_FINETUNE = dict(
    seeds=[0, 1, 2],
    finetune=dict(
        epochs=dict(in_domain=1, transfer=1), lr=0.01, train_images=2500),
    calibration_batches=1)
PRESETS = dict(
    full=FULL,
    # The second study as it ran: today's search, the one-epoch finetune.
    full_1epoch_finetune=dict(FULL, **SHORT_FINETUNE),
    # The same study with the first study's search settings.
    full_released_search=dict(FULL, search=RELEASED_SEARCH),
    # The full study's first budget with a longer search (8 epochs, 1 of
    # them warm-up): does a search that runs longer leave uniform and win?
    # Run it in-domain next to a finished `full` study (copy its teacher
    # and fixed-policy finetunes: same seeds, same runs).
    long_search=dict(
        FULL, budgets=[2], search=dict(RELEASED_SEARCH, epochs=8)),
    # For tests: a few iterations of every kind of run (counts below the
    # study's minimum: it checks the machinery, not the method).
    tiny=dict(
        FULL,
        train_limit=32,
        test_limit=20,
        batch_size=16,
        seeds=[0],
        n_random=1,
        budgets=[2],
        uniform=[2],
        teacher=dict(epochs=1, lr=0.1),
        search=dict(FULL['search'], epochs=2, arch_warmup_epochs=1),
        finetune=dict(
            epochs=dict(in_domain=1, transfer=1), lr=0.01, train_images=24),
        calibration_batches=1,
        calibration_bins=64))


# ------------------------------------------------------------------ data --
def write_split(out_dir, split, resolution, train_limit, test_limit):
    """IDX files of one class split, resized, labels renumbered from 0."""
    import torch
    import torch.nn.functional as F
    from mmpretrain.datasets.mnist import read_image_file, read_label_file

    os.makedirs(out_dir, exist_ok=True)
    keep = SPLITS[split]
    for prefix, limit in (('train', train_limit), ('t10k', test_limit)):
        images = read_image_file(osp.join(DATA, f'{prefix}-images-idx3-ubyte'))
        labels = read_label_file(osp.join(DATA, f'{prefix}-labels-idx1-ubyte'))
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for c in keep:
            mask |= labels == c
        images, labels = images[mask], labels[mask] - keep[0]
        if limit:
            images, labels = images[:limit], labels[:limit]
        if resolution != images.shape[-1]:
            images = F.interpolate(
                images[:, None].float(),
                size=(resolution, resolution),
                mode='bilinear',
                antialias=True,
                align_corners=False)[:, 0].round().clamp(0, 255).byte()
        n, h, w = images.shape
        with open(osp.join(out_dir, f'{prefix}-images-idx3-ubyte'), 'wb') as f:
            f.write((2051).to_bytes(4, 'big') + n.to_bytes(4, 'big') +
                    h.to_bytes(4, 'big') + w.to_bytes(4, 'big'))
            f.write(images.numpy().tobytes())
        with open(osp.join(out_dir, f'{prefix}-labels-idx1-ubyte'), 'wb') as f:
            f.write((2049).to_bytes(4, 'big') + n.to_bytes(4, 'big'))
            f.write(labels.numpy().astype(np.uint8).tobytes())


# --------------------------------------------------------------- configs --
_BASE = {}


def base_config(name):
    from mmengine.config import Config
    if name not in _BASE:
        cfg = Config.fromfile(osp.join(DEMO, f'{name}_r18_fashion_mnist.py'))
        # No yapf formatting of the config text: mmengine formats it five
        # times per Runner (log, dump, visualizer, ...), which took 40 of
        # the 46 s of a tiny finetune; the dumped config stays valid Python.
        # (fromfile drops format_python_code for plain configs, so rebuild.)
        _BASE[name] = Config(
            cfg.to_dict(), filename=cfg.filename, format_python_code=False)
    return copy.deepcopy(_BASE[name])


def with_data(cfg, study, split):
    root = osp.join(study['work_dir'], 'data', split)
    res, n = study['resolution'], len(SPLITS[split])
    meta = dict(classes=[CLASSES[c] for c in SPLITS[split]])
    train = cfg.train_dataloader
    train.batch_size = study['batch_size']
    train.dataset.data_root = root
    train.dataset.metainfo = meta
    train.dataset.pipeline = [
        dict(type='RandomCrop', crop_size=res, padding=2),
        dict(type='RandomFlip', prob=0.5, direction='horizontal'),
        dict(type='PackInputs')
    ]
    test = copy.deepcopy(cfg.test_dataloader)
    test.dataset.data_root = root
    test.dataset.metainfo = meta
    cfg.test_dataloader = test
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.data_preprocessor.num_classes = n
    cfg.model.head.num_classes = n
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1000)
    cfg.default_hooks.checkpoint = None
    cfg.custom_hooks = [
        h for h in cfg.get('custom_hooks', [])
        if h['type'] != 'PolicyExportHook'
    ]
    for hook in cfg.custom_hooks:
        if hook['type'] == 'CalibrationHook':
            # fewer histogram bins: the threshold search is the slowest part
            # of a short finetune on CPU
            hook['bins'] = study['calibration_bins']
            hook['num_batches'] = study['calibration_batches']
    cfg.log_level = 'WARNING'
    cfg.launcher = 'none'
    cfg.env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
    return cfg


def teacher_model(study, split, out_indices=(3, )):
    cfg = base_config('pretrain').model.to_dict()
    cfg['backbone']['out_indices'] = tuple(out_indices)
    cfg['head']['num_classes'] = len(SPLITS[split])
    return cfg


def run_runner(cfg, name, work_dir, seed, test=True):
    from mmengine.runner import Runner
    cfg.work_dir = work_dir
    cfg.experiment_name = name
    cfg.randomness = dict(seed=seed)
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test() if test else None
    return runner, metrics


# ------------------------------------------------------------------ runs --
def run_teacher(study, split):
    t = study['teacher']
    cfg = with_data(base_config('pretrain'), study, split)
    cfg.optim_wrapper.optimizer.lr = t['lr']
    cfg.param_scheduler = dict(
        type='CosineAnnealingLR', T_max=t['epochs'], by_epoch=True)
    cfg.train_cfg = dict(by_epoch=True, max_epochs=t['epochs'])
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', interval=t['epochs'], save_last=False)
    work = osp.join(study['work_dir'], 'runs', f'teacher_{split}')
    _, metrics = run_runner(cfg, f'teacher_{split}', work, 0)
    return dict(
        top1=metrics['accuracy/top1'],
        checkpoint=osp.join(work, f"epoch_{t['epochs']}.pth"))


def normalised_entropy(policy):
    """Mean over layers and over w/a of H(p) / log K (1 = uniform)."""
    values = []
    for probs in policy['probabilities'].values():
        for key in ('w', 'a'):
            p = np.asarray(probs[key], dtype=np.float64)
            k = len(p)
            p = p[p > 0]
            values.append(float(-(p * np.log(p)).sum() / math.log(k)))
    return float(np.mean(values))


def search_config(study, setting, method, budget):
    """The search's config: the demo search on the setting's search split,
    against its teacher, with the study's search settings."""
    s = study['search']
    split = SETTINGS[setting][0]
    teacher = read_result(study, f'teacher_{split}')
    stages = s['attribution_stages']
    out_indices = tuple(sorted({3, *(st % 4 for st in stages)})) \
        if stages else (3, )
    cfg = with_data(base_config('search'), study, split)
    model = cfg.model
    model.backbone.backbone.out_indices = out_indices
    model.teacher = teacher_model(study, split, out_indices)
    model.teacher_checkpoint = teacher['checkpoint']
    model.input_shape = (1, study['resolution'], study['resolution'])
    model.target_bitops = budget
    # the searched policies spend the budget like the random ones do
    model.target_bitops_tolerance = 0.02
    model.attribution_stages = list(range(len(out_indices))) \
        if stages else None
    model.attribution_loss.loss_weight = s['aw'] if method == 'gmpq' else 0.
    model.complexity_loss.loss_weight = s['cd']
    model.complexity_loss.mode = s.get('cd_mode', 'reference')
    model.init_from_teacher = s.get('init_from_teacher', False)
    cfg.optim_wrapper.weights.optimizer.lr = s['weights_lr']
    cfg.optim_wrapper.arch.optimizer = dict(s['arch_optimizer'])
    cfg.param_scheduler = dict(
        weights=[
            dict(type='CosineAnnealingLR', T_max=s['epochs'], by_epoch=True)
        ],
        arch=[dict(type='ConstantLR', factor=1.0, by_epoch=True)])
    cfg.train_cfg = dict(
        type='SearchLoop',
        mode=s['mode'],
        max_epochs=s['epochs'],
        arch_warmup_epochs=s['arch_warmup_epochs'],
        temperature=s.get('temperature'))
    return cfg


def budget_aware(study):
    """True when the search's loss depends on the budget (``cd_mode``
    ``'budget'``): then every budget needs its own search."""
    return study['search'].get('cd_mode', 'reference') == 'budget'


def run_search(study, setting, method, budgets):
    """Search once and export the policy at each of ``budgets`` (``{k:
    BitOPs}``). Each export lands in ``runs/search_<setting>_b<k>_<method>/``
    with its own ``result.json``; with a single budget that is this run's
    own folder."""
    from gmpq_mm.quantization.policy import save_policy
    first = min(budgets)
    cfg = search_config(study, setting, method, budgets[first])
    name = search_name(setting, method, budgets, study)
    work = osp.join(study['work_dir'], 'runs', name)
    runner, _ = run_runner(cfg, name, work, 0, test=False)
    model = runner.model
    out = {}
    for k, budget in sorted(budgets.items()):
        export = f'search_{setting}_b{k}_{method}'
        model.target_bitops = budget
        policy = model.current_policy(source=export)
        folder = osp.join(study['work_dir'], 'runs', export)
        os.makedirs(folder, exist_ok=True)
        path = save_policy(policy, osp.join(folder, 'policy.json'))
        out[k] = dict(
            policy=path,
            bitops=policy['bitops'],
            budget=budget,
            entropy=normalised_entropy(policy),
            search=name)
    if len(budgets) == 1:
        return out[first]
    for k, result in out.items():
        write_result(study, f'search_{setting}_b{k}_{method}', result)
    return dict(exports=sorted(out))


def search_name(setting, method, budgets, study):
    if len(budgets) == 1:
        return f'search_{setting}_b{next(iter(budgets))}_{method}'
    return f'search_{setting}_{method}'


def run_finetune(study, setting, policy_name, policy_path, seed):
    split = SETTINGS[setting][1]
    f = study['finetune']
    epochs = f['epochs'][setting]
    cfg = with_data(base_config('finetune'), study, split)
    cfg.model.backbone.policy = policy_path
    cfg.load_from = read_result(study, f'teacher_{split}')['checkpoint']
    cfg.optim_wrapper.optimizer.lr = f['lr']
    cfg.param_scheduler = dict(
        type='CosineAnnealingLR', T_max=epochs, by_epoch=True)
    cfg.train_cfg = dict(by_epoch=True, max_epochs=epochs)
    if f.get('train_images'):
        # the first N images of the split (mmengine's ``indices``)
        cfg.train_dataloader.dataset.indices = f['train_images']
    name = f'ft_{setting}_{policy_name}_s{seed}'
    work = osp.join(study['work_dir'], 'runs', name)
    _, metrics = run_runner(cfg, name, work, seed)
    return dict(top1=metrics['accuracy/top1'])


KINDS = dict(teacher=run_teacher, search=run_search, finetune=run_finetune)


def result_path(study, name):
    return osp.join(study['work_dir'], 'runs', name, 'result.json')


def read_result(study, name):
    with open(result_path(study, name)) as f:
        return json.load(f)


def execute(task):
    """Run one task in this process unless its result exists."""
    study, name, kind, args = task
    path = result_path(study, name)
    if osp.isfile(path):
        return name, 'skipped', 0.0
    start = time.time()
    result = KINDS[kind](study, *args)
    result.update(name=name, seconds=round(time.time() - start, 1))
    write_result(study, name, result)
    return name, 'done', result['seconds']


def write_result(study, name, result):
    path = result_path(study, name)
    os.makedirs(osp.dirname(path), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def init_worker(threads):
    import torch
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    import warnings
    warnings.filterwarnings('ignore')
    import logging

    from mmengine.logging import MMLogger
    MMLogger.get_instance('mmengine').setLevel(logging.WARNING)


# ------------------------------------------------------------- policies --
def layer_macs(study):
    from gmpq_mm.quantization.complexity import count_macs
    from gmpq_mm.quantization.layers import is_mixed_layer
    from gmpq_mm.registry import MODELS
    backbone = MODELS.build(base_config('search').model.backbone.to_dict())
    shape = (1, study['resolution'], study['resolution'])
    macs = count_macs(backbone, shape)
    return {
        n: int(macs[n].macs)
        for n, m in backbone.named_modules() if is_mixed_layer(m)
    }, backbone


def write_policies(study):
    """Uniform and random policies (deterministic) -> ``{name: path}``."""
    from gmpq_mm.quantization.budget import (policy_cost,
                                             random_policy_near_budget)
    from gmpq_mm.quantization.policy import make_policy, save_policy
    macs, backbone = layer_macs(study)
    first = next(m for m in backbone.modules() if hasattr(m, 'w_candidates'))
    w_c, a_c = list(first.w_candidates), list(first.a_candidates)
    total = sum(macs.values())
    folder = osp.join(study['work_dir'], 'policies')
    os.makedirs(folder, exist_ok=True)
    paths, budgets = {}, {}

    def save(name, layers, budget=None):
        policy = make_policy(
            layers,
            w_candidates=w_c,
            a_candidates=a_c,
            input_shape=[1, study['resolution'], study['resolution']],
            bitops=policy_cost(macs, layers),
            budget=budget,
            layer_macs=macs,
            source=name)
        paths[name] = save_policy(policy, osp.join(folder, f'{name}.json'))

    for b in study['uniform']:
        save(f'w{b}a{b}', {n: (b, b) for n in macs})
    for k in study['budgets']:
        budget = (k * k + (k + 1) * (k + 1)) * total // 2
        budgets[k] = budget
        for r in range(study['n_random']):
            layers = random_policy_near_budget(
                macs, w_c, a_c, budget, seed=1000 * k + r)
            save(f'b{k}_random{r}', layers, budget)
    return paths, budgets, macs


# --------------------------------------------------------------- stages --
def plan(study, budgets, paths):
    """Task lists in dependency order: teachers; searches; finetunes.

    Finetunes go seed by seed, searched policies first, so that a study cut
    short still has every policy at its first seeds.
    """

    def task(name, kind, *args):
        return (study, name, kind, args)

    settings = study['settings']
    splits = [
        s for s in SPLITS if any(s in SETTINGS[name] for name in settings)
    ]
    teachers = [task(f'teacher_{s}', 'teacher', s) for s in splits]
    searches, policies = [], []
    # a budget-blind search (the released linear cost) is run once and
    # exported at every budget; a budget-aware one runs per budget
    groups = [{k: b} for k, b in budgets.items()] if budget_aware(study) \
        else [dict(budgets)]
    for setting in settings:
        for method in ('gmpq', 'aw0'):
            for group in groups:
                searches.append(
                    task(
                        search_name(setting, method, group, study), 'search',
                        setting, method, group))
            for k in budgets:
                name = f'search_{setting}_b{k}_{method}'
                policies.append((setting, f'b{k}_{method}',
                                 osp.join(study['work_dir'], 'runs', name,
                                          'policy.json')))
    for setting in settings:
        policies += [(setting, policy, path) for policy, path in paths.items()]
    finetunes = [
        task(f'ft_{setting}_{policy}_s{seed}', 'finetune', setting, policy,
             path, seed) for seed in study['seeds']
        for setting, policy, path in policies
    ]
    return [teachers, searches, finetunes]


def run_stage(tasks, workers, threads, log):
    if workers <= 1:
        init_worker(threads)
        results = map(execute, tasks)
        for name, state, seconds in results:
            log(f'{name}: {state} ({seconds:.0f}s)')
        return
    ctx = mp.get_context('spawn')
    with ctx.Pool(
            workers,
            initializer=init_worker,
            initargs=(threads, ),
            maxtasksperchild=None) as pool:
        for name, state, seconds in pool.imap_unordered(execute, tasks):
            log(f'{name}: {state} ({seconds:.0f}s)')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('preset', choices=sorted(PRESETS))
    parser.add_argument('--work-dir', required=True)
    parser.add_argument(
        '--workers',
        type=int,
        default=1,
        help='worker processes (CPU: one per core)')
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch threads per worker on CPU (default 1: '
        'several threads per process were 4x slower on a '
        'loaded 2-core machine)')
    parser.add_argument(
        '--settings',
        nargs='+',
        choices=sorted(SETTINGS),
        default=sorted(SETTINGS),
        help='in_domain and/or transfer (default: both)')
    parser.add_argument(
        '--report-only',
        action='store_true',
        help='write study.md / study.png from the runs '
        'that have finished, run nothing')
    args = parser.parse_args(argv)
    from gmpq_mm.utils.policy_study import write_report

    study = copy.deepcopy(PRESETS[args.preset])
    study['preset'] = args.preset
    study['settings'] = [s for s in SETTINGS if s in args.settings]
    study['work_dir'] = osp.abspath(args.work_dir)
    os.makedirs(study['work_dir'], exist_ok=True)
    log_file = open(osp.join(study['work_dir'], 'study.log'), 'a')

    def log(msg):
        line = f'{time.strftime("%H:%M:%S")} {msg}'
        print(line, flush=True)
        log_file.write(line + '\n')
        log_file.flush()

    start = time.time()
    if not args.report_only:
        for split in SPLITS:
            write_split(
                osp.join(study['work_dir'], 'data', split), split,
                study['resolution'], study['train_limit'], study['test_limit'])
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    paths, budgets, macs = write_policies(study)
    if not args.report_only:
        with open(osp.join(study['work_dir'], 'study_settings.json'),
                  'w') as f:
            json.dump(dict(study, budgets_bitops=budgets), f, indent=1)
        for i, tasks in enumerate(plan(study, budgets, paths)):
            log(f'stage {i + 1}/3: {len(tasks)} runs')
            run_stage(tasks, args.workers, args.threads, log)
    md, png = write_report(study, budgets, macs, time.time() - start)
    log(f'written: {md} {png} ({time.time() - start:.0f}s)')


if __name__ == '__main__':
    main()
