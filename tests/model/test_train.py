"""Training: the schedule, label smoothing, clipping, the data pipeline, exact resume, and a tiny model that
learns to reverse digit sequences and then solves held-out cases (CPU, small data made here)."""

from __future__ import annotations

import gzip
import itertools
import math
import random
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint
from model.data import CharLMData, TranslationData, eval_windows, split_text
from model.evaluate import translate
from model.generate import GenerationConfig, generate
from model.tokenizer import Tokenizer
from model.train import (
    clip_gradients,
    cosine_lr,
    label_smoothed_loss,
    noam_lr,
    read_csv,
    train,
)
from model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the learning rate --------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 10, 399, 400, 401, 1000, 10_000])
def test_noam_schedule_is_the_paper_formula(step: int) -> None:
    d_model, warmup, scale = 512, 400, 2.0
    expected = scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    assert noam_lr(step, d_model, warmup, scale) == pytest.approx(expected, rel=1e-12)


def test_noam_schedule_peaks_at_the_warmup_step() -> None:
    lrs = [noam_lr(s, 256, 300) for s in range(1, 2000)]
    assert lrs.index(max(lrs)) + 1 == 300
    assert max(lrs) == pytest.approx(256**-0.5 * 300**-0.5)
    assert all(a < b for a, b in itertools.pairwise(lrs[:300]))  # rises linearly during warmup
    assert all(a > b for a, b in itertools.pairwise(lrs[299:]))  # then decays as step^-0.5
    assert noam_lr(1200, 256, 300) == pytest.approx(noam_lr(300, 256, 300) / 2)  # 4x the steps, half the rate


def test_cosine_schedule() -> None:
    assert cosine_lr(5, 1e-3, 10, 110, 1e-4) == pytest.approx(5e-4)
    assert cosine_lr(10, 1e-3, 10, 110, 1e-4) == pytest.approx(1e-3)
    assert cosine_lr(60, 1e-3, 10, 110, 1e-4) == pytest.approx(5.5e-4)  # halfway down
    assert cosine_lr(110, 1e-3, 10, 110, 1e-4) == pytest.approx(1e-4)
    assert cosine_lr(500, 1e-3, 10, 110, 1e-4) == pytest.approx(1e-4)


# --- label smoothing and clipping ---------------------------------------------------------------------------


def test_label_smoothed_loss_equals_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([0, 2, 3])  # the third row is padding (id 3) and does not count
    eps, vocab = 0.1, 4
    expected = 0.0
    for row, y in ((logits[0].tolist(), 0), (logits[1].tolist(), 2)):
        log_z = math.log(sum(math.exp(v) for v in row))
        logp = [v - log_z for v in row]
        q = [eps / vocab + (1 - eps) * (i == y) for i in range(vocab)]  # the smoothed target distribution
        expected += -sum(qi * lp for qi, lp in zip(q, logp, strict=True))
    expected /= 2
    loss, nll, n = label_smoothed_loss(logits, target, eps, ignore_index=3)
    assert n == 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(nll) == pytest.approx(float(F.cross_entropy(logits[:2], target[:2])), abs=1e-6)
    # the same as PyTorch's own label smoothing; and eps = 0 is plain cross-entropy
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, target, ignore_index=3, label_smoothing=eps)), abs=1e-6)
    assert float(label_smoothed_loss(logits, target, 0.0)[0]) == pytest.approx(float(F.cross_entropy(logits, target)), abs=1e-6)


def test_label_smoothing_keeps_the_loss_above_zero_for_a_perfect_model() -> None:
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0]])
    assert float(label_smoothed_loss(logits, torch.tensor([0]), 0.0)[0]) < 1e-6
    assert float(label_smoothed_loss(logits, torch.tensor([0]), 0.1)[0]) > 0.5  # eps * 30 * 3/4 = 2.25


def test_clipping_caps_the_gradient_norm() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    (model(torch.randn(32, 8)).sum() * 1000).backward()
    before = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    assert before > 10
    reported = clip_gradients(model.parameters(), 1.0)
    after = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    assert reported == pytest.approx(before, rel=1e-5)
    assert after == pytest.approx(1.0, rel=1e-4)
    # a small gradient is left alone
    model.zero_grad()
    (model(torch.randn(4, 8)).sum() * 1e-4).backward()
    small = [p.grad.clone() for p in model.parameters()]
    clip_gradients(model.parameters(), 1.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(small, model.parameters(), strict=True))


