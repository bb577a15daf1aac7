"""`SlotKV`: one preallocated slot per batch row, written in place; CUDA-graph decode steps.

One buffer [layers, 2, slots, max_len, kv_heads, head_dim]: row i of the batch lives in slot i,
its token at position p in column p (no padding: each row writes at its own position), and
attention reads the first `width` columns of the first rows, with a mask that hides the columns
past each row's position. A row that leaves is replaced by the last row (one copy), so the rows
always fill the first slots. Nothing changes shape from one step to the next within a (rows,
width) bucket, so on CUDA each bucket's decode step is captured once in a CUDA graph and
replayed: one launch instead of the thousands of kernel launches (and the Python between them)
of a quantized 7B model's forward pass, which were most of a decode step's time
(docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from service.engine import PEFT_BASE
from service.engine.lora import FusedMixedLoRA
from service.engine.runner import ModelRunner, Routing

log = logging.getLogger(__name__)

_MIN_WIDTH = 64  # smallest width bucket of a captured step


class SlotKV:
    """Rows in the slots of one preallocated buffer; decode steps from CUDA graphs on CUDA.

    `max_len` bounds a row's prompt plus completion (the engine's context); `capacity` is the
    most rows at once. The engine reserves the buffer when it is built (`reserve`, from the
    model's config); otherwise the first join allocates it in the shape of the model's cache.
    Pieces of prompts never ride in its steps (`packable`): a captured step's shapes are fixed.
    """

    packable = False

    def __init__(
        self,
        runner: ModelRunner,
        capacity: int,
        max_len: int,
        *,
        cuda_graphs: bool = True,
        lora_slots: int = 1,
        on_capture: Callable[[float], None] = lambda seconds: None,
        on_graphs_off: Callable[[], None] = lambda: None,
    ):
        self.runner = runner
        # Adapters the LoRA pool holds before it must grow (and every graph be captured again):
        # the engine gives its device slots (MAX_RESIDENT_ADAPTERS); 1 grows it as they load.
        self.lora_slots = lora_slots
        self._on_capture, self._on_graphs_off = on_capture, on_graphs_off
        self.capacity = capacity
        self.max_len = max_len
        self.graphs = graphs_unavailable(runner, cuda_graphs) is None
        self.rows = 0
        self._lengths: list[int] = []  # per row: tokens in its slot (kept to size the copies)
        self._buffer: torch.Tensor | None = None
        self._flat: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: [slots*max_len, heads, dim]
        self._steps: dict[tuple[int, int], _Step] = {}
        self._graph_key: Any = None
        self._pool = None
        self.captures = 0  # graphs captured so far (for logs and tests)

    # --- joining and leaving ------------------------------------------------------------------

    def join(self, cache: DynamicCache, new_mask: torch.Tensor) -> None:
        """Copy freshly prefilled, left-padded rows into the next free slots, each from column 0."""
        rows, width = new_mask.shape
        if self.rows + rows > self.capacity:
            raise RuntimeError(f"{self.rows + rows} rows exceed the batch capacity {self.capacity}")
        if width > self.max_len:
            raise RuntimeError(f"a prompt of {width} tokens exceeds the KV cache length {self.max_len}")
        if self._buffer is None:
            self._allocate(cache)
        elif _layout(cache) != _layout(self._buffer):
            if self.rows:
                raise RuntimeError(
                    f"the model's cache {_layout(cache)} does not match the static KV cache's {_layout(self._buffer)}"
                )
            log.warning(
                "the static KV cache was reserved as %s but the model's cache is %s: reallocating",
                _layout(self._buffer),
                _layout(cache),
            )
            self._buffer, self._flat = None, []
            self._steps.clear()
            self._allocate(cache)
        lengths = new_mask.sum(dim=1)
        # Row r's tokens sit in columns [width - length_r, width): shift each left to column 0.
        shift = (width - lengths).unsqueeze(1)
        columns = (torch.arange(width, device=new_mask.device).unsqueeze(0) + shift).clamp(max=width - 1)
        buffer = self._buffer
        assert buffer is not None  # allocated above
        heads, dim = buffer.shape[-2:]
        index = columns[:, None, :, None].expand(rows, heads, width, dim)
        start = self.rows
        for layer, source in enumerate(cache.layers):
            for kind, states in enumerate((source.keys, source.values)):
                aligned = states.gather(2, index.to(states.device))  # [rows, heads, width, dim]
                buffer[layer, kind, start : start + rows, :width] = aligned.transpose(1, 2)
        self._lengths += lengths.tolist()
        self.rows += rows

    def retain(self, keep: list[int]) -> list[int]:
        """Keep these rows (old indices, ascending): each kept row past the new row count moves
        into a slot that a leaving row frees below it. Returns the kept rows' old indices in
        their new slot order."""
        count = len(keep)
        kept = set(keep)
        holes = [i for i in range(count) if i not in kept]
        movers = [i for i in keep if i >= count]  # as many as there are holes
        order = list(range(count))
        for hole, source in zip(holes, movers, strict=True):
            order[hole] = source
        buffer = self._buffer
        if holes and buffer is not None:
            width = max(self._lengths[s] for s in movers)
            to = torch.tensor(holes, device=buffer.device)
            sources = torch.tensor(movers, device=buffer.device)
            buffer[:, :, to, :width] = buffer[:, :, sources, :width]
        self._lengths = [self._lengths[i] for i in order]
        self.rows = count
        return order

    def step_packed(self, tokens, positions, adapters, pieces) -> tuple[torch.Tensor, list]:
        raise RuntimeError("the static KV cache does not pack prompt pieces into its steps (packable is False)")

    def clear(self) -> None:
        self.rows = 0
        self._lengths = []

    # --- one step -----------------------------------------------------------------------------

    def decode(self, tokens: list[int], positions: list[int], adapters: list[str | None]) -> torch.Tensor:
        """One token for every row; returns [rows, vocab] fp32 logits."""
        rows = len(tokens)
        assert rows == self.rows, (rows, self.rows)
        # Each row writes its new token's key and value at its position: the column count needed
        # is the largest position + 1.
        need = max(positions) + 1
        if need > self.max_len:
            raise RuntimeError(f"position {need - 1} is past the KV cache length {self.max_len}")
        names = [a or PEFT_BASE for a in adapters]
        if self.graphs:
            logits = self._decode_graph(tokens, positions, names, need)
        else:
            logits = self._decode_eager(tokens, positions, names, need)
        self._lengths = [p + 1 for p in positions]
        return logits

    def _decode_eager(self, tokens, positions, names, width) -> torch.Tensor:
        step = _Step(self, len(tokens), width)
        step.load(tokens, positions)
        with torch.inference_mode():
            return step.forward(names, routing=Routing.EAGER)[: len(tokens)]

    def _decode_graph(self, tokens, positions, names, need) -> torch.Tensor:
        rows = len(tokens)
        bucket = next(b for b in _buckets(self.capacity) if b >= rows)
        width = next(w for w in _widths(self.max_len) if w >= need)
        fused = self._fused()
        if fused is not None and not fused.sync_pool():  # a LoRA variant or bias: eager steps
            return self._decode_eager(tokens, positions, names, need)
        padded = names + [PEFT_BASE] * (bucket - rows)
        inputs = (tokens + [0] * (bucket - rows), positions + [0] * (bucket - rows))
        step = self._captured(bucket, width, padded, inputs, fused)
        if step is None:  # its capture failed: no graphs from now on
            return self._decode_eager(tokens, positions, names, need)
        step.load(*inputs)
        with torch.inference_mode():
            return step.replay(padded)[:rows].clone()

    def capture_all(self) -> tuple[int, float]:
        """Capture the decode step of every (rows, width) bucket now, before any request runs,
        so that none is captured (a pause for every running stream) under traffic. Returns the
        graphs captured and the seconds it took. A later change of the model's structure (the
        first adapter of a model that had none, a new pool: a layer no adapter had, a higher
        rank, more adapters than slots) still captures again, bucket by bucket, as they run."""
        if not self.graphs or self._buffer is None or self.rows:
            return 0, 0.0
        fused = self._fused()
        if fused is not None and not fused.sync_pool():  # a LoRA variant or bias: eager steps
            return 0, 0.0
        started, before = time.perf_counter(), self.captures
        # Padding rows at position 0: what the warm-up passes write into the slots is overwritten
        # by the first rows that join. A failed capture turns graphs off: the rest is not tried.
        buckets = [(b, w) for b in _buckets(self.capacity) for w in _widths(self.max_len)]
        for bucket, width in buckets:
            zeros = [0] * bucket
            if self._captured(bucket, width, [PEFT_BASE] * bucket, (zeros, zeros), fused, live=False) is None:
                break
        return self.captures - before, time.perf_counter() - started

    def _captured(self, bucket, width, names, inputs, fused, *, live: bool = True) -> _Step | None:
        """The (bucket, width) step's graph, captured now if it has none (`live`: under traffic,
        told to on_capture); None when its capture failed (graphs are then off)."""
        # Loads, evictions and reloads copy into the adapter pool in place; only a new pool (a
        # new layer, a higher rank, more adapters than slots) or the first adapter recaptures.
        key = (id(self.runner.model), fused.pool_version if fused else None)
        if key != self._graph_key:
            self._steps.clear()
            self._graph_key = key
        step = self._steps.get((bucket, width))
        if step is not None:
            return step
        step = _Step(self, bucket, width)
        # The warm-up passes write this step's keys and values into the cache: with this
        # step's own inputs, what they write is what the replay writes again.
        step.load(*inputs)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                step.capture(names, self._graph_pool())
        except GraphCaptureError:
            log.exception(
                "CUDA graph capture failed for %d rows x %d columns: decoding without graphs from now on",
                bucket,
                width,
            )
            self.graphs = False
            self._steps.clear()
            self._on_graphs_off()
            return None
        self._steps[(bucket, width)] = step
        self.captures += 1
        seconds = time.perf_counter() - started
        if live:
            self._on_capture(seconds)
            log.info("captured the decode step for %d rows x %d columns in %.2f s", bucket, width, seconds)
        return step

    # --- internals ----------------------------------------------------------------------------

    @property
    def buffer(self) -> torch.Tensor | None:
        """The slots: [layers, 2 (keys, values), slots, max_len, kv_heads, head_dim]."""
        return self._buffer

    def reserve(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Allocate the buffer now (at start: a reservation that does not fit fails the start,
        not the first request); otherwise the first join allocates it from its cache's shape."""
        shape = (layers, 2, self.capacity, self.max_len, kv_heads, head_dim)
        # Zeros, not empty: padding rows of a captured step read their slots, and garbage there
        # could be NaN (harmless, since those rows are dropped, but never worth the doubt).
        self._buffer = torch.zeros(shape, dtype=dtype, device=self.runner.device)
        flat = self._buffer.view(layers, 2, self.capacity * self.max_len, kv_heads, head_dim)
        self._flat = [(flat[i, 0], flat[i, 1]) for i in range(layers)]
        log.info(
            "static KV cache: %d slots x %d positions, %.2f GiB",
            self.capacity,
            self.max_len,
            self._buffer.numel() * self._buffer.element_size() / 2**30,
        )

    def _allocate(self, cache: DynamicCache) -> None:
        first = cache.layers[0].keys  # [rows, kv_heads, tokens, head_dim]
        self.reserve(len(cache.layers), first.shape[1], first.shape[3], first.dtype)

    def _fused(self) -> FusedMixedLoRA | None:
        self.runner.lora.reserve(self.lora_slots)  # the pool's shape never changes under the graphs
        return self.runner.lora.fused_layers()

    def _graph_pool(self):
        if self._pool is None and self.runner.device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool


