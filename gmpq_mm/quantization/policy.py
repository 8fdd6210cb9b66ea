"""The bit-width policy file: plain JSON keyed by module name.

A policy says which weight / activation bit width each searched layer gets::

    {
      "format": "gmpq-policy",
      "version": 1,
      "layers": {
        "layer1.0.conv1": {"w_bits": 4, "a_bits": 3},
        ...
      },
      "w_candidates": [2, 3, 4, 6],
      "a_candidates": [2, 3, 4, 6],
      "input_shape": [3, 32, 32],
      "bitops": 1234567890,
      "mean_w_bits": 3.6,
      "mean_a_bits": 3.9,
      "source": "config / checkpoint / epoch it came from",
      "budget": null
    }

The released GMPQ code keyed the policy by parameter ORDER and hard-coded the
candidates at finetune time; a name-keyed file can be read, diffed and checked
against the network it is applied to (:func:`validate_policy`).

Pure PyTorch / stdlib: nothing from mmengine / mmpretrain is imported.
"""
import copy
import json
import numbers
import os
import os.path as osp
from collections import OrderedDict
from typing import (Dict, Iterable, Iterator, Mapping, Optional, Sequence,
                    Tuple, Union)

from .atomic_file import write_text_atomic
from .bits import check_bits, check_candidates

__all__ = [
    'POLICY_FORMAT', 'POLICY_VERSION', 'Policy', 'make_policy', 'save_policy',
    'load_policy', 'validate_policy', 'policy_layers'
]

POLICY_FORMAT = 'gmpq-policy'
POLICY_VERSION = 1

# Order of the top-level keys in a written file (unknown keys go last).
_KEY_ORDER = ('format', 'version', 'source', 'target', 'w_candidates',
              'a_candidates', 'input_shape', 'bitops', 'budget', 'size_mb',
              'size_budget_mb', 'mean_w_bits', 'mean_a_bits', 'layers',
              'layer_macs', 'layer_params', 'probabilities')

PathLike = Union[str, os.PathLike]
Bits = Tuple[int, int]


def _check_layer_bits(name: str, entry, where: str) -> Bits:
    """``(w_bits, a_bits)`` of one ``layers`` entry, or a ValueError."""
    if isinstance(entry, Mapping):
        extra = sorted(set(entry) - {'w_bits', 'a_bits'})
        missing = [k for k in ('w_bits', 'a_bits') if k not in entry]
        if extra or missing:
            raise ValueError(f'{where}: layers[{name}] must hold exactly '
                             f'"w_bits" and "a_bits" (missing {missing}, '
                             f'unknown {extra})')
        w_bits, a_bits = entry['w_bits'], entry['a_bits']
    elif (isinstance(entry, Sequence) and not isinstance(entry, str)
          and len(entry) == 2):
        w_bits, a_bits = entry
    else:
        raise ValueError(f'{where}: layers[{name}] must be '
                         f'{{"w_bits": int, "a_bits": int}}, got {entry!r}')
    return (check_bits(w_bits, where=f'{where}: layers[{name}] w_bits'),
            check_bits(a_bits, where=f'{where}: layers[{name}] a_bits'))


def _mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _ordered(policy: Mapping) -> dict:
    keys = [k for k in _KEY_ORDER if k in policy]
    keys += [k for k in policy if k not in _KEY_ORDER]
    return {k: policy[k] for k in keys}


def make_policy(layers: Mapping, **meta) -> dict:
    """Build a policy dict.

    Args:
        layers: ``name -> (w_bits, a_bits)`` (or ``{'w_bits', 'a_bits'}``),
            in network order.
        **meta: ``w_candidates``, ``a_candidates``, ``input_shape``,
            ``bitops``, ``source``, ``budget``, ... . ``mean_w_bits`` /
            ``mean_a_bits`` default to the plain mean over the layers.

    Returns:
        dict: A policy that :func:`load_policy` accepts.

    Example:
        >>> policy = make_policy({'conv1': (4, 3), 'conv2': (2, 2)},
        ...                      source='hand-written')
        >>> policy['layers']['conv1'], policy['mean_a_bits']
        ({'w_bits': 4, 'a_bits': 3}, 2.5)
    """
    policy = {'format': POLICY_FORMAT, 'version': POLICY_VERSION}
    table = OrderedDict((name, _check_layer_bits(name, bits, '<policy>'))
                        for name, bits in layers.items())
    policy['layers'] = {
        name: {
            'w_bits': w,
            'a_bits': a
        }
        for name, (w, a) in table.items()
    }
    for key in ('w_candidates', 'a_candidates'):
        if meta.get(key) is not None:
            meta[key] = list(check_candidates(meta[key], where=key))
    if meta.get('input_shape') is not None:
        meta['input_shape'] = [int(s) for s in meta['input_shape']]
    if meta.get('bitops') is not None:
        meta['bitops'] = int(meta['bitops'])
    meta.setdefault('bitops', None)
    meta.setdefault('mean_w_bits', _mean(w for w, _ in table.values()))
    meta.setdefault('mean_a_bits', _mean(a for _, a in table.values()))
    policy.update(meta)
    return load_policy(_ordered(policy))


