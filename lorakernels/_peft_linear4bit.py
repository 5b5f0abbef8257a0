"""The fused route of PEFT's QLoRA layer `lora.bnb.Linear4bit`, which `lorakernels.patch_peft` swaps in.

Importing this module imports peft's bitsandbytes layers, hence bitsandbytes: `patch_peft` imports it
only when bitsandbytes is already loaded (a 4-bit layer can exist only then).

PEFT's `lora.bnb.Linear4bit.forward` (peft 0.21.2) computes what `lora.Linear.forward` does over a
bitsandbytes `Linear4bit` base (plus a defensive clone of the base output), so the per-call
conditions and the fused call are `lorakernels._peft_linear`'s: the 4-bit weight reaches the
kernels as its packed codes (`operands.FourBitWeight`), never dequantized to a dense copy (the
torch backend, lorakernels' CPU path, dequantizes W for the duration of each call).
"""

from peft.tuners.lora import bnb as peft_lora_bnb

from lorakernels._peft_linear import FusedRoute

PeftLinear4bit = peft_lora_bnb.Linear4bit


class Linear4bit(FusedRoute, PeftLinear4bit):
    """PEFT's `lora.bnb.Linear4bit` whose forward runs `lorakernels.lora_linear` on the 4-bit weight
    when that is exact (see `lorakernels._peft_linear.Linear`)."""

    peft_class = PeftLinear4bit
