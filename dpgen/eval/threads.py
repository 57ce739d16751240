"""How many CPU threads evaluation uses.

Evaluation trains and runs networks of 10^4-10^6 parameters on 8-32 px images and does
numpy linear algebra on 1000x128 matrices (KID, FID): operations too small to be worth
splitting across threads. Measured on the 2-core reference machine while other jobs ran:
training the downstream ResNet (4 epochs, 400 images of 8x8) took 0.5 s on one thread and
15 s on two, the CNN 2.9 s and 22 s; OpenBLAS's eigvals of a 2048x2048 matrix (Inception
FID) 4.8 s and 30 s. ``eval.num_threads`` sets both PyTorch's intra-op threads and the BLAS
pools (threadpoolctl) for the evaluate stage (null: leave them alone); both are restored after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from threadpoolctl import threadpool_limits


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` PyTorch and BLAS threads (None: unchanged)."""
    before = torch.get_num_threads()
    with ExitStack() as stack:
        if n is not None:
            torch.set_num_threads(n)
            stack.enter_context(threadpool_limits(n))
        try:
            yield
        finally:
            torch.set_num_threads(before)
