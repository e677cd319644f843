"""Which cache positions of a ``FirstModel`` a prefill may reuse (docs/FORMAT.md section 3).

Positions decoded under a mask lack KV in the layers it skipped, and positions decoded with
thin FFNs have KV computed from another residual stream: each evaluated segment remembers how
its KV was made (``kv``: None for full depth) and, for a ``first`` prefill, its router sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class _Segment:
    """Cache positions [start, end) and how their KV was computed."""

    start: int
    end: int
    kv: bytes | None  # run mask that computed them; None: every layer
    sums: np.ndarray | None  # router sums over these positions (a `first` prefill)


class KvSegments:
    """The segment bookkeeping of ``FirstModel`` (mode, mask, thin, last_prefill, _healing, _segments)."""

    def _prefill_kv(self) -> bytes | None:
        masked = self.mode == "mask" and self.prefill_kind == "masked"
        return _kv_key(self.mask, self.thin) if masked else None

    def _decode_kv(self) -> bytes | None:
        if self.mode == "full":
            return None
        key = _kv_key(self.mask, self.thin) if self.mode == "mask" else (
            _kv_key(self.last_prefill.mask, self.thin) if self.last_prefill else None)
        return key + b"h" if key is not None and self._healing is not None else key

    def _compatible_upto(self, limit: int) -> int:
        """End of the longest prefix of cached segments the next prefill may reuse."""
        need_kv, need_sums = self._prefill_kv(), self.mode == "first"
        end = 0
        for seg in self._segments:
            if seg.start >= limit or seg.kv != need_kv or (need_sums and seg.sums is None):
                break
            if seg.end > limit:  # a segment cut in the middle: its sums are not separable
                break
            end = seg.end
        return end

    def restored_full_depth(self, n: int) -> None:
        """Cache positions [0, n) were loaded from a sequence state saved after a full-depth
        prefill (``first-gguf bench --restore-prompt``): they count as computed at every layer,
        without router sums (so a ``first`` prefill recomputes them)."""
        self.n_tokens = n
        self._segments = [_Segment(0, n, None, None)] if n else []

    def _truncate_segments(self, n: int) -> None:
        kept = []
        for seg in self._segments:
            if seg.start >= n:
                break
            if seg.end > n:
                seg = _Segment(seg.start, n, seg.kv, None)
            kept.append(seg)
        self._segments = kept

    def _record(self, start: int, end: int, kv: bytes | None, sums: np.ndarray | None) -> None:
        if end <= start:
            return
        last = self._segments[-1] if self._segments else None
        if last and last.end == start and last.kv == kv and last.sums is None and sums is None:
            last.end = end
        else:
            self._segments.append(_Segment(start, end, kv, sums))


def _kv_key(mask: Sequence[bool] | None, thin: Sequence[int] = ()) -> bytes | None:
    """How positions decoded under ``mask`` with ``thin`` layers got their KV; None: as at full depth."""
    if (mask is None or all(mask)) and not thin:
        return None
    key = bytes(int(bool(m)) for m in mask) if mask is not None else b""
    return key + (b"t" + bytes(thin) if thin else b"")
