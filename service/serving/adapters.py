"""The adapter fleet over HTTP: vLLM's load/unload endpoints, pins, and the model list.

`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` keep vLLM's request fields,
status codes and plain-text success bodies, so vLLM's tooling drives hotswap unchanged. A load
fetches and checks the package on a thread (network and disk never block the event loop); a load
under a served name with `load_inplace` makes the new version current for new requests while
running ones finish on theirs.

Every version passes the gate (`service.adapters.gate`) before it answers a request: on load,
on a rescan and at start. A refused version answers none; the name's serving versions keep
serving. `"traffic": 0.1` loads a version as the name's canary; `promote`, `rollback` and
`traffic` change the split for the next request (`service.adapters.release`). RELEASES_FILE
declares all of that for every replica at once: `ReleasesWatch` acts on each change of it
through the same calls (`service.adapters.desired`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from service.adapters import desired, gate
from service.adapters.records import AdapterRecord
from service.adapters.registry import AdapterExists, AdapterRejected
from service.adapters.sources import SourceError
from service.errors import HotswapError, InvalidRequestError, NotFoundError
from service.protocol_objects import ModelCard
from service.protocol_vllm import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from service.serving.context import ServingContext

log = logging.getLogger(__name__)


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
        if body.traffic is not None and not body.load_inplace:
            raise InvalidRequestError(
                "a canary (traffic) is a new version of a served name: set load_inplace", param="traffic"
            )
        was_resident = self._resident(body.lora_name)
        try:
            record = await asyncio.to_thread(
                ctx.registry.stage, body.lora_name, body.lora_path, replace=body.load_inplace
            )
        except (ValueError, AdapterExists) as exc:
            raise InvalidRequestError(str(exc), param="lora_name") from exc
        except (SourceError, AdapterRejected) as exc:
            raise InvalidRequestError(f"cannot load {body.lora_path!r}: {exc}", param="lora_path") from exc
        try:
            verdict = await self.check(record, gated=body.gate)
            if not verdict.passed:
                raise InvalidRequestError(
                    f"cannot load {body.lora_path!r}: refused by the gate: {verdict.reason}", param="lora_path"
                )
            ctx.registry.install(record, traffic=body.traffic)
        except AdapterRejected as exc:
            ctx.registry.unstage(record)
            raise InvalidRequestError(f"cannot load {body.lora_path!r}: {exc}", param="traffic") from exc
        except BaseException:
            ctx.registry.unstage(record)
            raise
        if body.traffic is not None:
            ctx.metrics.canary_traffic.labels(record.name, record.version).set(body.traffic)
        elif was_resident:  # the new version takes a slot before it is asked for
            ctx.engine.reload_adapters([body.lora_name])
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    # --- the gate -----------------------------------------------------------------------------

    async def check(self, record: AdapterRecord, *, gated: bool = True) -> gate.Verdict:
        """Gate one version (`service.adapters.gate`); a refused one is marked failed with the
        reason. `gated` False (or ADAPTER_GATE=false) passes it unchecked, with a warning."""
        ctx = self.ctx
        if not (gated and ctx.gate):
            log.warning("adapter %r version %s: the gate was skipped (gate: false)", record.name, record.version)
            ctx.metrics.gate_checks.labels(record.name, "skipped").inc()
            return gate.Verdict(True, "gate skipped")
        evaluation = record.manifest.evaluation if record.manifest else None
        golden = [
            g
            for g in (evaluation.golden if evaluation else [])
            if len(g.prompt_ids) + len(g.output_ids) < ctx.max_context
        ]
        same = evaluation is None or evaluation.quantization == ctx.quantization
        try:
            verdict = await gate.check(
                record.key,
                golden,
                gate.engine_scorer(ctx.engine),
                probe_ids=list(ctx.tokenizer(gate.PROBE)["input_ids"]),
                tolerance=gate.SAME_QUANTIZATION if same else gate.CROSS_QUANTIZATION,
            )
        except HotswapError as exc:  # its weights cannot be loaded on this base
            verdict = gate.Verdict(False, f"it cannot be run: {exc.message}")
        log.info("adapter %r version %s gate: %s %s", record.name, record.version, verdict.reason, verdict.figures)
        ctx.metrics.gate_checks.labels(record.name, "passed" if verdict.passed else "refused").inc()
        if not verdict.passed:
            ctx.registry.refuse(record, verdict.reason)
        return verdict

    async def gate_all(self) -> None:
        """At start: every version the directory scan found, before the service is ready."""
        for record in self.ctx.registry.ready():
            await self.check(record)

    async def rescan(self) -> dict[str, Any]:
        """Scan the adapter directory; added and changed packages serve once they pass the gate."""
        registry = self.ctx.registry
        diff = await asyncio.to_thread(registry.rescan, stage=True)
        refused = []
        for record in diff.pop("staged"):
            if (await self.check(record)).passed:
                registry.install(record)
                self.ctx.engine.reload_adapters([record.name])
            else:
                refused.append(record.name)
        return {**diff, "refused": refused}

    # --- releases -----------------------------------------------------------------------------

    def promote(self, name: str) -> ModelCard:
        record = self._release(self.ctx.registry.promote, name)
        self.ctx.metrics.canary_traffic.labels(name, record.version).set(0)
        self.ctx.engine.reload_adapters([name])
        return self.card(self.ctx.registry.get(name))

    def rollback(self, name: str, trigger: str = "admin") -> ModelCard:
        canary = self.ctx.registry.release(name)["canary"] if name in self.ctx.registry else None
        self._release(self.ctx.registry.rollback, name)
        if canary is not None:
            self.ctx.metrics.canary_traffic.labels(name, canary["version"]).set(0)
        self.ctx.metrics.rollbacks.labels(name, trigger).inc()
        return self.card(self.ctx.registry.get(name))

    def traffic(self, name: str, share: float) -> ModelCard:
        canary = self._release(self.ctx.registry.set_traffic, name, share)
        self.ctx.metrics.canary_traffic.labels(name, canary.version).set(share)
        return self.card(self.ctx.registry.get(name))

    def _release(self, change: Any, name: str, *args: Any) -> Any:
        try:
            self.ctx.registry.get(name)
            return change(name, *args)
        except NotFoundError as exc:
            raise exc.about("name") from None
        except (AdapterRejected, ValueError) as exc:
            raise InvalidRequestError(str(exc), param="name") from exc

    # --- the releases file ---------------------------------------------------------------------

    async def sync(self, declared: desired.Declared) -> list[dict[str, Any]]:
        """Take the steps from what this replica serves to the declared releases
        (`service.adapters.desired`), one at a time; each step's outcome, in order. A failed
        step leaves its name as it was and skips the name's later steps."""
        registry, metrics = self.ctx.registry, self.ctx.metrics
        serving = {name: registry.serving(name) for name in declared.releases}
        failed: set[str] = set()
        outcomes: list[dict[str, Any]] = []
        for step in desired.plan(declared.releases, serving):
            outcome, error = "skipped", "an earlier step for this adapter failed"
            if step.name not in failed:
                try:
                    await self._take(step)
                    outcome, error = "done", None
                except HotswapError as exc:
                    outcome, error = "failed", exc.message
                except Exception as exc:  # a background sync must go on to the other names
                    log.error("releases file: %s: unexpected error", step, exc_info=exc)
                    outcome, error = "failed", f"{type(exc).__name__}: {exc}"
            if outcome == "done":
                log.info("releases file: %s: done", step)
            else:
                failed.add(step.name)
                log.error("releases file: %s: %s: %s", step, outcome, error)
            metrics.release_steps.labels(step.name, step.action, outcome).inc()
            outcomes.append(
                {"adapter": step.name, "action": step.action, "step": str(step), "outcome": outcome}
                | ({"error": error} if error else {})
            )
        return outcomes

    async def _take(self, step: desired.Step) -> None:
        if step.action in ("stable", "canary"):
            assert step.source is not None
            load = LoadLoRAAdapterRequest(
                lora_name=step.name, lora_path=step.source, load_inplace=True, traffic=step.traffic
            )
            await self.load(load)
        elif step.action == "promote":
            self.promote(step.name)
        elif step.action == "traffic":
            assert step.traffic is not None
            self.traffic(step.name, step.traffic)
        else:
            self.rollback(step.name, trigger="file")

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
        common: dict[str, Any] = dict(id=record.name, parent=ctx.base_id, root=public_root(record))
        common["release"] = ctx.registry.release(record.name)
        if record.status != "ready":
            return ModelCard(**common, state="failed", error=record.error, version=record.version)
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


