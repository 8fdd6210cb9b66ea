"""Run a study: its tasks in this process or a pool of worker processes,
resumable (a run whose ``result.json`` exists is skipped), then the
report."""
import copy
import json
import multiprocessing as mp
import os
import os.path as osp
import time

from .data import write_split
from .plan import plan
from .policies import write_policies
from .presets import PRESETS, SETTINGS, SPLITS
from .results import result_path, write_result
from .runs import KINDS

__all__ = ['make_study', 'execute', 'init_worker', 'run_stage', 'run_study']


def make_study(preset, work_dir, settings=None):
    """A copy of ``PRESETS[preset]`` with ``preset``, ``settings`` (in
    :data:`SETTINGS` order; default all) and the absolute ``work_dir``."""
    study = copy.deepcopy(PRESETS[preset])
    chosen = SETTINGS if settings is None else settings
    study['preset'] = preset
    study['settings'] = [s for s in SETTINGS if s in chosen]
    study['work_dir'] = osp.abspath(os.fspath(work_dir))
    return study


def execute(task):
    """Run one task in this process unless its result exists; returns
    ``(name, 'done' or 'skipped', seconds)``."""
    study, name, kind, args = task
    path = result_path(study, name)
    if osp.isfile(path):
        return name, 'skipped', 0.0
    start = time.time()
    result = KINDS[kind](study, *args)
    result.update(name=name, seconds=round(time.time() - start, 1))
    write_result(study, name, result)
    return name, 'done', result['seconds']


def init_worker(threads):
    """Set up a process to run tasks: ``threads`` torch threads on CPU,
    the registries, quiet logs."""
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


def run_stage(tasks, workers, threads, log):
    """Run ``tasks`` (independent of each other) here or on ``workers``
    spawned processes, logging one line per task."""
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


def run_study(study, workers=1, threads=1, report_only=False):
    """Write the data and fixed policies, run every stage of
    :func:`gmpq_mm.study.plan.plan` (unless ``report_only``), then write
    ``study.md`` / ``study.png``; returns their paths."""
    from .report import write_report
    os.makedirs(study['work_dir'], exist_ok=True)
    log_file = open(osp.join(study['work_dir'], 'study.log'), 'a')

    def log(msg):
        line = f'{time.strftime("%H:%M:%S")} {msg}'
        print(line, flush=True)
        log_file.write(line + '\n')
        log_file.flush()

    start = time.time()
    if not report_only:
        for split in SPLITS:
            write_split(
                osp.join(study['work_dir'], 'data', split), split,
                study['resolution'], study['train_limit'], study['test_limit'])
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    paths, budgets, macs = write_policies(study)
    if not report_only:
        with open(osp.join(study['work_dir'], 'study_settings.json'),
                  'w') as f:
            json.dump(dict(study, budgets_bitops=budgets), f, indent=1)
        for i, tasks in enumerate(plan(study, budgets, paths)):
            log(f'stage {i + 1}/3: {len(tasks)} runs')
            run_stage(tasks, workers, threads, log)
    md, png = write_report(study, budgets, macs, time.time() - start)
    log(f'written: {md} {png} ({time.time() - start:.0f}s)')
    log_file.close()
    return md, png
