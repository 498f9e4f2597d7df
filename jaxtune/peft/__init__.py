"""PEFT methods as transforms of the parameter tree (``params -> params`` plus a trainable mask).

    from jaxtune.peft import LoraConfig, apply_lora, trainable_mask, merge_adapters
    params = apply_lora(params, LoraConfig(rank=8, targets=("all-linear",)), rng)
    mask = trainable_mask(params)                 # A and B only
    ...train with jaxtune.utils.partition.split(params, mask)...
    plain = merge_adapters(params)                # no extra latency at inference

Methods: LoRA (+ rsLoRA, PiSSA / OLoRA inits, dropout), DoRA, AdaLoRA, IA3, bottleneck
adapters, BitFit and LN-tuning masks (+ added biases), prompt tuning, P-tuning, prefix tuning;
`AdapterSet` for several named adapters on one base; `foreign.lora_wrap` for JAX code that was
not written for jaxtune; `PeftConfig` / `apply_peft` for the ``peft:`` section of a job;
`merge_quantized` folds adapters into quantized bases (QLoRA). Targets are chosen by
`jaxtune.utils.targets` (`TARGET_PRESETS` or regexes over param paths).
"""

from jaxtune.peft.adalora import AdaLoraConfig, AdaLoraWeight, adalora_optimizer, apply_adalora, effective_ranks
from jaxtune.peft.bottleneck import BottleneckConfig, BottleneckWeight, apply_bottleneck, remove_bottleneck
from jaxtune.peft.config import BitFitConfig, PeftConfig, apply_peft, peft_mask, peft_optimizer
from jaxtune.peft.core import (
    adapter_mask,
    any_mask,
    base_model,
    count_trainable,
    describe_trainable,
    is_adapter,
    merge_adapters,
    merge_quantized,
    register_adapter,
    trainable_mask,
)
from jaxtune.peft.dora import DoraWeight, apply_dora
from jaxtune.peft.foreign import init_foreign_lora, lora_wrap, materialise
from jaxtune.peft.ia3 import IA3Config, IA3Weight, apply_ia3
from jaxtune.peft.lora import (
    LoraConfig,
    LoraWeight,
    apply_lora,
    join_lora,
    lora_mask,
    merge,
    split_lora,
)
from jaxtune.peft.multi import AdapterSet, attach_adapter, extract_adapter
from jaxtune.peft.prompt import (
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    apply_p_tuning,
    apply_prefix_tuning,
    apply_prompt_tuning,
    resolve_prompt,
)
from jaxtune.peft.selective import BiasedWeight, add_biases, bitfit_mask, ln_tuning_mask
from jaxtune.utils.targets import TARGET_PRESETS

__all__ = [
    "TARGET_PRESETS", "AdaLoraConfig", "AdaLoraWeight", "AdapterSet", "BiasedWeight", "BitFitConfig",
    "BottleneckConfig", "BottleneckWeight", "DoraWeight", "IA3Config", "IA3Weight", "LoraConfig", "LoraWeight",
    "PTuningConfig", "PeftConfig", "PrefixTuningConfig", "PromptTuningConfig", "adalora_optimizer", "adapter_mask",
    "add_biases", "any_mask", "apply_adalora", "apply_bottleneck", "apply_dora", "apply_ia3", "apply_lora",
    "apply_p_tuning", "apply_peft", "apply_prefix_tuning", "apply_prompt_tuning", "attach_adapter", "base_model",
    "bitfit_mask", "count_trainable", "describe_trainable", "effective_ranks", "extract_adapter",
    "init_foreign_lora", "is_adapter", "join_lora", "ln_tuning_mask", "lora_mask", "lora_wrap", "materialise",
    "merge", "merge_adapters", "merge_quantized", "peft_mask", "peft_optimizer", "register_adapter", "remove_bottleneck",
    "resolve_prompt", "split_lora", "trainable_mask",
]
