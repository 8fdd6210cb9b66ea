from .gmpq_search_classifier import GMPQSearchClassifier

__all__ = ['GMPQSearchClassifier']
