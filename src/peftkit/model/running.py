"""Running the adapted model: ``forward`` and ``generate`` (with per-row ``adapter_names``: see
:mod:`.routing`), activation checkpointing; a mixin of :class:`~peftkit.model.PeftModel`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from peftkit.core.layer import BASE_ADAPTER_NAME, AdapterLayer
from peftkit.model.routing import Routing


class Running:
    """PeftModel's run methods (its state: ``model``, the active adapters, the wrappers)."""

    def forward(self, *args: Any, adapter_names: Sequence[str] | Routing | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the adapters applied.

        Takes the base model's arguments; ``inspect.signature(model.forward)`` shows them, with
        ``adapter_names`` added.

        Args:
            adapter_names: one adapter name per row of the batch (``"__base__"``: no adapter) to mix
                adapters in one batch; each row then gets what it would get alone. Layer adapters only.
                Or a :meth:`routing` made once for several calls over the same rows.

        An active soft prompt adds its virtual tokens to the inputs here
        (see :mod:`peftkit.core.whole_model`).
        """
        for adapter in self._active_model_adapters():
            args, kwargs = adapter.prepare_inputs(self.model, args, kwargs)
        if adapter_names is None:
            return self.model(*args, **kwargs)
        routing = adapter_names if isinstance(adapter_names, Routing) else list(adapter_names)
        with self._routed(routing):
            return self.model(*args, **kwargs)

    def routing(self, adapter_names: Sequence[str]) -> Routing:
        """A per-row routing to pass as ``adapter_names`` to several calls over batches of the same rows.

        Each layer stacks its adapters for a routing on the first call that uses it (the batched LoRA
        path) and the next calls reuse the stacks: a decoding loop outside ``generate`` then pays for
        stacking once, not once per step. Valid while the adapters do not change: make a new one after
        loading, deleting or training adapters.

        Args:
            adapter_names: one adapter name per row (``"__base__"``: no adapter).

        Raises:
            ValueError: an unknown adapter name.
        """
        names = list(adapter_names)
        self._check_known([name for name in names if name != BASE_ADAPTER_NAME])
        return Routing(names, next(self.model.parameters()).device)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``adapter_names`` routes each prompt row as in :meth:`forward`.

        With ``num_beams`` or ``num_return_sequences`` above 1 each name is repeated for its row's copies.
        An active soft prompt starts generation from its virtual tokens.
        """
        for adapter in self._active_model_adapters():
            args, kwargs = adapter.prepare_generate(self.model, args, kwargs)
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        copies = max(kwargs.get("num_beams", 1) or 1, kwargs.get("num_return_sequences", 1) or 1)
        names = [name for name in adapter_names for _ in range(copies)]
        with self._routed(names):
            return self.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The base model (with peftkit's wrappers inside while adapters are loaded)."""
        return self.model

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Turn on the base model's activation (gradient) checkpointing, non-reentrant by default.

        The non-reentrant variant gives adapter gradients even though the frozen inputs of each
        checkpointed block need no gradient, and reads nothing of the base weights, so it works
        whatever their type. ``transformers.Trainer`` calls this for ``gradient_checkpointing=True``
        (``activation_checkpointing=True``), passing ``gradient_checkpointing_kwargs`` as
        ``activation_checkpointing_kwargs``.

        Raises:
            TypeError: the base model has no checkpointing of its own (not a transformers model).
        """
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        # Passed on only when set, so transformers versions before these options keep working.
        options = {} if (every_n_layers, offload) == (1, False) else {"every_n_layers": every_n_layers}
        if offload:
            options["offload"] = True
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
        elif hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
        else:
            raise TypeError(
                f"{type(self.model).__name__} has no activation checkpointing of its own (transformers "
                "models have it); for another model, wrap its blocks in "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself"
            )

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **options: Any
    ) -> None:
        """The older name of :meth:`activation_checkpointing_enable` (non-reentrant by default)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    @contextmanager
    def _routed(self, adapter_names: list[str] | Routing) -> Iterator[None]:
        """Hand every wrapper the routing's function for the block; take it back afterwards."""
        routing = adapter_names if isinstance(adapter_names, Routing) else None
        names = list(routing.groups) if routing is not None else adapter_names
        self._check_known([name for name in names if name != BASE_ADAPTER_NAME])
        model_level = sorted({name for name in [*names, *self._active] if name in self.model_adapters})
        if model_level:
            raise ValueError(
                f"adapter_names (one adapter per row) works with layer adapters only; {model_level} act on "
                "the whole model (soft prompt / selective): run their rows as separate batches"
            )
        if self.merged_adapters:
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge_adapter()")
        routing = routing or Routing(names, next(self.model.parameters()).device)
        wrappers = [wrapper for _, wrapper in self._wrappers()]
        for wrapper in wrappers:
            layer = isinstance(wrapper, AdapterLayer)
            wrapper.route = routing.adapter_layer if layer else routing.modules_to_save
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.route = None
