"""Per-example gradients through module hooks, with augmentation multiplicity folded in.

A method feeds its model ``B*K`` rows in copy-major order: K blocks of B rows, row ``k*B + b``
being copy k of example b (``x.repeat(K, 1, 1, 1)``). DP-SGD needs, for each *example*, the
gradient of the mean over its K copies, clipped as one vector. Computing per-row gradients and averaging
afterwards would hold ``B*K`` gradient copies; instead the K copies are folded into the
reduction that builds each per-example gradient (for Linear and Conv2d they become extra
positions of the same contraction), so what is stored is ``B*P``, never ``B*K*P``.

Linear, Conv2d, GroupNorm and LayerNorm are folded here. Opacus's layer formulas
(``GradSampleModule.GRAD_SAMPLERS``) are reused for every other layer type (embeddings, ...).
We do not use ``GradSampleModule`` itself because it allocates its per-row buffers at the row
count ``B*K`` and cannot be told that rows come in groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import nn

FoldedSampler = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], dict[nn.Parameter, torch.Tensor]]


class UnsupportedLayerError(TypeError):
    """A trainable layer has no per-example gradient formula."""


def _linear(layer: nn.Linear, acts: torch.Tensor, backprops: torch.Tensor, batch: int) -> dict:
    # [K*B, ..., in] -> [B, K*T, in]: copy k of example b and its positions t are all summed
    # into example b's gradient by the same contraction.
    dtype = layer.weight.dtype  # accumulate in the parameter dtype, also under bf16 autocast
    g = _per_example_positions(backprops.to(dtype), batch)  # [B, K*T, out]; a view when K=1
    out = {}
    if layer.weight.requires_grad:
        # bmm rather than einsum: the same kernel without einsum's parsing, which costs as much
        # as the product itself at attention-block sizes (B=64, 64 positions, 32 channels).
        out[layer.weight] = torch.bmm(g.transpose(1, 2), _per_example_positions(acts.to(dtype), batch))
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(1)
    return out


def _conv2d(layer: nn.Conv2d, acts: torch.Tensor, backprops: torch.Tensor, batch: int) -> dict:
    # Grouped-convolution trick: the rows [K*B, C, H, W] are viewed (no copy, thanks to the
    # copy-major row order) as [K, B*C, H, W], and we ask for the weight gradient of a
    # convolution with groups=B. Each group is one example and the "batch" dimension, its K
    # copies, is summed by the weight-gradient kernel itself, so neither B*K gradients nor
    # unfolded (im2col) activations are ever materialised. Measured here 10-25x faster than
    # Opacus's unfold + einsum.
    k = acts.shape[0] // batch
    dtype = layer.weight.dtype
    c, o = acts.shape[1], backprops.shape[1]
    out = {}
    if layer.weight.requires_grad and _is_pointwise(layer):
        # A 1x1 convolution is a Linear over positions: one batched contraction, about 10x faster
        # here than the grouped weight gradient at 64 channels (timed at B=64, 4x4 and 8x8).
        a = _per_example_channels(acts.to(dtype), batch)  # [B, C, K*T]
        g = _per_example_channels(backprops.to(dtype), batch)  # [B, O, K*T]
        out[layer.weight] = torch.bmm(g, a.transpose(1, 2)).view(batch, *layer.weight.shape)
    elif layer.weight.requires_grad:
        a = acts.to(dtype).reshape(k, batch * c, *acts.shape[2:])
        g = backprops.to(dtype).reshape(k, batch * o, *backprops.shape[2:])
        w = torch.nn.grad.conv2d_weight(a, (batch * o, c, *layer.kernel_size), g, stride=layer.stride,
                                        padding=layer.padding, dilation=layer.dilation, groups=batch)
        out[layer.weight] = w.view(batch, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.to(dtype).reshape(k, batch, o, -1).sum((0, 3))
    return out


def _group_norm(layer: nn.GroupNorm, acts: torch.Tensor, backprops: torch.Tensor, batch: int) -> dict:
    # Opacus's formula (normalised input times output gradient, summed over positions), with the
    # K copies summed by the same reduction; about 5x faster than Opacus's einsum at these sizes.
    dtype = layer.weight.dtype
    k, c = acts.shape[0] // batch, layer.num_channels
    g = backprops.to(dtype).reshape(k, batch, c, -1)
    out = {}
    if layer.weight.requires_grad:
        normed = F.group_norm(acts.to(dtype), layer.num_groups, eps=layer.eps).reshape(k, batch, c, -1)
        out[layer.weight] = (normed * g).sum((0, 3))
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum((0, 3))
    return out


def _layer_norm(layer: nn.LayerNorm, acts: torch.Tensor, backprops: torch.Tensor, batch: int) -> dict:
    # As _group_norm: the copies and the positions before the normalised dimensions are summed at once.
    dtype = layer.weight.dtype
    k, shape = acts.shape[0] // batch, layer.normalized_shape
    g = backprops.to(dtype).reshape(k, batch, -1, *shape)
    out = {}
    if layer.weight.requires_grad:
        normed = F.layer_norm(acts.to(dtype), shape, eps=layer.eps).reshape(k, batch, -1, *shape)
        out[layer.weight] = (normed * g).sum((0, 2))
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum((0, 2))
    return out


def _is_pointwise(layer: nn.Conv2d) -> bool:
    return layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)


def _fold_after(opacus_fn: Callable) -> FoldedSampler:
    """Per-row gradients from Opacus's formula, summed over each example's K rows.

    Used for every layer type we do not fold ourselves; in our models only the class embedding,
    whose transient ``B*K`` copy of one layer's gradient is negligible.
    """

    def sampler(layer: nn.Module, acts: torch.Tensor, backprops: torch.Tensor, batch: int) -> dict:
        dtype = next(layer.parameters()).dtype
        if acts.is_floating_point():  # embeddings take integer indices
            acts = acts.to(dtype)
        per_row = opacus_fn(layer, [acts], backprops.to(dtype))
        return {p: g.reshape(-1, batch, *g.shape[1:]).sum(0) for p, g in per_row.items()}

    return sampler


def _per_example_positions(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[K*B, ..., F] copy-major rows -> [B, K*T, F]: an example's K copies (and its positions)
    become the positions of one row."""
    k = t.shape[0] // batch
    if k == 1:  # one reshape (a view) instead of three: this runs for every Linear layer
        return t.reshape(batch, -1, t.shape[-1])
    return t.reshape(k, batch, -1, t.shape[-1]).transpose(0, 1).reshape(batch, -1, t.shape[-1])


