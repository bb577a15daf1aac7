"""Forward passes of one base model with per-row PEFT adapters and a growing KV cache."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from enum import Enum
from typing import Any

import torch
from transformers import DynamicCache

from service.engine import PEFT_BASE, TokenLogprob
from service.engine.attention import WIDE, prompt_pass, prompt_tokens_in_pass, use_wide_attention
from service.engine.kv_layers import Layers, pad_left
from service.engine.lora import FusedMixedLoRA, Layout, LoRARouting
from service.engine.model import LoRAModel
from service.engine.packed import Grow, PackedCache, Piece, packed_pass
from service.engine.packed import inputs as packed_inputs
from service.engine.packed import supported as packed_supported
from service.engine.prefix import unsupported as prefix_unsupported
from service.engine.sampling import token_logprob

SCORE_CHUNK = 512  # prompt positions scored at once (score_prompt): bounds [positions, vocab] logits
POOL_MAX_ADAPTERS = 16  # loaded adapters up to which eager batches may go through the LoRA pool


class Routing(Enum):
    """How a slot step's rows reach their adapters (`ModelRunner.forward_slots`)."""

    EAGER = "eager"  # as any forward pass: PEFT's per-row names, or the fused LoRA's stacks
    STATIC = "static"  # through fixed buffers, refilled for these rows (a CUDA graph's inputs)
    CAPTURE = "capture"  # through fixed buffers, left as they are (while a graph is captured)


