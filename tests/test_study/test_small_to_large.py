"""The small_to_large preset: its data check on a fake whole Fashion-MNIST
(the original idx layout, gzip-compressed as Debian ships it), its plan and
its data, without running a network."""
import gzip
import os

import numpy as np
import pytest

from gmpq_mm.study.data import check_full_data, write_study_data
from gmpq_mm.study.plan import fixed_policy_names, plan
from gmpq_mm.study.presets import PRESETS
from gmpq_mm.study.runner import make_study, run_study
from gmpq_mm.utils.idx_file import read_idx, write_idx

N_TRAIN, N_TEST = 30, 20


def fake_fashion_mnist(folder, n_train=N_TRAIN, n_test=N_TEST, size=28):
    """The four ``*-ubyte.gz`` files of the original release, with every
    class in turn as the label and the label as the pixel value."""
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.repeat(labels, size * size).reshape(n, size, size)
        for kind, arr in (('images-idx3', images), ('labels-idx1', labels)):
            plain = os.path.join(folder, f'{prefix}-{kind}-ubyte')
            write_idx(plain, arr)
            with open(plain, 'rb') as f, gzip.open(plain + '.gz', 'wb') as g:
                g.write(f.read())
            os.remove(plain)
    return folder


def s2l_study(tmp_path, root):
    study = make_study('small_to_large', tmp_path / 'work', full_data=root)
    study['full_data'].update(train=N_TRAIN, test=N_TEST)
    return study


def test_preset_searches_small_and_finetunes_large():
    p = PRESETS['small_to_large']
    assert p['settings'] == ['small_to_large'] and p['resolution'] == 28
    assert p['full_data'] == dict(
        root='/usr/share/datasets/fashion-mnist', train=60000, test=10000)
    assert p['n_random'] >= 10 and len(p['seeds']) >= 3
    assert p['methods'] == ['gmpq', 'aw0', 'sensitivity']
    # every training image of the whole set, no cap
    assert p['finetune']['train_images'] is None
    assert p['train_limit'] is None and p['headroom_bar'] == 3.0


def test_data_check_accepts_the_real_layout(tmp_path):
    root = fake_fashion_mnist(str(tmp_path / 'fm'))
    check_full_data(s2l_study(tmp_path, root))
    # the full-size preset asks for 60,000 / 10,000 images: one line
    study = make_study('small_to_large', tmp_path / 'w', full_data=root)
    with pytest.raises(ValueError) as e:
        check_full_data(study)
    msg = str(e.value)
    assert '\n' not in msg
    assert 'train-images-idx3-ubyte[.gz] holds images [30, 28, 28] and ' \
        'labels [30]; expected [60000, 28, 28] and [60000]' in msg


@pytest.mark.parametrize('fault', ['missing', 'no_labels', 'size', 'junk'])
def test_data_check_names_the_file_before_anything_is_written(tmp_path, fault):
    root = str(tmp_path / 'fm')
    if fault != 'missing':
        fake_fashion_mnist(root, size=16 if fault == 'size' else 28)
    if fault == 'no_labels':
        os.remove(os.path.join(root, 't10k-labels-idx1-ubyte.gz'))
    if fault == 'junk':
        with gzip.open(os.path.join(root, 'train-images-idx3-ubyte.gz'),
                       'wb') as f:
            f.write(b'<html>not found</html>')
    study = s2l_study(tmp_path, root)
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        run_study(study)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('full Fashion-MNIST: ')
    name = dict(
        missing='train-images-idx3-ubyte[.gz] not found; install it with '
        '`apt-get install dataset-fashion-mnist`',
        no_labels='t10k-labels-idx1-ubyte[.gz] not found',
        size='holds images [30, 16, 16]',
        junk='train-images-idx3-ubyte[.gz]: not an unsigned-byte IDX')[fault]
    assert name in msg, msg
    # nothing was run or written
    assert not (tmp_path / 'work').exists()


def test_other_presets_need_no_full_data(tmp_path):
    check_full_data(make_study('full', tmp_path))
    study = make_study('full', tmp_path, settings=['small_to_large'])
    with pytest.raises(ValueError, match="preset 'full' has no full_data"):
        check_full_data(study)


def test_plan_teachers_on_both_sets_searches_on_the_small(tmp_path):
    study = s2l_study(tmp_path, str(tmp_path / 'fm'))
    budgets = {1: 100, 2: 200}
    teachers, searches, finetunes = plan(
        study, budgets, dict.fromkeys(fixed_policy_names(study), 'p.json'))
    assert [t[1] for t in teachers] == ['teacher_all', 'teacher_full']
    # budget-aware searches, then the sensitivity allocations, per budget
    assert [t[1] for t in searches] == [
        f'search_small_to_large_b{k}_{m}'
        for m in ('gmpq', 'aw0', 'sensitivity') for k in (1, 2)
    ]
    # 2 budgets x (3 found + 10 random) + 2 uniform policies, 3 seeds
    assert len(finetunes) == (2 * 13 + 2) * 3
    assert finetunes[0][1] == 'ft_small_to_large_b1_gmpq_s0'
    assert {t[3][0] for t in finetunes} == {'small_to_large'}


def test_budgets_and_data_of_the_preset(tmp_path):
    from gmpq_mm.study.policies import write_policies
    from gmpq_mm.utils import register_all_modules
    register_all_modules()
    root = fake_fashion_mnist(str(tmp_path / 'fm'))
    study = s2l_study(tmp_path, root)
    paths, budgets, macs = write_policies(study)
    total = sum(macs.values())
    # k = 1: 5.0 BitOPs per MAC; k = 2: the W2A2-W3A3 midpoint, 6.5
    assert budgets == {1: int(5.0 * total), 2: 13 * total // 2}
    assert len(paths) == 2 + 2 * 10
    write_study_data(study)
    data = tmp_path / 'work' / 'data'
    full = read_idx(str(data / 'full' / 'train-images-idx3-ubyte'))
    # the whole fake set, 28 px, unchanged
    assert full.shape == (N_TRAIN, 28, 28)
    labels = read_idx(str(data / 'full' / 'train-labels-idx1-ubyte'))
    assert (full[:, 0, 0] == labels).all()
    # the search's split: the shipped 5,000-image subset at 28 px
    small = read_idx(str(data / 'all' / 'train-images-idx3-ubyte'))
    assert small.shape == (5000, 28, 28)
