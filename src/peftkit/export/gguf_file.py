"""Writing a GGUF file one tensor at a time: the header and every tensor's name, shape and type first,
then each tensor's data made, encoded and written in turn, so at most one converted tensor is held.

Types follow llama.cpp's converter: 1-D tensors and norms stay float32; the rest take the ``--outtype``
(f32, f16, bf16, q8_0); a row whose length is not a multiple of Q8_0's block of 32 falls back to f16.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

__all__ = ["FILE_TYPES", "QUANT_TYPES", "PlannedTensor", "tensor_type", "write_gguf"]

Q = gguf.GGMLQuantizationType
QUANT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor of the file before its data exists.

    Attributes:
        name: llama.cpp's name (``blk.0.attn_q.weight``).
        shape: PyTorch order, e.g. ``(out, in)`` for a linear weight.
        qtype: its type in the file.
        produce: makes the float tensor (of ``shape``) when its turn comes.
    """

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes of its data in the file."""
        if self.qtype == Q.F32:
            return math.prod(self.shape) * 4
        if self.qtype in (Q.F16, Q.BF16):
            return math.prod(self.shape) * 2
        return math.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))


def tensor_type(name: str, shape: Sequence[int], outtype: str) -> gguf.GGMLQuantizationType:
    """The file type of tensor ``name`` of ``shape`` for ``outtype``, as llama.cpp's converter picks it."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    qtype = QUANT_TYPES[outtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    return qtype


def _encode(tensor: Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def write_gguf(
    path: Path,
    arch_name: str,
    write_metadata: Callable[[gguf.GGUFWriter], None],
    tensors: Sequence[PlannedTensor],
) -> None:
    """Write a GGUF file: metadata from ``write_metadata(writer)``, then ``tensors`` one by one.

    Args:
        path: the file to create (callers pass the temporary file of an atomic write).
        arch_name: ``general.architecture``.
        write_metadata: adds the key/value pairs.
        tensors: in file order; each ``produce()`` is called once, when its data is written.
    """
    writer = gguf.GGUFWriter(None, arch_name)
    write_metadata(writer)
    for planned in tensors:
        writer.add_tensor_info(
            planned.name, planned.shape, np.dtype(np.float32), planned.nbytes, planned.qtype
        )
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for planned in tensors:
            produced = planned.produce()
            if tuple(produced.shape) != planned.shape:
                raise ValueError(f"{planned.name}: made {tuple(produced.shape)}, planned {planned.shape}")
            writer.write_tensor_data(_encode(produced, planned.qtype))
    finally:
        writer.close()