def _layout(source: DynamicCache | torch.Tensor) -> tuple:
    """(layers, KV heads, head size, dtype) of a prefilled cache or of the slot buffer."""
    if isinstance(source, torch.Tensor):  # [layers, 2, slots, max_len, heads, dim]
        return source.shape[0], source.shape[4], source.shape[5], source.dtype
    first = source.layers[0].keys  # [rows, heads, tokens, dim]
    return len(source.layers), first.shape[1], first.shape[3], first.dtype


def kv_shape(config: Any) -> tuple[int, int, int] | None:
    """(layers, KV heads, head size) of a decoder's cache, from its config (None: unknown)."""
    config = getattr(config, "get_text_config", lambda: config)()
    try:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return config.num_hidden_layers, heads, head_dim
    except AttributeError:
        return None


def graphs_unavailable(runner: ModelRunner, enabled: bool) -> str | None:
    """Why this runner's decode steps will not be replayed from CUDA graphs (None: they will)."""
    if runner.device.type != "cuda":
        return "not on CUDA"
    if not enabled:
        return "CUDA_GRAPHS is off"
    return capture_unsupported(runner.model)


def capture_unsupported(model: Any) -> str | None:
    """Why a decode step of this model cannot be captured in a CUDA graph (None: it can)."""
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            # LLM.int8() looks for outlier columns on the host every call (`outliers.any()`).
            return "bitsandbytes 8-bit layers synchronise with the host"
    return None