class ReleasesWatch:
    """RELEASES_FILE on this replica: read at start and on every change of its content, each
    reading acted on once (`AdapterServing.sync`); what the last one did, for `GET
    /admin/releases`."""

    def __init__(self, path: Path):
        self.path = path
        self.digest: str | None = None  # the reading acted on last
        self.synced_at: float | None = None
        self.steps: list[dict[str, Any]] = []
        self.error: str | None = None  # why the file cannot be used now (None: it can)
        self._lock = asyncio.Lock()  # the poll and an admin's sync take turns

    async def sync(self, ctx: ServingContext, *, force: bool = False) -> dict[str, Any]:
        """Act on the file if its content changed since the last reading acted on (`force`:
        even if not). An unreadable or invalid file changes nothing: the replica keeps serving
        what it serves, and the error is logged once and shown until the file is fixed."""
        async with self._lock:
            try:
                declared = await asyncio.to_thread(desired.read, self.path)
            except desired.ReleasesError as exc:
                if self.error != str(exc):
                    log.error("%s; serving as before", exc)
                    ctx.metrics.release_syncs.labels("invalid").inc()
                self.error = str(exc)
                return self.status()
            self.error = None
            if declared.digest == self.digest and not force:
                return self.status()
            self.steps = await AdapterServing(ctx).sync(declared)
            self.digest, self.synced_at = declared.digest, time.time()
            failed = any(step["outcome"] != "done" for step in self.steps)
            ctx.metrics.release_syncs.labels("failed" if failed else "applied").inc()
            return self.status()

    async def watch(self, ctx: ServingContext, every: float) -> None:
        """Check the file every `every` seconds until cancelled."""
        while True:
            await asyncio.sleep(every)
            await self.sync(ctx)

    def status(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "digest": self.digest,
            "synced_at": self.synced_at,
            "steps": self.steps,
            "error": self.error,
        }
