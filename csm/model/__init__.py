"""The model: CSM itself (backbone and decoder), its weights in every layout and the conversions between them,
LoRA adapters, the Mimi codec, the text tokenizer, the hub, and the transformers-layout export.

May import: the system part.
"""
