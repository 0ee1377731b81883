"""Fine-tuning tasks: thin task layers over `lmlab.train` (one loop, `run_task`)."""

from lmlab.finetune.classify import ClassificationTask, finetune_classify, predict
from lmlab.finetune.dpo import PreferenceTask, finetune_dpo
from lmlab.finetune.lora import adapters_disabled, apply_lora, export_peft, merge_lora
from lmlab.finetune.sft import SFTTask, finetune_sft

__all__ = ["ClassificationTask", "finetune_classify", "predict", "apply_lora", "adapters_disabled",
           "export_peft", "merge_lora", "PreferenceTask", "finetune_dpo", "SFTTask", "finetune_sft"]