# --- data ---------------------------------------------------------------------------------------------------


def test_char_data_uses_nanogpts_split_and_shifted_targets() -> None:
    text = "".join(chr(97 + i % 26) for i in range(1000))
    train_text, val_text = split_text(text)
    assert train_text == text[:900] and val_text == text[900:]
    data = CharLMData(text)
    assert len(data.splits["train"]) == 900 and len(data.splits["val"]) == 100
    x, y = data.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert data.tokenizer.decode(data.splits["val"].tolist()) == val_text
    windows = list(eval_windows(data.splits["val"], 16, 2))
    assert sum(x.numel() for x, _ in windows) == (100 - 1) // 16 * 16  # whole non-overlapping windows


def test_translation_batches_add_bos_eos_and_respect_the_token_budget() -> None:
    src = [" ".join("1234"[: 1 + i % 4]) for i in range(50)]
    tgt = [s[::-1] for s in src]
    tok = Tokenizer.train_bpe(src + tgt, vocab_size=270)
    data = TranslationData(src, tgt, tok, max_len=32)
    b = data.make_batch([0, 3])
    assert b.tgt_in[0, 0] == tok.bos_id and b.tgt_in[1, 0] == tok.bos_id
    for row in range(2):
        n = int(b.tgt_valid[row].sum())
        assert b.tgt_out[row, n - 1] == tok.eos_id
        assert torch.equal(b.tgt_in[row, 1:n], b.tgt_out[row, : n - 1])  # shifted by one
        assert (b.tgt_out[row, n:] == tok.pad_id).all()
    buckets = data.buckets(max_tokens=40)
    assert sorted(i for bucket in buckets for i in bucket) == list(range(50))
    for bucket in buckets:
        batch = data.make_batch(bucket)
        assert max(batch.src.numel(), batch.tgt_in.numel()) <= 40 or len(bucket) == 1


# --- a tiny model learns a task -----------------------------------------------------------------------------


def _write_reverse_task(folder: Path, n_train: int = 2000, seed: int = 0) -> tuple[list[str], list[str]]:
    """Digit sequences (3-6 digits) and their reversals as multi30k-style gzip'd files; returns held-out pairs."""
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n_train + 300:
        s = " ".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
        if s not in seen:
            seen.add(s)
            pairs.append((s, " ".join(reversed(s.split()))))
    splits = {"train": pairs[:n_train], "val": pairs[n_train : n_train + 100], "test_2016_flickr": pairs[n_train + 100 :]}
    for name, rows in splits.items():
        for lang, col in (("en", 0), ("de", 1)):
            with gzip.open(folder / f"{name}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(r[col] + "\n" for r in rows))
    held_out = splits["test_2016_flickr"][:60]
    return [p[0] for p in held_out], [p[1] for p in held_out]


TINY_SEQ2SEQ = [
    "--task", "translation", "--layers", "2", "--d-model", "64", "--heads", "4", "--d-ff", "128",
    "--dropout", "0.0", "--vocab-size", "280", "--max-len", "32", "--max-tokens", "600", "--label-smoothing", "0",
    "--schedule", "cosine", "--lr", "3e-3", "--min-lr", "1e-4", "--warmup", "30", "--threads", "0", "--no-progress",
]


def test_tiny_encoder_decoder_learns_to_reverse_and_solves_held_out_cases(tmp_path: Path) -> None:
    sources, references = _write_reverse_task(tmp_path)
    out = tmp_path / "ckpt"
    result = train([*TINY_SEQ2SEQ, "--data", str(tmp_path), "--out", str(out), "--max-steps", "400",
                    "--eval-interval", "100", "--log-interval", "20"])
    last = [result.losses[s] for s in range(381, 401)]
    assert sum(last) / len(last) < 0.05, last
    assert result.best_val < 0.05
    # the shipped folder holds exactly the checkpoint files, and the resume state lives elsewhere
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "loss_curve.png", "model.safetensors", "tokenizer.json", "train_log.csv"
    ]
    assert (tmp_path / "ckpt.train-state" / "train_state.safetensors").is_file()
    assert any(r["val_loss"] for r in read_csv(out / "train_log.csv"))
    ckpt = load_checkpoint(out)
    model, tok = ckpt.model, ckpt.tokenizer
    assert isinstance(model, Transformer)
    outputs = translate(model, tok, sources)
    correct = sum(o == r for o, r in zip(outputs, references, strict=True))
    assert correct >= 0.9 * len(sources), list(zip(sources, outputs, strict=True))[:10]
    # the batched greedy decoder of the evaluation is model.generate's greedy, token for token
    for s in sources[:20]:
        cfg = GenerationConfig(max_new_tokens=2 * len(tok.encode(s)) + 10, eos_id=tok.eos_id)
        assert tok.decode(generate(model, [tok.bos_id], cfg, source=tok.encode(s))) == outputs[sources.index(s)]
    beam = translate(model, tok, sources[:10], beam=4)
    assert sum(o == r for o, r in zip(beam, references[:10], strict=True)) >= 9