class GraphCaptureError(RuntimeError):
    """A decode step ran eagerly but could not be captured in a CUDA graph."""


class _SlotView:
    """What the attention layers see as the cache: each row's new key and value are written at
    its own position in its slot; the layer then attends over the first `width` columns."""

    def __init__(self, kv: SlotKV, rows: int, width: int, write: torch.Tensor):
        self.kv, self.rows, self.width = kv, rows, width
        self.write = write  # [rows] flat index slot * max_len + position

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        flat_keys, flat_values = self.kv._flat[layer_idx]
        flat_keys.index_copy_(0, self.write, keys[:, :, 0])  # keys: [rows, kv_heads, 1, head_dim]
        flat_values.index_copy_(0, self.write, values[:, :, 0])
        buffer = self.kv._buffer
        assert buffer is not None  # a step runs only on rows that joined
        return (
            buffer[layer_idx, 0, : self.rows, : self.width].transpose(1, 2),
            buffer[layer_idx, 1, : self.rows, : self.width].transpose(1, 2),
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    # What transformers' mask helpers ask of a cache when a model passes them a 2D mask (ALiBi
    # models): every query may see all `width` columns, and the 2D mask hides each row's future.
    # Compileable, so that no helper skips the mask on a check that would read the device.
    is_compileable = True

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.width - 1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.width, 0


class _Step:
    """The static inputs and outputs of one (rows, width) decode step, and its CUDA graph."""

    def __init__(self, kv: SlotKV, rows: int, width: int):
        self.kv, self.rows, self.width = kv, rows, width
        device = kv.runner.device
        self.inputs = torch.zeros((2, rows), dtype=torch.long, device=device)  # tokens, positions
        self.columns = torch.arange(width, device=device)
        self.slots = torch.arange(rows, device=device) * kv.max_len
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def load(self, tokens: list[int], positions: list[int]) -> None:
        self.inputs.copy_(torch.tensor([tokens, positions]), non_blocking=False)

    def forward(self, names: list[str], *, routing: Routing) -> torch.Tensor:
        runner = self.kv.runner
        tokens, positions = self.inputs[0].unsqueeze(1), self.inputs[1].unsqueeze(1)
        mask = (self.columns.unsqueeze(0) <= positions)[:, None, None, :]  # [rows, 1, 1, width]
        if runner.mask_2d:  # the model builds its ALiBi biases and 4D mask from [rows, width]
            mask = mask[:, 0, 0].long()
        elif runner.additive_mask is not None:  # eager attention adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=runner.additive_mask, device=mask.device).masked_fill_(
                ~mask, torch.finfo(runner.additive_mask).min
            )
        view = _SlotView(self.kv, self.rows, self.width, self.slots + self.inputs[1])
        out = runner.forward_slots(
            names,
            routing=routing,
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{runner.cache_kwarg: view},
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def capture(self, names: list[str], pool) -> None:
        """Warm up, then capture the step in a CUDA graph. Off CUDA (tests), only the warm-up:
        `replay` then runs the same statically routed forward pass eagerly."""
        if self.kv.runner.device.type != "cuda":
            self.forward(names, routing=Routing.STATIC)
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: kernels chosen, the adapter pool and row masks made
                self.forward(names, routing=Routing.STATIC)
        torch.cuda.current_stream().wait_stream(stream)
        graph = self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                self.logits = self.forward(names, routing=Routing.CAPTURE)
        except Exception as exc:  # the warm-up ran: the step itself works, its capture does not
            self.graph = None
            raise GraphCaptureError(f"{type(exc).__name__}: {exc}") from exc

    def replay(self, names: list[str]) -> torch.Tensor:
        if self.graph is None:
            return self.forward(names, routing=Routing.STATIC)
        with self.kv.runner.pool_routing(names):  # the rows' adapters, into the mask buffers
            self.graph.replay()
        assert self.logits is not None  # the capture's output buffer
        return self.logits


def _buckets(capacity: int) -> list[int]:
    """Row counts a step is captured for: powers of two, then the capacity itself."""
    sizes, b = [], 1
    while b < capacity:
        sizes.append(b)
        b *= 2
    return [*sizes, capacity]


def _widths(max_len: int) -> list[int]:
    """Column counts a step is captured for: powers of two from 64, then max_len itself."""
    widths, w = [], _MIN_WIDTH
    while w < max_len:
        widths.append(w)
        w *= 2
    return [*widths, max_len]
