"""The Open Inference Protocol decoder under random caller input: it answers or raises BadRequest, nothing else,
and never builds more than the bytes it was given allow (pure, seeded, about a second)."""

from __future__ import annotations

import contextlib
import json
import random
import struct
from typing import Any

import numpy as np
import pytest

from strata.core.datatypes import OIP_TO_NUMPY
from strata.core.errors import BadRequest
from strata.core.oip import decode_request, encode_request

DATATYPES = sorted(OIP_TO_NUMPY)
ODD_VALUES: list[Any] = [
    None, True, -1, 0, 1, 2**31, 2**63, 2**64, 4611686018427387904, 10**30, 1.5, float("nan"), "", "x", "FP32",
    [], [[]], [1, [2]], {}, {"a": 1},
]  # fmt: skip


def odd_shape(rng: random.Random) -> Any:
    match rng.randrange(5):
        case 0:
            return [rng.choice([0, 1, 2, 2**28, 2**31, 2**62, 2**64]) for _ in range(rng.randrange(0, 5))]
        case 1:
            return [1] * rng.randrange(30, 70)
        case 2:
            return rng.choice(ODD_VALUES)
        case 3:
            return [rng.choice(ODD_VALUES) for _ in range(rng.randrange(1, 4))]
        case _:
            return [rng.randrange(0, 5) for _ in range(rng.randrange(0, 4))]


def odd_data(rng: random.Random) -> Any:
    match rng.randrange(4):
        case 0:
            return [rng.choice(ODD_VALUES) for _ in range(rng.randrange(0, 6))]
        case 1:
            return [[rng.random()] * rng.randrange(0, 3) for _ in range(rng.randrange(0, 3))]
        case 2:
            return rng.choice(ODD_VALUES)
        case _:
            return [rng.randrange(-(2**70), 2**70) for _ in range(rng.randrange(0, 4))]


def odd_tensor(rng: random.Random) -> tuple[dict[str, Any], bytes]:
    tensor: dict[str, Any] = {
        "name": rng.choice(["x", "y", "", None, 3]),
        "datatype": rng.choice([*DATATYPES, "FP128", ["FP32"], None, {"a": 1}]),
        "shape": odd_shape(rng),
    }
    payload = b""
    if rng.random() < 0.5:
        payload = rng.choice([b"", b"\0" * rng.randrange(0, 40), struct.pack("<I", rng.randrange(2**32)) + b"ab"])
        size: Any = rng.choice([len(payload), len(payload) + 1, -1, 2**64, "4", True])
        tensor["parameters"] = rng.choice([{"binary_data_size": size}, [], None])
    else:
        tensor["data"] = odd_data(rng)
    return tensor, payload


@pytest.mark.parametrize("seed", range(4))
def test_random_requests_decode_or_are_bad_requests(seed: int) -> None:
    rng = random.Random(seed)
    outcomes = {"ok": 0, "bad": 0}
    for _ in range(1500):
        tensors, payloads = zip(*(odd_tensor(rng) for _ in range(rng.randrange(1, 3))), strict=True)
        header = json.dumps({"inputs": list(tensors)}).encode()
        binary = b"".join(payloads)
        length: int | None = len(header) if binary or rng.random() < 0.3 else None
        try:
            request = decode_request(header + binary, length)
        except BadRequest:
            outcomes["bad"] += 1
            continue
        outcomes["ok"] += 1
        for tensor in request.inputs:  # what was built is bounded by what was sent
            assert tensor.array.nbytes <= 8 * len(header + binary) + 64
    assert outcomes["bad"] > outcomes["ok"] > 0


@pytest.mark.parametrize("seed", range(4))
def test_mutated_binary_requests_decode_or_are_bad_requests(seed: int) -> None:
    rng = random.Random(seed)
    strings = np.array([b"a", b"bc", b""], dtype=object)
    body, length = encode_request({"x": np.arange(6, dtype=np.float32).reshape(2, 3), "s": strings})
    assert length is not None
    for _ in range(2000):
        mutated = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            position = rng.randrange(len(mutated))
            mutated[position] = rng.randrange(256)
        cut = len(mutated) if rng.random() < 0.8 else rng.randrange(len(mutated))
        header_length = rng.choice([length, length, length - 1, length + 3, 0, None])
        with contextlib.suppress(BadRequest):
            decode_request(bytes(mutated[:cut]), header_length)
