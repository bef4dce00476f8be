r"""DIN's per-request attention on TF's CPU kernels: float32 against bfloat16, cache-sized chunks, PReLU's form.

The serving request of `tools/bench/serving.py` (200 candidates, a history of S=50, item embedding width E=48 after
the concatenation of DIN's id embeddings, attention units 80-40) spends most of its model call in one computation:
the first attention layer as one `[B, E] × [E, S·80]` product (the shared-history form of `DINAttention`), its
bias and PReLU over `[B·S, 80]`, the second layer `[B·S, 80] × [80, 40]` with its bias and PReLU, the score
`[B·S, 40] × [40, 1]`, the softmax over S and the weighted sum of the history. This bench times that computation
alone, in one `tf.function` on one intra-op thread (the server's setting), in several forms:

* **fp32** — float32 throughout, PReLU as Keras writes it (`relu(x) − α·relu(−x)`): the baseline.
* **fp32_maxmin** — PReLU as `max(x, 0) + α·min(x, 0)`.
* **bf16** — everything in bfloat16 (the softmax in float32).
* **bf16_matmul** — the two large products in bfloat16, their results cast to float32 for the elementwise work.
* **fp32_chunk4**, **fp32_chunk8** — the candidates in 4 or 8 chunks, so that each chunk's `[B·S/k, 80]`
  activations stay in cache.
* **matmul_fp32**, **matmul_bf16** — the first layer's product alone, and its GFLOP/s.

The modes run interleaved, `--repeats` × `--seconds` each. The table gives the median and the best CPU ms per
call of this process, and each form's ratio to fp32. Outputs are checked against fp32 (bfloat16 within 2e-2).

```
python -m tools.bench.din_kernels            # ~1 minute
```
"""

import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from tools.bench.serving_world import machine_info

_CANDIDATES = flags.DEFINE_integer("candidates", 200, "Candidates per request (B).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 50, "History length S.")
_WIDTH = flags.DEFINE_integer("width", 48, "DIN's query/key width E (concatenated id embeddings).")
_UNITS = flags.DEFINE_list("units", ["80", "40"], "The attention MLP's two hidden layers.")
_SECONDS = flags.DEFINE_float("seconds", 0.6, "Timed seconds per mode and repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repeats.")

MODES = ("fp32", "fp32_maxmin", "bf16", "bf16_matmul", "fp32_chunk4", "fp32_chunk8", "matmul_fp32", "matmul_bf16")


def _prelu(x, alpha):
    return tf.nn.relu(x) - alpha * tf.nn.relu(-x)


def _prelu_maxmin(x, alpha):
    return tf.maximum(x, 0.0) + alpha * tf.minimum(x, 0.0)


def build(b, s, e, h1, h2, seed=0):
    """`({mode: tf.function of the query [B, E]}, query, flops of the first product)` for the sizes given."""
    rng = np.random.default_rng(seed)

    def const(*shape):
        return tf.constant(rng.standard_normal(shape).astype(np.float32) * 0.1)

    query, hist = const(b, e), const(s, e)
    m, bias, w2, b2, w3 = const(e, s * h1), const(s * h1), const(h1, h2), const(h2), const(h2, 1)
    a1, a2 = const(h1), const(h2)
    m16, w2_16 = tf.cast(m, tf.bfloat16), tf.cast(w2, tf.bfloat16)

    def attention(q, prelu=_prelu, dtype=tf.float32, matmul_dtype=None):
        def mm(x, w, w16):
            if matmul_dtype is None:
                return tf.matmul(tf.cast(x, dtype), tf.cast(w, dtype))
            return tf.cast(tf.matmul(tf.cast(x, matmul_dtype), w16), dtype)

        h = mm(q, m, m16) + tf.cast(bias, dtype)  # [b, S·h1]
        h = prelu(tf.reshape(h, [-1, h1]), tf.cast(a1, dtype))  # [b·S, h1]
        h = prelu(mm(h, w2, w2_16) + tf.cast(b2, dtype), tf.cast(a2, dtype))  # [b·S, h2]
        scores = tf.reshape(tf.cast(tf.matmul(h, tf.cast(w3, dtype)), tf.float32), [-1, s])  # [b, S]
        return tf.matmul(tf.nn.softmax(scores, -1), hist)  # [b, E]

    def chunked(q, k):
        return tf.concat([attention(part) for part in tf.split(q, k)], 0)

    fns = {
        "fp32": lambda q: attention(q),
        "fp32_maxmin": lambda q: attention(q, prelu=_prelu_maxmin),
        "bf16": lambda q: attention(q, dtype=tf.bfloat16),
        "bf16_matmul": lambda q: attention(q, matmul_dtype=tf.bfloat16),
        "fp32_chunk4": lambda q: chunked(q, 4),
        "fp32_chunk8": lambda q: chunked(q, 8),
        "matmul_fp32": lambda q: tf.matmul(q, m),
        "matmul_bf16": lambda q: tf.matmul(tf.cast(q, tf.bfloat16), m16),
    }
    return {k: tf.function(f) for k, f in fns.items()}, query, 2 * b * e * s * h1


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    b, s, e = _CANDIDATES.value, _SEQ_LEN.value, _WIDTH.value
    h1, h2 = (int(u) for u in _UNITS.value)
    if b % 8:
        raise app.UsageError(f"--candidates must be a multiple of 8 (the chunked modes), got {b}")
    print({"machine": machine_info(), "candidates": b, "seq_len": s, "width": e, "units": [h1, h2]}, flush=True)
    fns, query, first_flops = build(b, s, e, h1, h2)
    reference = fns["fp32"](query).numpy()
    for mode, fn in fns.items():
        out = tf.cast(fn(query), tf.float32).numpy()
        if not mode.startswith("matmul"):
            np.testing.assert_allclose(out, reference, atol=2e-2 if "bf16" in mode else 1e-4)
    cpu = {m: [] for m in MODES}
    for _ in range(_REPEATS.value):
        for mode in MODES:
            fn, n = fns[mode], 0
            c0, t0 = time.process_time(), time.perf_counter()
            while time.perf_counter() - t0 < _SECONDS.value:
                fn(query).numpy()
                n += 1
            cpu[mode].append(1e3 * (time.process_time() - c0) / n)
    base = statistics.median(cpu["fp32"])
    print("\n| mode | CPU ms/call, median | best | / fp32 | GFLOP/s (products alone) |\n|---|---:|---:|---:|---:|")
    for mode in MODES:
        med = statistics.median(cpu[mode])
        gflops = f"{first_flops / (min(cpu[mode]) * 1e-3) / 1e9:.0f}" if mode.startswith("matmul") else "—"
        ratio = "—" if mode == "fp32" or mode.startswith("matmul") else f"{med / base:.2f}"
        print(f"| {mode} | {med:.3f} | {min(cpu[mode]):.3f} | {ratio} | {gflops} |")
    print({"load_after": machine_info()["load"]})


if __name__ == "__main__":
    app.run(main)
