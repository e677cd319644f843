"""Healing adapters on a ``FirstModel`` context (docs/FORMAT.md section 6): load, switch per decode.

``Healing`` is a mixin of ``FirstModel``: llama.cpp's LoRA support (``llama_adapter_lora_init``,
``llama_set_adapters_lora``) runs an adapter only while a decode mask that skips exactly its
set runs; ``engine.py`` decides when that is. Adapters come from ``FirstModel(heal=...)`` or
from an operating point that names one (the file beside the GGUF).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Sequence

from llama_cpp import llama_cpp

from ..errors import FirstError


class Healing:
    """Adapter methods of ``FirstModel`` (``heals``, ``heal_on``, ``_adapters`` and ``_healing`` are its)."""

    def _load_heals(self, paths: Sequence[str | Path]) -> list[Any]:
        from ..format import read_heal

        adapters = []
        for path in paths:
            info = read_heal(path)
            if info.n_layer != self.n_layer:
                raise FirstError(f"{path}: heals a model of {info.n_layer} layers; {self.model_path} has {self.n_layer}")
            if any(h.skip == info.skip for h in self.heals):
                raise FirstError(f"{path}: a second healing adapter for skip set {list(info.skip)}")
            adapter = llama_cpp.llama_adapter_lora_init(self._model.model, str(path).encode())
            if not adapter:
                raise FirstError(f"{path}: llama.cpp refused the adapter for {self.model_path} "
                                 f"(another architecture or tensor shapes; see the library log)")
            self.heals.append(info)
            adapters.append(adapter)
        return adapters

    def _use_heal(self, decode_mask: Sequence[bool] | None) -> bool:
        """Apply the healing adapter whose skip set ``decode_mask`` skips, if any; returns whether one is on."""
        pick = None if decode_mask is None or not self.heal_on else next(
            (i for i, h in enumerate(self.heals) if h.heals(decode_mask)), None)
        self._set_adapter(pick)
        return pick is not None

    def _set_adapter(self, pick: int | None) -> None:
        """Put the loaded adapter number ``pick`` on the context (None: none)."""
        if pick != self._healing:
            if pick is not None:
                adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[pick])
                rc = llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
            else:
                rc = llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
            if rc != 0:
                raise FirstError(f"llama_set_adapters_lora failed (code {rc})")
            self._healing = pick

    def _load_point_heal(self, p: Any) -> None:
        """Load the adapter a skip point names, from the GGUF's directory, unless it is already loaded."""
        from ..format import read_heal

        path = Path(self.model_path).parent / p.heal
        if not path.is_file():
            raise FirstError(f"{self.model_path}: point {p.name!r} is healed by {p.heal}, which is not beside it")
        loaded = next((h for h in self.heals if h.skip == p.skip), None)
        if loaded is not None and Path(loaded.path).resolve() != path.resolve():
            raise FirstError(f"point {p.name!r} names {path}, but {loaded.path} heals skip set {list(p.skip)} here")
        if loaded is None:
            if (skip := read_heal(path).skip) != p.skip:
                raise FirstError(f"{path}: heals skip set {list(skip)}; point {p.name!r} skips {list(p.skip)}")
            self._adapters += self._load_heals([path])
