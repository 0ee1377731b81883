"""Checkpoint exchange with other libraries; today Hugging Face `transformers` (see `hf`)."""

from lmlab.interop.hf import export_hf, from_hf, import_hf, to_hf_state_dict

__all__ = ["export_hf", "import_hf", "to_hf_state_dict", "from_hf"]
