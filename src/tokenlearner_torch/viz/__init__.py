"""Token maps as numbers and pictures.

``token_maps(model, *inputs)`` and ``token_diversity(maps)`` need torch only; the pictures
(``tokenlearner-viz``, :mod:`.render`) need the ``viz`` extra (matplotlib, Pillow).
"""

from __future__ import annotations

from .maps import MAP_KINDS, TokenDiversity, TokenMaps, map_modules, token_diversity, token_maps

__all__ = ["token_maps", "token_diversity", "TokenMaps", "TokenDiversity", "MAP_KINDS", "map_modules"]
