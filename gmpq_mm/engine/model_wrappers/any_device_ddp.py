import torch
from mmengine.model import MMDistributedDataParallel

from gmpq_mm.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class AnyDeviceDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that also wraps CPU modules.

    mmengine's Runner always passes ``device_ids=[LOCAL_RANK]``, which torch's
    DDP rejects for a module on the CPU. Dropping it there lets
    ``tools/dist_train.sh CONFIG 2`` run with gloo on a machine without CUDA;
    on GPUs this class behaves exactly like its parent.
    """

    def __init__(self, module, device_ids=None, **kwargs):
        on_cpu = all(p.device.type == 'cpu' for p in module.parameters())
        if on_cpu or not torch.cuda.is_available():
            device_ids = None
            kwargs.pop('output_device', None)
        super().__init__(module=module, device_ids=device_ids, **kwargs)
