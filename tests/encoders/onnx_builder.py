"""Tiny ONNX models written straight in protobuf wire format (the onnx package is not a dependency).

Only what the text-encoder tests need: Gather (embedding lookup) and ReduceMean nodes,
float/int64 tensors, opset 13.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_FLOAT, _INT64 = 1, 7


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _key(field, 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray) -> bytes:  # TensorProto
    dtype = {np.dtype(np.float32): _FLOAT, np.dtype(np.int64): _INT64}[array.dtype]
    dims = b"".join(_int(1, d) for d in array.shape)
    return dims + _int(2, dtype) + _bytes(8, name) + _bytes(9, np.ascontiguousarray(array).tobytes())


def _value_info(name: str, elem_type: int, dims: list[int | str]) -> bytes:  # ValueInfoProto
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor_type = _int(1, elem_type) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _ints_attribute(name: str, values: list[int]) -> bytes:  # AttributeProto, type INTS = 7
    return _bytes(1, name) + b"".join(_int(8, v) for v in values) + _int(20, 7)


def _int_attribute(name: str, value: int) -> bytes:  # AttributeProto, type INT = 2
    return _bytes(1, name) + _int(3, value) + _int(20, 2)


def _node(op: str, inputs: list[str], outputs: list[str], attributes: list[bytes] = ()) -> bytes:  # NodeProto
    return (
        b"".join(_bytes(1, i) for i in inputs)
        + b"".join(_bytes(2, o) for o in outputs)
        + _bytes(4, op)
        + b"".join(_bytes(5, a) for a in attributes)
    )


def write_embedding_model(
    path: Path,
    table: np.ndarray,
    *,
    input_names: tuple[str, ...] = ("input_ids",),
    pooled: bool = True,
    float_inputs: tuple[str, ...] = (),
    symbolic_dim: bool = False,
) -> Path:
    """An ONNX "sentence encoder": token embeddings from ``table``, optionally mean-pooled.

    Args:
        path: output file.
        table: (vocab, ...) float32 embedding table; the output has its trailing dims.
        input_names: graph inputs, (batch, sequence) int64; only ``input_ids`` is used.
        pooled: True gives output (batch, ...), the mean over all tokens; False gives the
            per-token (batch, sequence, ...).
        float_inputs: inputs declared as float instead of int64 (unused by the graph).
        symbolic_dim: declare the output's last dim as a name rather than a number.
    """
    nodes = [_node("Gather", ["table", "input_ids"], ["tokens" if pooled else "output"])]
    if pooled:
        nodes.append(_node("ReduceMean", ["tokens"], ["output"], [_ints_attribute("axes", [1]), _int_attribute("keepdims", 0)]))
    trailing: list[int | str] = [int(d) for d in table.shape[1:]]
    if symbolic_dim:
        trailing[-1] = "dim"
    out_dims = ["batch", *trailing] if pooled else ["batch", "sequence", *trailing]
    graph = (
        b"".join(_bytes(1, n) for n in nodes)
        + _bytes(2, "tiny_encoder")
        + _bytes(5, _tensor("table", table.astype(np.float32)))
        + b"".join(
            _bytes(11, _value_info(name, _FLOAT if name in float_inputs else _INT64, ["batch", "sequence"]))
            for name in input_names
        )
        + _bytes(12, _value_info("output", _FLOAT, out_dims))
    )
    model = _int(1, 8) + _bytes(2, "recsys-tests") + _bytes(7, graph) + _bytes(8, _bytes(1, "") + _int(2, 13))
    path.write_bytes(model)
    return path
