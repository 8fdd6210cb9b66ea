"""MNIST-style IDX files (unsigned bytes), plain or gzip-compressed.

The layout of the original MNIST / Fashion-MNIST release: magic
``0x00 0x00 0x08 <ndim>``, ``ndim`` big-endian int32 dims, then the raw
bytes. Plain numpy, so tools and the study share one reader and writer.
"""
import gzip
import os.path as osp

import numpy as np

__all__ = ['IDX_UBYTE', 'open_idx', 'read_idx', 'write_idx']

IDX_UBYTE = 0x08  # element type code for unsigned byte


def open_idx(path):
    """Open an idx file, plain or gzip-compressed (``path`` or
    ``path + '.gz'``)."""
    if osp.exists(path):
        return open(path, 'rb')
    if osp.exists(path + '.gz'):
        return gzip.open(path + '.gz', 'rb')
    raise FileNotFoundError(f'Neither {path} nor {path}.gz exists')


def read_idx(path):
    """Read an unsigned-byte IDX file into a numpy array (checks header)."""
    with open_idx(path) as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f'{path}: not an unsigned-byte IDX file')
    zero, zero2, dtype_code, ndim = data[0], data[1], data[2], data[3]
    if zero != 0 or zero2 != 0 or dtype_code != IDX_UBYTE:
        raise ValueError(f'{path}: not an unsigned-byte IDX file')
    dims = [
        int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)
    ]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f'{path}: header dims {dims} do not match '
                         f'{arr.size} payload bytes')
    return arr.reshape(dims)


def write_idx(path, arr):
    """Write a uint8 array as an IDX file (magic 0x0000_08_<ndim>, big-endian
    int32 dims, then the raw bytes), exactly as the original release."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, arr.ndim])
    header += b''.join(int(d).to_bytes(4, 'big') for d in arr.shape)
    with open(path, 'wb') as f:
        f.write(header)
        f.write(arr.tobytes())
