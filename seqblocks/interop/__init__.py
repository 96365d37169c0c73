"""Interoperability with other ecosystems' checkpoints.

- ``from_hf(path, **overrides)`` / ``save_hf(model, path)``: Hugging Face model folders of the families
  in ``FAMILIES`` (``seqblocks.interop.hf``), and mamba_ssm's own format on import.
- ``save_mamba_ssm(model, path)``: mamba_ssm's ``MambaLMHeadModel`` format (``seqblocks.interop.mamba_ssm``).
- ``convert(src, dst, to=None)``: either direction between an HF folder and a seqblocks checkpoint.

docs/interop.md lists the families, the name maps and the known numerical differences.
"""

from seqblocks.interop.convert import convert, folder_kind
from seqblocks.interop.hf import ARCHITECTURES, FAMILIES, detect_family, family_of, from_hf, save_hf
from seqblocks.interop.mamba_ssm import save_mamba_ssm

__all__ = ["from_hf", "save_hf", "save_mamba_ssm", "convert", "folder_kind", "detect_family", "family_of",
           "FAMILIES", "ARCHITECTURES"]
