"""High-level entry points built on the registered gmpq_mm types."""
from .deploy import (build_deployed_model, deploy_model_config,
                     export_checkpoint, load_model)
from .onnx_export import export_onnx_checkpoint, export_onnx_model
from .sensitivity import sensitivity_policy

__all__ = [
    'build_deployed_model', 'deploy_model_config', 'export_checkpoint',
    'export_onnx_checkpoint', 'export_onnx_model', 'load_model',
    'sensitivity_policy'
]
