"""What do the testbed's heads contribute? Per head, its share of the attention output and how much
of that varies from token to token.

One forward of the testbed model on a noised held-out clip at each noise level ``t``, dense. For
every self-attention head ``h`` the dense output ``o_h`` is projected by its slice of the output
matrix (``y_h = o_h W_o[:, h]ᵀ``, what the head adds to the residual stream) and reported as

- ``share``: ``|y_h|`` over the sum of the layer's ``|y_h|``;
- ``varying``: ``|y_h − mean_tokens(y_h)| / |y_h|``, the part that differs between tokens (0: the
  head adds the same vector everywhere, a learned offset).

A head that attends almost uniformly averages the whole clip, so it can only add an offset: these
are the heads whose recall no sparse plan can raise (``docs/testbed.md``).

    PYTHONPATH=src python benchmarks/head_outputs.py --out benchmarks/results/testbed-head-outputs-cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import held_out_clip, save_testbed_report

from pasa.eval.generate import resolve_device
from pasa.integrations.diffusers.processors import wan_rotary
from pasa.testbed.model import DEFAULT_CHECKPOINT


class _HeadOutputs:
    """Wraps a stock self-attention processor; records each head's ``(share, varying)``."""

    def __init__(self, stock, sink: list) -> None:
        self.stock, self.sink = stock, sink

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = wan_rotary(q, *rotary_emb), wan_rotary(k, *rotary_emb)
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
        weight = attn.to_out[0].weight.float()  # (dim, H * D)
        dim = q.shape[-1]
        norms, varying = [], []
        for h in range(attn.heads):
            y = o[:, h] @ weight[:, h * dim : (h + 1) * dim].T  # (B, S, dim)
            norms.append(float(y.norm()))
            varying.append(float((y - y.mean(1, keepdim=True)).norm() / y.norm().clamp_min(1e-30)))
        total = sum(norms)
        pairs = zip(norms, varying, strict=True)
        self.sink.append([{"share": round(n / total, 4), "varying": round(v, 4)} for n, v in pairs])
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--times", type=float, nargs="+", default=[0.9, 0.5, 0.2])
    ap.add_argument("--clip", type=int, default=0, help="index of the held-out clip")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    clip = held_out_clip(args.checkpoint, args.clip, device)
    model = clip.model
    sink: list = []
    stock = [block.attn1.processor for block in model.blocks]
    for block, proc in zip(model.blocks, stock, strict=True):
        block.attn1.set_processor(_HeadOutputs(proc, sink))
    start = time.monotonic()
    rows = []
    try:
        for t in args.times:
            sink.clear()
            model(**clip.model_call(t))
            rows.append({"t": t, "layers": [list(layer) for layer in sink]})
            print(f"t = {t}: (share, varying) per head, layer by layer", flush=True)
            for i, layer in enumerate(sink):
                print(f"  layer {i}: " + "  ".join(
                    f"{h['share']:.2f} {h['varying']:.2f}" for h in layer), flush=True)  # fmt: skip
    finally:
        for block, proc in zip(model.blocks, stock, strict=True):
            block.attn1.set_processor(proc)
    save_testbed_report("head_outputs", args, device, start, caption=clip.caption, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
