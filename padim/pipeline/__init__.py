"""From a source to a decision: sources, decoding with per-file errors, engines, decisions, records."""
