"""Operations over checkpoints: convert, cast, scan, verify, diff, merge."""
