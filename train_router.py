"""
train_router.py: fit R2R's router on label.py's dataset (R2R Stage 2), pick its
threshold, and compare it with routing by SLM confidence at the same LLM share.

    python train_router.py                                    # labels/ -> router/
    python train_router.py --labels labels --out demo/router  # how demo/router was made

The router sees the SLM's last hidden state, its top-k logits and the embedding of the
token it is about to emit (taken from the SLM's own embedding table, which is loaded,
never stored). Three splits by prompt text, never by token: train; validation for early
stopping and the threshold; held-out prompts for the report, so its recall and LLM share
were measured on prompts that chose nothing. The features stay on disk, read a batch at a
time, so memory does not grow with the label set. The router folder keeps training.json, the
report and each split's prompt ids. It does not label (label.py) or decode (generate.py).
"""

import contextlib
import json
import os
import pathlib
import shutil
import sys
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

import r2r


def auc(scores, labels):
    """Area under the ROC curve: the chance that a random positive outscores a random
    negative, ties counting half (Mann-Whitney, from ranks with ties averaged).
    [0.1, 0.4, 0.35, 0.8] with labels [0, 0, 1, 1] -> 3 of 4 pairs ordered -> 0.75."""
    y = labels.bool()
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    # 1-based ranks; ties share their mean rank.
    ranks = (counts.cumsum(0) - (counts - 1) / 2)[inverse]
    n_pos = y.sum().item()
    # Undefined with one class only (a tiny held-out split can have no negatives).
    if n_pos in (0, len(y)):
        return float("nan")
    return (ranks[y].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos))


def threshold_for_recall(scores, labels, recall):
    """The highest threshold (so the lowest LLM share) that routes at least `recall` of the
    positives: the authors' rule (R2R Stage 2)."""
    pos = scores[labels.bool()].sort(descending=True).values
    return pos[max(0, int(torch.tensor(recall * len(pos)).ceil().item()) - 1)].item()


def threshold_for_share(scores, share):
    """The threshold that routes `share` of all positions."""
    return scores.sort(descending=True).values[max(0, round(share * len(scores)) - 1)].item()


def recall_share(scores, labels, threshold):
    """(recall of the positives, share of all positions routed) at `threshold`."""
    routed = scores >= threshold
    recall = (routed & labels.bool()).sum().item() / max(labels.sum().item(), 1)
    return recall, routed.float().mean().item()


class Labels:
    """A label folder's positions for R2R Stage 2 at the paper's scale (2M positions of a
    1,536-wide SLM hold 6.5 GB of float16 features): the scalar columns in memory, (N,) each; the
    features read from the shards' data.arrow files a batch at a time, by pread into the batch's
    own array. Never through a mapping: mapped pages count in the process's memory once read, and
    on the CPU VM one random batch of 1,024 rows left 0.9 GB of a 1 GB shard mapped."""

    def __init__(self, files):
        scalars = {k: [] for k in ("prompt_id", "prompt_hash", "slm_token", "label")}
        # (file, its first position, {feature: file offset of its values}) per record batch.
        self.parts = []
        n = 0
        for path in files:
            # Zero-copy over the file's mapping: only the Arrow metadata is read.
            whole = pa.memory_map(path).read_buffer()
            for batch in pa.ipc.open_stream(whole):
                for k, v in scalars.items():
                    v.append(batch.column(k).to_numpy().copy())
                values = {k: batch.column(k).flatten() for k in ("hidden", "topk")}
                offsets = {
                    k: x.buffers()[1].address - whole.address + x.offset * x.type.byte_width
                    for k, x in values.items()
                }
                self.parts.append((path, n, offsets))
                n += batch.num_rows
        for k, v in scalars.items():
            setattr(self, k, torch.from_numpy(np.concatenate(v)))
        self.firsts = np.array([first for _, first, _ in self.parts])
        # Feature widths H and k, and their stored dtype.
        self.widths = {k: batch.schema.field(k).type.list_size for k in ("hidden", "topk")}
        self.dtype = batch.schema.field("hidden").type.value_type.to_pandas_dtype()

    def read(self, i, names=("hidden", "topk")):
        """The features `names` of positions i (n,) -> float32 tensors (n, H), (n, k), in i's
        order; one pread per run of consecutive positions, each file opened once."""
        order = np.argsort(np.asarray(i))
        s = np.asarray(i)[order]
        part = np.searchsorted(self.firsts, s, side="right") - 1
        runs = np.flatnonzero((np.diff(s, prepend=-2) != 1) | (np.diff(part, prepend=-1) != 0))
        rows = {k: np.empty((len(s), self.widths[k]), self.dtype) for k in names}
        with contextlib.ExitStack() as files:
            fds = {}
            for a, b in zip(runs, np.append(runs[1:], len(s))):
                path, first, offsets = self.parts[part[a]]
                if path not in fds:
                    fds[path] = files.enter_context(open(path, "rb", buffering=0)).fileno()
                for k, x in rows.items():
                    os.preadv(fds[path], [x[a:b]], offsets[k] + (s[a] - first) * x[0].nbytes)
        back = np.argsort(order)
        return [torch.from_numpy(rows[k][back]).float() for k in names]


