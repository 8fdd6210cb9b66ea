"""Plot a bit-width policy: weight / activation bits per searched layer.

One pair of bars per layer in network order, each layer's share of the
MACs and of the weights on a second axis, and the totals in the title:
BitOPs of the searched layers, the size of their weights at their bits and
the compression of both against FP32.

The MACs and weight counts come from the policy itself (a search writes
``layer_macs`` / ``layer_params``); for a policy written before that, give
``--config`` (the FP, search or finetune config of the same network): its
backbone is built (no weights loaded) and counted at the policy's
``input_shape`` (else the config's test input), and the policy is checked
against the layers that backbone quantizes. With ``--config`` the counts of
the network are used even when the policy carries its own.

Examples::

    python tools/visualization/plot_policy.py work_dirs/search/policy.json
    python tools/visualization/plot_policy.py \\
        work_dirs/demo/search/policy.json \\
        --config configs/gmpq/demo/pretrain_r18_fashion_mnist.py \\
        --out policy.png
"""
import argparse
import os.path as osp
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Bar chart of a policy\'s per-layer weight / activation '
        'bits with each layer\'s share of MACs and the totals')
    parser.add_argument('policy', help='policy JSON written by a search')
    parser.add_argument(
        '--out', help='PNG to write (default: <policy stem>.png next to it)')
    parser.add_argument(
        '--config',
        help='config of the policy\'s network, to count MACs and weights '
        'when the policy does not carry them (and to check its layer names)')
    parser.add_argument(
        '--dpi', type=int, default=100, help='pixels per inch (default 100)')
    return parser.parse_args(argv)


def counts_from_config(config, policy, policy_path):
    """``(layer_macs, layer_params)`` of the policy's layers, counted on the
    backbone ``config`` builds; a ValueError naming the policy file if its
    layers are not the ones that backbone quantizes."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from gmpq_mm.quantization.complexity import count_macs
    from gmpq_mm.quantization.convert import select_layers
    from gmpq_mm.quantization.policy import validate_policy
    from gmpq_mm.registry import MODELS
    from gmpq_mm.utils.cli import register_for_tool
    from gmpq_mm.utils.quantization_summary import (WRAPPER_TYPES, config_type,
                                                    inner_backbone)
    from gmpq_mm.utils.report import infer_input_shape
    register_for_tool()

    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model_cfg = cfg.get('model')
    backbone_cfg = model_cfg.get('backbone') if model_cfg else None
    if not isinstance(backbone_cfg, dict):
        raise ValueError(f'{config}: model has no `backbone` config')
    backbone_cfg = backbone_cfg.to_dict() if hasattr(
        backbone_cfg, 'to_dict') else dict(backbone_cfg)
    # The outermost gmpq wrapper says which layers are quantized.
    selection = dict(include=None, exclude=None)
    if config_type(backbone_cfg) in WRAPPER_TYPES:
        selection.update({k: backbone_cfg.get(k) for k in selection})
    backbone_cfg = inner_backbone(backbone_cfg)
    # The plain FP backbone: same layer names and MACs, no policy needed.
    backbone = MODELS.build(backbone_cfg)
    names = select_layers(backbone, **selection)
    validate_policy(policy, names, source=policy_path)
    shape = infer_input_shape(cfg, backbone, policy.get('input_shape'))
    macs = count_macs(backbone, shape)
    modules = dict(backbone.named_modules())
    layer_macs = {name: macs[name].macs for name in policy['layers']}
    layer_params = {
        name: int(modules[name].weight.numel())
        for name in policy['layers']
    }
    return layer_macs, layer_params, shape


def _fail(message):
    print(f'error: {message}', file=sys.stderr)
    return 1


def main(argv=None):
    args = parse_args(argv)
    from gmpq_mm.quantization.policy import load_policy
    from gmpq_mm.visualization.figure_io import save_figure
    from gmpq_mm.visualization.policy_plot import (format_bitops,
                                                   policy_figure,
                                                   policy_totals)

    try:
        policy = load_policy(args.policy)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    if args.config is not None:
        if not osp.isfile(args.config):
            return _fail(f'config file not found: {args.config}')
        try:
            layer_macs, layer_params, shape = counts_from_config(
                args.config, policy, args.policy)
        except (ValueError, KeyError, FileNotFoundError) as err:
            return _fail(str(err))
        counted = f'counted on {args.config} at input {tuple(shape)}'
    elif policy.get('layer_macs') and policy.get('layer_params'):
        layer_macs, layer_params = policy['layer_macs'], policy['layer_params']
        counted = 'from the policy file'
    else:
        return _fail(f'{args.policy}: the policy has no "layer_macs" / '
                     f'"layer_params" (written before searches recorded '
                     f'them); pass --config CONFIG (the FP, search or '
                     f'finetune config of its network) to count them')

    out = args.out or osp.splitext(args.policy)[0] + '.png'
    totals = policy_totals(policy, layer_macs, layer_params)
    fig = policy_figure(
        policy, layer_macs, layer_params, title=osp.basename(args.policy))
    save_figure(fig, out, dpi=args.dpi)

    def ratio(value):
        return 'n/a' if value is None else f'{value:.2f}x'

    print(f'policy: {args.policy} ({totals["num_layers"]} searched layers; '
          f'MACs / weights {counted})')
    print(f'BitOPs: {totals["bitops"]} ({format_bitops(totals["bitops"])}; '
          f'FP32 {format_bitops(totals["fp_bitops"])}, compression '
          f'{ratio(totals["bitops_compression"])})')
    print(f'weights: {totals["size_mb"]:.6f} MB at their bits (FP32 '
          f'{totals["fp_size_mb"]:.6f} MB, compression '
          f'{ratio(totals["size_compression"])}; MB = 1e6 bytes)')
    print(f'mean bits: W {totals["mean_w_bits"]:.2f}, A '
          f'{totals["mean_a_bits"]:.2f}')
    print(f'written: {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
