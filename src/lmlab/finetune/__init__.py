"""Fine-tuning tasks: thin task layers over `lmlab.train` (one loop, `run_task`)."""

from lmlab.finetune.classify import ClassificationTask, finetune_classify, predict

__all__ = ["ClassificationTask", "finetune_classify", "predict"]