def load_features(folder, device):
    """A label folder's Labels, the SLM's input embedding table (float32, frozen), its tokenizer
    and meta.json."""
    meta, ds = r2r.load_labels(folder)
    if len(ds) == 0:
        raise r2r.R2RError(f"{folder} holds no labeled positions: label more prompts")
    data = Labels([f["filename"] for f in ds.cache_files])
    if data.label.sum() == 0:
        raise r2r.R2RError(
            f"{folder} has no divergent labels, so there is nothing to route: label more prompts "
            "or check the verifier"
        )
    # In its checkpoint's dtype (half of float32's bytes for a bf16 SLM: 3.6 GB, not 7.1, for
    # R1-1.5B), and only until its embedding table is taken: upcast bf16 values are exact.
    slm = r2r.load_model(meta["slm"], device, dtype="auto")
    tok = r2r.load_tokenizer(meta["slm"])
    have = r2r.fingerprint(slm, tok)
    if any(have[k] != meta["fingerprint"][k] for k in ("hidden_size", "vocab", "embedding_sha")):
        raise r2r.R2RError(f"{meta['slm']} is not the SLM that made the labels in {folder}")
    emb_table = slm.get_input_embeddings().float().requires_grad_(False)
    return data, emb_table, tok, meta


class Split(NamedTuple):
    """Position indices (N_split,) of the three prompt-level splits."""

    train: torch.Tensor  # fits the weights
    val: torch.Tensor  # early stopping and the threshold
    test: torch.Tensor  # held out: chose nothing, so its recall and LLM share are honest


def split_by_prompt(prompt_ids, val_fraction, test_fraction, seed):
    """Three splits by prompt: a prompt's positions all go to one side (neighbouring tokens
    would leak across a token-level split). main passes label.py's prompt_hash, so that prompts
    of the same text share a side too."""
    ids = prompt_ids.unique()
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    n_val, n_test = max(1, round(val_fraction * len(ids))), max(1, round(test_fraction * len(ids)))
    if n_val + n_test >= len(ids):
        raise r2r.R2RError(
            f"{len(ids)} prompts cannot be split with --val-fraction {val_fraction} and "
            f"--test-fraction {test_fraction}: label more prompts"
        )
    val, test = (
        torch.isin(prompt_ids, ids[:n_val]),
        torch.isin(prompt_ids, ids[n_val : n_val + n_test]),
    )
    return Split((~val & ~test).nonzero()[:, 0], val.nonzero()[:, 0], test.nonzero()[:, 0])


def router_logits(router, emb_table, data, i):
    """The router on positions i, read from the shards now. Each batch moves to the router's
    device, where the SLM's embedding table must be too (--device cuda)."""
    dev = next(router.parameters()).device
    hidden, topk = data.read(i)
    return router(hidden.to(dev), topk.to(dev), emb_table(data.slm_token[i].to(dev)))


def batch_loss(router, emb_table, data, y, i, pos_weight):
    """Class-weighted binary cross-entropy of one batch (R2R Stage 2), on the router's device."""
    logit = router_logits(router, emb_table, data, i)
    return F.binary_cross_entropy_with_logits(
        logit, y[i].to(logit.device), pos_weight=pos_weight.to(logit.device)
    )


@torch.no_grad()
def scores_of(router, emb_table, data, idx, batch=8192):
    router.eval()
    out = [router_logits(router, emb_table, data, i).float().cpu() for i in idx.split(batch)]
    return torch.sigmoid(torch.cat(out))


