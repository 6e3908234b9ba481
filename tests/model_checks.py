"""Checks shared by the save -> load tests."""

import torch


def tensor_layouts(head) -> dict:
    """dtype, shape and strides of every fitted tensor of a head, its sub-modules' parameters and buffers included.

    A loaded model gives bit-identical outputs only if it runs the same arithmetic on the same tensors; a tensor with
    other strides (say column-major from scikit-learn, row-major from the file) takes another BLAS path, whose last
    bits differ on some CPUs. Comparing layouts catches that on every CPU, not only where the bits differ.
    """
    out = {}
    for key, value in vars(head).items():
        if torch.is_tensor(value):
            out[key] = (value.dtype, tuple(value.shape), value.stride())
        elif isinstance(value, torch.nn.Module):
            for name, t in value.state_dict(keep_vars=True).items():
                out[f"{key}.{name}"] = (t.dtype, tuple(t.shape), t.stride())
    return out
