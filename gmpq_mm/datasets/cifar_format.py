import io
import os.path as osp
import pickle
import shutil

import numpy as np
from mmengine.logging import MMLogger
from mmpretrain.datasets import CIFAR10, CIFAR100
from mmpretrain.datasets.utils import check_md5

from gmpq_mm.registry import DATASETS

# What the python-version CIFAR files are made of, besides dicts, lists,
# str, bytes and numbers (which pickle builds without naming a global):
# numpy arrays (rebuilt by these numpy functions and types), and bytes as
# Python 3 pickles them at protocol 2 (``_codecs.encode(text, 'latin1')``).
_CIFAR_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),
    ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('_codecs', 'encode'),
}


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only plain data: any other global is refused, so a file
    carrying a code-running payload fails instead of running it."""

    def __init__(self, file, path):
        super().__init__(file, encoding='latin1')
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f'{self.path}: refusing to load {module}.{name} -- a CIFAR '
            'file holds only dicts, lists, str, bytes and numpy arrays; '
            'this file is not one (it may carry code)')


def load_plain_pickle(path):
    """Read a CIFAR python-version file without running code from it.

    Raises:
        pickle.UnpicklingError: Naming the file, for anything but plain
            data, or a truncated / corrupt file.
    """
    with open(path, 'rb') as f:
        data = f.read()
    try:
        obj = _PlainUnpickler(io.BytesIO(data), path).load()
    except pickle.UnpicklingError as err:
        if str(err).startswith(f'{path}:'):
            raise
        raise pickle.UnpicklingError(
            f'{path}: not a readable CIFAR file ({err})') from None
    except Exception as err:  # EOFError, ValueError, ... of a bad file
        raise pickle.UnpicklingError(
            f'{path}: not a readable CIFAR file ({type(err).__name__}: '
            f'{err})') from None
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(
            f'{path}: a CIFAR file holds a dict, got {type(obj).__name__}')
    # Python 2 wrote str keys; a Python 3 re-export may hold bytes keys.
    return {
        k.decode('latin1') if isinstance(k, bytes) else k: v
        for k, v in obj.items()
    }


class _CIFARFormatMixin:
    """Read data in a CIFAR on-disk format without requiring the exact files.

    mmpretrain's CIFAR datasets accept only byte-identical official files
    (md5); a mismatch makes them re-download over the user's data. Here a
    present-but-different file (a subset, a re-export, the tiny batches the
    tests write) loads with a warning, and only missing files trigger the
    download (when ``download=True``) or a ``FileNotFoundError`` naming the
    path. With the official files the result is identical to mmpretrain's.

    Always strict: files are read by an allow-list unpickler of plain data
    (:func:`load_plain_pickle`), so a file whose md5 differs cannot run
    code, whatever ``GMPQ_MM_STRICT_LOAD`` says.
    """

    def _check_integrity(self):
        root = self.data_prefix['root']
        entries = self.train_list + self.test_list
        missing = [
            osp.join(root, self.base_folder, name) for name, _ in entries
            if not osp.isfile(osp.join(root, self.base_folder, name))
        ]
        if missing:
            if not self.download:
                raise FileNotFoundError(
                    f'{type(self).__name__}: missing {missing[0]} (expected '
                    f"the '{self.base_folder}' folder of the python version "
                    f'under data_root={root!r}; set download=True to fetch '
                    'it)')
            return False
        altered = [
            name for name, md5 in entries
            if not check_md5(osp.join(root, self.base_folder, name), md5)
        ]
        if altered and not getattr(self, '_warned', False):
            self._warned = True
            MMLogger.get_current_instance().warning(
                f'{type(self).__name__}: {", ".join(altered)} under '
                f'{osp.join(root, self.base_folder)} differ from the '
                'official release (md5); using them as they are.')
        return True

    def _fetch(self, root):
        """Download into ``root``; a root this call created is removed
        again when the download fails (a typo must not become a folder)."""
        from mmpretrain.datasets.utils import download_and_extract_archive
        created = not osp.exists(root)
        try:
            download_and_extract_archive(
                self.url, root, filename=self.filename, md5=self.tgz_md5)
        except (OSError, RuntimeError) as err:
            if created and osp.isdir(root):
                shutil.rmtree(root, ignore_errors=True)
            raise FileNotFoundError(
                f'{type(self).__name__}: no usable data under {root} and '
                f'fetching {self.url} failed ({type(err).__name__}: {err}). '
                f"Put the '{self.base_folder}' folder there (python "
                'version) or run where the download can reach it.') from err

    def load_data_list(self):
        """As mmpretrain's, but every file is read by
        :func:`load_plain_pickle` (never plain ``pickle``), and only a
        missing file triggers the download."""
        from mmengine import dist
        root = self.data_prefix['root']
        if dist.is_main_process() and not self._check_integrity():
            self._fetch(root)
        dist.barrier()
        if not self._check_integrity():
            raise FileNotFoundError(
                f'{type(self).__name__}: files still missing under {root} '
                'after the download (shared storage not visible here?)')
        files = self.train_list if self.split == 'train' else self.test_list
        imgs, gt_labels = [], []
        for file_name, _ in files:
            path = osp.join(root, self.base_folder, file_name)
            entry = load_plain_pickle(path)
            key = 'labels' if 'labels' in entry else 'fine_labels'
            if 'data' not in entry or key not in entry:
                raise ValueError(f'{path}: a CIFAR batch needs "data" and '
                                 f'"labels" (or "fine_labels") entries')
            imgs.append(entry['data'])
            gt_labels.extend(entry[key])
        imgs = np.vstack(imgs).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        if self.CLASSES is None:
            self._load_meta()
        return [{
            'img': img,
            'gt_label': int(label)
        } for img, label in zip(imgs, gt_labels)]

    def _load_meta(self):
        # Same as mmpretrain's, minus the md5 requirement on the meta file.
        path = osp.join(self.data_prefix['root'], self.base_folder,
                        self.meta['filename'])
        if not osp.isfile(path):
            raise FileNotFoundError(f'CIFAR meta file not found: {path}')
        data = load_plain_pickle(path)
        self._metainfo.setdefault('classes', data[self.meta['key']])


@DATASETS.register_module()
class CIFAR10Format(_CIFARFormatMixin, CIFAR10):
    """CIFAR-10 in its python-pickle layout (``cifar-10-batches-py/``).

    Same arguments as :class:`mmpretrain.datasets.CIFAR10`.
    """


@DATASETS.register_module()
class CIFAR100Format(_CIFARFormatMixin, CIFAR100):
    """CIFAR-100 counterpart of :class:`CIFAR10Format`."""