# --- resuming -----------------------------------------------------------------------------------------------


def _lm_args(tmp_path: Path, out: str) -> list[str]:
    text = "".join(random.Random(1).choice(["to be or not to be\n", "that is the question\n", "whether tis nobler\n"])
                   for _ in range(300))
    (tmp_path / "input.txt").write_text(text)
    return [
        "--task", "lm", "--data", str(tmp_path / "input.txt"), "--out", str(tmp_path / out), "--layers", "1",
        "--d-model", "32", "--heads", "2", "--d-ff", "64", "--block", "32", "--batch-size", "4", "--dropout", "0.2",
        "--schedule", "cosine", "--lr", "3e-3", "--warmup", "5", "--max-steps", "24", "--eval-interval", "8",
        "--weight-decay", "0.1", "--log-interval", "1", "--threads", "0", "--no-progress",
    ]


def _seq2seq_args(tmp_path: Path, out: str) -> list[str]:
    if not (tmp_path / "train.en.gz").exists():
        _write_reverse_task(tmp_path, n_train=300)  # an epoch is a few steps: the run crosses epoch boundaries
    return [*TINY_SEQ2SEQ, "--data", str(tmp_path), "--out", str(tmp_path / out), "--max-steps", "24",
            "--eval-interval", "8", "--dropout", "0.1", "--log-interval", "1", "--label-smoothing", "0.1"]


@pytest.mark.parametrize("make_args", [_lm_args, _seq2seq_args], ids=["lm", "translation"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, make_args) -> None:
    full = train(make_args(tmp_path, "full"))
    first = train([*make_args(tmp_path, "resumed"), "--stop-after", "11"])  # stops like --max-minutes does
    assert first.step == 11 and first.stopped == "stop_after"
    second = train([*make_args(tmp_path, "resumed"), "--resume"])
    assert second.step == 24
    assert sorted(second.losses) == list(range(12, 25))
    for step in range(1, 12):
        assert first.losses[step] == full.losses[step]
    for step in range(12, 25):
        assert second.losses[step] == pytest.approx(full.losses[step], abs=1e-6), step
    assert second.val[24] == pytest.approx(full.val[24], abs=1e-6)
    logged = {int(r["step"]): r["train_loss"] for r in read_csv(tmp_path / "resumed" / "train_log.csv") if r["train_loss"]}
    assert sorted(logged) == list(range(1, 25))  # the log continues where the interrupted run stopped


def test_the_loop_reads_the_device_only_at_log_rows_and_evaluations(tmp_path: Path, monkeypatch) -> None:
    """Losses, NLLs and gradient norms stay tensors between log rows: count the reads of float tensors (but not
    Adam's step counter, which torch keeps on the host)."""
    reads = []

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            if self.is_floating_point() and "torch/optim" not in caller.replace("\\", "/"):
                reads.append((name, caller))
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    args = [*_lm_args(tmp_path, "synced"), "--log-interval", "6", "--eval-interval", "100"]
    result = train(args)  # 24 steps: 4 log rows, one evaluation (at the last step)
    assert sorted(result.losses) == list(range(1, 25))
    assert len(reads) <= 4 + 3, reads  # the rows, the read before the evaluation, the evaluation, the end
