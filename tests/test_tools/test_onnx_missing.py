"""Without the [deploy] extra, --out x.onnx stops with what to install
(runs whether or not onnx / onnxruntime are installed)."""
import importlib.util
import os.path as osp

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO, 'configs/gmpq/demo/finetune_r18_fashion_mnist.py')


def test_missing_deploy_packages_stop_the_tool(tmp_path, monkeypatch):
    import gmpq_mm.apis.onnx_export as api
    monkeypatch.setattr(
        api,
        'missing_deploy_packages',
        lambda with_runtime=True: ['onnx', 'onnxruntime'])
    spec = importlib.util.spec_from_file_location(
        'export_tool', osp.join(REPO, 'tools/deploy/export.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ckpt = tmp_path / 'any.pth'
    ckpt.write_bytes(b'not read: the packages are checked first')
    out = tmp_path / 'm.onnx'
    try:
        tool.main([
            CONFIG,
            str(ckpt), '--out',
            str(out), '--cfg-options', 'load_from=None',
            'model.backbone.policy=None', 'model.backbone.w_bits=4',
            'model.backbone.a_bits=4'
        ])
    except SystemExit as err:
        msg = str(err)
    else:
        raise AssertionError('the tool did not stop')
    assert 'onnx and onnxruntime' in msg and 'gmpq_mm[deploy]' in msg, msg
    assert not out.exists()
