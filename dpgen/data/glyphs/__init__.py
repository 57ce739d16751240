"""Public data rendered offline from the fonts that ship with matplotlib."""
