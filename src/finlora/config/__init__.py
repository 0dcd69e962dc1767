"""Typed run configuration: YAML recipes, dotted `--set key=value` overrides, validation.

One dataclass per concern (model, data, method, train, speed, and one section of options per
tuning method: lora, prefix, prompt, ptuning, ia3, freeze, full, adalora, adapter), each field
with its help text. Each validates itself where it is built, and every error names the dotted
key and what was allowed, e.g. `config: lora.r must be a positive integer (got 0)`.

sections.py and methods.py hold the sections; build.py turns YAML and `--set` items into them.
"""

from finlora.config.build import (
    INFERENCE_KEYS,
    SPEED_KEYS,
    apply_overrides,
    config_from_dict,
    load_config,
    read_yaml,
    select_method,
    with_speed_overrides,
)
from finlora.config.methods import (
    ADAPTER_NON_LINEARITIES,
    ADAPTER_PLACEMENTS,
    LORA_BIASES,
    LORA_INITS,
    METHOD_SECTIONS,
    PROMPT_INIT_TEXTS,
    PROMPT_INITS,
    PTUNING_ENCODERS,
    VIRTUAL_TOKEN_METHODS,
    AdaLoraSection,
    AdapterSection,
    FreezeSection,
    FullSection,
    IA3Section,
    LoraSection,
    MethodConfig,
    PrefixSection,
    PromptSection,
    PTuningSection,
)
from finlora.config.preference import OBJECTIVES, PreferenceSection
from finlora.config.sections import (
    DATA_FORMATS,
    DEVICES,
    FPB_AGREEMENTS,
    FPB_ENV,
    MODEL_KINDS,
    PRECISIONS,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from finlora.config.speed import ATTENTIONS, SpeedConfig
from finlora.config.tasks import GENERATIVE_TASKS, INSTRUCT_TEMPLATE, SERVES_AS, TASKS

__all__ = [
    "ADAPTER_NON_LINEARITIES",
    "ADAPTER_PLACEMENTS",
    "ATTENTIONS",
    "DATA_FORMATS",
    "DEVICES",
    "FPB_AGREEMENTS",
    "FPB_ENV",
    "INFERENCE_KEYS",
    "GENERATIVE_TASKS",
    "INSTRUCT_TEMPLATE",
    "OBJECTIVES",
    "LORA_BIASES",
    "LORA_INITS",
    "METHOD_SECTIONS",
    "MODEL_KINDS",
    "PRECISIONS",
    "PROMPT_INITS",
    "PROMPT_INIT_TEXTS",
    "PTUNING_ENCODERS",
    "SERVES_AS",
    "SPEED_KEYS",
    "TASKS",
    "VIRTUAL_TOKEN_METHODS",
    "AdaLoraSection",
    "AdapterSection",
    "DataConfig",
    "FreezeSection",
    "FullSection",
    "IA3Section",
    "LoraSection",
    "MethodConfig",
    "ModelConfig",
    "PTuningSection",
    "PreferenceSection",
    "PrefixSection",
    "PromptSection",
    "RunConfig",
    "SpeedConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "read_yaml",
    "select_method",
    "with_speed_overrides",
]
