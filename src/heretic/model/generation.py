"""Batched forward passes: greedy responses, last-position residuals, first-response-position logits.

Three exact savings over a plain `generate` call:
- prompts are batched in order of length, so little padding is computed;
- the token prefix that all prompts of a batch share (system prompt and chat-template preamble)
  is computed once and its KV cache copied to every row;
- a response stops as soon as its verdict is fixed (end of text, or the caller's `is_decided`),
  and finished rows leave the batch.
Rows are independent, so each response equals the one a full-length batch would give (up to
floating-point reassociation, which the tests bound).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from ..errors import HereticError
from ..prompts import Prompt
from .offload import execution_device
from .reuse import LayerReuse
from .template import format_chat

# (index of the prompt, generated token ids so far) -> True once the response needs no more tokens.
DecidedFn = Callable[[int, list[int]], bool]
# Called after every decoding step; returning True abandons the rest of the generation.
AbortFn = Callable[[], bool]
# (index of the prompt, its whole response's token ids): called once a response ends (end of text or the
# token limit), in the decoding step it ends in; never for a response `is_decided` stopped.
FinishedFn = Callable[[int, list[int]], None]
ProgressFn = Callable[[int], None]

# The longest prompt (chat template included) that reaches the model, in tokens, whatever the model's
# context: attention over one long prompt grows with the square of its length, so a single huge
# prompt would otherwise make memory grow until the process is killed. Refusal prompts are short.
MAX_PROMPT_TOKENS = 8192
# Model types whose recurrent state cannot continue a shared prompt prefix (see Engine).
UNSHARED_PREFIX_TYPES = {"minimax"}


@dataclass
class Batch:
    indices: list[int]  # positions of the rows in the caller's prompt list
    prefix: list[int]  # token ids shared by every row
    suffixes: list[list[int]]  # the rest of each row's ids


class Engine:
    """Runs a causal LM (optionally wrapped by PEFT) on chat prompts."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        batch_size: int = 8,
        share_prefix: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.batch_size = max(1, batch_size)
        self.length_order = True  # batch prompts in order of length (False: in the caller's order)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.response_prefix = ""
        # transformers renamed `past_key_values` to `cache` (5.2x); accept both.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        parameters = inspect.signature(base.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        if "attention_mask" not in parameters:
            raise HereticError(
                f"{type(base).__name__} takes no attention mask, so the padding of prompts batched together would "
                "change its responses; such models are not supported."
            )
        # A recurrent model without positions (Mamba), or one whose state decays over the padding between a shared
        # prefix and the suffix and is not copied to each row (MiniMax's lightning attention): prompts run whole.
        recurrent = "position_ids" not in parameters or getattr(base.config, "model_type", None) in UNSHARED_PREFIX_TYPES
        self.share_prefix = share_prefix and not recurrent
        make_head_input_contiguous(model)
        self.sliding_window = sliding_window(model)
        self.max_prompt_tokens = prompt_token_limit(model)
        self.reuse: LayerReuse | None = None  # the original's prompt passes, reused by trials (model/reuse.py)

    def _forward(self, cache: object | None, keep: int = 1, **inputs: object) -> tuple[torch.Tensor, object]:
        """One forward pass keeping the last position's logits; returns (logits (rows, vocab), cache).
        With keep > 1, the last `keep` positions' logits: (rows, keep, vocab)."""
        inputs[self._cache_argument] = cache
        output = self.model(use_cache=True, logits_to_keep=keep, **inputs)
        new_cache = getattr(output, "cache", None)
        if new_cache is None:
            new_cache = getattr(output, "past_key_values", None)
        if new_cache is None:
            raise HereticError(
                f"{type(self.model).__name__} returns no cache from a forward pass (it has none, or keeps its state inside "
                "the model); generating with such models is not supported."
            )
        return (output.logits[:, -1, :] if keep == 1 else output.logits[:, -keep:, :]), new_cache

    @property
    def device(self) -> torch.device:
        """Where the input ids go: the embeddings' execution device (accelerate's, when they are offloaded)."""
        embeddings = self.model.get_input_embeddings()
        return execution_device(embeddings, embeddings.weight.device)

    # --- Tokenization -------------------------------------------------------------------------

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        if not prompts:
            return []
        texts = [format_chat(self.tokenizer, p.system, p.user, self.response_prefix) for p in prompts]
        encoded = [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for prompt, ids in zip(prompts, encoded):
            if len(ids) > self.max_prompt_tokens:
                start = " ".join(prompt.user.split()[:8])[:60]
                raise HereticError(
                    f"The prompt starting {start!r} is {len(ids):,} tokens long, more than the {self.max_prompt_tokens:,} "
                    "this model can read at once; shorten it or remove it from its prompt set."
                )
        return encoded

    def batches(self, ids: list[list[int]], batch_size: int | None = None, new_tokens: int = 0) -> Iterator[Batch]:
        """Length-sorted batches (longest first: an out-of-memory error shows up at once)."""
        size = batch_size or self.batch_size
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i)) if self.length_order else list(range(len(ids)))
        for start in range(0, len(order), size):
            chosen = order[start : start + size]
            rows = [ids[i] for i in chosen]
            shared = common_prefix_length(rows) if self.share_prefix and len(rows) > 1 else 0
            shared = min(shared, min(len(row) for row in rows) - 1)  # keep >= 1 token per row to run
            # With a shared prefix the padding sits between prefix and suffix; a sliding window counts
            # cache slots, so sharing is only exact while the whole sequence fits in the window.
            if self.sliding_window is not None and max(map(len, rows)) + new_tokens >= self.sliding_window:
                shared = 0
            yield Batch(chosen, rows[0][:shared], [row[shared:] for row in rows])

    # --- Forward passes -----------------------------------------------------------------------

    def _prefill(self, batch: Batch, keep: int = 1) -> tuple[torch.Tensor, object, torch.Tensor, torch.Tensor]:
        """Run prefix + suffixes; return (last-position logits, cache, attention mask, last positions).
        With keep > 1 the logits are the last `keep` positions': (rows, keep, vocab)."""
        device = self.device
        rows = len(batch.suffixes)
        cache = None
        prefix_length = len(batch.prefix)
        if prefix_length:
            prefix = torch.tensor([batch.prefix], device=device)
            _, cache = self._forward(None, input_ids=prefix)
            select_rows(cache, torch.zeros(rows, dtype=torch.long, device=device))  # copy the prefix to each row
        pass_context = self._reused_pass(batch)
        width = max(len(row) for row in batch.suffixes)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((rows, width), dtype=torch.long)
        for row, suffix in enumerate(batch.suffixes):
            input_ids[row, width - len(suffix) :] = torch.tensor(suffix)
            suffix_mask[row, width - len(suffix) :] = 1
        # Positions continue after the prefix, skipping the padding in between.
        positions = prefix_length + (suffix_mask.cumsum(dim=1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones((rows, prefix_length), dtype=torch.long), suffix_mask], dim=1)
        with pass_context as record:
            logits, cache = self._forward(
                cache,
                keep,
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
            )
            if record is not None:
                record.cache = cache
        return logits, cache, mask.to(device), positions[:, -1].to(device)

    def _reused_pass(self, batch: Batch) -> contextlib.AbstractContextManager:
        """The suffix pass's context: recording the original's pass, replaying a recorded one below the
        first layer the adapters change, or nothing (see model/reuse.py)."""
        if self.reuse is None:
            return contextlib.nullcontext()
        key = self.reuse.key(batch.prefix, batch.suffixes)
        if self.reuse.should_record(key):
            return self.reuse.record(key, len(batch.prefix))  # the cache holds the prefix's positions first
        start = self.reuse.start_layer(key)
        if start > 0:
            return self.reuse.replay(key, start, self.device)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def first_logprobs(self, ids: list[list[int]], progress: ProgressFn | None = None) -> torch.Tensor:
        """log-softmax of the first response position's raw logits, (prompts, vocab), float32, on CPU."""
        result: list[torch.Tensor | None] = [None] * len(ids)
        for batch in self.batches(ids):
            logits, _, _, _ = self._prefill(batch)
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, index in enumerate(batch.indices):
                result[index] = logprobs[row]
            if progress:
                progress(len(batch.indices))
        return torch.stack(result)  # type: ignore[arg-type]

    @torch.inference_mode()
    def last_logprobs(self, ids: list[list[int]], keep: int, progress: ProgressFn | None = None) -> torch.Tensor:
        """log-softmax of the last `keep` positions' raw logits, (prompts, keep, vocab), float32, on CPU.
        The kept positions must lie in the suffix pass: a batch whose shortest suffix is shorter runs unshared."""
        result: list[torch.Tensor | None] = [None] * len(ids)
        for batch in self.batches(ids):
            if min(map(len, batch.suffixes)) < keep:
                batch = Batch(batch.indices, [], [batch.prefix + suffix for suffix in batch.suffixes])
            logits, _, _, _ = self._prefill(batch, keep)
            logits = logits.unsqueeze(1) if keep == 1 else logits  # (rows, keep, vocab)
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, index in enumerate(batch.indices):
                result[index] = logprobs[row]
            if progress:
                progress(len(batch.indices))
        return torch.stack(result)  # type: ignore[arg-type]

    @torch.inference_mode()
    def residuals(
        self, ids: list[list[int]], layers: Sequence[torch.nn.Module], progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """Hidden states at the last prompt position: (prompts, layers + 1, hidden), float32, on CPU.

        Index 0 is the input of the first layer (the embedding output), index i+1 the output of layer i.
        """
        return self.position_residuals(ids, layers, (-1,), progress)[:, 0]

    @torch.inference_mode()
    def position_residuals(
        self,
        ids: list[list[int]],
        layers: Sequence[torch.nn.Module],
        offsets: Sequence[int],
        progress: ProgressFn | None = None,
        mean: bool = False,
    ) -> torch.Tensor:
        """Hidden states at the prompt positions `offsets` (negative, from the end: -1 is the last token):
        (prompts, offsets, layers + 1, hidden), float32, on CPU. Layer indices as in `residuals`. With `mean`,
        their mean over the offsets, taken batch by batch: (prompts, layers + 1, hidden).

        Offsets other than -1 read the chat template's last tokens, which a shared prefix could hold for
        very short prompts, so prefix sharing is off for them."""
        captured: list[torch.Tensor] = []
        index = torch.tensor(list(offsets))

        def keep_input(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.append(hidden[:, index, :].float().cpu())

        def keep_output(_module: torch.nn.Module, _args: tuple, output: object) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            captured.append(hidden[:, index, :].float().cpu())  # type: ignore[index]

        if min(offsets) < -min(map(len, ids)):
            raise HereticError(
                f"A prompt is shorter than the {-min(offsets)} tokens --direction-positions reads; use smaller offsets."
            )
        share_prefix, reuse = self.share_prefix, self.reuse
        self.share_prefix = share_prefix and list(offsets) == [-1]
        self.reuse = None  # every layer must run: the hooks read each one's output
        handles = [layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)]
        handles += [layer.register_forward_hook(keep_output) for layer in layers]
        result: list[torch.Tensor | None] = [None] * len(ids)
        try:
            for batch in self.batches(ids):
                self._prefill(batch)  # a prefix pass fires the hooks too; the suffix pass comes last
                stacked = torch.stack(captured[-(len(layers) + 1) :], dim=2)  # (rows, offsets, layers + 1, hidden)
                stacked = stacked.mean(dim=1) if mean else stacked  # (rows, layers + 1, hidden)
                captured.clear()
                for row, position in enumerate(batch.indices):
                    result[position] = stacked[row]
                if progress:
                    progress(len(batch.indices))
        finally:
            self.share_prefix, self.reuse = share_prefix, reuse
            for handle in handles:
                handle.remove()
        return torch.stack(result)  # type: ignore[arg-type]

    @torch.inference_mode()
    def generate(
        self,
        ids: list[list[int]],
        max_new_tokens: int,
        is_decided: DecidedFn | None = None,
        should_abort: AbortFn | None = None,
        progress: ProgressFn | None = None,
        batch_size: int | None = None,
        on_finished: FinishedFn | None = None,
    ) -> list[list[int]] | None:
        """Greedy responses (token ids, end-of-text excluded). None if `should_abort` stopped it."""
        responses: list[list[int]] = [[] for _ in ids]
        for batch in self.batches(ids, batch_size, new_tokens=max_new_tokens):
            if not self._generate_batch(batch, responses, max_new_tokens, is_decided, should_abort, progress, on_finished):
                return None
        return responses

    def _generate_batch(
        self,
        batch: Batch,
        responses: list[list[int]],
        max_new_tokens: int,
        is_decided: DecidedFn | None,
        should_abort: AbortFn | None,
        progress: ProgressFn | None,
        on_finished: FinishedFn | None = None,
    ) -> bool:
        device = self.device
        logits, cache, mask, positions = self._prefill(batch)
        active = list(batch.indices)  # caller indices of the rows still in the batch
        for step in range(max_new_tokens):
            tokens = logits.argmax(dim=-1)
            finished: list[int] = []
            last_step = step == max_new_tokens - 1
            for row, (index, token) in enumerate(zip(active, tokens.tolist())):
                if token in self.eos_ids:
                    finished.append(row)
                    if on_finished is not None:
                        on_finished(index, responses[index])
                    continue
                responses[index].append(token)
                if is_decided is not None and is_decided(index, responses[index]):
                    finished.append(row)
                elif last_step and on_finished is not None:
                    on_finished(index, responses[index])
            if progress:
                progress(len(active))
            if should_abort is not None and should_abort():
                return False
            if last_step:
                break
            if finished:
                done = set(finished)
                keep = [row for row in range(len(active)) if row not in done]
                if not keep:
                    break
                keep_index = torch.tensor(keep, dtype=torch.long, device=device)
                select_rows(cache, keep_index)
                mask, positions, tokens = mask[keep_index], positions[keep_index], tokens[keep_index]
                active = [active[row] for row in keep]
            positions = positions + 1
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)
            logits, cache = self._forward(cache, input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None])
        return True

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def select_rows(cache: object, rows: torch.Tensor) -> None:
    """Keep the cache's rows `rows` (in that order). A cache class that selects rows its own way but leaves
    reorder_cache to transformers' Cache (MiniMax's, whose linear-attention states only it knows) is asked
    through batch_select_indices."""
    kind = type(cache)
    own_selection = getattr(kind, "batch_select_indices", None) is not Cache.batch_select_indices
    if isinstance(cache, Cache) and kind.reorder_cache is Cache.reorder_cache and own_selection:
        cache.batch_select_indices(rows)
    else:
        cache.reorder_cache(rows)  # type: ignore[attr-defined]


