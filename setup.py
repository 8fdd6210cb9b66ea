"""Package set-up for gmpq_mm.

Metadata and tool settings live in ``setup.cfg``; this file reads the
requirement lists and follows OpenMMLab's ``mim`` layout: ``configs/`` and
``tools/`` are made reachable as ``gmpq_mm/.mim/{configs,tools}`` so
``mim train gmpq_mm CONFIG`` and ``importlib.resources`` find them from an
installed package.
"""
import os
import os.path as osp
import shutil
import sys
from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))
MIM_ITEMS = ('configs', 'tools', 'model-index.yml')


def read_requirements(name):
    """Requirement lines of ``requirements/<name>.txt`` (comments dropped)."""
    path = osp.join(HERE, 'requirements', f'{name}.txt')
    with open(path) as f:
        lines = (line.split('#', 1)[0].strip() for line in f)
        return [line for line in lines if line and not line.startswith('-')]


def add_mim_extension():
    """Expose configs/ and tools/ inside the package for mim.

    Editable installs get symlinks (edits show through at once); wheels and
    sdists get copies. Mirrors what OpenMMLab repos do, written for this repo.
    """
    if 'develop' in sys.argv or any('editable' in a for a in sys.argv):
        mode = 'symlink'
    elif {'sdist', 'bdist_wheel'} & set(sys.argv) or 'install' in sys.argv:
        mode = 'copy'
    else:
        return
    mim_root = osp.join(HERE, 'gmpq_mm', '.mim')
    os.makedirs(mim_root, exist_ok=True)
    for item in MIM_ITEMS:
        src = osp.join(HERE, item)
        dst = osp.join(mim_root, item)
        if not osp.exists(src):
            continue
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim_root), dst)
        elif osp.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    setup(
        packages=find_packages(exclude=('configs', 'tools', 'tests', 'demo')),
        include_package_data=True,
        package_data={
            'gmpq_mm':
            ['.mim/configs/**/*', '.mim/tools/**/*', '.mim/model-index.yml']
        },
        install_requires=read_requirements('runtime'),
        extras_require={
            # CPU / no-CUDA machines: the pure-python mmcv build. Users who
            # already run full mmcv (``mim install mmcv``) leave this out, so
            # the two never fight over the ``mmcv`` package directory.
            'lite': read_requirements('lite'),
            'mim': read_requirements('mminstall'),
            'tests': read_requirements('tests'),
            'optional': read_requirements('optional'),
            # ONNX export (tools/deploy/export.py --out x.onnx) and its
            # onnxruntime check.
            'deploy': read_requirements('deploy'),
        },
        zip_safe=False)
