"""What a compiled executable says about itself: memory per device, cost, and the collectives in
the optimised HLO."""

from __future__ import annotations

import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# "%name = <result shape> all-gather(" or its async "-start(" form; "-done" carries no new data.
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = _DTYPE_BYTES.get(dtype, 0)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return total


# XLA:TPU writes a reduce-scatter as a fusion that calls an "all-reduce-scatter" computation (an
# all-reduce and the dynamic-slice of this device's shard).
_RS_FUSION = re.compile(r"=\s*(.*?)\sfusion\(.*calls=(%all-reduce-scatter[\w.]*)")
_CHANNEL = re.compile(r"channel_id=(\d+)")
_RS_BODY = re.compile(r"^%all-reduce-scatter[\w.]*\s")


def collectives(hlo_text: str) -> dict:
    """{kind: {"count", "bytes"}} over the optimised HLO (result sizes; async starts counted
    once). An XLA:TPU reduce-scatter fusion counts as one reduce-scatter of its result (the
    shard), not as the all-reduce inside it; a collective that an async collective fusion
    repeats in its start, body and done computations (one channel id) counts once."""
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    in_rs_body, seen = False, set()
    for line in hlo_text.splitlines():
        if not line.startswith(" "):  # a computation's header or closing brace
            in_rs_body = bool(_RS_BODY.match(line))
            continue
        fusion = _RS_FUSION.search(line)
        if fusion and fusion.group(2) not in seen:
            seen.add(fusion.group(2))
            out["reduce-scatter"]["count"] += 1
            out["reduce-scatter"]["bytes"] += shape_bytes(fusion.group(1))
            continue
        m = None if in_rs_body else _OP.search(line)
        if m:
            result, kind, start = m.groups()
            channel = _CHANNEL.search(line)
            if channel:
                if (kind, channel.group(1)) in seen:
                    continue
                seen.add((kind, channel.group(1)))
            # async start: a tuple (operands, results, ...); the largest part is the result
            if start and result.startswith("("):
                nbytes = max(shape_bytes(f"{d}[{dims}]") for d, dims in _SHAPE.findall(result))
            else:
                nbytes = shape_bytes(result)
            out[kind]["count"] += 1
            out[kind]["bytes"] += nbytes
    return out


def memory(compiled) -> dict:
    """Per-device bytes; the peak is arguments + outputs + temporaries - aliased (donated)
    buffers."""
    m = compiled.memory_analysis()
    out = dict(argument_bytes=int(m.argument_size_in_bytes),
               output_bytes=int(m.output_size_in_bytes),
               temp_bytes=int(m.temp_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes))
    out["peak_bytes_per_chip"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                                  - out["alias_bytes"])
    return out


def cost(compiled) -> dict:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return dict(flops_per_chip=float(c.get("flops", 0.0)),
                bytes_accessed_per_chip=float(c.get("bytes accessed", 0.0)))
