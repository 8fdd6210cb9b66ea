"""Errors that say what to do, raised before any work, and no alarm about
what is expected (issue 22, item 5)."""
import copy
import logging
import shutil

import pytest
import torch
from torch import nn

from gmpq_mm.quantization.policy import load_policy
from gmpq_mm.utils.config_checks import find_missing_paths

GOOD_POLICY = ('{"format": "gmpq-policy", "version": 1, "layers": '
               '{"conv": {"w_bits": 4, "a_bits": 4}}}')


# -------------------------------------------------- ImageNet annotations --
def _flatten(folder):
    """ImageNet's val layout: every image straight in the split folder."""
    for image in list(folder.rglob('*.JPEG')):
        image.rename(folder / image.name)
    for sub in [p for p in folder.iterdir() if p.is_dir()]:
        sub.rmdir()


def _imagenet_cfg(root):
    loader = dict(
        dataset=dict(type='ImageNet', data_root=str(root), split='val'))
    return dict(val_dataloader=loader)


def test_flat_val_folder_without_meta_file_is_named_up_front(
        imagenet_root, tmp_path):
    """ImageNet's val images sit in one flat folder: without
    meta/val.txt mmpretrain would count 0 class subfolders of 1000."""
    root = tmp_path / 'imagenet'
    shutil.copytree(imagenet_root, root)
    assert find_missing_paths(_imagenet_cfg(root), phases=('val', )) == []
    _flatten(root / 'val')
    assert find_missing_paths(_imagenet_cfg(root), phases=('val', )) == []
    (root / 'meta' / 'val.txt').unlink()
    problems = find_missing_paths(_imagenet_cfg(root), phases=('val', ))
    assert len(problems) == 1
    key, path = problems[0]
    assert path == str(root / 'meta' / 'val.txt')
    assert key.startswith('val_dataloader.dataset (annotation file: ')
    assert 'no class subfolders' in key


def test_train_tool_names_the_missing_meta_file_before_the_runner(
        imagenet_root, tmp_path, run_tool):
    root = tmp_path / 'imagenet'
    shutil.copytree(imagenet_root, root)
    _flatten(root / 'val')
    (root / 'meta' / 'val.txt').unlink()
    work = tmp_path / 'work'
    result = run_tool([
        'tools/test.py', 'configs/gmpq/finetune_r18_fp_in1k.py',
        str(tmp_path / 'no.pth'), '--work-dir',
        str(work), '--cfg-options', f'test_dataloader.dataset.data_root={root}'
    ],
                      check=False,
                      timeout=300)
    assert result.returncode != 0
    assert str(root / 'meta' / 'val.txt') in result.output
    assert 'Traceback' not in result.output
    assert not work.exists()  # stopped before the Runner


# ------------------------------------------------------------ policies --
@pytest.mark.parametrize(
    'name, text, message',
    [('deep', '[' * 100000 + ']' * 100000, 'nested too deeply'),
     ('dup', GOOD_POLICY[:-2] + ', "conv": {"w_bits": 2, "a_bits": 2}}}',
      "key 'conv' appears twice"),
     ('bigint', '{"format": ' + '9' * 5000 + '}', 'unreadable JSON'),
     ('broken', GOOD_POLICY[:-3], 'malformed JSON at line 1')])
def test_bad_policy_json_is_one_line_naming_the_file(tmp_path, name, text,
                                                     message):
    path = tmp_path / f'{name}.json'
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_policy(str(path))
    msg = str(info.value)
    assert msg.startswith(f'{path}: ') and message in msg
    assert '\n' not in msg


def test_huge_policy_file_is_refused_unread(tmp_path, monkeypatch):
    from gmpq_mm.quantization import policy
    path = tmp_path / 'huge.json'
    path.write_text(GOOD_POLICY + ' ' * 2000)
    monkeypatch.setattr(policy, 'MAX_POLICY_BYTES', 1000)
    with pytest.raises(ValueError, match=f'{path}: 2.* bytes is too large'):
        load_policy(str(path))
    path.write_text(GOOD_POLICY)
    assert load_policy(str(path))['layers']['conv'] == {
        'w_bits': 4,
        'a_bits': 4
    }


# ---------------------------------------------- expected missing state --
class _Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)


def _load_messages(model, state):
    from mmengine.logging import MMLogger
    from mmengine.runner.checkpoint import load_state_dict
    logger = MMLogger.get_instance('expected_missing_test')
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        load_state_dict(model, state, strict=False, logger=logger)
    finally:
        logger.removeHandler(handler)
    return [m for m in seen if 'do not match exactly' in m]


def test_quantizer_state_missing_from_fp_weights_is_not_reported():
    from gmpq_mm.engine.hooks.calibration_hook import QUANT_STATE
    from gmpq_mm.engine.hooks.expected_missing_keys import ExpectedMissingKeys
    from gmpq_mm.quantization.convert import to_quantized
    fp = _Net()
    fp_state = copy.deepcopy(fp.state_dict())
    model = to_quantized(_Net(), (4, 4), names=['conv', 'fc'])
    # Without it: mmengine's warning lists the quantizer state.
    before = _load_messages(model, fp_state)
    assert len(before) == 1 and 'conv.act_range' in before[0]
    quiet = ExpectedMissingKeys(QUANT_STATE).attach(model)
    assert _load_messages(model, fp_state) == []
    # Another missing key is still reported -- alone.
    partial = {k: v for k, v in fp_state.items() if k != 'fc.bias'}
    other = _load_messages(model, partial)
    assert len(other) == 1 and 'fc.bias' in other[0]
    assert 'act_range' not in other[0] and 'w_threshold' not in other[0]
    left_out = quiet.detach()
    assert sorted(left_out) == [
        'conv.act_range', 'conv.w_threshold', 'fc.act_range', 'fc.w_threshold'
    ]
    # Detached: back to mmengine's message; the weights did load.
    assert len(_load_messages(model, fp_state)) == 1
    assert torch.equal(model.conv.weight, fp.conv.weight)
