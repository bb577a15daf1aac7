"""The adapter fleet over HTTP: vLLM's load/unload endpoints, pins, and the model list.

`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` keep vLLM's request fields,
status codes and plain-text success bodies, so vLLM's tooling drives hotswap unchanged. A load
fetches and checks the package on a thread (network and disk never block the event loop); a load
under a served name with `load_inplace` makes the new version current for new requests while
running ones finish on theirs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.adapters.registry import AdapterExists, AdapterRecord, AdapterRejected
from service.adapters.sources import SourceError
from service.errors import InvalidRequestError, NotFoundError
from service.protocol import LoadLoRAAdapterRequest, ModelCard, UnloadLoRAAdapterRequest
from service.serving.generation import ServingContext


def public_root(record: AdapterRecord) -> str:
    """Where an adapter came from, as every API key may see it: a hub id or bucket URL as the
    load API was given it, else `adapters/<directory name>`, never this host's paths (review L5)."""
    source = record.source or ""
    if "://" in source:
        return source
    return f"adapters/{Path(source).name if source else record.name}"


class AdapterServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        ctx = self.ctx
        if body.base_model_name and body.base_model_name != ctx.base_id:
            raise InvalidRequestError(
                f"base_model_name {body.base_model_name!r} is not the served base {ctx.base_id!r}",
                param="base_model_name",
            )
        was_resident = self._resident(body.lora_name)
        try:
            await asyncio.to_thread(ctx.registry.register, body.lora_name, body.lora_path, replace=body.load_inplace)
        except (ValueError, AdapterExists) as exc:
            raise InvalidRequestError(str(exc), param="lora_name") from exc
        except (SourceError, AdapterRejected) as exc:
            raise InvalidRequestError(f"cannot load {body.lora_path!r}: {exc}", param="lora_path") from exc
        if was_resident:  # the new version takes a slot before it is asked for
            ctx.engine.reload_adapters([body.lora_name])
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        try:
            self.ctx.registry.unregister(body.lora_name)
        except NotFoundError as exc:
            raise exc.about("lora_name") from None
        self.ctx.engine.pin_adapter(body.lora_name, False)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    def pin(self, name: str, pinned: bool) -> ModelCard:
        try:
            record = self.ctx.registry.get(name)
        except NotFoundError as exc:
            raise exc.about("name") from None
        try:
            self.ctx.engine.pin_adapter(name, pinned)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="name") from exc
        return self.card(record)

    def _resident(self, name: str) -> bool:
        if name not in self.ctx.registry:
            return False
        try:
            return self.ctx.engine.adapter_state(self.ctx.registry.version(name).key) == "resident"
        except NotFoundError:
            return False

    # --- the model list -----------------------------------------------------------------------

    def cards(self) -> list[ModelCard]:
        """What the caller's tenant may use: the base (if it may) and its adapters, nothing of
        the others'."""
        ctx, tenant = self.ctx, self.ctx.tenant
        cards = [ModelCard(id=ctx.base_id, root=ctx.base_id)] if tenant.base else []
        records = [r for r in ctx.registry.records() if tenant.may_use(r.name)]
        cards += [self.card(record) for record in records]
        served = {r.name for r in records}
        for name, source in ctx.registry.loading().items():
            if name not in served and tenant.may_use(name):
                cards.append(ModelCard(id=name, parent=ctx.base_id, root=source, state="loading"))
        return cards

    def card(self, record: AdapterRecord) -> ModelCard:
        ctx = self.ctx
        # `root` names where the adapter came from without this host's paths: the load API's
        # source (a hub id or bucket URL), or the adapter directory's entry (review L5).
        common = dict(id=record.name, parent=ctx.base_id, root=public_root(record))
        if record.status != "ready":
            return ModelCard(**common, state="failed", error=record.error)
        manifest = record.manifest
        return ModelCard(
            **common,
            description=manifest.description,
            prompt_template=manifest.prompt_template,
            input_fields=[f.model_dump() for f in manifest.input_fields],
            output=manifest.output.model_dump(),
            version=record.version,
            state=ctx.engine.adapter_state(record.key),
            pinned=record.name in ctx.engine.pinned_adapters(),
        )
