"""`python -m tunedag ...` is the `tunedag` command."""

from tunedag.cli import main

main()