def save_policy(policy: Mapping, path: PathLike) -> str:
    """Write ``policy`` as JSON, atomically.

    The file is written to a temporary sibling and moved over ``path`` with
    ``os.replace``, so a crash never leaves a half-written policy behind.

    Returns:
        str: The path written.
    """
    path = os.fspath(path)
    policy = _ordered(load_policy(policy))  # never write an invalid file
    text = json.dumps(policy, indent=2) + '\n'
    write_text_atomic(path, text)
    return path


# A policy names each quantized layer once: even networks with thousands of
# layers stay far below this; a larger file is not a policy.
MAX_POLICY_BYTES = 16 * 2**20


class _DuplicateKey(Exception):
    """A JSON object names one key twice (json keeps the last silently)."""


def _no_duplicate_keys(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _read_json(path: str) -> dict:
    if not osp.isfile(path):
        raise FileNotFoundError(f'policy file not found: {path}')
    size = osp.getsize(path)
    if size > MAX_POLICY_BYTES:
        raise ValueError(f'{path}: {size} bytes is too large for a policy '
                         f'file (at most {MAX_POLICY_BYTES}); is it one?')
    with open(path, encoding='utf-8') as f:
        text = f.read()
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: malformed JSON at line {e.lineno} column '
                         f'{e.colno}: {e.msg}') from None
    except _DuplicateKey as e:
        raise ValueError(f'{path}: key {e.args[0]!r} appears twice in one '
                         'JSON object (only one value can hold); remove the '
                         'other') from None
    except RecursionError:
        raise ValueError(f'{path}: JSON nested too deeply to be a policy '
                         '(a policy is format, version, layers -> name -> '
                         'bits)') from None
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        raise ValueError(f'{path}: unreadable JSON: {e}') from None


def load_policy(path_or_dict: Union[PathLike, Mapping]) -> dict:
    """Read and check a policy.

    Args:
        path_or_dict: A JSON file, or an already parsed policy dict.

    Returns:
        dict: The policy, with ``layers`` as ``name -> {'w_bits', 'a_bits'}``
        in file order.

    Raises:
        FileNotFoundError: Naming the path, if the file does not exist.
        ValueError: Naming the file (and the layer), for malformed JSON
            (with line / column), a wrong structure or bad bit widths.

    Example:
        >>> load_policy({'format': 'gmpq-policy', 'version': 1,
        ...              'layers': {'conv1': {'w_bits': 4, 'a_bits': 9}}})
        Traceback (most recent call last):
        ...
        ValueError: <policy>: layers[conv1] a_bits: bit width 9 is not ...
    """
    if isinstance(path_or_dict, Mapping):
        where, raw = '<policy>', dict(path_or_dict)
    else:
        where = os.fspath(path_or_dict)
        raw = _read_json(where)
    if not isinstance(raw, dict):
        raise ValueError(f'{where}: a policy must be a JSON object, got '
                         f'{type(raw).__name__}')
    if raw.get('format') != POLICY_FORMAT:
        raise ValueError(f'{where}: "format" must be "{POLICY_FORMAT}", got '
                         f'{raw.get("format")!r}')
    if raw.get('version') != POLICY_VERSION or isinstance(
            raw.get('version'), bool):
        raise ValueError(f'{where}: unsupported policy "version" '
                         f'{raw.get("version")!r} (expected {POLICY_VERSION})')
    layers = raw.get('layers')
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError(f'{where}: "layers" must be a non-empty object '
                         f'name -> {{"w_bits", "a_bits"}}')

    policy = dict(raw)
    cands = {}
    for key in ('w_candidates', 'a_candidates'):
        if raw.get(key) is not None:
            cands[key] = check_candidates(raw[key], where=f'{where}: {key}')
            policy[key] = list(cands[key])
    table = OrderedDict()
    for name, entry in layers.items():
        w_bits, a_bits = _check_layer_bits(name, entry, where)
        for kind, bits in (('w', w_bits), ('a', a_bits)):
            allowed = cands.get(f'{kind}_candidates')
            if allowed is not None and bits not in allowed:
                raise ValueError(f'{where}: layers[{name}] {kind}_bits={bits} '
                                 f'is not among {kind}_candidates '
                                 f'{list(allowed)}')
        table[name] = {'w_bits': w_bits, 'a_bits': a_bits}
    policy['layers'] = dict(table)

    shape = raw.get('input_shape')
    if shape is not None and not (isinstance(shape, Sequence)
                                  and not isinstance(shape, str) and all(
                                      isinstance(s, numbers.Integral)
                                      and not isinstance(s, bool) and s > 0
                                      for s in shape)):
        raise ValueError(f'{where}: "input_shape" must be a list of positive '
                         f'ints such as [3, 32, 32], got {shape!r}')
    if shape is not None:
        policy['input_shape'] = [int(s) for s in shape]
    bitops = raw.get('bitops')
    if bitops is not None and (not isinstance(bitops, numbers.Real)
                               or isinstance(bitops, bool) or bitops < 0):
        raise ValueError(f'{where}: "bitops" must be a non-negative number '
                         f'or null, got {bitops!r}')
    for key in ('layer_macs', 'layer_params'):
        if raw.get(key) is not None:
            policy[key] = _check_layer_counts(raw[key], table, key, where)
    probs = raw.get('probabilities')
    if probs is not None:
        policy['probabilities'] = _check_probabilities(probs, table, cands,
                                                       where)
    if raw.get('target') is not None:
        # a target the policy was searched for must hold every width
        from .targets import check_policy_target, get_target
        check_policy_target(table, get_target(raw['target'],
                                              f'{where}: target'), where)
    return policy


