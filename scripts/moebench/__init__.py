"""moebench: how should I LoRA-fine-tune a Mixture-of-Experts LLM on this GPU?

One module per workflow stage; every stage writes rows of the one tidy metrics schema (`metrics.py`).
"""
__version__ = "0.1.0"
