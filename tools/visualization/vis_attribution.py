"""Show what GMPQ preserves: the FP teacher's and the quantized network's
attribution maps on a few images, side by side, as one PNG grid.

    python tools/visualization/vis_attribution.py CONFIG CHECKPOINT \\
        --images a.png b.png [--out attribution.png] \\
        [--teacher-config C --teacher-checkpoint T] [--cfg-options ...]

One row per image: the image as the network sees it (after the config's
test pipeline), the teacher's map and the network's map over it. The maps
are those the search loss compares (Grad-CAM of each network's own top-1
class at the last attribution stage, same code); the title gives both
predictions and Spearman's rank correlation of the two maps.

A search checkpoint carries its teacher. A finetuned (or any other)
checkpoint needs ``--teacher-config`` and ``--teacher-checkpoint``.
"""
import argparse
import os.path as osp

from gmpq_mm.utils.cli import DictAction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Draw the FP teacher\'s and the quantized network\'s '
        'attribution maps on a few images')
    parser.add_argument('config', help='config file of the checkpoint')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--images', nargs='+', required=True, help='image files, one row each')
    parser.add_argument(
        '--out',
        help='PNG to write (default: attribution_maps.png next to the '
        'checkpoint)')
    parser.add_argument(
        '--teacher-config',
        help='config of the FP teacher (needed unless CONFIG is a search)')
    parser.add_argument(
        '--teacher-checkpoint',
        help='checkpoint of the FP teacher (needed unless CHECKPOINT is a '
        'search checkpoint, which holds its teacher)')
    parser.add_argument(
        '--device', help='torch device (default: cuda if available, else cpu)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of CONFIG, key=value (xxx=yyy format)')
    return parser.parse_args(argv)


def _score(value: float) -> str:
    return 'n/a (a constant map)' if value != value else f'{value:.2f}'


def _short(name: str, width: int = 34) -> str:
    """A file name that fits a panel title."""
    if len(name) <= width:
        return name
    half = (width - 3) // 2
    return f'{name[:half]}...{name[-half:]}'


def rows_of(results, student_name):
    """Grid rows with titles a quantization researcher reads at a glance:
    each network's top-1 class and probability, and how well the network
    keeps the teacher's ranking of positions."""
    from gmpq_mm.visualization.attribution_grid import AttributionRow

    rows = []
    for res in results:
        t, s = res.teacher_pred, res.student_pred
        differs = '' if t['label'] == s['label'] else ', differs'
        image_size = f'{res.image.shape[1]}x{res.image.shape[0]}'
        map_size = f'{res.student_map.shape[1]}x{res.student_map.shape[0]}'
        rows.append(
            AttributionRow(
                image=res.image,
                teacher_map=res.teacher_map,
                student_map=res.student_map,
                image_title=f'{_short(osp.basename(res.path))}\n'
                f'{image_size} input, {map_size} map',
                teacher_title=f'FP teacher\n{t["name"]} ({t["score"]:.2f})',
                student_title=f'{student_name}\n'
                f'{s["name"]} ({s["score"]:.2f}){differs}\n'
                f'Spearman vs teacher: {_score(res.spearman)}'))
    return rows


def main(argv=None):
    args = parse_args(argv)
    import torch

    from gmpq_mm.apis.attribution import (explain_images,
                                          load_attribution_models)
    from gmpq_mm.utils.cli import register_for_tool
    from gmpq_mm.visualization.attribution_grid import draw_attribution_grid
    from gmpq_mm.visualization.figure_io import save_figure
    register_for_tool()

    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    out = args.out or osp.join(
        osp.dirname(osp.abspath(args.checkpoint)), 'attribution_maps.png')
    try:
        models = load_attribution_models(
            args.config,
            args.checkpoint,
            teacher_config=args.teacher_config,
            teacher_checkpoint=args.teacher_checkpoint,
            cfg_options=args.cfg_options,
            device=device)
        results = explain_images(models, args.images)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f'error: {err}')
    fig = draw_attribution_grid(
        rows_of(results, models.student_name),
        title=f'Attribution maps: FP teacher vs {models.student_name} '
        f'({osp.basename(args.checkpoint)})')
    print(f'written: {save_figure(fig, out)}')


if __name__ == '__main__':
    main()