def _check_layer_counts(counts, layers: Mapping, key: str, where: str) -> dict:
    """``layer_macs`` / ``layer_params``: one non-negative int a layer."""
    if not isinstance(counts, Mapping):
        raise ValueError(f'{where}: "{key}" must be an object name -> int')
    missing = [name for name in layers if name not in counts]
    extra = [name for name in counts if name not in layers]
    if missing or extra:
        raise ValueError(f'{where}: "{key}" must name the same layers as '
                         f'"layers" (missing {missing}, unknown {extra})')
    out = {}
    for name in layers:
        value = counts[name]
        if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
                or value < 0):
            raise ValueError(f'{where}: {key}[{name}] must be a '
                             f'non-negative int, got {value!r}')
        out[name] = int(value)
    return out


def _check_probabilities(probs, layers: Mapping, cands: Mapping,
                         where: str) -> dict:
    """``probabilities``: ``name -> {'w': [p...], 'a': [p...]}``, one
    probability per candidate bit width."""
    if not isinstance(probs, Mapping):
        raise ValueError(f'{where}: "probabilities" must be an object '
                         f'name -> {{"w": [...], "a": [...]}}')
    extra = [name for name in probs if name not in layers]
    if extra:
        raise ValueError(f'{where}: "probabilities" names layers that are '
                         f'not in "layers": {extra}')
    out = {}
    for name, entry in probs.items():
        if not isinstance(entry, Mapping) or set(entry) != {'w', 'a'}:
            raise ValueError(f'{where}: probabilities[{name}] must hold '
                             f'exactly "w" and "a" lists')
        for kind in ('w', 'a'):
            values = entry[kind]
            count = len(cands.get(f'{kind}_candidates', values))
            if (not isinstance(values, Sequence) or isinstance(values, str)
                    or len(values) != count or not all(
                        isinstance(v, numbers.Real)
                        and not isinstance(v, bool) and 0 <= v <= 1
                        for v in values)):
                raise ValueError(
                    f'{where}: probabilities[{name}][{kind!r}] must be '
                    f'{count} numbers in [0, 1], one per {kind}_candidate, '
                    f'got {values!r}')
        out[name] = {
            kind: [float(v) for v in entry[kind]]
            for kind in ('w', 'a')
        }
    return out


def policy_layers(
        policy: Union[PathLike, Mapping]) -> 'OrderedDict[str, Bits]':
    """``name -> (w_bits, a_bits)`` of a policy (file or dict), file order."""
    policy = load_policy(policy)
    return OrderedDict((name, (e['w_bits'], e['a_bits']))
                       for name, e in policy['layers'].items())


