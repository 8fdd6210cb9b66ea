import os.path as osp

from mmengine.logging import MMLogger
from mmpretrain.datasets import CIFAR10, CIFAR100
from mmpretrain.datasets.utils import check_md5

from gmpq_mm.registry import DATASETS


class _CIFARFormatMixin:
    """Read data in a CIFAR on-disk format without requiring the exact files.

    mmpretrain's CIFAR datasets accept only byte-identical official files
    (md5); a mismatch makes them re-download over the user's data. Here a
    present-but-different file (a subset, a re-export, the tiny batches the
    tests write) loads with a warning, and only missing files trigger the
    download (when ``download=True``) or a ``FileNotFoundError`` naming the
    path. With the official files the result is identical to mmpretrain's.
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

    def load_data_list(self):
        try:
            return super().load_data_list()
        except (OSError, RuntimeError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            root = self.data_prefix['root']
            raise FileNotFoundError(
                f'{type(self).__name__}: no usable data under {root} and '
                f'fetching {self.url} failed ({type(err).__name__}: {err}). '
                f"Put the '{self.base_folder}' folder there (python "
                'version) or run where the download can reach it.') from err

    def _load_meta(self):
        # Same as mmpretrain's, minus the md5 requirement on the meta file.
        path = osp.join(self.data_prefix['root'], self.base_folder,
                        self.meta['filename'])
        if not osp.isfile(path):
            raise FileNotFoundError(f'CIFAR meta file not found: {path}')
        import pickle
        with open(path, 'rb') as f:
            data = pickle.load(f, encoding='latin1')
        self._metainfo.setdefault('classes', data[self.meta['key']])


@DATASETS.register_module()
class CIFAR10Format(_CIFARFormatMixin, CIFAR10):
    """CIFAR-10 in its python-pickle layout (``cifar-10-batches-py/``).

    Same arguments as :class:`mmpretrain.datasets.CIFAR10`.
    """


@DATASETS.register_module()
class CIFAR100Format(_CIFARFormatMixin, CIFAR100):
    """CIFAR-100 counterpart of :class:`CIFAR10Format`."""
