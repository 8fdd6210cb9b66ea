# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Compare the calibration rules on a small trained network and real images.

Trains a narrow ResNet-18 (CIFAR stem, 16 base channels, 1 input channel)
for ``--epochs`` on the Fashion-MNIST demo subset shipped in ``data_demo/``
(5000 train / 1000 test images), then for each uniform bit setting and each
rule calibrates a copy on ``--calib-batches`` x 64 training images
(:func:`gmpq_mm.quantization.calibration.calibrate_model`) and reports,
without any finetuning, the test accuracy and the relative L2 error of the
logits against the FP network. Rules: ``kl`` (TensorRT), ``release`` (the
spec / released code), ``mse``, ``max`` and ``release+mse`` (release for
the weights, MSE for the activations).

Example (a few minutes on 2 CPU cores)::

    python tools/analysis/compare_calibration.py --epochs 2
"""
import argparse
import copy
import os.path as osp
import struct
import time

import numpy as np

RULES = ('kl', 'release', 'mse', 'max', 'release+mse')
SETTINGS = ((4, 4), (3, 3), (2, 2), (2, 4), (4, 2))


def read_idx(path):
    with open(path, 'rb') as f:
        data = f.read()
    (magic, ) = struct.unpack('>I', data[:4])
    ndim = magic & 0xff
    dims = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim:], np.uint8).reshape(dims)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', default='data_demo/fashion_mnist_subset')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--calib-batches', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch import nn

    from gmpq_mm.quantization.calibration import calibrate_model
    from gmpq_mm.quantization.convert import select_layers, to_quantized
    from gmpq_mm.registry import MODELS
    from gmpq_mm.utils.cli import register_for_tool
    register_for_tool()

    torch.manual_seed(args.seed)

    def load(split):
        x = read_idx(osp.join(args.data, f'{split}-images-idx3-ubyte'))
        y = read_idx(osp.join(args.data, f'{split}-labels-idx1-ubyte'))
        x = torch.tensor(x).float().div(255).sub(0.286).div(0.353)
        return x.unsqueeze(1), torch.tensor(y).long()

    x_tr, y_tr = load('train')
    x_te, y_te = load('t10k')

    class Net(nn.Module):

        def __init__(self):
            super().__init__()
            self.backbone = MODELS.build(
                dict(
                    type='ResNet_CIFAR',
                    depth=18,
                    in_channels=1,
                    stem_channels=16,
                    base_channels=16,
                    out_indices=(3, )))
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(self.backbone(x)[-1].mean((2, 3)))

    net = Net()
    opt = torch.optim.SGD(
        net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    start = time.time()
    for _ in range(args.epochs):
        perm = torch.randperm(len(x_tr))
        for i in range(0, len(x_tr), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        fp = net(x_te)
    print(f'trained {args.epochs} epoch(s) in {time.time() - start:.0f} s; '
          f'FP test accuracy {(fp.argmax(1) == y_te).float().mean():.3f}')
    calib = [x_tr[i * 64:(i + 1) * 64] for i in range(args.calib_batches)]
    print('setting  ' + '  '.join(f'{r:>20}' for r in RULES) +
          '   (accuracy / logits rel. error)')
    for bits in SETTINGS:
        cells = []
        for rule in RULES:
            weight_rule, _, act_rule = rule.partition('+')
            q = copy.deepcopy(net)
            names = ['backbone.' + n for n in select_layers(q.backbone)]
            to_quantized(q, bits, names=names, signed=False)
            calibrate_model(
                q,
                calib,
                method=act_rule or weight_rule,
                weight_method=weight_rule)
            q.eval()
            with torch.no_grad():
                out = q(x_te)
            acc = float((out.argmax(1) == y_te).float().mean())
            rel = float((out - fp).norm() / fp.norm())
            cells.append(f'{acc:.3f} / {rel:.3f}')
        print(
            f'W{bits[0]}A{bits[1]}     ' + '  '.join(f'{c:>20}'
                                                     for c in cells),
            flush=True)


if __name__ == '__main__':
    main()
