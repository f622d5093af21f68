"""`python -m safeckpt.cli`: the `safeckpt` command."""

from . import main

main(prog_name="safeckpt")
