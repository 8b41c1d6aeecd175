"""Device-memory traffic of a compiled step, read from its optimised HLO text: kernels and bytes per class.

Each instruction of the ENTRY computation is one kernel (a fusion, a library call, a copy); its bytes
are its output plus its operands. An operand that the fused computation only slices counts as the
slices' size, not the whole array (a fused q/k/v output read a third at a time). What this misses:
kernels inside loops (a scanned model's layers; the `while` is counted, its body is not), re-reads
inside a kernel, and caches. So it is a static estimate of how many bytes each class must move, for
comparing variants offline — e.g. the H100 step compiled on a CPU host (`benchmarks.mfu --dry_run
--topology h100`) — never a measured time.
"""

from __future__ import annotations

import re
from typing import Any

CLASSES = ("gemm", "attention", "elementwise", "pallas", "copy", "collective", "other")
_ITEM_BYTES = dict(pred=1, s8=1, u8=1, bf16=2, f16=2, s16=2, u16=2, f32=4, s32=4, u32=4, f64=8, s64=8, u64=8)
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][a-z\-]*)\((.*?)\)(?:, (.*))?$")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) \(.*\) -> .* \{$")
_NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id"}
_COLLECTIVES = re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute")
_GEMM_FUSION = re.compile(r'"kind":"__(triton_gemm|triton_nested_gemm_fusion|cublas|custom_fusion)"|gemm')
_SLICES = {"slice", "dynamic-slice"}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string; a tuple's elements add up."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * _ITEM_BYTES[dtype]
    return total


def _computations(text: str) -> dict[str, list[tuple[str, str, str, str, str]]]:
    """Each computation's instructions: (name, shape, opcode, operands, attributes); ENTRY as 'ENTRY'."""
    computations: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("ENTRY "):
            current = computations.setdefault("ENTRY", [])
        elif (match := _COMPUTATION.match(line)) is not None:
            current = computations.setdefault(match.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and (match := _INSTRUCTION.match(line)) is not None:
            name, shape, opcode, operands, attributes = match.groups()
            current.append((name, shape, opcode, operands, attributes or ""))
    return computations


def _operand_names(operands: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", operands)


def _parameters_read(body: list[tuple]) -> dict[int, int]:
    """Per parameter index of a fused computation: the bytes read where it is only sliced (through bitcasts)."""
    users: dict[str, list[tuple]] = {}
    for instruction in body:
        for operand in _operand_names(instruction[3]):
            users.setdefault(operand, []).append(instruction)

    def sliced_bytes(name: str) -> int | None:
        total = 0
        for user_name, shape, opcode, _, _ in users.get(name, []):
            if opcode in _SLICES:
                total += shape_bytes(shape)
            elif opcode == "bitcast" and (inner := sliced_bytes(user_name)) is not None:
                total += inner
            else:
                return None
        return total if users.get(name) else None

    read = {}
    for name, _, opcode, operands, _ in body:
        if opcode == "parameter" and (sliced := sliced_bytes(name)) is not None:
            read[int(operands)] = sliced
    return read


def kernel_class(opcode: str, attributes: str, name: str, body: list[tuple] = ()) -> str:
    """The class of one ENTRY instruction; `body` is a fusion's called computation (a dot in it: gemm)."""
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', attributes)
        target = target.group(1).lower() if target else ""
        if "fmha" in target or "flash" in target or "attention" in target:
            return "attention"
        if target in ("__gpu$xla.gpu.triton", "tpu_custom_call"):
            return "pallas"  # a kernel written in Pallas (Triton on GPUs, Mosaic on TPUs)
        return "gemm" if re.search(r"gemm|matmul|cublas", target) else "other"
    if opcode == "fusion":
        has_dot = any(instruction[2] in ("dot", "convolution") for instruction in body)
        return "gemm" if has_dot or _GEMM_FUSION.search(attributes) or "gemm" in name else "elementwise"
    if opcode in ("dot", "convolution"):
        return "gemm"
    if opcode in ("copy", "transpose", "copy-start", "dynamic-update-slice"):
        return "copy"
    if _COLLECTIVES.search(opcode):
        return "collective"
    return "other"


def traffic_by_class(text: str) -> dict[str, dict[str, Any]]:
    """{class: {kernels, read_bytes, written_bytes}} over the ENTRY computation of optimised HLO text."""
    computations = _computations(text)
    sizes: dict[str, int] = {}
    result = {name: dict(kernels=0, read_bytes=0, written_bytes=0) for name in CLASSES}
    for name, shape, opcode, operands, attributes in computations.get("ENTRY", []):
        sizes[name] = shape_bytes(shape)
        if opcode in _NOT_KERNELS or opcode.endswith("-done"):
            continue
        operand_bytes = [sizes.get(operand, 0) for operand in _operand_names(operands)]
        called = re.search(r"calls=%?([\w.\-]+)", attributes)
        body = computations.get(called.group(1), []) if opcode == "fusion" and called else []
        for index, sliced in _parameters_read(body).items():
            if index < len(operand_bytes):
                operand_bytes[index] = sliced
        entry = result[kernel_class(opcode, attributes, name, body)]
        entry["kernels"] += 1
        entry["read_bytes"] += sum(operand_bytes)
        entry["written_bytes"] += sizes[name]
    return result


def format_traffic(traffic: dict[str, dict[str, Any]], bandwidth: float | None) -> str:
    """One line per class that has kernels; with a bandwidth, the time its bytes take at that rate."""
    lines = []
    for name, entry in traffic.items():
        if not entry["kernels"]:
            continue
        moved = entry["read_bytes"] + entry["written_bytes"]
        at = f", {moved / bandwidth * 1e3:.1f} ms at {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""
        lines.append(f"  {name:<12}{entry['kernels']:>6} kernels  {moved / 2**30:9.2f} GiB{at}")
    return "\n".join(lines)
