from .cifar_format import CIFAR10Format, CIFAR100Format

__all__ = ['CIFAR10Format', 'CIFAR100Format']
