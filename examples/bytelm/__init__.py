"""A byte-level transformer language model on CPython's own standard-library sources.

The corpus is already on every machine that runs potluck: a fixed list of .py files of the running
interpreter's standard library, each pinned by sha256 (CPython 3.11.7), so every peer trains on the
same bytes and nothing is downloaded. A file whose hash differs is refused with its name. Two files
are held out for evaluation (bits per byte); the model (~0.25M parameters, 64-byte context) trains
on a CPU in minutes and gives the benchmarks a transformer, not only an MLP.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from peer.errors import UserError

CONTEXT = 64  # bytes a prediction sees
STRIDE = 32  # training windows overlap by half
WIDTH, LAYERS, HEADS = 96, 2, 4

TRAIN_FILES = (
    ("bisect.py", "e5b2ff166f48a06e70ae831d8c9b47283fcd0c254306eee12d3dae9c55e11526"),
    ("colorsys.py", "d9800f8e81d46e63ca6f2e7d6ac5f344d85afb92c3cf6d103b5f977f1ad66ac2"),
    ("reprlib.py", "264433cc232332db871666b3bb6e4c2cb97b092cb8d5056a45ec2e53daea2b1c"),
    ("fnmatch.py", "6683da36e47af523f3f41e18ad244d837783e19e98911cc0b7415dea81494ebc"),
    ("sched.py", "edfb309483d7cb05e06ad86d1fdeb819629f71402dc6710a1bec36c7afcaac50"),
    ("abc.py", "e558702a95cdce3febd289da021715d2b92bc43995b8a1bc58dfa1c3d8010287"),
    ("copy.py", "27dcfc53a4b9d4fbc3d90c74e549eb6eca9301524d6d2fbff9a6589cf51b6fd5"),
    ("numbers.py", "6d70991643a109e9c99e94d6ea2734a995fa8e89114a70ea09737413fa9ae292"),
    ("queue.py", "f6c37fc37cd7440979f7d22d40ee818fa3b714c573610c08fa52911d541193f0"),
    ("string.py", "24aeae1f0526250f442022022bf98df9a823b1cb330543ee79e70e44907462e9"),
    ("shlex.py", "42ab6060f316e121e374e6621d8c1c98b8db323903c3df289a810c45a8ae46a7"),
    ("heapq.py", "6d43277e5c76fc0f073cd388fcff852d14d068f6bb6d4886c340f8b75a1229a9"),
    ("contextlib.py", "d732c045bc7450997f97b2f79cfdb1546b68d2655e89ab3170f3b19b3930d83c"),
    ("functools.py", "6d80018a3fa9fed44c5b78f881987ee3ab3fb1238b077b4e6dcb4b76da7db73b"),
    ("dataclasses.py", "4b7e1c99ebea53b546317d218a0261895a1769f83a6b95dc0136f13578066a7f"),
)
HELD_OUT_FILES = (
    ("textwrap.py", "62867e40cdea6669b361f72af4d7daf0359f207c92cbeddfc7c7506397c1f31c"),
    ("graphlib.py", "7bd338c5a475d1101064603d3baa5507446d3c5e73f741f6d6e77c6204c1eb65"),
)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_pinned(files: tuple[tuple[str, str], ...], root: Path | None = None) -> bytes:
    """The files' bytes, concatenated; UserError naming the first missing or changed file."""
    root = root or stdlib_dir()
    chunks = []
    for name, expected in files:
        path = root / name
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UserError(f"examples.bytelm needs the standard-library file {path}, which cannot be read "
                            f"({error.strerror}); run the peer with CPython 3.11.7") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise UserError(f"examples.bytelm: {path} differs from the pinned copy (sha256 mismatch); this task "
                            f"pins CPython 3.11.7's sources, so every peer trains on the same bytes: "
                            f"run the peer with CPython 3.11.7")
        chunks.append(data)
    return b"".join(chunks)


def windows(data: bytes, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): CONTEXT bytes each, targets shifted by one byte."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    starts = torch.arange(0, len(tokens) - CONTEXT - 1, stride)
    index = starts[:, None] + torch.arange(CONTEXT + 1)[None, :]
    window = tokens[index]
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


@lru_cache(maxsize=1)
def _data():
    return windows(read_pinned(TRAIN_FILES), STRIDE), windows(read_pinned(HELD_OUT_FILES), CONTEXT)


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, WIDTH))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, WIDTH)
        self.position = nn.Parameter(torch.zeros(CONTEXT, WIDTH))
        self.blocks = nn.Sequential(*[Block() for _ in range(LAYERS)])
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, tokens):
        x = self.blocks(self.embed(tokens) + self.position[: tokens.shape[1]])
        return self.norm(x) @ self.embed.weight.T  # output layer tied to the byte embedding


class ByteLMTask:
    name = "examples.bytelm"
    version = "1"

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = ByteLM()
        nn.init.normal_(model.embed.weight, std=0.02)  # small: it is also the output layer
        nn.init.normal_(model.position, std=0.02)
        return model

    def train_data(self):
        return _data()[0]

    def eval_data(self):
        return _data()[1]

    def loss(self, model, inputs, targets):
        return nn.functional.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())

    def make_optimizer(self, params):
        return torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)

    @torch.no_grad()
    def evaluate(self, model, inputs, targets):
        logits = model(inputs).flatten(0, 1).float()
        loss = nn.functional.cross_entropy(logits, targets.flatten()).item()
        return {
            "loss": loss,
            "bits_per_byte": loss / math.log(2),
            "accuracy": (logits.argmax(-1) == targets.flatten()).float().mean().item(),  # next-byte top-1
        }


TASK = ByteLMTask()
