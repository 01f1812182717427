"""Shared pieces of the latent-store tests, and a writer process for the crash tests.

As a script: ``python -m tests.latent_helpers STORE LOG N CHUNK BATCH SLEEP``
encodes class "0" of ``SyntheticSource(N)`` into STORE with :func:`pool_encoder`,
sleeping SLEEP seconds per batch and appending the item numbers of each batch
to LOG (one line per encoder call) before encoding it, so a test can kill it
at a known point and see what it had encoded.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mgd3_core.data import SyntheticSource, synthetic_item_numbers
from mgd3_core.latent_writer import encode_class

FINGERPRINT = "testvae0"
SCALING = 0.5


def pool_encoder(x: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in VAE: (B, 1, 32, 32) -> (B, 4, 8, 8).

    Pooling and elementwise ops only: each output value is computed from its
    own image's pixels by one thread, with no reduction across the batch or
    threads, so the latent-store tests may compare its results bit for bit
    across processes, batch compositions, thread counts and CPU capabilities.
    (A real VAE is compared with a float32 tolerance: tests/test_latents.py.)
    """
    p = F.avg_pool2d(x, 4)
    return torch.cat([p, p * p, -p, p.abs()], dim=1) * SCALING


class RecordingEncoder:
    """Wraps an encoder; records the synthetic item numbers of every call."""

    def __init__(self, fn=pool_encoder, log: Path | None = None, sleep: float = 0.0):
        self.fn, self.log, self.sleep = fn, log, sleep
        self.calls: list[list[int]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        items = synthetic_item_numbers(x)
        self.calls.append(items)
        if self.log is not None:
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, (" ".join(map(str, items)) + "\n").encode())
            os.close(fd)
        if self.sleep:
            time.sleep(self.sleep)
        return self.fn(x)

    @property
    def items(self) -> list[int]:
        return [i for call in self.calls for i in call]


def encode_synthetic(store: Path, n: int, chunk: int, batch: int, encoder, **kw):
    return encode_class(
        SyntheticSource(n), "0", "train", encoder, store,
        vae_fingerprint=FINGERPRINT, scaling_factor=SCALING, batch_size=batch, chunk_size=chunk, **kw,
    )


def main(argv: list[str]) -> None:
    store, log, n, chunk, batch, sleep = argv
    encode_synthetic(Path(store), int(n), int(chunk), int(batch),
                     RecordingEncoder(log=Path(log), sleep=float(sleep)))


if __name__ == "__main__":
    main(sys.argv[1:])
