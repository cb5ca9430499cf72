"""The byte formats under the contract, private to ``protocol``: canonical JSON (``canonical``),
DSSE envelopes (``dsse``), the safetensors header parser (``safetensors``), the pickle scan
(``pickles``), the RFC 9162 Merkle tree (``merkle``), bit-packed masks (``masks``) and the
small-order key checks (``curves``). Nothing outside ``protocol`` imports them; the public
modules (``signing``, ``sealing``, ``audit``, ``masks``, ``canonical``...) are their callers.
"""