def validate_policy(policy: Union[PathLike, Mapping],
                    layer_names: Sequence[str],
                    w_allowed: Optional[Iterable[int]] = None,
                    a_allowed: Optional[Iterable[int]] = None,
                    source: Optional[str] = None) -> Dict[str, Bits]:
    """Check a policy against the layers of a model.

    Args:
        policy: A policy file or dict.
        layer_names: Names of the layers the model quantizes (network order).
        w_allowed / a_allowed: Bit widths the model allows (None: any
            supported width).
        source: Name of the policy in messages; default the file path (or
            ``'<policy>'`` for a dict).

    Returns:
        dict: ``name -> (w_bits, a_bits)`` in ``layer_names`` order.

    Raises:
        ValueError: Naming the policy and every offending layer, for layers
            the policy lacks, layers the model does not have, and bits the
            model does not allow.

    Example:
        >>> policy = make_policy({'conv1': (4, 3), 'conv2': (2, 2)})
        >>> validate_policy(policy, ['conv1', 'conv2'])
        {'conv1': (4, 3), 'conv2': (2, 2)}
        >>> validate_policy(policy, ['conv1', 'conv3'], source='p.json')
        Traceback (most recent call last):
        ...
        ValueError: p.json: policy does not fit the model: missing layer(s) ...
    """
    if source is None:
        source = ('<policy>'
                  if isinstance(policy, Mapping) else os.fspath(policy))
    try:
        table = policy_layers(policy)
    except ValueError as e:
        # Re-label dict errors with the caller's source name.
        msg = str(e)
        if msg.startswith('<policy>'):
            msg = source + msg[len('<policy>'):]
        raise ValueError(msg) from None
    layer_names = list(layer_names)
    w_allowed = None if w_allowed is None else {int(b) for b in w_allowed}
    a_allowed = None if a_allowed is None else {int(b) for b in a_allowed}

    problems = []
    missing = [name for name in layer_names if name not in table]
    if missing:
        problems.append(f'missing layer(s) {missing}')
    extra = [name for name in table if name not in set(layer_names)]
    if extra:
        problems.append(f'layer(s) {extra} not quantized by the model '
                        f'(unknown name or a layer kept full precision)')
    for name, (w_bits, a_bits) in table.items():
        if w_allowed is not None and w_bits not in w_allowed:
            problems.append(f'layers[{name}] w_bits={w_bits} not in allowed '
                            f'{sorted(w_allowed)}')
        if a_allowed is not None and a_bits not in a_allowed:
            problems.append(f'layers[{name}] a_bits={a_bits} not in allowed '
                            f'{sorted(a_allowed)}')
    if problems:
        raise ValueError(f'{source}: policy does not fit the model: ' +
                         '; '.join(problems))
    return {name: table[name] for name in layer_names}


class Policy(Mapping):
    """A checked, read-only policy: the JSON file above as a Python object.

    A :class:`~collections.abc.Mapping` over the file's fields, so every
    function of this package that takes a policy dict takes a ``Policy``.
    It is checked when made (:func:`load_policy`), and :meth:`save` writes
    the same JSON format, atomically.

    Args:
        policy: A policy file path, a policy dict or another ``Policy``.

    Example:
        >>> import os, tempfile
        >>> policy = Policy.from_layers({'conv1': (4, 3), 'conv2': (2, 2)},
        ...                             w_candidates=[2, 4],
        ...                             a_candidates=[2, 3])
        >>> policy.layers
        OrderedDict([('conv1', (4, 3)), ('conv2', (2, 2))])
        >>> policy['mean_w_bits'], policy['w_candidates']
        (3.0, [2, 4])
        >>> path = policy.save(os.path.join(tempfile.mkdtemp(), 'p.json'))
        >>> Policy(path) == policy
        True
        >>> Policy.from_layers({'conv1': (1, 3)})
        Traceback (most recent call last):
        ...
        ValueError: <policy>: layers[conv1] w_bits: bit width 1 is not ...
    """

    def __init__(self, policy: Union[PathLike, Mapping]):
        source = policy._data if isinstance(policy, Policy) else policy
        self._data = load_policy(source)

    @classmethod
    def from_layers(cls, layers: Mapping, **meta) -> 'Policy':
        """A policy of ``layers`` (``name -> (w_bits, a_bits)``) and the
        optional fields ``meta`` (see :func:`make_policy`)."""
        return cls(make_policy(layers, **meta))

    @property
    def layers(self) -> 'OrderedDict[str, Bits]':
        """``name -> (w_bits, a_bits)`` in file order."""
        return OrderedDict((name, (e['w_bits'], e['a_bits']))
                           for name, e in self._data['layers'].items())

    def validate(self, layer_names: Sequence[str],
                 **kwargs) -> Dict[str, Bits]:
        """:func:`validate_policy` of this policy against a model's layers."""
        return validate_policy(self._data, layer_names, **kwargs)

    def save(self, path: PathLike) -> str:
        """Write the JSON file atomically; returns the path."""
        return save_policy(self._data, path)

    def to_dict(self) -> dict:
        """A deep copy of the fields, as :func:`load_policy` returns them."""
        return copy.deepcopy(self._data)

    def __getitem__(self, key: str):
        return copy.deepcopy(self._data[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return (f'Policy({len(self._data["layers"])} layers, mean W/A bits '
                f'{self._data.get("mean_w_bits")}/'
                f'{self._data.get("mean_a_bits")}, '
                f'bitops={self._data.get("bitops")})')
