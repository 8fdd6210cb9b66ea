"""Where each run of a study keeps its result: ``runs/<name>/result.json``.

A run whose file exists is finished (the runner skips it on a rerun); the
file is written atomically, so a killed run leaves none.
"""
import json
import os.path as osp

from gmpq_mm.quantization.atomic_file import write_text_atomic

__all__ = ['result_path', 'read_result', 'write_result']


def result_path(study, name):
    """``WORK_DIR/runs/<name>/result.json`` of ``study``."""
    return osp.join(study['work_dir'], 'runs', name, 'result.json')


def read_result(study, name):
    """The finished run ``name``'s result dict."""
    with open(result_path(study, name)) as f:
        return json.load(f)


def write_result(study, name, result):
    """Write ``result`` as run ``name``'s result (atomic replace)."""
    write_text_atomic(result_path(study, name), json.dumps(result, indent=1))
