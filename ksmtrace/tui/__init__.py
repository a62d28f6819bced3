"""The Textual observatory behind `ksmtrace top` (see app.py)."""
