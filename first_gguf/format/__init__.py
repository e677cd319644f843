"""The GGUF / router-file format layer: the one door the rest of first-gguf goes through.

numpy + gguf + safetensors only, never torch (a user who only converts and chats installs no
torch). Inside: ``header`` (a fast, safe GGUF reader), ``rules`` (the FiRST-GGUF rules every
reader applies), ``routers`` (``RouterSet``, the untrained recipe), ``router_file``
(.safetensors router files), ``reader`` (validate and read a FiRST-GGUF), ``inspection``
(``first-gguf inspect``), ``points`` (named operating points) and ``points_json`` (their JSON form),
``thin`` (thinned FFNs, read and checked), ``vocab`` (the short output vocabulary, read and
checked), ``writer`` (byte-exact GGUF rewrite), ``attach`` (also ``stamp_points``), ``thin_write``
(``write_thin``), ``vocab_write`` (``write_vocab``) and ``prune``.
The strings of the format are ``first_gguf.constants``; the generic output helpers (refuse
to overwrite, write then rename) are ``first_gguf.paths``.
"""

from __future__ import annotations

from .attach import attach_checked, attach_routers, stamp_points
from .heal import HealInfo, read_heal, stamp_heal
from .header import GGUFHeader, read_header
from .inspection import format_inspect, inspect_gguf
from .points import Point, Points
from .points_json import load_points
from .prune import parse_layers, prune_gguf
from .reader import (FirstParts, gguf_w1_dtype, is_first_gguf, open_gguf, read_first, read_first_parts, read_points,
                     read_routers, read_thin, read_vocab, validate_first_gguf)
from .router_file import checked_routers, load_router_file, save_router_file, stored_w1_dtype
from .routers import RouterSet, make_identity_routers
from .thin import ThinInfo, top_neurons
from .thin_write import write_thin, write_thin_from_scores
from .vocab import VocabInfo
from .vocab_write import write_vocab, write_vocab_from_counts

__all__ = [
    "RouterSet", "make_identity_routers",
    "save_router_file", "load_router_file", "stored_w1_dtype", "checked_routers",
    "attach_routers", "attach_checked", "stamp_points", "prune_gguf", "parse_layers",
    "Point", "Points", "load_points", "read_points", "read_first",
    "read_routers", "validate_first_gguf", "is_first_gguf", "gguf_w1_dtype", "inspect_gguf", "format_inspect",
    "open_gguf", "read_header", "GGUFHeader", "HealInfo", "read_heal", "stamp_heal",
    "FirstParts", "read_first_parts", "ThinInfo", "read_thin", "top_neurons", "write_thin", "write_thin_from_scores",
    "VocabInfo", "read_vocab", "write_vocab", "write_vocab_from_counts",
]
