"""conftest's run_in_process: a tool's main(argv) in the test process gives
what the subprocess would (exit status, output) and leaves the process as
it found it."""
import os

import torch


def _state():
    import sys

    from mmengine.logging import MMLogger
    from mmengine.registry import DefaultScope
    return (dict(os.environ), os.getcwd(), list(sys.argv),
            torch.get_num_threads(), list(MMLogger._instance_dict),
            list(DefaultScope._instance_dict))


def test_exit_status_and_output_as_a_process(run_in_process):
    ok = run_in_process(['tools/train.py', '--help'])
    assert ok.returncode == 0 and 'usage:' in ok.output
    bad_flag = run_in_process(
        ['tools/train.py', 'configs/gmpq/pretrain_r18_cifar10.py', '--bad'],
        check=False)
    assert bad_flag.returncode == 2
    assert 'train.py: error: unrecognized arguments: --bad' in bad_flag.output
    missing = run_in_process(['tools/train.py', 'no/such/config.py'],
                             check=False)
    assert missing.returncode == 1
    assert 'no/such/config.py' in missing.output
    assert 'Traceback' in missing.output  # an exception, as Python prints it


def test_system_exit_message_and_integer_return(run_in_process, tmp_path):
    # complexity.py: `sys.exit(main())`, `error: ...` through SystemExit.
    result = run_in_process([
        'tools/analysis/complexity.py', 'configs/gmpq/pretrain_r18_cifar10.py',
        '--policy', tmp_path / 'missing.json'
    ],
                            check=False)
    assert result.returncode != 0
    assert str(tmp_path / 'missing.json') in result.output


def test_run_captures_log_lines_and_leaves_no_trace(run_in_process,
                                                    trained_cifar_r18):
    before = _state()
    # The session's teacher was trained in process: its output holds the
    # Runner's log lines (and the CIFAR md5 warning of the tiny files).
    output = (trained_cifar_r18 / 'train_output.txt').read_text()
    assert 'Epoch(train) [2]' in output and 'accuracy/top1' in output
    result = run_in_process(['tools/train.py', '--help'])
    assert 'usage:' in result.output
    assert _state() == before
