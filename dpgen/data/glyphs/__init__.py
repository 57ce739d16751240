"""Public data rendered offline from the fonts that ship with matplotlib."""

from dpgen.data.glyphs.public import build_glyphs, glyph_cache_path, validate_glyphs_config

__all__ = ["build_glyphs", "glyph_cache_path", "validate_glyphs_config"]
