"""A 224-pixel search config (ImageNet stem) runs: the released code
crashes on all five fine-grained sets because its pooling assumed 32x32."""
import json
import textwrap

import torch


def test_search_r18_cars_runs_at_224(tmp_path, repo_root, imagenet_root,
                                     run_in_process):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    from gmpq_mm.utils import register_all_modules
    register_all_modules()

    init_default_scope('mmpretrain')
    teacher_cfg = Config.fromfile(
        repo_root / 'configs/gmpq/pretrain_r18_cars.py').model.to_dict()
    teacher_cfg['backbone'].pop('init_cfg')  # no download
    teacher = MODELS.build(teacher_cfg)
    ckpt = tmp_path / 'teacher.pth'
    torch.save({'state_dict': teacher.state_dict()}, ckpt)
    # The cars config, reading an ImageNet-format folder in place of
    # StanfordCars (same pipelines: RandomResizedCrop 224 + flip).
    cfg = tmp_path / 'search_cars.py'
    cfg.write_text(
        textwrap.dedent(f'''
        _base_ = ['{repo_root}/configs/gmpq/search_r18_cars.py']
        train_dataloader = dict(
            batch_size=2, num_workers=0, persistent_workers=False,
            dataset=dict(_delete_=True, type='CustomDataset',
                         data_root='{imagenet_root}', data_prefix='train',
                         pipeline={{{{_base_.train_pipeline}}}}))
        model = dict(teacher_checkpoint='{ckpt}')
        train_cfg = dict(max_epochs=1)
        val_cfg = None
        val_dataloader = None
        val_evaluator = None
        default_hooks = dict(logger=dict(interval=1))
    '''))
    work = tmp_path / 'work'
    out = run_in_process(['tools/train.py', cfg, '--work-dir', work],
                         timeout=600).output
    assert 'loss_attr' in out
    policy = json.loads((work / 'policy.json').read_text())
    assert len(policy['layers']) == 19
    assert policy['input_shape'] == [3, 224, 224]