def make_head_input_contiguous(model: PreTrainedModel) -> None:
    """Give the output embedding a contiguous input.

    With `logits_to_keep=1` the head sees a strided slice of the last hidden state; for such inputs
    some CPU builds of PyTorch, for some shapes, fall back to a naive bf16 GEMM that is far slower than
    the packed one; a contiguous copy of one position per row costs nothing.
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_heretic_contiguous", False):
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    head._heretic_contiguous = handle  # type: ignore[attr-defined]


def sliding_window(model: PreTrainedModel) -> int | None:
    """The smallest attention window of the text model, or None when every layer attends to everything."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and all(kind == "full_attention" for kind in layer_types):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def common_prefix_length(rows: Sequence[Sequence[object]]) -> int:
    """The length of the longest prefix that all rows (token ids, or strings) share."""
    first = rows[0]
    length = min(len(row) for row in rows)
    for position in range(length):
        token = first[position]
        if any(row[position] != token for row in rows):
            return position
    return length


def prompt_token_limit(model: torch.nn.Module) -> int:
    """The longest prompt the model is given: its context (max_position_embeddings), at most MAX_PROMPT_TOKENS."""
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    config = getter() if callable(getter) else config
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and context > 0:
        return min(context, MAX_PROMPT_TOKENS)
    return MAX_PROMPT_TOKENS
