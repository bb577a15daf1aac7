"""`python -m training`: produces the adapter packages that the service hot-swaps.

The training recipes (Dolly QLoRA instruction-tuning, MarketMail schema tuning) land with the
training issue; the adapter package contract they write is `service.adapters.manifest`.
"""
