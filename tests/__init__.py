"""safeckpt's tests, a package so that test modules import shared helpers as `tests.…` (no sys.path edits)."""
