"""MACs, BitOPs, size and compression of the model a config builds.

Works for full-precision configs, supernet configs (``MixedPrecisionBackbone``:
expected bits under the current alphas) and quantized configs
(``QuantizedBackbone``); ``--policy`` turns any of them into the quantized
network that policy describes. No weights are loaded (nothing is downloaded):
MACs and BitOPs do not depend on them. What is counted is backbone + neck +
head, built as a plain ``ImageClassifier`` (a search config's teacher and its
checkpoint are not needed).

Prints one row per conv / linear layer (MACs, weight / activation bits,
BitOPs; ``fp`` marks full-precision layers) and the totals: MACs, BitOPs of
the quantized layers (what papers report) and of the whole network (FP
layers at 32x32), model size and compression against FP. A check line
compares the conv / linear MACs with mmengine's ``FlopAnalyzer`` run on the
full-precision twin of the network (same layers, no quantizers: the
analyzer's tracer cannot read the quantizers' autograd functions).

Examples::

    python tools/analysis/complexity.py configs/gmpq/pretrain_r18_cifar10.py
    python tools/analysis/complexity.py configs/gmpq/pretrain_r18_cifar10.py \\
        --policy work_dirs/search/policy.json --out complexity.json
    python tools/analysis/complexity.py CONFIG --input-shape 224 224
"""
import argparse
import copy
import json
import os
import os.path as osp
import sys
import warnings

from gmpq_mm.utils.cli import add_cfg_options
from gmpq_mm.utils.quantization_summary import (WRAPPER_TYPES, config_type,
                                                inner_backbone)

# Wrapper arguments that say WHICH layers are quantized and how; carried
# over to the QuantizedBackbone that applies --policy.
CARRIED_KEYS = ('include', 'exclude', 'signed', 'init_range', 'per_channel')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='MACs / BitOPs / size / compression of a config\'s model '
        '(FP, supernet or quantized)')
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--policy',
        help='policy JSON: count the network quantized with these bits '
        '(the config\'s backbone becomes a QuantizedBackbone)')
    parser.add_argument(
        '--input-shape',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='input height and width (channels from the stem conv); '
        'default: inferred from the config\'s test data')
    add_cfg_options(parser)
    parser.add_argument(
        '--target',
        help='deployment target (e.g. int8_runtime, see '
        'docs/user_guides/budgets_and_targets.md): refuse widths it cannot '
        'hold and name the layers it only emulates; default: the target the '
        '--policy file records, else the config\'s model.target, if any')
    parser.add_argument('--out', help='write the report as JSON here')
    parser.add_argument(
        '--no-check',
        action='store_true',
        help='skip the cross-check with mmengine.analysis.FlopAnalyzer')
    return parser.parse_args(argv)


def model_cfg_with_policy(model_cfg, policy):
    """``model_cfg`` with its backbone quantized by ``policy`` (a path)."""
    model_cfg = copy.deepcopy(model_cfg)
    backbone = model_cfg['backbone']
    carried = {}
    if config_type(backbone) in WRAPPER_TYPES:
        carried = {k: backbone[k] for k in CARRIED_KEYS if k in backbone}
    model_cfg['backbone'] = dict(
        type='QuantizedBackbone',
        backbone=copy.deepcopy(inner_backbone(backbone)),
        policy=policy,
        **carried)
    return model_cfg


def fp_model_cfg(model_cfg):
    """``model_cfg`` with the plain FP backbone (no quantized layers)."""
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg['backbone'] = copy.deepcopy(
        inner_backbone(model_cfg['backbone']))
    return model_cfg


def countable_model_cfg(model_cfg):
    """A plain ``ImageClassifier`` of ``model_cfg``'s backbone, neck and
    head, or ``model_cfg`` itself if it is one already.

    Other classifiers (e.g. ``GMPQSearchClassifier``) carry what the
    complexity does not depend on and may need files to build (the
    teacher's checkpoint); the deployed network is backbone + neck + head.
    """
    if config_type(model_cfg) == 'ImageClassifier' or not isinstance(
            model_cfg.get('backbone'), dict):
        return model_cfg, None
    slim = dict(type='ImageClassifier', backbone=model_cfg['backbone'])
    if model_cfg.get('target') is not None:  # a search for a target
        from gmpq_mm.quantization.targets import with_target_candidates
        slim['backbone'] = with_target_candidates(slim['backbone'],
                                                  model_cfg['target'])[0]
    for key in ('neck', 'head'):
        if model_cfg.get(key) is not None:
            slim[key] = model_cfg[key]
    return slim, model_cfg.get('type')


def model_kind(model):
    from gmpq_mm.quantization.layers import is_mixed_layer, is_quantized_layer
    mods = list(model.modules())
    if any(is_mixed_layer(m) for m in mods):
        return 'supernet (expected bits under the current alphas)'
    if any(is_quantized_layer(m) for m in mods):
        return 'quantized'
    return 'full precision'


def flop_analyzer_check(fp_net, input_shape, layer_names, our_macs):
    """mmengine's FlopAnalyzer on the FP twin: conv / linear MACs of our
    layers (one flop = one MAC in its convention) and all its ops."""
    import torch
    from mmengine.analysis import FlopAnalyzer

    from gmpq_mm.quantization.probe import eval_mode
    param = next(fp_net.parameters())
    with eval_mode(fp_net):
        inputs = torch.zeros((1, *input_shape),
                             device=param.device,
                             dtype=param.dtype)
        analyzer = FlopAnalyzer(fp_net, inputs)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            by_module = analyzer.by_module()
            total = analyzer.total()
    layers = int(sum(by_module.get(name, 0) for name in layer_names))
    return dict(
        tool='mmengine.analysis.FlopAnalyzer (FP twin)',
        conv_linear_macs=layers,
        all_ops=int(total),
        ours=int(our_macs),
        match=layers == int(our_macs))


