"""`python -m training`: produces the adapter packages that the service hot-swaps.

Two recipes (training/presets.py): Dolly QLoRA instruction-tuning and MarketMail schema tuning
on an 8-bit base. They write the adapter package contract of `service.adapters.manifest`.
"""
