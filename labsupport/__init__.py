"""labsupport: the helper library of "LLM Cost Optimization, Measured".

Modules (each introduced by the lab named in its docstring):
runtime (profiles, device, cache), data (corpus, tokenizer), model (the course model),
train (training loop), zoo (trained course models), measure (timing, bytes, FLOPs, rooflines),
cost (hardware table, cost and energy), claims (claim-check tables), plot (figure style);
later labs add scaling, lora, distill, quant, serving, gqa, cascade, factworld, retrieval, rag
and tco (ownership cost against an API, lab 42).
"""

__version__ = "0.1.0"
