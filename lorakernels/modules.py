"""`LoRALinear` (layer 4): a drop-in nn.Linear with a trainable low-rank adapter."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakernels import ops
from lorakernels._validation import FLOAT_DTYPES, check_lora_hyperparameters, check_scaling_fits, shares_memory
from lorakernels.four_bit import four_bit_weight, is_linear4bit, original_dtype
from lorakernels.functional import lora_linear
from lorakernels.plan import resolve_backend, resolve_base_gemm


def lora_scaling(r, lora_alpha, use_rslora=False):
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_arguments(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, base_gemm):
    check_lora_hyperparameters(in_features, out_features, r, lora_alpha, lora_dropout)
    formula = (f"lora_alpha / sqrt(r) = {lora_alpha!r} / sqrt({r})" if use_rslora
               else f"lora_alpha / r = {lora_alpha!r} / {r}")
    check_scaling_fits(lora_scaling(r, lora_alpha, use_rslora), adapter_dtype, formula)
    if base_gemm is not None:
        resolve_base_gemm(base_gemm)  # a bad strategy fails here, not at the first forward


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


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * dropout(x) A^T B^T, with W and b frozen.

    Args:
        in_features, out_features: as nn.Linear.
        r: adapter rank, 1..256. lora_alpha: scaling numerator. lora_dropout: p on the input of A.
        bias: whether the frozen base has a bias. use_rslora: scaling = alpha / sqrt(r).
        device, dtype: of the frozen base (and of the adapters unless adapter_dtype is given).
        adapter_dtype: dtype of lora_A/lora_B, e.g. torch.float32 with a bf16 base (PEFT's default).
        backend: 'auto' | 'triton' | 'torch' (see `lora_linear`); None follows LORAKERNELS_BACKEND.
        base_gemm: 'triton' | 'cublas' (see `lora_linear`); None follows LORAKERNELS_BASE_GEMM.

    Parameters: weight [out, in] and bias [out] (frozen), lora_A [r, in] (kaiming-uniform,
    a = sqrt(5)) and lora_B [out, r] (zeros, so a fresh adapter leaves the layer unchanged).

    Over a bitsandbytes `Linear4bit` (`from_linear`, `apply_lora`; QLoRA), `weight` is its 4-bit
    `Params4bit`, shared and frozen; forward casts x to the compute dtype (the Linear4bit's
    `compute_dtype`, else x's dtype), runs the fused kernels on the 4-bit weight and returns x's
    dtype, as Linear4bit does. The adapters are fp32 unless adapter_dtype says the compute dtype.
    Such a layer is not merged in place (`merge()` raises TypeError); `merged_linear()` (used by
    `merge_and_unload`) builds the merged 16-bit nn.Linear.

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
                         adapter_dtype or dtype or torch.get_default_dtype(), base_gemm)
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
                         adapter_dtype or (torch.float32 if four_bit else linear.weight.dtype), base_gemm)
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

    def reset_lora_parameters(self):
        """A kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT, B zeros: the adapter starts as the identity."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        if self.four_bit:
            return self._forward_four_bit(x)
        if self.merged:
            if self.training and torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
                raise RuntimeError("LoRALinear is merged: its adapter is folded into weight and cannot be trained. "
                                   "Call unmerge() first, or eval() / torch.no_grad() for inference.")
            return F.linear(x, self.weight, self.bias)
        if self.adapters_disabled:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           self.lora_dropout, self.training, backend=self.backend, base_gemm=self.base_gemm)

    def four_bit_base(self):
        """The `operands.FourBitWeight` of the 4-bit base (codes shared; see `lorakernels.four_bit`)."""
        return four_bit_weight(self.weight)

    def _forward_four_bit(self, x):
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x must be a float32, float16 or bfloat16 tensor; got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        dtype = self.compute_dtype or x.dtype
        base = self.four_bit_base()
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.adapters_disabled:
            return F.linear(x.to(dtype), base.dequantize(dtype), bias).to(x.dtype)
        y = lora_linear(x.to(dtype), base, bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout,
                        self.training, backend=self.backend, base_gemm=self.base_gemm)
        return y.to(x.dtype)

    @torch.no_grad()
    def merged_linear(self):
        """A new nn.Linear (frozen) computing this layer with the adapter folded in: over a 4-bit base,
        W dequantized to the compute dtype (the Linear4bit's compute_dtype, else the dtype W was
        quantized from) plus scaling * lora_B @ lora_A, rounded once to that dtype by the merge
        kernel; the bias in that dtype. The result is exact to that dtype's rounding of the 4-bit
        model's weight, not of the original 16-bit one (the 4-bit quantization error stays).
        A dense base: a merged copy of weight. The layer itself is unchanged.
        """
        if self.merged:
            raise RuntimeError("LoRALinear is merged in place already; its weight is the merged one")
        if self.four_bit:
            dtype = self.compute_dtype or original_dtype(self.weight)
            dense = self.four_bit_base().dequantize(dtype)
        else:
            dtype, dense = self.weight.dtype, self.weight.detach().clone()
        merged = ops.lora_merge(dense, self.lora_A.detach(), self.lora_B.detach(), self.scaling, out=dense,
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
        """
        if self.four_bit:
            raise four_bit_merge_error("this layer")
        if self.merged:
            raise RuntimeError("LoRALinear is already merged; call unmerge() first")
        tied = [name for name, p in self.tied_to if shares_memory(p, self.weight)]
        if tied:
            raise tied_weight_error(f"this layer's weight with {tied}", "layer")
        self._original_weight = self.weight.detach().clone() if keep_original else None
        ops.lora_merge(self.weight, self.lora_A, self.lora_B, self.scaling, out=self.weight,
                       backend=self._merge_backend())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo `merge()`: restore the kept base weight, or subtract the adapter if none was kept."""
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged")
        if self._original_weight is not None:
            self.weight.copy_(self._original_weight)
        else:
            ops.lora_merge(self.weight, self.lora_A, self.lora_B, self.scaling, subtract=True, out=self.weight,
                           backend=self._merge_backend())
        self._original_weight = None
        self.merged = False

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
                f"adapter_dtype={self.lora_A.dtype}, base_gemm={self.base_gemm}, merged={self.merged}"
                + (f", base=4-bit {self.weight.quant_type}, compute_dtype={self.compute_dtype}"
                   if self.four_bit else ""))