def fit(router, emb_table, data, y, tr_idx, va_idx, pos_weight, args):
    """AdamW on class-weighted BCE; keeps the weights of the best validation loss and stops
    after --patience epochs without a better one (R2R Stage 2)."""
    opt = torch.optim.AdamW(router.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    best, best_state, bad = float("inf"), None, 0
    bar = tqdm(range(args.epochs), desc="router", unit="epoch")
    for epoch in bar:
        router.train()
        losses = []
        for i in tr_idx[torch.randperm(len(tr_idx))].split(args.batch_size):
            loss = batch_loss(router, emb_table, data, y, i, pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        s, yv = scores_of(router, emb_table, data, va_idx), y[va_idx]
        vl = F.binary_cross_entropy(
            s.clamp(1e-7, 1 - 1e-7), yv, weight=1 + (pos_weight - 1) * yv
        ).item()
        rec, share = recall_share(s, yv, threshold_for_recall(s, yv, args.recall))
        bar.write(
            f"epoch {epoch + 1:3d} | train loss {sum(losses) / len(losses):.4f} | "
            f"val loss {vl:.4f} | val AUC {auc(s, yv):.3f} | recall {rec:.3f} at LLM share "
            f"{share:.1%}",
            file=sys.stderr,
        )
        if vl < best:
            best, best_state, bad = vl, {k: v.clone() for k, v in router.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= args.patience:
                bar.write(
                    f"early stop: no better validation loss for {args.patience} epochs",
                    file=sys.stderr,
                )
                break
    router.load_state_dict(best_state)


def measure(router, emb_table, data, y, idx, threshold, seed):
    """The router at `threshold` on positions `idx`, beside the confidence baselines
    routing the same share of them there: a dict (tests read it, main prints it)."""
    s, yv = scores_of(router, emb_table, data, idx), y[idx]
    rec, share = recall_share(s, yv, threshold)
    g = torch.Generator().manual_seed(seed)
    # A batch of top-k logits at a time.
    parts = [r2r.confidence_scores(data.read(i, ["topk"])[0], g) for i in idx.split(8192)]
    base = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    baselines = {
        name: dict(auc=auc(b, yv), recall=recall_share(b, yv, threshold_for_share(b, share))[0])
        for name, b in base.items()
    }
    return dict(
        positions=len(idx),
        divergent=int(yv.sum()),
        share=share,
        recall=rec,
        auc=auc(s, yv),
        baselines=baselines,
    )


def save_router(router, folder, report=None):
    """router.save_pretrained(folder) and its training report (training.json) as a whole: written
    to a sibling folder, then swapped in (the old one renamed aside, removed last), so a reader
    never sees new weights beside an old config; not r2r.atomic, whose os.replace cannot replace a
    folder that holds files. Its files get the modes of any file the umask allows (safetensors
    writes 0600)."""
    folder = os.path.normpath(folder)
    tmp = folder + ".tmp"
    old = folder + ".old"
    # The umask is read by setting it.
    umask = os.umask(0)
    os.umask(umask)

    def tidy():
        # A swap that failed, or was killed, puts the old router back.
        if os.path.exists(old) and not os.path.exists(folder):
            os.rename(old, folder)
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)

    tidy()
    try:
        router.save_pretrained(tmp)
        if report is not None:
            pathlib.Path(tmp, "training.json").write_text(json.dumps(report, indent=2))
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if os.path.exists(folder):
            os.rename(folder, old)
        os.rename(tmp, folder)
    finally:
        tidy()


def parse_args(argv=None):
    p = r2r.parser(__doc__, pair=False)
    # data
    p.add_argument("--labels", default="labels", help="folder written by label.py")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        help="share of prompts for early stopping and the threshold",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.15,
        help="share of prompts held out for the report: they choose nothing",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the split and the initialisation")
    # router size: the paper's 6 blocks x 1024 (56M parameters) is far more than the demo needs
    p.add_argument("--width", type=int, default=128, help="MLP width (paper: 1024)")
    p.add_argument("--blocks", type=int, default=2, help="residual MLP blocks (paper: 6)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout in each block")
    # optimisation
    p.add_argument("--epochs", type=int, default=50, help="most epochs (paper: 50)")
    p.add_argument(
        "--patience",
        type=int,
        default=10,
        help="stop after this many epochs without a better validation loss (paper: 10)",
    )
    p.add_argument("--batch-size", type=int, default=1024, help="positions per step (paper: 1024)")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="AdamW learning rate (paper: 5e-5 for its 56M router)",
    )
    p.add_argument(
        "--weight-decay", type=float, default=5e-4, help="AdamW weight decay (paper: 5e-4)"
    )
    # threshold
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--recall",
        type=float,
        default=0.95,
        help="lowest LLM share whose validation recall of "
        "divergent tokens is at least this (the paper's rule)",
    )
    g.add_argument(
        "--llm-share",
        type=float,
        default=None,
        help="instead, route this share of validation tokens",
    )
    p.add_argument("--out", default="router", help="folder for model.safetensors and config.json")
    p.add_argument(
        "--device", default="cpu", help="cpu is plenty for the demo; cuda for large label sets"
    )
    args = p.parse_args(argv)
    r2r.check_args(
        args, epochs=1, patience=1, batch_size=1, width=1, blocks=1, dropout=0, weight_decay=0
    )
    for flag, ok, where in (
        ("lr", args.lr > 0, "above 0"),
        ("dropout", args.dropout < 1, "below 1"),
        ("recall", 0 < args.recall <= 1, "in (0, 1]"),
        ("llm_share", args.llm_share is None or 0 < args.llm_share <= 1, "in (0, 1]"),
        ("val_fraction", 0 < args.val_fraction < 1, "in (0, 1)"),
        (
            "test_fraction",
            0 < args.test_fraction < 1 - args.val_fraction,
            f"in (0, {1 - args.val_fraction:g}), beside --val-fraction {args.val_fraction:g}",
        ),
    ):
        if not ok:
            raise r2r.R2RError(
                f"--{flag.replace('_', '-')} must be {where}, not {getattr(args, flag)}"
            )
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    # Before any work: where the router goes (beside --out); load_features reads meta.json first.
    r2r.check_writable(os.path.dirname(os.path.abspath(args.out)), "out")
    data, emb_table, tok, meta = load_features(args.labels, args.device)
    repeats = len(data.prompt_id.unique()) - len(data.prompt_hash.unique())
    r2r.status(f"{repeats} duplicate prompts (the same text after whitespace normalisation)")
    split = split_by_prompt(data.prompt_hash, args.val_fraction, args.test_fraction, args.seed)
    y = data.label.float()
    counts = [int(y[idx].sum()) for idx in (split.train, split.val, split.test)]
    n_pos = counts[0]
    if min(counts) == 0:
        raise r2r.R2RError(
            "the training, validation or held-out prompts hold no divergent label (divergent: "
            f"{' / '.join(map(str, counts))}): label more prompts, or raise --val-fraction and "
            "--test-fraction"
        )
    # Class weighting (R2R Stage 2): divergent tokens are a few percent of all.
    pos_weight = torch.tensor((len(split.train) - n_pos) / n_pos)
    H, k = data.widths["hidden"], data.widths["topk"]
    router = r2r.Router(H, k, args.width, args.blocks, args.dropout, slm=meta["fingerprint"])
    # Beside emb_table, which load_features placed.
    router = router.to(args.device)
    print(
        f"{len(split.train)} train / {len(split.val)} validation / {len(split.test)} held-out "
        f"positions, {y.mean():.2%} divergent, pos_weight {pos_weight:.1f}; router "
        f"{r2r.n_params(router) / 1e6:.2f}M parameters"
    )
    fit(router, emb_table, data, y, split.train, split.val, pos_weight, args)

    # The threshold on validation prompts (R2R Stage 2); the report on held-out prompts, which
    # chose nothing.
    s, yv = scores_of(router, emb_table, data, split.val), y[split.val]
    t = (
        threshold_for_share(s, args.llm_share)
        if args.llm_share
        else threshold_for_recall(s, yv, args.recall)
    )
    router.config["threshold"] = t
    metrics = dict(
        threshold=t,
        validation=measure(router, emb_table, data, y, split.val, t, args.seed),
        test=measure(router, emb_table, data, y, split.test, t, args.seed),
    )
    # Anyone can audit a shared router: its figures, its threshold rule, each split's prompts.
    rule = dict(llm_share=args.llm_share) if args.llm_share else dict(recall=args.recall)
    names = ("train", "validation", "test")
    ids = {n: sorted(set(data.prompt_id[i].tolist())) for n, i in zip(names, split)}
    save_router(router, args.out, dict(metrics, rule=rule, prompt_ids=ids))
    v, h = metrics["validation"], metrics["test"]
    print(
        f"saved {args.out}: threshold {t:.4f}, chosen on validation: recall {v['recall']:.3f} at "
        f"LLM share {v['share']:.1%}"
    )
    print(
        f"held out ({h['positions']} positions, {h['divergent']} divergent), at LLM share "
        f"{h['share']:.1%}:"
    )
    print(f"  {'router':8s} AUC {h['auc']:.3f}  recall {h['recall']:.3f}")
    for name, b in h["baselines"].items():
        print(f"  {name:8s} AUC {b['auc']:.3f}  recall {b['recall']:.3f}")
    return metrics


if __name__ == "__main__":
    r2r.run_main(main)
