"""Read what a search leaves in its work_dir, for the search-curve plots.

Two sources, both plain JSON:

* ``policy_epoch_<N>.json``: the policy after epoch ``N``
  (``PolicyExportHook``), with each layer's candidate probabilities;
* ``<timestamp>/vis_data/scalars.json``: mmengine's ``LocalVisBackend`` log,
  one JSON object a line; the training lines carry the supernet's
  ``expected_gbitops`` and ``mean_w_bits`` / ``mean_a_bits`` (the search
  classifier's loss dict) at their ``step`` (iteration).

No mmengine import: the files are read as they lie on disk.
"""
import glob
import json
import os
import os.path as osp
import re
import warnings
from typing import List, NamedTuple, Optional, Tuple

from gmpq_mm.quantization.policy import load_policy

__all__ = [
    'SearchHistory', 'BITOPS_KEY', 'epoch_policy_files', 'load_epoch_policies',
    'read_scalars', 'load_train_scalars', 'load_search_history'
]

EPOCH_POLICY_NAME = re.compile(r'^policy_epoch_(\d+)\.json$')
# The key that marks a training line of scalars.json (validation lines and
# lines of other runs lack it).
BITOPS_KEY = 'expected_gbitops'
# Stored probabilities are rounded to 6 decimals; a sum further from 1 than
# this is not rounding.
PROBABILITY_SUM_TOLERANCE = 1e-3


class SearchHistory(NamedTuple):
    """The per-epoch policies and the training scalars of one search.

    Attributes:
        work_dir (str): Where they were read.
        epochs (list[int]): Epoch numbers of the policies, ascending.
        policies (list[dict]): The policies (:func:`load_policy` checked).
        policy_files (list[str]): Their files.
        scalars (list[dict]): Training lines of ``scalars.json`` in step
            order (a later run replaces an earlier one from its first step).
        scalar_files (list[str]): The ``scalars.json`` files read, oldest
            run first.
    """
    work_dir: str
    epochs: List[int]
    policies: List[dict]
    policy_files: List[str]
    scalars: List[dict]
    scalar_files: List[str]


def epoch_policy_files(work_dir: str) -> List[Tuple[int, str]]:
    """``(epoch, path)`` of every ``policy_epoch_<N>.json``, by epoch."""
    if not osp.isdir(work_dir):
        raise FileNotFoundError(f'work_dir not found: {work_dir}')
    found = []
    for name in os.listdir(work_dir):
        match = EPOCH_POLICY_NAME.match(name)
        if match:
            found.append((int(match.group(1)), osp.join(work_dir, name)))
    return sorted(found)


def _check_probability_sums(policy: dict, path: str) -> None:
    for name, entry in (policy.get('probabilities') or {}).items():
        for kind, values in entry.items():
            total = sum(values)
            if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
                raise ValueError(f'{path}: probabilities[{name}][{kind!r}] '
                                 f'sum to {total:.6f}, not 1')


def _difference(policy: dict, reference: dict) -> Optional[str]:
    """What tells ``policy`` apart from ``reference`` as a network, if
    anything (layer names and order, candidates, input shape, MACs)."""
    names, ref_names = list(policy['layers']), list(reference['layers'])
    if names != ref_names:
        missing = [n for n in ref_names if n not in names]
        unknown = [n for n in names if n not in ref_names]
        if not missing and not unknown:
            return 'the same layers in another order'
        return f'other layers (missing {missing[:3]}, unknown {unknown[:3]})'
    for key in ('w_candidates', 'a_candidates', 'input_shape', 'layer_macs'):
        if key in policy and key in reference and \
                policy[key] != reference[key]:
            return (f'another {key}' if key == 'layer_macs' else
                    f'{key} {policy[key]} instead of {reference[key]}')
    return None


def load_epoch_policies(work_dir: str):
    """The per-epoch policies of a search, checked to be of one network.

    Returns:
        tuple: ``(epochs, policies, files)``, by epoch.

    Raises:
        FileNotFoundError: Naming ``work_dir`` if it holds no
            ``policy_epoch_<N>.json``.
        ValueError: Naming the file that is malformed (see
            :func:`load_policy`), whose probabilities do not sum to 1, or
            that describes another network than the first file.
    """
    found = epoch_policy_files(work_dir)
    if not found:
        raise FileNotFoundError(
            f'{work_dir}: no policy_epoch_<N>.json files; expected the '
            f'per-epoch policies that PolicyExportHook writes into a '
            f'search\'s work_dir (custom_hooks=[dict(type='
            f'"PolicyExportHook")], as in configs/gmpq/_base_/schedules/'
            f'search_25e.py)')
    epochs, policies, files = [], [], []
    for epoch, path in found:
        policy = load_policy(path)
        _check_probability_sums(policy, path)
        if policies:
            diff = _difference(policy, policies[0])
            if diff is not None:
                raise ValueError(
                    f'{path}: not the network of {files[0]}: {diff}; are '
                    f'policies of different searches mixed in {work_dir}?')
        epochs.append(epoch)
        policies.append(policy)
        files.append(path)
    return epochs, policies, files


def read_scalars(path: str) -> List[dict]:
    """The JSON lines of an mmengine ``scalars.json``.

    A last line cut short (a run killed while writing it) is skipped with
    a warning; any other malformed line is an error naming the file and
    line.
    """
    with open(path, encoding='utf-8') as f:
        lines = f.read().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(f'{path}: line {number} is cut short '
                              f'(interrupted run?); skipped')
                continue
            raise ValueError(f'{path}: line {number} is not JSON: '
                             f'{err.msg}') from None
        if not isinstance(record, dict):
            raise ValueError(f'{path}: line {number} is not a JSON object')
        records.append(record)
    return records


def load_train_scalars(work_dir: str):
    """The training scalars of every run in ``work_dir``, joined.

    Runs are the ``<timestamp>/vis_data/scalars.json`` files, taken in
    timestamp order. A resumed run repeats the steps after its checkpoint
    and a fresh run starts again at step 1, so each run replaces what the
    runs before it logged from its own first step on.

    Returns:
        tuple: ``(records, files)``; ``records`` in step order, each with
        ``step`` and :data:`BITOPS_KEY`.
    """
    files = sorted(
        glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    records, used = [], []
    for path in files:
        run = [
            r for r in read_scalars(path)
            if BITOPS_KEY in r and isinstance(r.get('step'), int)
        ]
        if not run:  # e.g. a test run in the same work_dir
            continue
        first = min(r['step'] for r in run)
        records = [r for r in records if r['step'] < first] + sorted(
            run, key=lambda r: r['step'])
        used.append(path)
    return records, used


def load_search_history(work_dir: str) -> SearchHistory:
    """:func:`load_epoch_policies` and :func:`load_train_scalars` of a
    search's work_dir."""
    work_dir = os.fspath(work_dir)
    epochs, policies, files = load_epoch_policies(work_dir)
    scalars, scalar_files = load_train_scalars(work_dir)
    return SearchHistory(work_dir, epochs, policies, files, scalars,
                         scalar_files)