def _per_example_channels(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[K*B, C, H, W] copy-major rows -> [B, C, K*H*W]: a view when K=1."""
    k = t.shape[0] // batch
    if k == 1:
        return t.reshape(batch, t.shape[1], -1)
    return t.reshape(k, batch, t.shape[1], -1).permute(1, 2, 0, 3).reshape(batch, t.shape[1], -1)


def _norms_of(grads: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """One ``[B]`` fp32 tensor of per-example norms per gradient ``[B, ...]``: one kernel each,
    accumulated in at least fp32 (fp64 parameters keep fp64 until the result)."""
    return [torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.promote_types(g.dtype, torch.float32)).float()
            for g in grads]


def _is_plain_conv(layer: nn.Module) -> bool:
    """A Conv2d our folded formulas cover: ungrouped, zero padding given as numbers."""
    return (type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str))


def _gram_via_pixels(layer: nn.Conv2d, acts: torch.Tensor, batch: int) -> bool:
    """Whether the patch Gram matrix is cheaper from pixel inner products than from im2col."""
    k = acts.shape[0] // batch
    (ph, pw), (kh, kw) = layer.padding, layer.kernel_size
    padded = k * (acts.shape[2] + 2 * ph) * (acts.shape[3] + 2 * pw)
    (ho, wo) = _conv_output_size(layer, acts)
    return padded**2 < kh * kw * (k * ho * wo) ** 2


def _conv_output_size(layer: nn.Conv2d, acts: torch.Tensor) -> tuple[int, int]:
    sizes = []
    for n, p, d, s, kernel in zip(acts.shape[2:], layer.padding, layer.dilation, layer.stride, layer.kernel_size):
        sizes.append((n + 2 * p - d * (kernel - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


def _patch_gram(layer: nn.Conv2d, acts: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, KT, KT]``: inner products between every two unfolded input patches of an example.

    Two patches at output positions t and s are the same kernel window shifted, so their
    inner product is a sum, over the kernel offsets d, of inner products between input
    *pixels* t+d and s+d. One Gram matrix of the (zero-padded) pixels, then sums of its
    shifted views, give every patch pair without im2col, whose buffer is kernel-size times
    the input and slow to build on CPU. A strided convolution skips most pixel pairs,
    so there the unfolded patches are cheaper (``_gram_via_pixels``).
    """
    if not _gram_via_pixels(layer, acts, batch):
        cols = F.unfold(acts, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return _position_gram(cols.transpose(1, 2), batch)
    k = acts.shape[0] // batch
    (ph, pw), (dh, dw), (sh, sw), (kh, kw) = layer.padding, layer.dilation, layer.stride, layer.kernel_size
    ho, wo = _conv_output_size(layer, acts)
    x = F.pad(acts, (pw, pw, ph, ph))
    c, hp, wp = x.shape[1:]
    pixels = x.reshape(k, batch, c, hp * wp).permute(1, 0, 3, 2).reshape(batch, k * hp * wp, c)
    pixel_gram = (pixels @ pixels.transpose(1, 2)).view(batch, k, hp, wp, k, hp, wp)
    # The kernel offset (i, j) shifts rows by i and columns by j in both positions, so the sum
    # over offsets splits into one over row shifts, then one over column shifts: kh + kw
    # strided sums instead of kh * kw.
    over_rows = None
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
        shifted = pixel_gram[:, :, rows, :, :, rows, :]
        over_rows = shifted.clone() if over_rows is None else over_rows.add_(shifted)
    gram = None
    for j in range(kw):
        cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
        shifted = over_rows[:, :, :, cols, :, :, cols]
        gram = shifted.clone() if gram is None else gram.add_(shifted)
    return gram.reshape(batch, k * ho * wo, k * ho * wo)


def _position_gram(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, KT, KT]``: inner products between an example's rows at every position of every copy."""
    rows = _per_example_positions(t.reshape(t.shape[0], -1, t.shape[-1]), batch)
    return rows @ rows.transpose(1, 2)


def _ghost_sq_norms(layer: nn.Module, acts: torch.Tensor, backprops: torch.Tensor, batch: int) -> torch.Tensor:
    """Squared per-example gradient norms of a Linear or Conv2d layer without forming the gradients.

    The gradient of example b is ``A_b^T G_b`` (A: its inputs at every position of every copy,
    unfolded for a convolution; G: the output gradients there), so its squared norm is
    ``<A_b A_b^T, G_b G_b^T>`` (Li et al. 2022, "ghost norm"): ``B (K T)^2`` memory instead of
    ``B P``, which pays where few positions meet many parameters (low-resolution layers).
    """
    dtype = layer.weight.dtype
    if isinstance(layer, nn.Conv2d):
        g = backprops.to(dtype).flatten(2).transpose(1, 2)
    else:
        g = backprops.to(dtype)
    g_rows = _per_example_positions(g.reshape(g.shape[0], -1, g.shape[-1]), batch)
    sq = torch.zeros(batch, dtype=dtype, device=acts.device)
    if layer.weight.requires_grad:
        a_gram = (_patch_gram(layer, acts.to(dtype), batch) if isinstance(layer, nn.Conv2d)
                  else _position_gram(acts.to(dtype), batch))
        sq += a_gram.mul_(g_rows @ g_rows.transpose(1, 2)).sum((1, 2))
    if layer.bias is not None and layer.bias.requires_grad:
        sq += g_rows.sum(1).pow(2).sum(1)
    return sq.float()


def _ghost_pays(layer: nn.Module, acts: torch.Tensor, output: torch.Tensor, batch: int) -> bool:
    """Whether the ghost norm beats forming the layer's per-example gradients, in memory and arithmetic.

    Multiply-adds per example: forming the gradient costs one per (position, weight); the ghost
    norm costs its two Gram matrices, each (positions of all K copies)^2 times a row width. The
    Gram matrices are counted twice: timed one layer at a time on this CPU, they run at about half
    the rate of the weight-gradient kernels, and a ghost layer pays one more weight gradient for
    its clipped sum, where a formed gradient only needs a weighted sum.
    """
    k = acts.shape[0] // batch
    if _is_plain_conv(layer):
        (ph, pw), (kh, kw) = layer.padding, layer.kernel_size
        out_positions = k * output.shape[2] * output.shape[3]
        if _gram_via_pixels(layer, acts, batch):  # pixel pairs, then shifted sums
            in_positions = k * (acts.shape[2] + 2 * ph) * (acts.shape[3] + 2 * pw)
            in_cost = in_positions**2 * layer.in_channels + out_positions**2 * (kh + kw)
        else:  # im2col: one row of C*kh*kw per output position
            in_positions = out_positions
            in_cost = out_positions**2 * layer.in_channels * kh * kw
        gram_cost = in_cost + out_positions**2 * layer.out_channels
    elif type(layer) is nn.Linear:
        in_positions = out_positions = k * (output[0].numel() // output.shape[-1])
        gram_cost = out_positions**2 * (layer.in_features + layer.out_features)
    else:
        return False
    gradient_cost = out_positions * layer.weight.numel()
    fits = in_positions**2 + out_positions**2 <= layer.weight.numel()
    return fits and 2 * gram_cost < gradient_cost


def _sampler_for(layer: nn.Module) -> FoldedSampler:
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.padding_mode != "zeros":
        # Every formula here (ours and Opacus's) pads with zeros: the norms would be of another
        # gradient than the one the layer has.
        raise UnsupportedLayerError(
            f"trainable {type(layer).__name__} with padding_mode={layer.padding_mode!r}: per-example "
            "gradients assume zero padding; use padding_mode='zeros' or freeze it")
    if type(layer) is nn.Linear:
        return _linear
    if _is_plain_conv(layer):
        return _conv2d
    if type(layer) is nn.GroupNorm:
        return _group_norm
    if type(layer) is nn.LayerNorm and layer.weight is not None:
        return _layer_norm
    opacus_fn = GradSampleModule.GRAD_SAMPLERS.get(type(layer))
    if opacus_fn is None:
        raise UnsupportedLayerError(
            f"no per-example gradient formula for trainable layer {type(layer).__name__}; "
            "freeze it (requires_grad=False) or replace it with a supported layer"
        )
    return _fold_after(opacus_fn)


MODES = ("materialize", "norms", "mixed")

# Mixed mode keeps a layer's formed per-example gradients, rather than its input and output
# gradient, up to this multiple of the latter's size. Autograd frees far more than a trainable
# layer's own input as backward goes on (every intermediate of the frozen and parameter-free ops
# around it), so the peak barely moves. Measured with `make bench` (B=64, K=1/4/16), 4 instead of
# 2 leaves every DP peak where it was but one (ldm_small, all trainable, K=1: 117 -> 121 MB, 1.02x
# the non-private step) and spares DP-LDM's attention set 16 of its 24 second weight gradients.
KEEP_GRADIENTS_UP_TO = 4


@contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 convolutions and matrix products at full precision (no TF32) inside the block.

    A clipped example's share of the sum must be the vector whose norm was clipped. The norm and
    the sum of a layer often come from different kernels (grouped and plain weight gradients,
    Gram matrices); under TF32, cuDNN's default for fp32 convolutions on CUDA, each rounds its
    inputs to 10 bits, so the two would differ by about 1e-3 and a clipped example could exceed
    the bound by as much. No effect on the CPU.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class PerExampleGradients:
    """Per-example gradients of every trainable parameter, without the batch gradient.

    Every module that owns trainable parameters gets a forward hook. During a forward pass
    inside :meth:`capture`, the hook keeps the module's input and registers a gradient hook on
    its output; :meth:`backward` then runs autograd only as far as the *inputs* of the first
    trainable modules (never to the parameters), so torch computes the backpropagated
    gradients each layer needs but not the batch weight gradients, which DP-SGD would throw
    away. Each output hook handles its layer as soon as backward reaches it. What it keeps
    depends on the capture mode:

    * ``materialize``: the layer's per-example gradients, ``p.grad_sample`` ``[B, *p.shape]``.
    * ``norms``: only their squared norms; a second, reweighted backward through the retained
      graph then gives the clipped sum, layer by layer (ghost clipping, :meth:`reweighted_sum`).
    * ``mixed`` (book-keeping, Bu et al. 2023): per layer, until the clip factors are known,
      either the per-example gradients (``B*P`` values) or the layer's input and output
      gradient; the clipped sum of the latter is one ordinary weight gradient with output
      gradients scaled by the clip factors, so no second backward is needed. A layer whose
      norm comes from the ghost identity keeps its input and output gradient; one whose norm
      forms the gradients keeps them unless they exceed ``KEEP_GRADIENTS_UP_TO`` times its
      input and output gradient (``_what_to_keep``). High-resolution layers with few parameters
      keep gradients; low-resolution layers with many parameters keep activations.

    Squared norms are taken by the ghost-norm identity where it costs less arithmetic and fits
    in the gradients' memory (``_ghost_pays``).
    Frozen parameters get no hooks and no per-example work.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params: list[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._samplers: dict[nn.Module, FoldedSampler] = {}
        self._trainable_numel: dict[nn.Module, int] = {}
        # Where backward must reach: leaves standing in for the inputs of trainable modules
        # whose inputs do not require grad (the first trainable layers), or the outputs of
        # those with integer inputs (embeddings).
        self._roots: list[torch.Tensor] = []
        self._pending: dict[int, nn.Module] = {}  # output hooks registered but not yet fired
        self._keys = itertools.count()
        self._batch: int | None = None
        self._mode = "materialize"
        self._calls: dict[nn.Module, int] = {}  # forward calls per module in this capture
        self._decisions: dict[tuple, tuple[str, bool]] = {}  # _what_to_keep, by module, mode and shapes
        # Per-example norms, taken as each layer is processed (its gradients are still in cache), of
        # every module called once: [B] squared norms of ghost layers, and a [B] norm per gradient
        # tensor of the others, squared and summed in one go by squared_norms(). A module called
        # more than once is normed there, from its summed gradients.
        self._sq_norms: torch.Tensor | None = None
        self._norms: list[torch.Tensor] = []
        self._kept: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # book-keeping layers
        self._retained_roots: list[torch.Tensor] = []  # norms mode: where the reweighted backward goes
        self._sums: dict[nn.Parameter, torch.Tensor] | None = None  # filled by the reweighted backward
        owner: dict[nn.Parameter, nn.Module] = {}
        for module in model.modules():
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            for p in module.parameters(recurse=False):
                # Two modules' hooks would each add the squared norm of their own share of the
                # gradient, where clipping needs the norm of the sum: refuse tied weights.
                if p.requires_grad and owner.setdefault(p, module) is not module:
                    raise UnsupportedLayerError(
                        f"a trainable parameter is shared by {type(owner[p]).__name__} and "
                        f"{type(module).__name__}; per-example norms of tied weights are not supported: "
                        "untie them or freeze them")
            self._samplers[module] = _sampler_for(module)
            self._trainable_numel[module] = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        self.attach()

    def attach(self) -> None:
        """Register the hooks (done on construction; again after :meth:`remove`)."""
        if self._handles:
            return
        for module in self._samplers:
            self._handles.append(module.register_forward_pre_hook(self._prepare_input))
            self._handles.append(module.register_forward_hook(self._hook_output))

    def remove(self) -> None:
        """Remove the hooks: the model runs as if the engine did not exist, until :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def capture(self, batch_size: int, mode: str = "materialize") -> Iterator[None]:
        """Record per-example gradients (or what ``mode`` keeps) for ``batch_size`` examples (``B*K`` rows)."""
        if mode not in MODES:
            raise ValueError(f"capture mode {mode!r}: use one of {MODES}")
        if self._samplers and not self._handles:
            # Without hooks nothing is recorded, and the clipped sum would silently be zero.
            raise RuntimeError("capture() on an engine whose hooks were removed: call attach() first")
        self.clear()
        self._batch = batch_size
        self._mode = mode
        try:
            yield
        finally:
            self._batch = None
            self._roots.clear()
            self._pending.clear()
            self.clear()

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Process the forward pass that produced ``loss`` (see the class docstring)."""
        if self._roots:
            torch.autograd.grad(loss, self._roots, allow_unused=True, retain_graph=retain_graph)
        if retain_graph:
            self._retained_roots = list(self._roots)
        self._roots.clear()
        if self._pending:
            # Silently zero gradients would hide a bug: an output that never received a
            # gradient is either unused (freeze its parameters) or reached through an input
            # that requires grad for reasons outside the model.
            module = next(iter(self._pending.values()))
            self._pending.clear()
            raise ValueError(
                f"{type(module).__name__}'s output received no gradient, so its trainable parameters "
                "would get no per-example gradient; freeze it if it is unused, and do not pass "
                "inputs that require grad"
            )

    def squared_norms(self) -> torch.Tensor:
        """``[B]``: each example's squared gradient norm over all trainable parameters."""
        assert self._batch is not None, "squared_norms() outside capture()"
        total = torch.zeros(self._batch, device=self.params[0].device if self.params else None)
        if self._sq_norms is not None:
            total += self._sq_norms
        norms = list(self._norms)
        for module, calls in self._calls.items():
            if calls > 1:  # shared weights: the norm of the gradient summed over the calls
                norms += _norms_of(p.grad_sample for p in module.parameters(recurse=False) if p.grad_sample is not None)
        if norms:
            total += torch.stack(norms).square().sum(0)
        return total

    def reweighted_sum(self, weighted_loss: torch.Tensor) -> list[torch.Tensor]:
        """``norms`` mode, after ``backward(loss, retain_graph=True)``: the gradient of
        ``weighted_loss`` (each example's loss times its clip factor), summed by the layer hooks.

        Every layer's share comes from the same formula, on the same inputs, that gave its norms,
        never from autograd's own parameter gradient: a gradient the hooks cannot see (a weight
        also used outside its module) then cannot slip past clipping.
        """
        assert self._mode == "norms" and self._retained_roots, "reweighted_sum() needs backward(retain_graph=True)"
        self._sums = {}
        try:
            torch.autograd.grad(weighted_loss, self._retained_roots, allow_unused=True)
            return [self._sums.get(p, torch.zeros_like(p)) for p in self.params]
        finally:
            self._sums = None
            self._retained_roots = []

    def weighted_sum(self, factors: torch.Tensor) -> list[torch.Tensor]:
        """``sum_b factors[b] * grad_b`` for every trainable parameter (not in ``norms`` mode)."""
        assert self._mode != "norms", "norms mode keeps no gradients: backward the reweighted loss"
        with exact_fp32():
            return self._weighted_sum(factors)

    def _weighted_sum(self, factors: torch.Tensor) -> list[torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = {}
        for p in self.params:
            if p.grad_sample is not None:
                # A vector-matrix product: reads the B*P values once, as a weighted sum must.
                out[p] = (factors.to(p.grad_sample.dtype) @ p.grad_sample.flatten(1)).view(p.shape)
        for module, acts, backprops in self._kept:
            # Gradients are linear in the output gradient: scaling each row's output gradient by
            # its example's factor, then summing over all rows as one "example", is the clipped sum.
            # In the parameters' dtype: under bf16 autocast the output gradient is bf16, and
            # rounding the factors or the scaled rows to bf16 lets a clipped example exceed C.
            dtype = next(p for p in module.parameters(recurse=False) if p.requires_grad).dtype
            k = backprops.shape[0] // len(factors)
            rows = factors.to(dtype).repeat(k).view(-1, *([1] * (backprops.dim() - 1)))
            for p, g in self._samplers[module](module, acts, backprops.to(dtype) * rows, 1).items():
                out[p] = g[0] if p not in out else out[p] + g[0]
        return [out[p] if p in out else torch.zeros_like(p) for p in self.params]

    def clear(self) -> None:
        self._sq_norms = None
        self._norms.clear()
        self._kept.clear()
        self._retained_roots = []
        self._calls.clear()
        for p in self.params:
            p.grad_sample = None

    def _capturing(self) -> bool:
        return self._batch is not None and torch.is_grad_enabled()

    def _prepare_input(self, module: nn.Module, inputs: tuple) -> tuple | None:
        """Forward pre-hook: the input the module runs on, when it must differ from the given one."""
        x = inputs[0] if inputs else None
        if not self._capturing() or not isinstance(x, torch.Tensor):
            return None
        if not x.is_floating_point():
            return None  # integer input: the output itself becomes a root (in _hook_output)
        prepared = x
        if type(module) is nn.Linear and not x.is_contiguous():
            # A Linear saves, for its backward, the contiguous copy its matmul makes of a
            # strided input (attention's transposed tokens), not the input itself; the output
            # hook would then hold the input as well, one more activation per layer (K-fold
            # under multiplicity). Feeding the copy makes both the same tensor.
            prepared = prepared.contiguous()
        if not x.requires_grad:
            # The input does not require grad, so detaching it cuts nothing; the new leaf is
            # where backward may stop.
            prepared = prepared.detach().requires_grad_()
            self._roots.append(prepared)
        return None if prepared is x else (prepared, *inputs[1:])

    def _hook_output(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self._capturing():
            return
        acts = inputs[0].detach()
        if not acts.is_floating_point():
            self._roots.append(output)
        if acts.shape[0] % self._batch:
            raise ValueError(
                f"{type(module).__name__} saw {acts.shape[0]} rows for {self._batch} examples; "
                "every module must see B*K rows: K blocks of B rows, one per copy"
            )
        batch, key = self._batch, next(self._keys)
        self._pending[key] = module
        self._calls[module] = self._calls.get(module, 0) + 1
        decision = (module, self._mode, batch, acts.shape, output.shape)
        if decision not in self._decisions:  # the same every step: shapes repeat
            if len(self._decisions) > 100_000:  # Poisson batch sizes add keys; bound the memory
                self._decisions.clear()
            self._decisions[decision] = self._what_to_keep(module, acts, output, batch)
        keep, ghost = self._decisions[decision]
        # A module may run several times per forward pass (weight sharing): each call's
        # output carries its own input in the closure, and the contributions add up. The
        # input sits in a box the hook empties: the hook lives as long as the graph, and
        # holding every layer's input to the end of backward would cost a copy of all
        # activations that autograd itself frees layer by layer. (In norms mode the box is
        # emptied by the reweighted backward, while autograd retains the graph anyway.)
        box = [acts]
        output.register_hook(lambda grad: self._accumulate(key, module, box, grad.detach(), batch, keep, ghost))

    def _what_to_keep(self, module: nn.Module, acts: torch.Tensor, output: torch.Tensor,
                      batch: int) -> tuple[str, bool]:
        """For one layer call: what to keep ("gradients", "norms" or "activations", i.e. input and
        output gradient), and whether its norms come from the ghost identity."""
        if self._mode == "materialize":
            return "gradients", False
        ghost = _ghost_pays(module, acts, output, batch)
        if self._mode == "norms" or ghost:
            # A ghost layer never forms its gradients; in mixed mode its sum is one weight gradient.
            return ("norms" if self._mode == "norms" else "activations"), ghost
        # The norm forms this layer's per-example gradients anyway: keeping them makes the clipped
        # sum a cheap contraction instead of a second weight gradient.
        per_example = batch * self._trainable_numel[module]
        small = per_example <= KEEP_GRADIENTS_UP_TO * (acts.numel() + output.numel())
        return ("gradients" if small else "activations"), False

    def _accumulate(self, key: int, module: nn.Module, box: list[torch.Tensor], backprops: torch.Tensor,
                    batch: int, keep: str, ghost: bool) -> None:
        if self._pending.pop(key, None) is None:  # a backward through the retained graph
            if self._sums is not None and box:  # reweighted_sum: all rows as one example
                acts = box.pop()
                with exact_fp32():
                    for p, g in self._samplers[module](module, acts, backprops, 1).items():
                        self._sums[p] = g[0] if p not in self._sums else self._sums[p] + g[0]
            return
        # In norms mode the input stays for the reweighted backward; autograd's retained graph
        # holds the same tensor, so this costs no memory.
        acts = box[0] if self._mode == "norms" else box.pop()
        if self._calls[module] > 1:
            # Shared weights: an example's gradient is the sum over calls, and the norm of a
            # sum is not the sum of norms, so keep the gradients and add them up.
            keep, ghost = "gradients", False
        if keep == "activations":
            self._kept.append((module, acts, backprops))
        with exact_fp32():
            if ghost:
                self._add_sq_norms(_ghost_sq_norms(module, acts, backprops, batch))
                return
            grads = self._samplers[module](module, acts, backprops, batch)
            if self._calls[module] == 1:
                self._norms += _norms_of(grads.values())
            if keep == "gradients":
                for p, g in grads.items():
                    p.grad_sample = g if p.grad_sample is None else p.grad_sample + g

    def _add_sq_norms(self, sq: torch.Tensor) -> None:
        self._sq_norms = sq if self._sq_norms is None else self._sq_norms + sq