def target_report(report, target, policy_path, model_target=None):
    """The ``--target`` line: which quantized layers the target only
    emulates (a ``TargetError`` for widths it cannot hold), or None."""
    from gmpq_mm.quantization.policy import load_policy
    from gmpq_mm.quantization.targets import (check_policy_target,
                                              describe_emulated, get_target)
    where = '--target'
    if target is None and policy_path is not None:
        target = load_policy(policy_path).get('target')
        where = f'{policy_path}: target'
    if target is None and model_target is not None:
        target, where = model_target, 'model.target'
    if target is None:
        return None
    target = get_target(target, where)
    layers = {
        r['name']: (r['w_bits'], r['a_bits'])
        for r in report['layers'] if r['quantized']
    }
    if not all(isinstance(b, int) for bits in layers.values() for b in bits):
        return dict(
            name=target.name,
            emulated={},
            line=f'target {target.name!r}: a supernet has no fixed widths '
            'yet (pass --policy to check a policy against it)')
    emulated = check_policy_target(layers, target, f'target {target.name}')
    line = (
        describe_emulated(emulated, target) if emulated else
        f'target {target.name!r}: every quantized layer runs at a native '
        f'width (w {list(target.w_bits)}, a {list(target.a_bits)})')
    return dict(
        name=target.name,
        emulated={
            n: list(b)
            for n, b in emulated.items()
        },
        line=line)


def _fail(message):
    print(f'error: {message}', file=sys.stderr)
    return 1


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.config):
        return _fail(f'config file not found: {args.config}')
    if args.policy is not None and not osp.isfile(args.policy):
        return _fail(f'policy file not found: {args.policy}')

    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from gmpq_mm.quantization.complexity import complexity_report, format_table
    from gmpq_mm.registry import MODELS
    from gmpq_mm.utils.cli import register_for_tool
    from gmpq_mm.utils.report import (countable_model, infer_input_shape,
                                      summarize_report)
    register_for_tool()

    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))

    model_cfg = cfg.model.to_dict() if hasattr(cfg.model, 'to_dict') else dict(
        cfg.model)
    if args.policy is not None:
        if not isinstance(model_cfg.get('backbone'), dict):
            return _fail(f'{args.config}: model has no `backbone` config to '
                         f'apply {args.policy} to')
        model_cfg = model_cfg_with_policy(model_cfg, args.policy)

    model_cfg, dropped_type = countable_model_cfg(model_cfg)
    # Building never calls init_weights: no pretrained weights are loaded.
    try:
        model = MODELS.build(model_cfg)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    net = countable_model(model)
    if net is None:
        return _fail(f'{args.config}: {type(model).__name__} has no backbone')
    shape = infer_input_shape(cfg, net, args.input_shape)
    report = complexity_report(net, shape)
    summary = summarize_report(report)
    kind = model_kind(net)

    check = None
    if not args.no_check:
        try:
            if kind == 'full precision':
                fp_net = net
            else:
                fp_net = countable_model(MODELS.build(fp_model_cfg(model_cfg)))
            check = flop_analyzer_check(
                fp_net, shape, [row['name'] for row in report['layers']],
                report['totals']['macs'])
        except Exception as err:  # noqa: BLE001  a check, not the report
            check = dict(error=f'{type(err).__name__}: {err}')

    print(f'config: {args.config}')
    if args.policy is not None:
        print(f'policy: {args.policy}')
    print(f'model: {kind}')
    if dropped_type is not None:
        print(f'counted: backbone + neck + head of {dropped_type} (what it '
              f'holds besides, e.g. a teacher, is left out)')
    print(format_table(report))
    if summary['num_quantized']:
        print(f'mean bits over {summary["num_quantized"]} quantized layers: '
              f'W {summary["mean_w_bits"]:.2f}, A '
              f'{summary["mean_a_bits"]:.2f}')
    print(f'totals: {summary["macs"]:.4f} GMACs, BitOPs '
          f'{summary["bitops_quantized"]:.4f} G (quantized layers) / '
          f'{summary["bitops_total"]:.4f} G (whole network), size '
          f'{summary["size_mb"]:.6g} MB (FP {summary["fp_size_mb"]:.6g} MB), '
          f'compression {summary["compression"]:.2f}x')
    try:
        target = target_report(report, args.target, args.policy,
                               cfg.model.get('target'))
    except ValueError as err:
        return _fail(str(err))
    if target is not None:
        print(target['line'])
    if check is not None:
        if 'error' in check:
            print(f'check: mmengine FlopAnalyzer failed ({check["error"]})')
        else:
            verdict = 'match' if check['match'] else 'MISMATCH'
            print(f'check: mmengine FlopAnalyzer (FP twin) conv/linear MACs '
                  f'{check["conv_linear_macs"]:,} vs ours {check["ours"]:,}: '
                  f'{verdict}; all its ops (BN, pooling too) '
                  f'{check["all_ops"]:,}')

    if args.out:
        result = dict(
            config=args.config,
            policy=args.policy,
            model=kind,
            counted_from=dropped_type or 'ImageClassifier',
            **summary,
            check=check)
        if target is not None:
            result['target'] = target['name']
            result['emulated_layers'] = target['emulated']
        folder = osp.dirname(osp.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        with open(args.out, 'w', encoding='utf-8') as f:
            json.dump(result, f, indent=2)
        print(f'written: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