class ModelRunner:
    """Runs prefill and decode steps; the model must not change while a step runs."""

    def __init__(self, model: LoRAModel | Any, device: str, *, fused_lora: bool = True):
        # The model is reached through its owner, which the adapter slots share (a torch model
        # given here gets its owner, or the one it already has).
        self.lora = model if isinstance(model, LoRAModel) else LoRAModel.of(model)
        model = self.lora.model
        self.device = torch.device(device)
        self._cache_kwarg = _cache_kwarg(model)
        # Mixed-adapter batches through service.engine.lora (False: PEFT's own loop).
        self.fused_lora = fused_lora
        # A 4D attention mask is passed as is: boolean for SDPA, added to the scores (in this
        # dtype) by the eager attention.
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        attention = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
        self.additive_mask = None if attention in ("sdpa", WIDE) else hidden_dtype(model)
        # On CPUs attention runs in float64, so that what ran before (a stored prefix, padding,
        # the batch) cannot change an answer (service/engine/attention.py).
        self.wide_attention = use_wide_attention(model, self.device)
        # ALiBi models (BLOOM, MPT, Falcon-RW) build their position biases from a 2D padding
        # mask, so a static step must pass one [rows, columns] and let the model make the rest.
        self.mask_2d = config.model_type in ("bloom", "mpt") or bool(getattr(config, "alibi", False))

    @property
    def model(self) -> Any:
        return self.lora.model

    @property
    def fused(self) -> FusedMixedLoRA:
        return self.lora.fused

    @property
    def cache_kwarg(self) -> str:
        """The forward argument that takes the KV cache (its name depends on the version)."""
        return self._cache_kwarg

    def forward_slots(self, names: list[str], *, routing: Routing, **kwargs: Any) -> Any:
        """A forward pass with the rows' adapters (PEFT_BASE for the base), routed as said."""
        if routing is Routing.EAGER:
            return self._forward([None if n == PEFT_BASE else n for n in names], **kwargs)
        with self.pool_routing(names, fill=routing is Routing.STATIC):
            return self.model(**kwargs)

    @contextlib.contextmanager
    def pool_routing(self, names: list[str], *, fill: bool = True) -> Iterator[None]:
        """Route the passes (or graph replays) inside through the adapter pool, for these rows
        (`fill=False` while a graph is captured: see FusedMixedLoRA.route)."""
        fused = self.lora.fused_layers()
        if fused is None:
            if any(n != PEFT_BASE for n in names):
                raise ValueError("no adapters are loaded on this model")
            yield
            return
        if not fused.complete:
            raise RuntimeError("CUDA graphs need every LoRA layer fused (linear layers only)")
        fused.route(LoRARouting(tuple(names), Layout.POOL, fill=fill))
        try:
            yield
        finally:
            fused.route(None)

    def packable(self, max_context: int | None = None) -> bool:
        """Whether packed steps (service/engine/packed.py) can serve this model and its adapters
        over `max_context` tokens: attention through transformers' interface, full attention
        without ALiBi, and every adapter through the fused LoRA's per-token routing."""
        if self.mask_2d or prefix_unsupported(self, max_context) or not packed_supported(self.model):
            return False
        fused = self.lora.fused_layers()
        return fused is None or (self.fused_lora and fused.plain())

    @torch.inference_mode()
    def step_packed(
        self,
        running: Layers | None,
        running_mask: torch.Tensor | None,
        tokens: list[int],
        positions: list[int],
        adapters: list[str | None],
        pieces: list[Piece],
        grow: Grow | None = None,
    ) -> tuple[torch.Tensor, Layers | None, list[Layers]]:
        """One forward pass for the running rows' next tokens and the pieces (packed.py): the
        fp32 logits of each row's token and each piece's last one [rows + pieces, vocab], the
        rows' caches a column longer (through `grow`, PackedCache's), and each piece's KV (its
        past, then its tokens)."""
        ids, position_ids, names, keep = packed_inputs(tokens, positions, adapters, pieces, self.device)
        cache = PackedCache(running, running_mask, pieces, self.device, grow)
        with packed_pass(self.model, cache), prompt_tokens_in_pass() if pieces else contextlib.nullcontext():
            out = self._forward(
                names,
                packed=True,
                input_ids=ids,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_kwarg: cache},
                logits_to_keep=keep,
            )
        grown, done = cache.results()
        return out.logits[0].float(), grown, done

    def _forward(self, adapters: list[str | None], *, packed: bool = False, **kwargs: Any) -> Any:
        """The model's forward pass, each row through its own adapter (None: the base); with
        `packed`, one row whose tokens each have their own adapter (`adapters` per token)."""
        if not self.lora.peft:
            if any(a is not None for a in adapters):
                raise ValueError("no adapters are loaded on this model")
            return self.model(**kwargs)
        names = [a or PEFT_BASE for a in adapters]
        if not self.fused_lora:
            return self.model(**kwargs, adapter_names=names)  # PEFT's mixed batch
        fused = self.lora.fused_layers()
        assert fused is not None  # a PEFT model has its fused LoRA
        unknown = set(names) - {PEFT_BASE} - set(self.model.peft_config)
        if unknown:  # PEFT would check this; the fused path must too
            raise ValueError(f"adapters not loaded: {sorted(unknown)}")
        if packed and not fused.plain():
            raise RuntimeError("a packed step needs every adapter through the fused LoRA")
        if not fused.complete:
            return self.model(**kwargs, adapter_names=names)
        fused.route(LoRARouting(tuple(names), self._layout(names, fused), per_token=packed))
        try:
            return self.model(**kwargs)
        finally:
            fused.route(None)

    def _layout(self, names: list[str], fused: FusedMixedLoRA) -> Layout:
        """The pool when the batch uses at least half of the loaded adapters (and they fit it):
        one stack of all of them, rewritten in place when a slot's weights change, and a row
        mask per batch. Stacking each batch's own composition instead copies its adapters'
        weights whenever the composition changes, which in a fleet is nearly every step. With
        fewer in use, every row through every loaded adapter reads more than restacking copies,
        and with many more loaded than a batch holds the pool is larger still: then each
        batch's composition is stacked, and kept while it repeats (docs/benchmarks.md, bench.fleet)."""
        loaded = len(self.model.peft_config)
        present = len(set(names) - {PEFT_BASE})
        pooled = loaded <= POOL_MAX_ADAPTERS and 2 * present >= loaded and fused.sync_pool()
        return Layout.POOL if pooled else Layout.STACKS

    @torch.inference_mode()
    def prefill(
        self, prompt_ids: list[int], adapter: str | None, *, past: Any = None
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Run the prompt; return its last position's fp32 logits and the cache.

        `past` (a service.engine.prefix.Hit): the KV of the prompt's first `past.length` tokens,
        computed before; only the rest runs, and the cache returned covers the whole prompt."""
        extra: dict[str, Any] = {}
        if past is None:
            cache, start = DynamicCache(), 0
        else:
            cache, start = past.cache, past.length
            extra["position_ids"] = torch.arange(start, len(prompt_ids), device=self.device)[None]
            extra["attention_mask"] = torch.ones((1, len(prompt_ids)), dtype=torch.long, device=self.device)
        ids = torch.tensor([prompt_ids[start:]], device=self.device)
        with prompt_pass():
            out = self._forward(
                [adapter],
                input_ids=ids,
                use_cache=True,
                **{self._cache_kwarg: cache},
                logits_to_keep=1,
                **extra,
            )
        return out.logits[0, -1].float(), cache

    @torch.inference_mode()
    def score_prompt(
        self, prompt_ids: list[int], adapter: str | None, top_k: int
    ) -> tuple[torch.Tensor, DynamicCache, tuple[TokenLogprob | None, ...]]:
        """Run the prompt and score it: its last position's fp32 logits, the cache, and each
        prompt token's log-probability given the ones before it (None for the first), with its
        `top_k` alternatives (echo + logprobs; lm-evaluation-harness's log-likelihood).

        The vocabulary's logits are computed SCORE_CHUNK positions at a time from the decoder's
        last hidden states, never [positions, vocab] at once: that was 2 x 1.6 GB of fp32 for an
        8K-token SmolLM2 prompt, and a CUDA OOM on a large-vocabulary base (security review H3).
        A model whose head is not a plain projection of those states (logit scaling or
        soft-capping, LoRA on the head) gets its logits from the model, a chunk at a time too."""
        hidden: list[torch.Tensor] = []

        def keep(module: Any, args: Any, output: Any) -> None:
            hidden.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        decoder = _decoder(self.model)
        hook = decoder.register_forward_hook(keep) if decoder is not None else None
        cache = DynamicCache()
        try:
            with prompt_pass():
                out = self._forward(
                    [adapter],
                    input_ids=torch.tensor([prompt_ids], device=self.device),
                    use_cache=True,
                    **{self._cache_kwarg: cache},
                    logits_to_keep=1,
                )
        finally:
            if hook is not None:
                hook.remove()
        last = out.logits[0, -1].float()
        head = self.model.get_output_embeddings()
        states = hidden[0][0] if hidden else None
        plain = states is not None and torch.allclose(head(states[-1:]).float()[0], last, rtol=1e-4, atol=1e-4)
        scored: list[TokenLogprob | None] = [None]
        for start in range(0, len(prompt_ids) - 1, SCORE_CHUNK):
            end = min(start + SCORE_CHUNK, len(prompt_ids) - 1)
            if plain and states is not None:
                logits = head(states[start:end]).float()
            else:
                logits = self._last_positions(prompt_ids[:end], adapter, end - start)
            logprobs = torch.log_softmax(logits, dim=-1)
            scored += [token_logprob(logprobs[i - start], prompt_ids[i + 1], top_k) for i in range(start, end)]
        return last, cache, tuple(scored)

    def _last_positions(self, prompt_ids: list[int], adapter: str | None, count: int) -> torch.Tensor:
        """The fp32 logits of the last `count` positions, from the model itself (`score_prompt`'s
        fallback: the prompt runs again for each chunk, rare and bounded in memory)."""
        with prompt_pass():
            out = self._forward(
                [adapter],
                input_ids=torch.tensor([prompt_ids], device=self.device),
                use_cache=False,
                logits_to_keep=count,
            )
        return out.logits[0].float()

    @torch.inference_mode()
    def prefill_batch(
        self, prompts: list[list[int]], adapters: list[str | None], pasts: list[Any] | None = None
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Run several prompts in one left-padded forward pass, each row through its own adapter.

        Returns the fp32 logits of each prompt's last position [rows, vocab], the batch's cache
        and its attention mask [rows, longest prompt] (0 on the left padding). Positions count
        from each row's first real token, so padding changes nothing a row computes.

        `pasts` (service.engine.prefix.Hit or None per row): the KV of a row's first tokens,
        computed before; only the rest of each prompt runs, and the cache returned covers every
        whole prompt, left-padded like the others.
        """
        if pasts is not None and any(p is not None for p in pasts):
            return self._prefill_after(prompts, adapters, pasts)
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        mask = mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        return self._last_logits(adapters, ids, mask, positions, cache), cache, mask

    def _last_logits(self, adapters, ids, mask, positions, cache) -> torch.Tensor:
        """A batch's prompt pass into `cache`; the fp32 logits of each row's last position."""
        with prompt_pass():
            out = self._forward(
                adapters,
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
                **{self._cache_kwarg: cache},
                logits_to_keep=1,
            )
        return out.logits[:, -1].float()

    def _prefill_after(
        self, prompts: list[list[int]], adapters: list[str | None], pasts: list[Any]
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """`prefill_batch` where some rows start with stored KV (prefix reuse): one forward pass
        instead of one per row. Row r runs as [padding | its past | padding | the rest of its
        prompt]: the pasts left-padded to the longest in a fresh cache, the rest left-padded to
        the longest, each token at its own position, padding masked. The hole between a past
        and its rest is then closed (each row's columns gathered to the right), so the cache
        comes out left-padded as `prefill_batch`'s does."""
        lengths = [p.length if p is not None else 0 for p in pasts]
        rests = [prompt[n:] for prompt, n in zip(prompts, lengths, strict=True)]
        past_width, rest_width, rows = max(lengths), max(len(r) for r in rests), len(prompts)
        ids = torch.zeros((rows, rest_width), dtype=torch.long)
        positions = torch.zeros((rows, rest_width), dtype=torch.long)
        mask = torch.zeros((rows, past_width + rest_width), dtype=torch.long)
        for row, (rest, n) in enumerate(zip(rests, lengths, strict=True)):
            ids[row, rest_width - len(rest) :] = torch.tensor(rest)
            positions[row, rest_width - len(rest) :] = torch.arange(n, n + len(rest))
            mask[row, past_width - n : past_width] = 1
            mask[row, past_width + rest_width - len(rest) :] = 1
        stored = [[(layer.keys, layer.values) for layer in p.cache.layers] if p is not None else None for p in pasts]
        sample = next(layers for layers in stored if layers is not None)
        cache = DynamicCache()
        for index, (keys, _) in enumerate(sample):
            shape = (1, keys.shape[1], past_width, keys.shape[3])
            blank = keys.new_zeros(shape)
            padded = [
                [blank if layers is None else pad_left(layers[index][kind], past_width) for layers in stored]
                for kind in (0, 1)
            ]
            cache.update(torch.cat(padded[0]), torch.cat(padded[1]), index)
        mask = mask.to(self.device)
        logits = self._last_logits(adapters, ids, mask, positions, cache)
        # Padding first, then each row's tokens in order; then the columns that are padding in
        # every row go, so the cache is as wide as the longest prompt (a static cache's bound).
        order = torch.argsort(mask, dim=1, stable=True)
        mask = mask.gather(1, order)
        order = order[:, int(mask.argmax(dim=1).min()) :]
        for layer in cache.layers:
            columns = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, columns), layer.values.gather(2, columns)
        return logits, cache, mask[:, -order.shape[1] :]

    @torch.inference_mode()
    def decode_batch(
        self,
        token_ids: list[int],
        cache: DynamicCache,
        attention_mask: torch.Tensor,
        positions: list[int],
        adapters: list[str | None],
    ) -> torch.Tensor:
        """One token for each row of a left-padded batch; return [rows, vocab] fp32 logits.

        `attention_mask` covers the cache plus the new token (0 on padding); `positions` are the
        rows' own positions, so padding never shifts a row's rotary embeddings.
        """
        out = self._forward(
            adapters,
            input_ids=torch.tensor([[t] for t in token_ids], device=self.device),
            attention_mask=attention_mask,
            position_ids=torch.tensor([[p] for p in positions], device=self.device),
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, token_id: int, cache: DynamicCache, adapter: str | None) -> torch.Tensor:
        """Feed one token; return the fp32 logits of the next position."""
        ids = torch.tensor([[token_id]], device=self.device)
        out = self._forward(
            [adapter],
            input_ids=ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return out.logits[0, -1].float()


def _decoder(model: Any) -> Any:
    """The module whose output is the hidden states the head projects (None if unknown)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_decoder", None)
    try:
        return getter() if getter is not None else None
    except (AttributeError, NotImplementedError):
        return None


def _cache_kwarg(model: Any) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; older 5.x only knows the former."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def hidden_dtype(model: Any) -> torch.dtype:
    """The dtype of the hidden states, and so of the keys and values: the input embeddings'."""
    return model.get_input_embeddings().weight.dtype
