from .cifar_format import CIFAR10Format, CIFAR100Format
from .sample_seeding import (EpochTaggedSampler, SeededSamples,
                             seed_every_sample)

__all__ = [
    'CIFAR10Format', 'CIFAR100Format', 'EpochTaggedSampler', 'SeededSamples',
    'seed_every_sample'
]
