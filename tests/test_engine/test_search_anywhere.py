"""A shipped search config runs from a folder outside the repository.

The search config names its teacher config relative to itself
(``{{ fileDirname }}``), so ``tools/train.py`` finds it whatever the working
directory. Only data, sizes and the teacher checkpoint come from the
command line; the teacher's architecture comes from the shipped
``pretrain_r18_cifar10.py``.
"""
import json

import torch

CONFIG = 'configs/gmpq/search_r18_cifar10.py'


def test_search_config_runs_from_another_folder(tmp_path_factory, repo_root,
                                                cifar10_root, run_in_process):
    from mmengine.config import Config

    from gmpq_mm.registry import MODELS
    from gmpq_mm.utils import register_all_modules
    register_all_modules(init_default_scope=True)

    elsewhere = tmp_path_factory.mktemp('elsewhere')
    # The teacher exactly as the shipped pretrain config builds it (random
    # weights: the search only needs a checkpoint that fits).
    teacher_cfg = Config.fromfile(
        str(repo_root / 'configs/gmpq/pretrain_r18_cifar10.py'))
    teacher = MODELS.build(teacher_cfg.model)
    ckpt = elsewhere / 'teacher.pth'
    torch.save({'state_dict': teacher.state_dict()}, ckpt)

    options = {
        'model.teacher_checkpoint': ckpt,
        'model.backbone.backbone.stem_channels': 8,
        'model.backbone.backbone.base_channels': 8,
        'model.head.in_channels': 64,
        'train_cfg.max_epochs': 1,
        'train_cfg.val_interval': 1,
        'default_hooks.logger.interval': 1,
        'env_cfg.mp_cfg.mp_start_method': 'fork',
    }
    for phase in ('train', 'val', 'test'):
        options[f'{phase}_dataloader.batch_size'] = 4
        options[f'{phase}_dataloader.num_workers'] = 0
        options[f'{phase}_dataloader.persistent_workers'] = False
        options[f'{phase}_dataloader.dataset.data_root'] = cifar10_root
    work = elsewhere / 'work'
    result = run_in_process(
        [
            str(repo_root / 'tools/train.py'),
            str(repo_root / CONFIG), '--work-dir', 'work', '--cfg-options'
        ] + [f'{k}={v}' for k, v in options.items()],
        cwd=elsewhere)

    dumped = Config.fromfile(str(work / 'search_r18_cifar10.py'))
    teacher_path = dumped.model.teacher
    assert teacher_path.endswith('pretrain_r18_cifar10.py')
    assert (repo_root /
            'configs/gmpq/pretrain_r18_cifar10.py').samefile(teacher_path)
    policy = json.loads((work / 'policy.json').read_text())
    assert policy['format'] == 'gmpq-policy'
    assert len(policy['layers']) == 19, result.tail(20)
