"""`LoRALinear` (layer 4): a drop-in nn.Linear with a trainable low-rank adapter."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakernels import ops
from lorakernels._validation import FLOAT_DTYPES, check_lora_hyperparameters, check_scaling_fits, shares_memory
from lorakernels.four_bit import four_bit_weight, is_linear4bit, original_dtype
from lorakernels.functional import lora_linear, lora_linear_segmented
from lorakernels.plan import check_options, resolve_backend


def lora_scaling(r, lora_alpha, use_rslora=False):
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_arguments(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend=None,
                     base_gemm=None):
    check_lora_hyperparameters(in_features, out_features, r, lora_alpha, lora_dropout)
    formula = (f"lora_alpha / sqrt(r) = {lora_alpha!r} / sqrt({r})" if use_rslora
               else f"lora_alpha / r = {lora_alpha!r} / {r}")
    check_scaling_fits(lora_scaling(r, lora_alpha, use_rslora), adapter_dtype, formula)
    check_options(backend, base_gemm)  # a bad choice fails here, not at the first forward


# PEFT keeps each adapter's modules in an nn.ModuleDict keyed by its name (as `extra_adapters` here),
# so the names PEFT accepts are the keys nn.ModuleDict takes.
_MODULE_DICT = nn.ModuleDict()


def check_adapter_name(name):
    """TypeError unless `name` is a str; ValueError unless it is a name PEFT accepts: the key of an
    nn.ModuleDict, i.e. non-empty, without '.', and not an attribute of nn.ModuleDict ('training',
    'keys', 'to', ...). "math-v2", "my adapter" and "__base__" are names (in a mixed batch,
    "__base__" always means the base layer, as in PEFT)."""
    if not isinstance(name, str):
        raise TypeError(f"an adapter name must be a str; got {type(name).__name__} {name!r}")
    if not name or "." in name or hasattr(_MODULE_DICT, name):
        why = ("is empty" if not name else "contains '.'" if "." in name
               else "is an attribute of torch.nn.ModuleDict, which holds adapters by name here and in PEFT")
        raise ValueError(f"adapter name {name!r} {why}: adapter names are the names PEFT accepts (non-empty, "
                         f"without '.', not an attribute of nn.ModuleDict)")


def tied_weight_error(tied, layer):
    """The ValueError for merging in place weights that share memory with parameters outside their layer.

    tied: which weights share memory with what, e.g. "lm_head.weight with ['model.embed_tokens.weight']".
    layer: the name of a tied layer, for the untying snippet.
    """
    return ValueError(
        f"cannot merge in place a weight tied to parameters outside its layer (e.g. a Hugging Face model's "
        f"tie_word_embeddings=True): {tied}; the merge would change those too. Untie first: give the layer its own "
        f"copy, `{layer}.weight = nn.Parameter({layer}.weight.detach().clone(), requires_grad=False)` (and set "
        f"config.tie_word_embeddings = False so that Hugging Face does not tie it again); nothing was changed")


def four_bit_merge_error(layer):
    """The TypeError for merging in place a layer whose base weight is 4-bit."""
    return TypeError(
        f"cannot merge in place a LoRALinear over a 4-bit base ({layer}): its weight would have to be re-quantized, "
        f"which loses the adapter's update to 4-bit rounding (PEFT does that, with a warning). Use "
        f"lorakernels.merge_and_unload(model), which dequantizes to the compute dtype and returns plain 16-bit "
        f"nn.Linear layers, or keep the adapter unmerged; nothing was changed")


def _check_four_bit(linear, adapter_dtype):
    """The checks `from_linear` adds for a bitsandbytes Linear4bit: quantized, and adapters in fp32 or its
    compute dtype."""
    # Not quantized, CPU-packed, or a shape the 4-bit kernels cannot take: fails here, not at forward.
    four_bit_weight(linear.weight, name="the Linear4bit's weight")
    compute = linear.compute_dtype
    if compute is not None and compute not in FLOAT_DTYPES:
        raise TypeError(f"the Linear4bit's compute_dtype must be float32, float16 or bfloat16; got {compute}")
    if adapter_dtype is not None and compute is not None and adapter_dtype not in (torch.float32, compute):
        raise TypeError(f"adapter_dtype over a 4-bit base must be float32 or the Linear4bit's compute_dtype "
                        f"({compute}); got {adapter_dtype}")


BASE_ONLY = "__base__"  # PEFT's name, in `adapter_names`, for rows that take no adapter


class NamedAdapter(nn.Module):
    """A further adapter of a `LoRALinear` (`add_adapter`): lora_A [r, in], lora_B [out, r] and its
    hyperparameters, initialised as the layer's own (A kaiming-uniform, B zeros)."""

    def __init__(self, in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, device, dtype):
        super().__init__()
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def extra_repr(self):
        return f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * dropout(x) A^T B^T, with W and b frozen.

    Args:
        in_features, out_features: as nn.Linear.
        r: adapter rank, 1..256. lora_alpha: scaling numerator. lora_dropout: p on the input of A.
        bias: whether the frozen base has a bias. use_rslora: scaling = alpha / sqrt(r).
        device, dtype: of the frozen base (and of the adapters unless adapter_dtype is given).
        adapter_dtype: dtype of lora_A/lora_B, e.g. torch.float32 with a bf16 base (PEFT's default).
        backend: 'auto' | 'triton' | 'torch' (see `lora_linear`); None follows LORAKERNELS_BACKEND.
        base_gemm: 'auto' | 'triton' | 'triton-tma' | 'cublas' (see `lora_linear`); None follows
            LORAKERNELS_BASE_GEMM, else 'auto'.

    Parameters: weight [out, in] and bias [out] (frozen), lora_A [r, in] (kaiming-uniform,
    a = sqrt(5)) and lora_B [out, r] (zeros, so a fresh adapter leaves the layer unchanged).

    Over a bitsandbytes `Linear4bit` (`from_linear`, `apply_lora`; QLoRA), `weight` is its 4-bit
    `Params4bit`, shared and frozen; forward casts x to the compute dtype (the Linear4bit's
    `compute_dtype`, else x's dtype), runs the fused kernels on the 4-bit weight and returns x's
    dtype, as Linear4bit does. The adapters are fp32 unless adapter_dtype says the compute dtype.
    Such a layer is not merged in place (`merge()` raises TypeError); `merged_linear()` (used by
    `merge_and_unload`) builds the merged 16-bit nn.Linear.

    Several adapters, with PEFT's vocabulary: the layer's own adapter is named `adapter_name`
    ("default"); `add_adapter(name, r, ...)` adds another (`extra_adapters[name]`, its own rank,
    alpha, dropout), `set_adapter(name)` chooses the one forward, merge and unmerge use,
    `delete_adapter(name)` removes one. `forward(x, adapter_names=[...])` takes one adapter name
    per sequence (x.shape[0]; "__base__" for none), as PEFT's mixed batches, and runs them all in
    one fused pass (`lora_linear_segmented`): the base GEMM once, each row's LoRA term in the
    same accumulator; in training, the adapters named get gradients from their rows only.
    The adapters of a model may cover different layers; PEFT's rules hold (the model-level
    `set_adapter`, `load_adapter` and `mixed_batch` apply them): a layer whose active adapter it
    does not hold runs as its base layer, and so do the rows of a mixed batch naming an adapter
    the layer does not hold.

    `merge()` folds the adapter into `weight` (one pass of the merge kernel) so that forward is
    the plain GEMM; `unmerge()` restores the base weight bit for bit from a copy kept while
    merged (pass `keep_original=False` to save that memory: unmerge then subtracts, and a
    16-bit weight can drift by rounding, as with PEFT). Training while merged is refused, and so
    is merging a weight tied to a parameter outside the layer (`tied_to`, recorded by `apply_lora`).
    """

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, bias=True,
                 use_rslora=False, device=None, dtype=None, adapter_dtype=None, backend=None, base_gemm=None):
        super().__init__()
        _check_arguments(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora,
                         adapter_dtype or dtype or torch.get_default_dtype(), backend, base_gemm)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(base, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend, base_gemm)

    @classmethod
    def from_linear(cls, linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, adapter_dtype=None,
                    backend=None, base_gemm=None):
        """Wrap an existing nn.Linear: its weight and bias are shared (no copy) and frozen.

        A bitsandbytes `Linear4bit` (quantized, i.e. moved to its device) keeps its 4-bit weight:
        see the class docstring; adapter_dtype defaults to fp32 there (PEFT's QLoRA default) and
        may be fp32 or the Linear4bit's compute_dtype.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear; got {type(linear).__name__}")
        four_bit = is_linear4bit(linear)
        if four_bit:
            _check_four_bit(linear, adapter_dtype)
        elif not linear.weight.is_floating_point():
            raise TypeError(f"from_linear wraps an nn.Linear with a float weight, or a bitsandbytes Linear4bit; got "
                            f"{type(linear).__name__} with a {linear.weight.dtype} weight")
        _check_arguments(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, use_rslora,
                         adapter_dtype or (torch.float32 if four_bit else linear.weight.dtype), backend, base_gemm)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._init_from(linear, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend, base_gemm)
        return module

    def _init_from(self, base, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend, base_gemm):
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.backend = backend
        self.base_gemm = base_gemm
        self.merged = False
        self.adapters_disabled = False
        self._original_weight = None
        # ((name, parameter), ...) outside this layer that shared memory with weight when the model
        # was last checked (apply_lora, merge_lora, merge_and_unload); a plain tuple, not registered.
        self.tied_to = ()
        # A bitsandbytes Linear4bit's compute dtype (None: x's dtype), or None for a dense base.
        self.four_bit = is_linear4bit(base)
        self.compute_dtype = base.compute_dtype if self.four_bit else None
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        default_dtype = torch.float32 if self.four_bit else base.weight.dtype
        factory = {"device": base.weight.device, "dtype": adapter_dtype or default_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters()
        self.adapter_name = "default"
        self.active_adapter = self.adapter_name
        self.extra_adapters = nn.ModuleDict()
        # adapter_names for every call, set by `lorakernels.mixed_batch` around a whole model's call.
        self.batch_adapter_names = None

    def reset_lora_parameters(self):
        """A kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT, B zeros: the adapter starts as the identity."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --- several adapters ---------------------------------------------------------------------------

    @property
    def adapter_names(self):
        """Names of this layer's adapters: its own first, then those added."""
        return [self.adapter_name, *self.extra_adapters.keys()]

    def adapter_operands(self, name):
        """(lora_A, lora_B, scaling, lora_dropout) of adapter `name`."""
        if name == self.adapter_name:
            return self.lora_A, self.lora_B, self.scaling, self.lora_dropout
        if name not in self.extra_adapters:
            raise ValueError(f"no adapter {name!r} on this layer; its adapters: {self.adapter_names}")
        extra = self.extra_adapters[name]
        return extra.lora_A, extra.lora_B, extra.scaling, extra.lora_dropout

    def adapter_config(self, name):
        """(r, lora_alpha, lora_dropout, use_rslora) of adapter `name`."""
        self.adapter_operands(name)  # ValueError for an unknown name
        owner = self if name == self.adapter_name else self.extra_adapters[name]
        return owner.r, owner.lora_alpha, owner.lora_dropout, owner.use_rslora

    def set_adapter_config(self, name, lora_alpha, lora_dropout, use_rslora):
        """Set adapter `name`'s alpha, dropout and rsLoRA flag (its rank is its factors'), and its scaling."""
        self.adapter_operands(name)
        owner = self if name == self.adapter_name else self.extra_adapters[name]
        owner.lora_alpha, owner.lora_dropout, owner.use_rslora = lora_alpha, float(lora_dropout), use_rslora
        owner.scaling = lora_scaling(owner.r, lora_alpha, use_rslora)

    def add_adapter(self, name, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False):
        """Add adapter `name` (trainable, lora_B zeros: it starts as the identity), in the dtype and
        on the device of the layer's own adapter. The active adapter stays as it was."""
        self._check_new_adapter(name, r, lora_alpha, lora_dropout, use_rslora)
        self.extra_adapters[name] = NamedAdapter(self.in_features, self.out_features, r, lora_alpha, lora_dropout,
                                                 use_rslora, self.lora_A.device, self.lora_A.dtype)

    def _check_new_adapter(self, name, r, lora_alpha, lora_dropout, use_rslora):
        """The checks of `add_adapter`: a new name PEFT accepts, an unmerged layer, valid hyperparameters."""
        check_adapter_name(name)
        if name in self.adapter_names:
            raise ValueError(f"this layer has an adapter {name!r} already (its adapters: {self.adapter_names})")
        if self.merged:
            raise RuntimeError("LoRALinear is merged: unmerge() before adding an adapter")
        _check_arguments(self.in_features, self.out_features, r, lora_alpha, lora_dropout, use_rslora,
                         self.lora_A.dtype)

    def set_adapter(self, name):
        """Make `name`, one of this layer's adapters, the adapter forward (without adapter_names), merge
        and unmerge use. (The model-level `set_adapter` also activates a name that only other layers
        hold: a layer without it then runs as its base layer.)"""
        if self.merged:
            raise RuntimeError("LoRALinear is merged: unmerge() before switching adapters")
        self.adapter_operands(name)  # ValueError for an unknown name
        self.active_adapter = name

    def active_operands(self):
        """`adapter_operands` of the active adapter, or None where this layer does not hold it: the
        layer then computes its base layer alone, as PEFT's layers do."""
        name = self.active_adapter
        if name == self.adapter_name:
            return self.lora_A, self.lora_B, self.scaling, self.lora_dropout
        if name not in self.extra_adapters:
            return None
        extra = self.extra_adapters[name]
        return extra.lora_A, extra.lora_B, extra.scaling, extra.lora_dropout

    def delete_adapter(self, name):
        """Remove adapter `name`. The layer's own adapter can go while it holds another: the first added
        one then becomes its own (`adapter_name`, `lora_A`, `lora_B`, `r`, ...: the same parameters
        under the own adapter's state-dict keys). A layer's only adapter stays (the model-level
        `delete_adapter` puts the base layer back in its place). The active adapter falls back to
        the layer's own if it was `name`, as PEFT's layers fall back to their first adapter."""
        if name not in self.adapter_names:
            raise ValueError(f"no adapter {name!r} on this layer; its adapters: {self.adapter_names}")
        if name == self.adapter_name and not self.extra_adapters:
            raise ValueError(f"{name!r} is this layer's only adapter: a LoRALinear holds at least one (the "
                             f"model-level delete_adapter puts the base layer back instead); nothing was changed")
        if self.merged and self.active_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged into the weight: unmerge() first")
        was_active = self.active_adapter == name
        if name == self.adapter_name:
            promoted = next(iter(self.extra_adapters))
            extra = self.extra_adapters[promoted]
            self.lora_A, self.lora_B = extra.lora_A, extra.lora_B
            self.r, self.lora_alpha, self.lora_dropout = extra.r, extra.lora_alpha, extra.lora_dropout
            self.use_rslora, self.scaling, self.adapter_name = extra.use_rslora, extra.scaling, promoted
            name = promoted
        del self.extra_adapters[name]
        if was_active:
            self.active_adapter = self.adapter_name

    def _mixed_batch_forward(self, x, adapter_names):
        """One fused pass over a batch whose sequences use different adapters (PEFT's adapter_names).

        As PEFT's layers: rows named "__base__", or named after an adapter this layer does not hold
        (one that other layers of the model hold), take the base layer alone. Which names a model
        holds at all is checked by the model-level `mixed_batch`.
        """
        if self.merged:
            raise RuntimeError("LoRALinear is merged: adapter_names batches need unmerged adapters (unmerge() first)")
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names (one per sequence); got {adapter_names!r}")
        named = set(adapter_names) - {BASE_ONLY}
        used = [n for n in self.adapter_names if n in named]
        operands = [self.adapter_operands(n) for n in used]
        position = {n: i for i, n in enumerate(used)}
        rows = [position.get(n, -1) for n in adapter_names]
        adapters = [(A, B, s) for A, B, s, _ in operands] or [(self.lora_A.detach(), self.lora_B.detach(), 1.0)]
        dropout = [p for *_, p in operands] or 0.0  # each adapter's own p
        if self.four_bit:
            x_compute, base, bias = self._four_bit_operands(x)
            return lora_linear_segmented(x_compute, base, bias, adapters, rows, dropout, self.training, self.backend,
                                         self.base_gemm).to(x.dtype)
        return lora_linear_segmented(x, self.weight, self.bias, adapters, rows, dropout, self.training,
                                     backend=self.backend, base_gemm=self.base_gemm)

    def forward(self, x, adapter_names=None):
        adapter_names = adapter_names if adapter_names is not None else self.batch_adapter_names
        if adapter_names is not None and not self.adapters_disabled:
            return self._mixed_batch_forward(x, adapter_names)
        if self.four_bit:
            return self._forward_four_bit(x)
        operands = self.active_operands()
        if self.merged:
            if (operands is not None and self.training and torch.is_grad_enabled()
                    and (operands[0].requires_grad or operands[1].requires_grad)):
                raise RuntimeError("LoRALinear is merged: its adapter is folded into weight and cannot be trained. "
                                   "Call unmerge() first, or eval() / torch.no_grad() for inference.")
            return F.linear(x, self.weight, self.bias)
        if self.adapters_disabled or operands is None:
            return F.linear(x, self.weight, self.bias)
        lora_A, lora_B, scaling, dropout = operands
        return lora_linear(x, self.weight, self.bias, lora_A, lora_B, scaling, dropout, self.training,
                           backend=self.backend, base_gemm=self.base_gemm)

    def four_bit_base(self):
        """The `operands.FourBitWeight` of the 4-bit base (codes shared; see `lorakernels.four_bit`)."""
        return four_bit_weight(self.weight)

    def _four_bit_operands(self, x):
        """(x, the 4-bit base as a `FourBitWeight`, the bias) as the fused call takes them: x and the
        bias in the compute dtype (the Linear4bit's compute_dtype, else x's); the caller returns
        x's dtype, as Linear4bit does."""
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x must be a float32, float16 or bfloat16 tensor; got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        dtype = self.compute_dtype or x.dtype
        return x.to(dtype), self.four_bit_base(), None if self.bias is None else self.bias.to(dtype)

    def _forward_four_bit(self, x):
        x_compute, base, bias = self._four_bit_operands(x)
        operands = self.active_operands()
        if self.adapters_disabled or operands is None:
            return F.linear(x_compute, base.dequantize(x_compute.dtype), bias).to(x.dtype)
        lora_A, lora_B, scaling, dropout = operands
        y = lora_linear(x_compute, base, bias, lora_A, lora_B, scaling, dropout, self.training,
                        backend=self.backend, base_gemm=self.base_gemm)
        return y.to(x.dtype)

    @torch.no_grad()
    def merged_linear(self):
        """A new nn.Linear (frozen) computing this layer with the adapter folded in: over a 4-bit base,
        W dequantized to the compute dtype (the Linear4bit's compute_dtype, else the dtype W was
        quantized from) plus scaling * lora_B @ lora_A, rounded once to that dtype by the merge
        kernel; the bias in that dtype. The result is exact to that dtype's rounding of the 4-bit
        model's weight, not of the original 16-bit one (the 4-bit quantization error stays).
        A dense base: a merged copy of weight. A layer that does not hold its active adapter: the
        base alone. The layer itself is unchanged.
        """
        if self.merged:
            raise RuntimeError("LoRALinear is merged in place already; its weight is the merged one")
        if self.four_bit:
            dtype = self.compute_dtype or original_dtype(self.weight)
            dense = self.four_bit_base().dequantize(dtype)
        else:
            dtype, dense = self.weight.dtype, self.weight.detach().clone()
        operands = self.active_operands()
        merged = dense
        if operands is not None:
            lora_A, lora_B, scaling, _ = operands
            merged = ops.lora_merge(dense, lora_A.detach(), lora_B.detach(), scaling, out=dense,
                                    backend=self._merge_backend())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=dtype)
        linear.weight = nn.Parameter(merged, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype, copy=True), requires_grad=False)
        return linear

    def _merge_backend(self):
        return resolve_backend(self.backend, self.weight.device)

    @torch.no_grad()
    def merge(self, keep_original=True):
        """weight <- weight + scaling * lora_B @ lora_A, in place (shared with a wrapped nn.Linear).

        keep_original: keep a copy of the base weight (same device and dtype: one extra weight
        of memory while merged) so that `unmerge()` restores it bit for bit.
        A layer that does not hold its active adapter has nothing to fold in: it is marked merged
        and its weight stays as it is.
        """
        if self.four_bit:
            raise four_bit_merge_error("this layer")
        if self.merged:
            raise RuntimeError("LoRALinear is already merged; call unmerge() first")
        tied = [name for name, p in self.tied_to if shares_memory(p, self.weight)]
        if tied:
            raise tied_weight_error(f"this layer's weight with {tied}", "layer")
        operands = self.active_operands()
        self._original_weight = self.weight.detach().clone() if keep_original and operands is not None else None
        if operands is not None:
            lora_A, lora_B, scaling, _ = operands
            ops.lora_merge(self.weight, lora_A, lora_B, scaling, out=self.weight, backend=self._merge_backend())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo `merge()`: restore the kept base weight, or subtract the adapter if none was kept."""
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged")
        operands = self.active_operands()  # the adapter merged: it cannot change while merged
        if self._original_weight is not None:
            self.weight.copy_(self._original_weight)
        elif operands is not None:
            lora_A, lora_B, scaling, _ = operands
            ops.lora_merge(self.weight, lora_A, lora_B, scaling, subtract=True, out=self.weight,
                           backend=self._merge_backend())
        self._original_weight = None
        self.merged = False

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
                f"adapter_dtype={self.lora_A.dtype}, base_gemm={self.base_gemm}, merged={self.merged}"
                + (f", adapters={self.adapter_names}, active_adapter={self.active_adapter!r}"
                   if self.extra_adapters else "")
                + (f", base=4-bit {self.weight.quant_type}, compute_dtype={self.compute_dtype}"
                   if self.four_bit else ""))
